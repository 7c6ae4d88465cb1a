"""Soak test of `mavis-align serve` under ordinary mixed traffic (issue 34).

Starts the real server (`mavis-align serve --value packaged:default` by default) as a subprocess on
127.0.0.1, runs ``--clients`` concurrent clients for ``--duration`` seconds, each sending a rotation
of request kinds: plain completions, chat, greedy, weighted (objective weights, beta 5, top-k 15),
weighted and plain streams, abandoned streams (the client leaves after a few chunks), weighted chat
with a stop string, weighted greedy with min_tokens. The server's RSS is sampled every second. At
the end, four long streams are started and the server gets SIGTERM: they must end complete and the
process must exit 0.

    python benchmarks/soak.py [--clients 12] [--duration 600] [--warmup 60] [--value packaged:default]

Writes ``benchmarks/results/soak.json`` (``--out``): per-kind counts, status counts, latency p50 /
p95, throughput, RSS after warm-up / peak / final and their ratios, the SIGTERM outcome, and the
run record (config, seed, versions, git commit). The server's log goes beside it (``.log``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KINDS = ["plain", "weighted", "chat", "greedy", "weighted-stream", "abandon", "plain-stream", "weighted-chat-stop", "weighted-greedy-min"]
OBJECTIVES = ["helpful", "harmless", "humor"]
PROMPTS = ["Hi", "How do I bake bread?", "Tell me a joke about cats.", "What is the capital of France?",
           "How can I pick a lock?", "Write one sentence about the sea.", "Why is the sky blue?", "Give me advice on studying."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_of(kind: str, rng: random.Random) -> tuple[str, dict]:
    prompt = rng.choice(PROMPTS)
    lam = {o: rng.random() for o in OBJECTIVES}
    weighted = {"objective_weights": lam, "beta": 5.0, "top_k": 15}
    body = {"prompt": prompt, "max_tokens": 16, "seed": rng.randrange(2**31)}
    chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "seed": body["seed"]}
    if kind == "plain":
        return "/v1/completions", body
    if kind == "weighted":
        return "/v1/completions", {**body, **weighted, "max_tokens": 24}
    if kind == "chat":
        return "/v1/chat/completions", chat
    if kind == "greedy":
        return "/v1/completions", {**body, "temperature": 0}
    if kind == "weighted-stream":
        return "/v1/chat/completions", {**chat, **weighted, "stream": True}
    if kind == "abandon":
        return "/v1/completions", {**body, **(weighted if rng.random() < 0.5 else {}), "max_tokens": 64, "stream": True}
    if kind == "plain-stream":
        return "/v1/chat/completions", {**chat, "stream": True}
    if kind == "weighted-chat-stop":
        return "/v1/chat/completions", {**chat, **weighted, "stop": ["."]}
    if kind == "weighted-greedy-min":
        return "/v1/completions", {**body, **weighted, "temperature": 0, "min_tokens": 12}
    raise ValueError(kind)


def send(http, kind: str, path: str, body: dict) -> dict:
    """One request -> {kind, status, latency_s, tokens, ok}."""
    t0 = time.perf_counter()
    out = {"kind": kind, "status": None, "tokens": 0, "ok": False}
    try:
        if not body.get("stream"):
            r = http.post(path, json=body)
            out["status"] = r.status_code
            if r.status_code == 200:
                data = r.json()
                out["tokens"] = data["usage"]["completion_tokens"]
                out["ok"] = data["choices"][0]["finish_reason"] in ("stop", "length")
        else:
            with http.stream("POST", path, json=body) as r:
                out["status"] = r.status_code
                events = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if kind == "abandon" and len(events) == 3:
                            out["ok"] = True
                            break  # the client leaves mid-stream
                if kind == "abandon" and events and events[-1] == "[DONE]":
                    out["ok"] = True  # it ended before the client left
                elif kind != "abandon" and events and events[-1] == "[DONE]":
                    last = json.loads(events[-2])
                    out["tokens"] = last["usage"]["completion_tokens"]
                    out["ok"] = last["choices"][0]["finish_reason"] in ("stop", "length")
    except Exception as err:  # a broken connection is a result, not a crash of the benchmark
        out["status"] = f"{type(err).__name__}"
    out["latency_s"] = time.perf_counter() - t0
    return out


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    ap.add_argument("--warmup", type=float, default=60.0, help="RSS 'after warm-up' is the peak over the first this many seconds")
    ap.add_argument("--value", action="append", default=None, help="value models (default: packaged:default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "soak.json"))
    args = ap.parse_args()
    args.value = args.value or ["packaged:default"]

    import httpx
    import psutil

    from mavis_align.provenance import run_record, write_json

    port = free_port()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mavis_align.cli", "serve", "--port", str(port)] + [a for v in args.value for a in ("--value", v)]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {log_path}")
    ps = psutil.Process(proc.pid)
    rss: list[tuple[float, int]] = []
    stop = threading.Event()
    t_start = time.time()

    def sample() -> None:
        while not stop.is_set() and proc.poll() is None:
            try:
                rss.append((time.time() - t_start, ps.memory_info().rss))
            except psutil.Error:
                return
            time.sleep(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results: list[dict] = []
    lock = threading.Lock()
    end_at = t_start + args.duration

    def client(c: int) -> None:
        rng = random.Random(args.seed * 1000 + c)
        i = rng.randrange(len(KINDS))
        with httpx.Client(base_url=base, timeout=300) as http:
            while time.time() < end_at and proc.poll() is None:
                kind = KINDS[i % len(KINDS)]
                i += 1
                res = send(http, kind, *request_of(kind, rng))
                res["t"] = time.time() - t_start
                with lock:
                    results.append(res)

    print(f"soak: {args.clients} clients for {args.duration:.0f} s against {' '.join(cmd)}", flush=True)
    with ThreadPoolExecutor(args.clients) as ex:
        list(ex.map(client, range(args.clients)))
    traffic_s = time.time() - t_start
    time.sleep(2.0)
    health = httpx.get(base + "/health", timeout=10).json() if proc.poll() is None else None
    final_rss = ps.memory_info().rss if proc.poll() is None else None

    # graceful shutdown with four long streams in flight
    shutdown: dict = {"streams": []}
    if proc.poll() is None:
        first = threading.Barrier(5)

        def long_stream(i: int) -> dict:
            body = {"prompt": PROMPTS[i], "max_tokens": 200, "min_tokens": 200, "stream": True, "seed": i}
            if i % 2:
                body.update(objective_weights={"harmless": 1.0}, beta=5.0, top_k=15)
            events, err = [], None
            try:
                with httpx.stream("POST", base + "/v1/completions", json=body, timeout=300) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            if len(events) == 1:
                                first.wait(timeout=120)
            except Exception as e:
                err = type(e).__name__
            last = json.loads(events[-2]) if len(events) >= 2 and events[-1] == "[DONE]" else None
            return {"error": err, "done": bool(events) and events[-1] == "[DONE]",
                    "finish_reason": last["choices"][0]["finish_reason"] if last else None,
                    "tokens": last["usage"]["completion_tokens"] if last else None}

        with ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(long_stream, i) for i in range(4)]
            first.wait(timeout=120)
            t_sig = time.time()
            proc.send_signal(signal.SIGTERM)
            shutdown["streams"] = [f.result() for f in futs]
        try:
            shutdown["exit_code"] = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            shutdown["exit_code"] = "killed after 120 s"
        shutdown["seconds_to_exit"] = round(time.time() - t_sig, 2)
    stop.set()
    log.close()

    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_kind[r["kind"]].append(r)
    status = Counter(str(r["status"]) for r in results)
    lat = [r["latency_s"] for r in results if r["status"] == 200 and r["kind"] != "abandon"]
    warm = [b for t, b in rss if t <= args.warmup]
    after_warm = max(warm) if warm else None
    peak = max((b for _, b in rss), default=None)
    mb = (lambda b: None if b is None else round(b / 2**20, 1))
    summary = {
        "clients": args.clients, "duration_s": round(traffic_s, 1), "requests": len(results),
        "status_counts": dict(status), "errors_5xx": sum(1 for r in results if isinstance(r["status"], int) and r["status"] >= 500),
        "connection_errors": sum(1 for r in results if isinstance(r["status"], str)),
        "not_well_formed": sum(1 for r in results if r["status"] == 200 and not r["ok"]),
        "requests_per_s": round(len(results) / traffic_s, 3),
        "completion_tokens_per_s": round(sum(r["tokens"] for r in results) / traffic_s, 2),
        "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95),
        "per_kind": {k: {"n": len(v), "ok": sum(r["ok"] for r in v), "p50_s": pct([r["latency_s"] for r in v], 0.5),
                         "p95_s": pct([r["latency_s"] for r in v], 0.95)} for k, v in sorted(by_kind.items())},
        "rss_mb": {"after_warmup_peak": mb(after_warm), "peak": mb(peak), "final": mb(final_rss),
                   "peak_over_after_warmup": None if not (peak and after_warm) else round(peak / after_warm, 3)},
        "rss_series_mb": [(round(t, 1), mb(b)) for t, b in rss[:: max(1, len(rss) // 120)]],
        "server_health": health, "shutdown": shutdown,
    }
    import mavis_align

    write_json(out, {"run": run_record(vars(args), args.seed), "source": str(Path(mavis_align.__file__).parent), "command": " ".join(cmd),
                     "results": summary})
    print(json.dumps({k: v for k, v in summary.items() if k != "rss_series_mb"}, indent=2))


if __name__ == "__main__":
    main()
