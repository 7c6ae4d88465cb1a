"""Write ``src/mavis_align/pretrained/default`` (``packaged:default``) from the value-backbones benchmark's
400-prompt model: its heads and meta.json only (the ``trunk:4`` backbone is rebuilt from the base model on
load), with the provenance the demo and ``mavis-align ls values`` show.

    python benchmarks/value_backbones.py          # trains runs/value_backbones/models/trunk4-prompt_response-ridge-400p
    python benchmarks/package_default.py          # -> src/mavis_align/pretrained/default

The tilt recorded (raw values, β=50, k=15) is the one ``benchmarks/tilt_scale.py`` picked with this model on
24 dev prompts (hh-mix test #40 onwards; README "Value models that learn").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mavis_align.values import ValueModel

SOURCE = "runs/value_backbones/models/trunk4-prompt_response-ridge-400p"
TILT = {"beta": 50.0, "normalize": False, "top_k": 15,
        "chosen_by": "benchmarks/tilt_scale.py with this model on 24 hh-mix test prompts from #40 (README 'Value models that learn')"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=SOURCE, help="a value_backbones.py model folder (best/ and result.json inside)")
    ap.add_argument("--out", default="src/mavis_align/pretrained/default")
    args = ap.parse_args()
    src = Path(args.source)
    vm = ValueModel.load(src / "best")
    quality = json.loads((src / "result.json").read_text())["quality"]["per_objective"]
    vm.meta["provenance"] = {
        "trained_by": "python benchmarks/value_backbones.py (configuration 'trunk:4 prompt+response ridge 400p', seed 0)",
        "trees": "hh-mix train prompts 0-400 from pi_ref (L=3, K_root=4, K=2, T=40), 328 train / 72 held-out trees (split by tree)",
        "held_out_quality": {m: {k: quality[m][k] for k in ("r2", "concordance", "concordance_se", "pairs") if k in quality[m]} for m in quality},
        "tilt": TILT,
    }
    vm.save(args.out, with_backbone=False)
    print(f"wrote {args.out}: heads for {', '.join(vm.objectives)} on {vm.meta['backbone']} of {vm.meta['base_model']}")


if __name__ == "__main__":
    main()
