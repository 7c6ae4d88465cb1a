"""Decoding speed: HF ``generate`` vs the native loop vs MAVIS (fast, naive, LogitsProcessor,
multi-head), on the embedded default base model with value models of the default backbone
(``--backbone``, default ``DEFAULT_VALUE_BACKBONE`` = ``trunk:4``: the base model's first 4 layers, frozen, heads on
the prompt and response means (the default pool);
three such models share one trunk forward per step).

All methods run in this one process, one after another, with the same prompts; every number is
also given as a ratio to HF ``generate`` sampling measured in the same run (the machine is shared
and noisy). Every sequence is forced to the full length (``min_new_tokens``), so tokens/s compare
equal work. Value models are untrained: speed does not depend on their weights. The naive
path (uncached, every candidate sequence run alone) decodes all 64 tokens at batch 1 but only
16 at batch 8 (it takes minutes otherwise); its cost per token grows with length, so its batch-8
figure flatters it. Peak memory: a fresh subprocess per row loads the base model and the saved
value models that row needs and decodes once (VmHWM of that process), next to the models'
parameter memory.

    python benchmarks/decode.py [--new-tokens 64] [--reps 2] [--no-memory]

Writes ``benchmarks/results/decode.json`` and ``benchmarks/results/decode.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from mavis_align.data import load_prompts
from mavis_align.decoding.decoder import MavisDecoder
from mavis_align.decoding.processor import MavisLogitsProcessor
from mavis_align.generation import SamplingConfig, encode_batch
from mavis_align.models import format_prompts, load_causal_lm
from mavis_align.provenance import run_record
from mavis_align.values import DEFAULT_VALUE_BACKBONE, ValueModel, build_value_model

OBJECTIVES = ["helpful", "harmless", "humor"]
K = 15
BETA = 2.0
BACKBONE = DEFAULT_VALUE_BACKBONE  # set from --backbone in main()


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Bench:
    """Loaded models and prompts; ``run(method, batch, m, n_tokens)`` decodes once."""

    def __init__(self, singles: int = 3, multi: bool = True, vm_dir: Path | None = None):
        torch.manual_seed(0)
        self.model, self.tok = load_causal_lm()
        if vm_dir is not None:  # memory runs load saved value models (no base-model copy for PCA)
            self.singles = [ValueModel.load(vm_dir / n) for n in OBJECTIVES[:singles]]
            self.multi = ValueModel.load(vm_dir / "multi") if multi else None
        else:
            self.singles = [build_value_model([n], backbone=BACKBONE, seed=i) for i, n in enumerate(OBJECTIVES[:singles])]
            self.multi = build_value_model(OBJECTIVES, backbone=BACKBONE, seed=7) if multi else None
        gc.collect()
        self.prompts_all = [p.text for p in load_prompts("hh-mix", "test", tokenizer=self.tok, limit=8)]

    def run(self, method: str, batch: int, m: int, n: int) -> None:
        tok, model = self.tok, self.model
        prompts = self.prompts_all[:batch]
        ids, mask = encode_batch(tok, format_prompts(tok, prompts), "cpu")
        cfg = SamplingConfig(max_new_tokens=n, min_new_tokens=n, top_k=K, beta=BETA)
        w = {o: 1.0 for o in OBJECTIVES[:m]}
        if method in ("hf_generate", "logits_processor"):
            procs = [MavisLogitsProcessor(self.singles[:m], w, beta=BETA, top_k=K, attention_mask=mask)] if method == "logits_processor" else []
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=n, min_new_tokens=n,
                           top_k=0, top_p=1.0, temperature=1.0, pad_token_id=tok.pad_token_id, logits_processor=procs)
        elif method == "native_no_values":
            MavisDecoder(model, tok).generate(prompts, config=SamplingConfig(max_new_tokens=n, min_new_tokens=n), batch_size=batch)
        elif method in ("mavis_fast", "mavis_naive"):
            MavisDecoder(model, tok, self.singles[:m]).generate(prompts, weights=w, config=cfg, batch_size=batch, naive=method == "mavis_naive")
        elif method == "mavis_multihead":
            MavisDecoder(model, tok, [self.multi]).generate(prompts, weights={o: 1.0 for o in OBJECTIVES}, config=cfg, batch_size=batch)
        else:
            raise ValueError(method)


PLAN = [("hf_generate", 0), ("native_no_values", 0)] + [(m, k) for k in (1, 2, 3) for m in ("mavis_fast", "logits_processor", "mavis_naive")] + [("mavis_multihead", 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--naive-tokens-batched", type=int, default=16, help="tokens for the naive path at batch > 1 (it is very slow there)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--backbone", default=DEFAULT_VALUE_BACKBONE, help="value-model backbone (see `mavis-align ls backbones`)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method peak-memory subprocesses")
    ap.add_argument("--memory-only", action="store_true", help="only (re)measure memory for the rows in results/decode.json")
    ap.add_argument("--single", help=argparse.SUPPRESS)
    ap.add_argument("--vm-dir", help=argparse.SUPPRESS)  # METHOD:BATCH:M:TOKENS -> prints peak RSS (memory subprocess)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    if args.single:
        method, batch, m, n = args.single.split(":")
        m_single = 0 if method in ("hf_generate", "native_no_values", "mavis_multihead") else int(m)
        bench = Bench(singles=m_single, multi=method == "mavis_multihead", vm_dir=Path(args.vm_dir))
        params = sum(p.numel() * p.element_size() for mod in [bench.model, *bench.singles, *([bench.multi] if bench.multi else [])] for p in mod.parameters())
        bench.run(method, int(batch), int(m), int(n))
        print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1), "param_mb": round(params / 2**20, 1)}))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.memory_only:
        saved = json.loads((out / "decode.json").read_text())
        records = saved["records"]
        measure_memory(records)
        write_results(out, records, saved["run"])
        return

    bench = Bench()
    records = []
    for batch in [int(b) for b in args.batches.split(",")]:
        base_tps = None
        for method, m in PLAN:
            n = args.new_tokens if (method != "mavis_naive" or batch == 1) else args.naive_tokens_batched
            bench.run(method, batch, m, 2)  # warm-up
            best = float("inf")
            for _ in range(1 if method == "mavis_naive" else args.reps):
                t0 = time.perf_counter()
                bench.run(method, batch, m, n)
                best = min(best, time.perf_counter() - t0)
            rec = {"method": method, "batch": batch, "M": m, "new_tokens": n, "tokens_per_s": round(batch * n / best, 2), "seconds": round(best, 3)}
            if method == "hf_generate":
                base_tps = rec["tokens_per_s"]
            rec["ratio_vs_hf_generate"] = round(rec["tokens_per_s"] / base_tps, 3)
            records.append(rec)
            print(json.dumps(rec), flush=True)
        for rec in records:
            if rec["batch"] == batch and rec["method"] == "mavis_fast":
                naive = next(r for r in records if r["batch"] == batch and r["method"] == "mavis_naive" and r["M"] == rec["M"])
                rec["ratio_vs_naive"] = round(rec["tokens_per_s"] / naive["tokens_per_s"], 2)

    del bench
    gc.collect()
    meta = run_record({"new_tokens": args.new_tokens, "naive_tokens_batched": args.naive_tokens_batched, "reps": args.reps, "top_k": K, "beta": BETA,
                       "value_backbone": BACKBONE, "threads": torch.get_num_threads(), "prompts": "hh-mix test[:batch]"}, 0)
    write_results(out, records, meta)
    if not args.no_memory:
        measure_memory(records)
        write_results(out, records, meta)


def measure_memory(records: list[dict]) -> None:
    """Peak RSS of a fresh process per row that loads the base model and the saved value models it
    needs and decodes once; plus the parameter memory of those models."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        vm_dir = Path(tmp)
        for i, n in enumerate(OBJECTIVES):
            build_value_model([n], backbone=BACKBONE, seed=i).save(vm_dir / n)
        build_value_model(OBJECTIVES, backbone=BACKBONE, seed=7).save(vm_dir / "multi")
        for rec in records:
            cmd = [sys.executable, __file__, "--backbone", BACKBONE, "--single", f"{rec['method']}:{rec['batch']}:{rec['M']}:{rec['new_tokens']}", "--vm-dir", str(vm_dir)]
            line = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            mem = json.loads(line)
            rec["peak_rss_mb"] = mem["peak_rss_mb"]
            rec["param_mb"] = mem["param_mb"]
            print(rec["method"], rec["batch"], rec["M"], mem, flush=True)


def write_results(out: Path, records: list[dict], meta: dict) -> None:
    (out / "decode.json").write_text(json.dumps({"run": meta, "records": records}, indent=2) + "\n")
    lines = ["| method | M | batch | new tokens | tokens/s | × HF generate | × naive | peak RSS MB | params MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        mem = f"{r['peak_rss_mb']:.0f} | {r['param_mb']:.0f}" if "peak_rss_mb" in r else "- | -"
        nv = f"{r['ratio_vs_naive']:.1f}" if "ratio_vs_naive" in r else ""
        lines.append(f"| {r['method']} | {r['M']} | {r['batch']} | {r['new_tokens']} | {r['tokens_per_s']:.1f} | {r['ratio_vs_hf_generate']:.2f} | {nv} | {mem} |")
    (out / "decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
