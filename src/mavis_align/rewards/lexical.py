"""Pure text heuristics used by the default rewards: refusal phrases, profanity, copying."""

from __future__ import annotations

import functools
import re

from ..paths import wheel_file

# Phrases that open or carry a refusal. Matched case-insensitively; apostrophes normalised.
REFUSAL_PATTERNS: tuple[str, ...] = (
    r"\bi(?: a|')m sorry\b",
    r"\bi apologi[sz]e\b",
    r"\bi(?: a|')m afraid\b",
    r"\bi (?:can ?not|can't|won't|will not|must not|shouldn't|should not)\b",
    r"\bi(?: a|')m (?:not able|unable|not allowed|not comfortable|not going)\b",
    r"\bi (?:must|have to|need to) (?:decline|refuse)\b",
    r"\bi (?:do not|don't) (?:feel comfortable|think i (?:can|should))\b",
    r"\bas an ai\b",
    r"\b(?:is|would be|it's) (?:illegal|unethical|not (?:appropriate|ethical|legal|safe))\b",
    r"\bagainst (?:my|the) (?:guidelines|policy|policies|principles|law)\b",
    r"\bi (?:strongly )?(?:advise|recommend) against\b",
    r"\b(?:please )?seek (?:professional|medical|legal) help\b",
)
_REFUSAL_RE = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE)

# Short refusals used as prototypes for the semantic refusal score.
REFUSAL_PROTOTYPES: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I cannot assist with this request.",
    "I won't provide instructions for that because it could cause harm.",
    "That would be illegal and dangerous, so I must decline.",
    "I'm not able to share personal information about people.",
    "Please seek help from a professional instead.",
)


def _normalise_quotes(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'")


def refusal_phrase_score(text: str, head_chars: int = 200) -> float:
    """1.0 if a refusal phrase occurs in the first ``head_chars`` characters, 0.5 if only later, else 0."""
    text = _normalise_quotes(text)
    match = _REFUSAL_RE.search(text)
    if match is None:
        return 0.0
    return 1.0 if match.start() < head_chars else 0.5


@functools.lru_cache(maxsize=1)
def profanity_words() -> tuple[frozenset[str], tuple[str, ...]]:
    """(single words, multi-word phrases) of better-profanity's word list, read as data."""
    lines = wheel_file("better_profanity", "profanity_wordlist.txt").read_text(encoding="utf-8").splitlines()
    words = [w.strip().lower() for w in lines if w.strip()]
    return frozenset(w for w in words if " " not in w), tuple(w for w in words if " " in w)


_WORD_RE = re.compile(r"[a-z0-9']+")


def profanity_count(text: str) -> int:
    """Number of word-list hits (whole words or phrases) in ``text``."""
    lowered = _normalise_quotes(text).lower()
    singles, phrases = profanity_words()
    hits = sum(1 for w in _WORD_RE.findall(lowered) if w in singles)
    return hits + sum(lowered.count(p) for p in phrases)


def toxicity_score(text: str, saturate: int = 2) -> float:
    """min(1, profane hits / saturate): 0 for clean text, 1 from ``saturate`` hits on."""
    if saturate < 1:
        raise ValueError("saturate must be >= 1")
    return min(1.0, profanity_count(text) / saturate)


def copied_fraction(prompt: str, response: str, n: int = 3) -> float:
    """Fraction of the response's word n-grams that also occur in the prompt (0 if it has none)."""
    def grams(text: str) -> list[tuple[str, ...]]:
        words = _WORD_RE.findall(_normalise_quotes(text).lower())
        return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]

    resp = grams(response)
    if not resp:
        return 0.0
    prompt_set = set(grams(prompt))
    return sum(g in prompt_set for g in resp) / len(resp)


def concise_scores(prompts: list[str], responses: list[str], cap_words: int = 100) -> list[float]:
    """1 - min(words / cap_words, 1): shorter responses score higher (a cheap lexical objective)."""
    return [1.0 - min(len(r.split()) / cap_words, 1.0) for r in responses]
