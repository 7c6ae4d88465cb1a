"""Decode speed of two checkouts of mavis-align, A/B, as ratios against HF ``generate`` measured in
the same process (the machines are shared and noisy: alternate the runs and compare medians).

Each run: the embedded default base, three value models of the default backbone (untrained: speed
does not depend on their weights), every objective weighted, k=15, beta 2, 64 forced new tokens,
hh-mix test prompts, batch 1 and 8, ``--reps`` back-to-back pairs (HF generate, then MAVIS).

    PYTHONPATH=/path/to/old/src python benchmarks/decode_ab.py --label old --out results/ab.jsonl
    PYTHONPATH=/path/to/new/src python benchmarks/decode_ab.py --label new --out results/ab.jsonl   # alternate, repeat

Appends one JSON line per run to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

OBJECTIVES = ["helpful", "harmless", "humor"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_ab.jsonl"))
    args = ap.parse_args()

    import mavis_align
    from mavis_align.data import load_prompts
    from mavis_align.decoding.decoder import MavisDecoder
    from mavis_align.generation import SamplingConfig, encode_batch
    from mavis_align.models import format_prompts, load_causal_lm
    from mavis_align.provenance import run_record
    from mavis_align.values import DEFAULT_VALUE_BACKBONE, build_value_model

    torch.manual_seed(0)
    model, tok = load_causal_lm()
    dec = MavisDecoder(model, tok, [build_value_model([o], backbone=DEFAULT_VALUE_BACKBONE, seed=i) for i, o in enumerate(OBJECTIVES)])
    prompts = [p.text for p in load_prompts("hh-mix", "test", tokenizer=tok, limit=8)]
    n = args.tokens
    cfg = SamplingConfig(max_new_tokens=n, min_new_tokens=n, top_k=15, beta=2.0)
    ratios: dict[int, list[float]] = {}
    for b in (1, 8):
        ids, mask = encode_batch(tok, format_prompts(tok, prompts[:b]), "cpu")
        for _ in range(args.reps):
            t = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=n, min_new_tokens=n, top_k=0, top_p=1.0)
            hf = n * b / (time.perf_counter() - t)
            t = time.perf_counter()
            dec.generate(prompts[:b], weights={o: 1.0 for o in OBJECTIVES}, config=cfg, batch_size=b)
            ratios.setdefault(b, []).append(n * b / (time.perf_counter() - t) / hf)
    rec = {"label": args.label, "source": str(Path(mavis_align.__file__).parent), "backbone": DEFAULT_VALUE_BACKBONE,
           "ratio_vs_hf_generate": {str(b): sorted(v) for b, v in ratios.items()}, "run": run_record(vars(args), 0)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps({k: rec[k] for k in ("label", "ratio_vs_hf_generate")}))


if __name__ == "__main__":
    main()
