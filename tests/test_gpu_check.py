"""The prepared GPU check runs (at toy shapes, on the CPU, in bf16), so it does not rot before a GPU
machine runs it; gradient checkpointing of a value model gives the same training step."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_runs_at_toy_shapes_on_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu", "--dtype", "bfloat16",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env_rec = json.loads((tmp_path / "env.json").read_text())
    assert env_rec["placement"] == "cpu bfloat16" and env_rec["shapes"] == "tiny"
    decode = json.loads((tmp_path / "decode.json").read_text())
    methods = {(r["method"], r["batch"]) for r in decode["rows"]}
    assert methods == {(m, b) for m in ("hf_generate", "mavis_m3", "mavis_multihead") for b in (1, 4)}
    assert all(r["tokens_per_s"] > 0 for r in decode["rows"]) and all("ratio_to_hf_generate" in r for r in decode["rows"] if r["method"] != "hf_generate")
    train = json.loads((tmp_path / "train.json").read_text())
    assert [r["gradient_checkpointing"] for r in train["rows"]] == [False, True] and train["frozen_trunk_features_tokens_per_s"] > 0


def test_gradient_checkpointing_gives_the_same_step():
    from mavis_align.train.regression import enable_checkpointing
    from test_train import new_value_model

    a = new_value_model()
    b = copy.deepcopy(a)
    enable_checkpointing(b)
    ids = torch.randint(4, 20, (3, 7))
    mask = torch.ones_like(ids)
    for vm in (a, b):
        vm.train()
        ((vm.score(ids, mask) - 0.5) ** 2).mean().backward()
    ga = {n: p.grad for n, p in a.named_parameters() if p.grad is not None}
    gb = {n: p.grad for n, p in b.named_parameters() if p.grad is not None}
    assert ga.keys() == gb.keys() and all(torch.allclose(ga[n], gb[n], atol=1e-6) for n in ga)
    assert b.backbone.is_gradient_checkpointing
