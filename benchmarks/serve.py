"""Serving throughput on the embedded default: 8 concurrent clients, each with its own objective
weights, beta and prompt, against the same 8 requests sent one at a time, in one run.

The server (`mavis_align.serve`) runs in this process on 127.0.0.1 with three value models of
``--backbone`` (default: the default value backbone; untrained: speed does not depend on their
weights); requests go through HTTP with the `openai` client. Throughput = generated tokens / wall
time; latencies per request.

    python benchmarks/serve.py [--clients 8] [--max-tokens 48] [--backbone tiny --out results/serve-tiny.json]

Writes ``benchmarks/results/serve.json``.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

OBJECTIVES = ["helpful", "harmless", "humor"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    ap.add_argument("--backbone", default=None, help="value-model backbone (default: the package default)")
    args = ap.parse_args()

    import uvicorn
    from openai import OpenAI

    from mavis_align.data import load_prompts
    from mavis_align.decoding.decoder import MavisDecoder
    from mavis_align.models import load_causal_lm
    from mavis_align.provenance import run_record
    from mavis_align.serve import create_app
    from mavis_align.values import DEFAULT_VALUE_BACKBONE, build_value_model

    model, tok = load_causal_lm()
    args.backbone = args.backbone or DEFAULT_VALUE_BACKBONE
    dec = MavisDecoder(model, tok, [build_value_model([o], backbone=args.backbone, seed=i) for i, o in enumerate(OBJECTIVES)])
    # as `mavis-align serve` does: HTTP in a thread, the decode loop in this (the loading) thread
    app = create_app(dec, model_name="smollm2-135m-instruct", max_batch=16, scheduler_thread=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    prompts = [p.text for p in load_prompts("hh-mix", "test", tokenizer=tok, limit=args.clients)]

    def request(i: int) -> tuple[float, int]:
        lam = [(i % 3 == j) + 0.2 * ((i + j) % 2) for j in range(3)]
        t0 = time.perf_counter()
        r = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": prompts[i]}], max_tokens=args.max_tokens, seed=i,
            extra_body={"objective_weights": dict(zip(OBJECTIVES, lam)), "beta": 1.0 + i % 4, "top_k": 10 + i},
        )
        return time.perf_counter() - t0, r.usage.completion_tokens

    timings: dict = {}

    def measure() -> None:
        try:
            request(0)  # warm-up
            t0 = time.perf_counter()
            timings["seq"] = [request(i) for i in range(args.clients)]
            timings["seq_wall"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as ex:
                timings["conc"] = list(ex.map(request, range(args.clients)))
            timings["conc_wall"] = time.perf_counter() - t0
        finally:
            app.state.scheduler.shutdown()

    threading.Thread(target=measure, daemon=True).start()
    app.state.scheduler.run()
    seq, seq_wall, conc, conc_wall = timings["seq"], timings["seq_wall"], timings["conc"], timings["conc_wall"]

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

    res = {
        "clients": args.clients, "max_tokens": args.max_tokens, "backbone": args.backbone,
        "sequential": {"tokens": sum(n for _, n in seq), "wall_s": seq_wall, "tokens_per_s": sum(n for _, n in seq) / seq_wall,
                       "latency_p50_s": statistics.median(t for t, _ in seq), "latency_p95_s": pct([t for t, _ in seq], 0.95)},
        "concurrent": {"tokens": sum(n for _, n in conc), "wall_s": conc_wall, "tokens_per_s": sum(n for _, n in conc) / conc_wall,
                       "latency_p50_s": statistics.median(t for t, _ in conc), "latency_p95_s": pct([t for t, _ in conc], 0.95)},
        "scheduler": dict(app.state.scheduler.stats),
    }
    res["throughput_ratio"] = res["concurrent"]["tokens_per_s"] / res["sequential"]["tokens_per_s"]
    server.should_exit = True
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": run_record(vars(args), 0), "results": res}, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
