"""User-facing MAVIS decoder: a frozen base model, value models addressed by objective name,
and per-call (or per-prompt) objective weights lambda and tilt strength beta."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..generation import DEFAULT_TOP_K, Generation, SamplingConfig, check_beta, encode_batch, rows_to_generations, stop_checker
from ..values import ValueModel, check_tokenizer
from .engine import decode_ids, row_generator
from .steppers import CachedBase, CachedValueScorer, NaiveBase, SequenceValueScorer, bind_objectives, naive_value_fn
from .tilt import resolve_weights

Weights = Mapping[str, float] | Sequence[Mapping[str, float]]


def parse_value_spec(spec: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a bare ``PATH`` -> (None, PATH) (use the model's own head names)."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        if not name or not path:
            raise ValueError(f"--value {spec!r}: expected NAME=PATH or PATH")
        return name, path
    return None, spec


def parse_weights(specs: Sequence[str]) -> dict[str, float]:
    """``["helpful=0.7", "harmless=0.3"]`` -> {"helpful": 0.7, "harmless": 0.3}."""
    out: dict[str, float] = {}
    for spec in specs:
        name, sep, w = spec.partition("=")
        if not sep or not name:
            raise ValueError(f"--weights {spec!r}: expected NAME=WEIGHT")
        try:
            out[name] = float(w)
        except ValueError:
            raise ValueError(f"--weights {spec!r}: {w!r} is not a number") from None
    return out


class MavisDecoder:
    """pi_MAVIS(a | s, lambda) ∝ pi_ref(a | s) · exp(beta · NORMALIZE(sum_m lambda_m V_m(s ⊕ a))) over
    pi_ref's top-k tokens.

    Args:
        model, tokenizer: the frozen base model pi_ref (tokenizer padding on the left).
        value_models: value models (single- or multi-head) that share the base tokenizer; none
            means plain sampling from pi_ref.
        names: per value model, the objective name its single head answers to (None: the
            head names stored in the model).
    """

    def __init__(self, model, tokenizer, value_models: Sequence[ValueModel] = (), names: Sequence[str | None] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.value_models = list(value_models)
        for i, vm in enumerate(self.value_models):
            check_tokenizer(vm, tokenizer, name=f"value model {i} ({', '.join(vm.objectives)})")
            vm.eval()
        self.bindings = bind_objectives(self.value_models, names)

    @classmethod
    def load(cls, base: str, values: Sequence[str] = (), *, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None) -> "MavisDecoder":
        """Load the base model by name/path and value models from ``[NAME=]PATH`` specs, all on
        ``device`` in ``dtype`` (None: the current placement, see :mod:`mavis_align.placement`)."""
        from ..models import load_causal_lm

        specs = [parse_value_spec(v) for v in values]
        vms = [ValueModel.load(Path(p), device=device, dtype=dtype) for _, p in specs]  # fail fast before the base loads
        model, tokenizer = load_causal_lm(base, device=device, dtype=dtype)
        return cls(model, tokenizer, vms, [n for n, _ in specs])

    @property
    def objectives(self) -> list[str]:
        return [b.name for b in self.bindings]

    # ------------------------------------------------------------------ validation

    def resolve(self, n: int, weights: Weights | None, beta: float | Sequence[float] | None, config: SamplingConfig,
                *, token_tilt: bool = True):
        """Check everything a decode needs before any model runs -> (weights [n, M], beta [n], active models).
        ``token_tilt``: the values tilt each token over top-k candidates (step-level guidance: they do not)."""
        if not self.value_models:
            if weights:
                raise ValueError(f"objective weights {dict(weights) if isinstance(weights, Mapping) else weights} given, but no value models are loaded")
            return None, None, []
        if token_tilt and config.top_k < 1:
            raise ValueError(f"top_k (candidates per step) must be >= 1 with value models, got {config.top_k}")
        if weights is None:
            weights = {name: 1.0 for name in self.objectives}
        w = resolve_weights(self.objectives, weights, n)
        betas = [config.beta] * n if beta is None else [beta] * n if isinstance(beta, (int, float)) else list(beta)
        if len(betas) != n:
            raise ValueError(f"got {len(betas)} beta values for {n} prompts")
        b = torch.tensor([check_beta(x) for x in betas], dtype=torch.float32)
        used = (w > 0).any(0)
        active = sorted({bd.model for j, bd in enumerate(self.bindings) if bool(used[j])})
        return w, b, active

    # ------------------------------------------------------------------ decoding

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

    def _batches(self, prompts: list[str], seed: int, batch_size: int, chat: bool | None, progress: bool, desc: str, system: str | None = None,
                 row_ids: Sequence[int] | None = None):
        """Yield (slice, input_ids, attention_mask, generators) per batch: prompt i draws from
        ``row_generator(seed, i)`` (``row_ids[i]`` in place of i when given), so its random draws do
        not depend on the batch size or its neighbours (the logits can: another batch pads differently,
        and on real models that float rounding flips an occasional token; 1-4 of 24 demo responses at
        batch 1 / 8 / 24). ``system``: an instruction placed before every prompt (a system turn in chat format)."""
        from ..models import format_prompts

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = next(self.model.parameters()).device
        formatted = format_prompts(self.tokenizer, prompts, chat=chat, system=system)
        starts = range(0, len(prompts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc, unit="batch")
        for s in starts:
            sl = slice(s, s + batch_size)
            input_ids, attention = encode_batch(self.tokenizer, formatted[sl], device)
            ids = range(sl.start, min(sl.stop, len(prompts)))
            yield sl, input_ids, attention, [row_generator(seed, i if row_ids is None else int(row_ids[i])) for i in ids]

    def _scorer(self, active: list[int], naive: bool):
        if not self.value_models:
            return None
        if naive:
            return SequenceValueScorer(naive_value_fn(self.value_models, self.bindings), self.objectives)
        return CachedValueScorer(self.value_models, self.bindings, active)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        weights: Weights | None = None,
        beta: float | Sequence[float] | None = None,
        config: SamplingConfig = SamplingConfig(top_k=DEFAULT_TOP_K),
        seed: int = 0,
        batch_size: int = 8,
        chat: bool | None = None,
        progress: bool = False,
        naive: bool = False,
        system: str | None = None,
        row_ids: Sequence[int] | None = None,
    ) -> list[Generation]:
        """One response per prompt.

        Args:
            weights: {objective: lambda} for all prompts, or one dict per prompt; normalised to
                sum 1; default: equal weights over every loaded objective.
            beta: tilt strength for all prompts or one per prompt (default ``config.beta``).
            seed: prompt i samples from its own generator ``row_generator(seed, i)``: the same
                prompts, seed and batch size give the same responses; another batch size keeps
                every row's random draws (exactly the same responses on the tiny fp32 test models;
                on real models the padding's float rounding flips an occasional token), and
                prompt 0 the same as a server request with this seed.
            naive: use the uncached per-sequence reference path (slow; for tests/benchmarks).
            system: an instruction the model reads before every prompt (a system turn in chat
                format), e.g. a preference-conditioned policy's weights; ``Generation.prompt``
                stays the user prompt, so KL is measured against pi_ref on the user prompt alone.
            row_ids: prompt i samples from ``row_generator(seed, row_ids[i])`` instead: several
                weightings of the same prompts decoded in one call keep the random draws each would
                have alone (see :func:`~mavis_align.evaluate.evaluate_weightings`).
        Returns:
            :class:`Generation` records; ``log_ratio`` is the sequence's KL estimate (eq. 7) and
            ``extras["values"]`` the combined value of each chosen token.
        """
        prompts = list(prompts)
        if row_ids is not None and len(row_ids) != len(prompts):
            raise ValueError(f"got {len(row_ids)} row_ids for {len(prompts)} prompts")
        w, b, active = self.resolve(len(prompts), weights, beta, config)
        out: list[Generation] = []
        for sl, input_ids, attention, generators in self._batches(prompts, seed, batch_size, chat, progress, "mavis", system, row_ids):
            rows = decode_ids(
                NaiveBase(self.model) if naive else CachedBase(self.model),
                input_ids, attention, config,
                eos_id=self.eos_id, generators=generators,
                scorer=self._scorer(active, naive),
                weights=None if w is None else w[sl], beta=None if b is None else b[sl],
                stop_check=stop_checker(self.tokenizer, config.stop_strings),
            )
            out.extend(rows_to_generations(self.tokenizer, prompts[sl], rows, config.stop_strings))
        return out

    @torch.no_grad()
    def beam_search(
        self,
        prompts: Sequence[str],
        *,
        num_beams: int = 5,
        weights: Weights | None = None,
        beta: float | Sequence[float] | None = None,
        config: SamplingConfig = SamplingConfig(top_k=DEFAULT_TOP_K),
        expand: int | None = None,
        rerank=None,
        seed: int = 0,
        batch_size: int = 4,
        chat: bool | None = None,
        progress: bool = False,
    ) -> list[Generation]:
        """Value-guided beam search (paper Section 4.4): the best response per prompt.

        Args:
            num_beams: N beams per prompt; also the number of finished candidates kept.
            expand: children drawn from pi_MAVIS per beam per step (default N).
            rerank: optional ``fn(prompts, responses) -> scores``; when given, the kept
                candidates are re-ranked by it (e.g. the lambda-weighted reward models) and the
                best one returned. Otherwise the candidate with the highest combined value wins.
        Returns:
            One :class:`Generation` per prompt; ``extras["candidates"]`` lists every kept
            candidate as {"text", "value", "rerank"} best first.
        """
        from .beam import value_beam_search

        if not self.value_models:
            raise ValueError("beam search ranks by value: load at least one value model")
        prompts = list(prompts)
        w, b, active = self.resolve(len(prompts), weights, beta, config)
        out: list[Generation] = []
        for sl, input_ids, attention, generators in self._batches(prompts, seed, batch_size, chat, progress, "beam"):
            results = value_beam_search(
                CachedBase(self.model), CachedValueScorer(self.value_models, self.bindings, active),
                input_ids, attention, config, num_beams=num_beams, weights=w[sl], beta=b[sl],
                eos_id=self.eos_id, pad_id=self.pad_id, generators=generators, expand=expand,
                stop_check=stop_checker(self.tokenizer, config.stop_strings),
            )
            for prompt, res in zip(prompts[sl], results):
                gens = rows_to_generations(self.tokenizer, [prompt] * len(res.candidates), [c.row for c in res.candidates], config.stop_strings)
                scores = list(rerank([prompt] * len(gens), [g.text for g in gens])) if rerank is not None and gens else [None] * len(gens)
                order = sorted(range(len(gens)), key=lambda i: -scores[i]) if rerank is not None else list(range(len(gens)))
                best = gens[order[0]]
                best.extras["candidates"] = [
                    {"text": gens[i].text, "value": res.candidates[i].value, "rerank": scores[i]} for i in order
                ]
                out.append(best)
        return out

    @torch.no_grad()
    def step_search(
        self,
        prompts: Sequence[str],
        *,
        n: int = 4,
        chunk: int = 10,
        select: str = "best",
        weights: Weights | None = None,
        beta: float | Sequence[float] | None = None,
        config: SamplingConfig = SamplingConfig(),
        seed: int = 0,
        batch_size: int = 4,
        chat: bool | None = None,
        progress: bool = False,
        proposal_beta: float = 0.0,
    ) -> list[Generation]:
        """Step-level value guidance (:mod:`~mavis_align.decoding.steplevel`): N candidate steps of
        ``chunk`` tokens sampled from this decoder's model under ``config``, one kept per step by
        the value models (``select``: ``"best"`` or ``"tilt"`` with ``beta``). ``proposal_beta`` > 0:
        the steps are sampled from the token-level tilt at that beta (``config``'s top-k, tail and
        tilt_tokens) instead: token tilt and step selection together.

        Returns:
            One :class:`Generation` per prompt; ``extras["selection_kl"]`` is the KL bound the
            selections add to the tokens' own log-ratios, ``extras["step_values"]`` the combined
            value of each kept step.
        """
        from .steplevel import step_guided_search

        if not self.value_models:
            raise ValueError("step-level guidance ranks steps by value: load at least one value model")
        prompts = list(prompts)
        if proposal_beta < 0 or (proposal_beta > 0 and config.top_k < 1):
            raise ValueError(f"proposal_beta must be >= 0, and > 0 needs config.top_k >= 1 candidates (got {proposal_beta}, top_k {config.top_k})")
        w, b, active = self.resolve(len(prompts), weights, beta, config, token_tilt=False)
        out: list[Generation] = []
        for sl, input_ids, attention, generators in self._batches(prompts, seed, batch_size, chat, progress, "steps"):
            results = step_guided_search(
                CachedBase(self.model), CachedValueScorer(self.value_models, self.bindings, active),
                input_ids, attention, config, n=n, chunk=chunk, select=select, weights=w[sl], beta=b[sl],
                eos_id=self.eos_id, pad_id=self.pad_id, generators=generators,
                stop_check=stop_checker(self.tokenizer, config.stop_strings),
                proposal_beta=torch.full((input_ids.shape[0],), float(proposal_beta)) if proposal_beta > 0 else None,
            )
            gens = rows_to_generations(self.tokenizer, prompts[sl], [r.row for r in results], config.stop_strings)
            for g, r in zip(gens, results):
                g.extras.update(selection_kl=r.selection_kl, step_values=r.step_values)
            out.extend(gens)
        return out

