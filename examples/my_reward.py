"""A user's own objective for mavis-align: any plain ``(prompts, responses) -> scores`` callable.

Use it anywhere a reward name goes: ``--reward examples/my_reward.py:polite`` (a file) or
``--reward my_package.my_module:polite`` (an importable module). Its name (``polite``) becomes the
objective the trees are labelled with, the value model's head and the weight's key.
"""

import re

POLITE = re.compile(r"\b(please|thank(s| you)?|glad|happy to help|you're welcome|kindly|sorry)\b", re.IGNORECASE)


def polite(prompts: list[str], responses: list[str]) -> list[float]:
    """Politeness: polite words per 20 words of the response, capped at 1."""
    out = []
    for r in responses:
        words = max(1, len(r.split()))
        out.append(min(1.0, len(POLITE.findall(r)) * 20 / words))
    return out
