"""Reward registry: names -> lazily built :class:`Reward` callables.

Entries are ``"module:factory"`` strings imported on first use, so listing rewards costs nothing
and a reward that needs a hub model only fails when it is actually requested. A spec of the form
``hf:NAME_OR_PATH[#INDEX][@FORMAT]`` builds a sequence-classification reward on the fly, and
``MODULE:NAME`` or ``path/to/file.py:NAME`` loads a user's own reward: a plain
``(prompts, responses) -> scores`` callable (or a :class:`Reward`), named by ``NAME``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass, field

from ..placement import Placement, current, placement_of, using
from .base import Reward, RewardFn

__all__ = ["Reward", "RewardFn", "RewardEntry", "REWARDS", "DEFAULT_OBJECTIVES", "register_reward", "get_reward", "get_rewards", "list_rewards", "load_user_reward", "reward_name",
           "score_all", "weighted_reward"]


@dataclass(frozen=True)
class RewardEntry:
    name: str
    description: str
    value_range: tuple[float, float]
    higher_is_better: bool
    target: str  # "module:callable"
    kwargs: dict = field(default_factory=dict)
    offline: bool = True  # False: needs a hub (or a local copy) of the model
    kind: str = "scorer"  # "scorer": target is the batched scoring fn; "factory": target(**kwargs) -> Reward

    def build(self, place: Placement | None = None) -> Reward:
        """The reward, its models on ``place`` (None: the current placement)."""
        place = place or current()
        module, _, attr = self.target.partition(":")
        obj = getattr(importlib.import_module(module), attr)
        if self.kind == "scorer":
            return Reward(self.name, self.description, self.value_range, self.higher_is_better, _placed(obj, place))
        params = inspect.signature(obj).parameters
        extra = {k: v for k, v in (("device", place.device), ("dtype", place.dtype)) if k in params}
        reward = obj(**self.kwargs, **extra)
        if not isinstance(reward, Reward):
            raise TypeError(f"factory {self.target} returned {type(reward).__name__}, not a Reward")
        return reward


def _placed(fn: RewardFn, place: Placement) -> RewardFn:
    """``fn`` run with ``place`` current, so the models it loads lazily (the shipped encoder) go
    there, whichever thread scores."""
    @functools.wraps(fn)
    def scored(prompts: list[str], responses: list[str]) -> list[float]:
        with using(place.device, place.dtype):
            return fn(prompts, responses)

    return scored


REWARDS: dict[str, RewardEntry] = {}

DEFAULT_OBJECTIVES = ("helpful", "harmless", "humor")


def register_reward(entry: RewardEntry, *, overwrite: bool = False) -> None:
    if entry.name in REWARDS and not overwrite:
        raise ValueError(f"reward {entry.name!r} is already registered")
    REWARDS[entry.name] = entry
    _build.cache_clear()


_D = "mavis_align.rewards.defaults"
_H = "mavis_align.rewards.hf:make_hf_classifier_reward"
_INF = (float("-inf"), float("inf"))
for _e in [
    RewardEntry("helpful", "relevance of the response to the prompt (MiniLM cosine, minus copying)", (-1.0, 1.0), True, f"{_D}:helpful_scores"),
    RewardEntry("harmless", "refuses harmful requests and avoids profanity (learned harm probe x refusal)", (0.0, 1.0), True, f"{_D}:harmless_scores"),
    RewardEntry("humor", "the response reads as a joke (MiniLM probe trained on shipped jokes)", (0.0, 1.0), True, f"{_D}:humor_scores"),
    RewardEntry("positive", "positive sentiment of the response (MiniLM probe trained on IMDB)", (0.0, 1.0), True, f"{_D}:positive_scores"),
    # independent scorers (rewards.independent): never label trees; reported beside the labellers
    RewardEntry("helpful-pmi", "independent helpful: prompt-response PMI under the base LM, nats/token", _INF, True, "mavis_align.rewards.independent:helpful_pmi_scores"),
    RewardEntry("harmless-lm", "independent harmless: on source-labelled harmful prompts, decline-vs-comply log-ratio under the base LM", _INF, True, "mavis_align.rewards.independent:harmless_lm_scores"),
    RewardEntry("humor-lexical", "independent humor: hashed word-bigram logistic regression on the joke lines", (0.0, 1.0), True, "mavis_align.rewards.independent:humor_lexical_scores"),
    RewardEntry("concise", "1 - min(words/100, 1): shorter responses score higher (lexical, instant)", (0.0, 1.0), True, "mavis_align.rewards.lexical:concise_scores"),
    # The paper's hub reward models (App. F.7); they need a hub or a local copy.
    RewardEntry("hh-helpful", "paper: Ray2333/gpt2-large-helpful-reward_model, logit 0", _INF, True, _H,
                dict(model="Ray2333/gpt2-large-helpful-reward_model", name="hh-helpful", output_index=0, input_format="hh"), offline=False, kind="factory"),
    RewardEntry("hh-harmless", "paper: Ray2333/gpt2-large-harmless-reward_model, logit 0", _INF, True, _H,
                dict(model="Ray2333/gpt2-large-harmless-reward_model", name="hh-harmless", output_index=0, input_format="hh"), offline=False, kind="factory"),
    RewardEntry("hh-humor", "paper: mohameddhiab/humor-no-humor (DistilBERT), logit 1", _INF, True, _H,
                dict(model="mohameddhiab/humor-no-humor", name="hh-humor", output_index=1, input_format="response"), offline=False, kind="factory"),
    RewardEntry("summary-quality", "paper: Tristan/gpt2_reward_summarization, logit 0", _INF, True, _H,
                dict(model="Tristan/gpt2_reward_summarization", name="summary-quality", output_index=0, input_format="pair"), offline=False, kind="factory"),
    RewardEntry("faithful", "paper: CogComp/bart-faithful-summary-detector, logit 1", _INF, True, _H,
                dict(model="CogComp/bart-faithful-summary-detector", name="faithful", output_index=1, input_format="pair_reversed"), offline=False, kind="factory"),
]:
    REWARDS[_e.name] = _e


def _parse_hf_spec(spec: str) -> dict:
    """``hf:NAME_OR_PATH[#INDEX][@FORMAT]`` -> kwargs of make_hf_classifier_reward."""
    body = spec[3:]
    body, _, fmt = body.partition("@")
    model, _, index = body.partition("#")
    if not model:
        raise ValueError(f"reward spec {spec!r} names no model; expected hf:NAME_OR_PATH[#INDEX][@FORMAT]")
    try:
        idx = int(index) if index else 0
    except ValueError as err:
        raise ValueError(f"reward spec {spec!r}: output index {index!r} is not an integer") from err
    kw = dict(model=model, name=spec, output_index=idx)
    if fmt:
        kw["input_format"] = fmt
    return kw


def _is_user_spec(spec: str) -> bool:
    return ":" in spec and not spec.startswith("hf:") and spec not in REWARDS


def load_user_reward(spec: str) -> Reward:
    """``MODULE:NAME`` / ``path/to/file.py:NAME`` -> the user's reward (one-line errors on a missing
    module, file or name, or a callable that cannot take ``(prompts, responses)``)."""
    import importlib.util
    from pathlib import Path

    where, _, attr = spec.rpartition(":")
    if not where or not attr.isidentifier():
        raise ValueError(f"reward spec {spec!r}: expected MODULE:NAME or path/to/file.py:NAME")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise ValueError(f"reward spec {spec!r}: no file {path}")
        mod_spec = importlib.util.spec_from_file_location(f"mavis_user_reward_{abs(hash(str(path.resolve())))}", path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as err:
            raise ValueError(f"reward spec {spec!r}: {path} failed to import: {type(err).__name__}: {err}") from err
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ValueError(f"reward spec {spec!r}: cannot import module {where!r} ({err})") from err
    obj = getattr(module, attr, None)
    if obj is None:
        raise ValueError(f"reward spec {spec!r}: {where} has no {attr!r}")
    if isinstance(obj, Reward):
        return obj
    if not callable(obj):
        raise ValueError(f"reward spec {spec!r}: {attr!r} is a {type(obj).__name__}, not a (prompts, responses) -> scores callable")
    try:
        inspect.signature(obj).bind([], [])
    except TypeError as err:
        raise ValueError(f"reward spec {spec!r}: {attr!r} must accept (prompts, responses) ({err})") from err
    except ValueError:
        pass  # builtins without a signature: trust the call
    if attr in REWARDS:
        raise ValueError(f"reward spec {spec!r}: the name {attr!r} is a registered reward; rename your function")
    doc = (inspect.getdoc(obj) or f"user reward {spec}").strip().splitlines()[0]
    return Reward(attr, doc, (float("-inf"), float("inf")), True, obj)


def reward_name(spec: str) -> str:
    """The objective name a reward spec labels trees with: the spec itself, or a user reward's own name."""
    return get_reward(spec).name if _is_user_spec(spec) else spec  # built once per process (the file is imported once)


@functools.lru_cache(maxsize=None)
def _build(spec: str, place: Placement) -> Reward:
    if _is_user_spec(spec):
        return load_user_reward(spec)
    if spec.startswith("hf:"):
        from .hf import make_hf_classifier_reward

        return make_hf_classifier_reward(**_parse_hf_spec(spec), device=place.device, dtype=place.dtype)
    if spec not in REWARDS:
        raise ValueError(f"unknown reward {spec!r}. Registered: {', '.join(REWARDS)}; or hf:NAME_OR_PATH[#INDEX][@FORMAT]; or MODULE:NAME / file.py:NAME")
    return REWARDS[spec].build(place)


def get_reward(spec: str, *, device=None, dtype=None) -> Reward:
    """The reward for a registry name or ``hf:`` spec (built once per process and placement;
    ``device``/``dtype`` None: the current placement, see :mod:`mavis_align.placement`)."""
    return _build(spec, placement_of(device, dtype))


def get_rewards(specs, *, device=None, dtype=None) -> list[Reward]:
    return [get_reward(s, device=device, dtype=dtype) for s in specs]


def list_rewards() -> list[RewardEntry]:
    return list(REWARDS.values())


def score_all(rewards: list[Reward], prompts: list[str], responses: list[str]) -> dict[str, list[float]]:
    """{reward name: scores} for every reward over the same pairs."""
    return {r.name: r(prompts, responses) for r in rewards}


def weighted_reward(rewards: list[Reward], weights: dict[str, float]):
    """``fn(prompts, responses) -> sum_m lambda_m R_m`` with lambda normalised to sum 1.

    Args:
        rewards: the reward objects (looked up by name).
        weights: {reward name: lambda >= 0}, not all zero; names without a reward are an error.
    """
    total = sum(weights.values())
    if total <= 0 or any(w < 0 for w in weights.values()):
        raise ValueError(f"reward weights must be >= 0 and not all 0, got {weights}")
    by_name = {r.name: r for r in rewards}
    missing = [n for n in weights if n not in by_name]
    if missing:
        raise ValueError(f"no reward named {missing}; have {sorted(by_name)}")

    def fn(prompts: list[str], responses: list[str]) -> list[float]:
        out = [0.0] * len(responses)
        for name, w in weights.items():
            if w:
                for i, x in enumerate(by_name[name](list(prompts), list(responses))):
                    out[i] += w / total * x
        return out

    return fn
