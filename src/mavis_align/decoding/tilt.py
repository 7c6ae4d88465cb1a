"""The MAVIS tilt as pure functions (paper Algorithm 2, eq. 14, App. F.5).

    pi_MAVIS(a | s, lambda) ∝ pi_ref(a | s) · exp(beta · NORMALIZE(sum_m lambda_m V_m(s ⊕ a)))

restricted to the top-k tokens of pi_ref (after temperature; chosen per row by
:func:`~mavis_align.decoding.engine.step_distribution`); tokens outside the top-k get no
probability mass. Every function here is free of side effects: inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..generation import check_beta

NEG_INF = float("-inf")


def combine_values(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """v_i = sum_m lambda_m V_m(s ⊕ a_i).

    Args:
        values: [B, k, M] per-objective values of each candidate.
        weights: [B, M] or [M] objective weights.
    Returns:
        [B, k] float32.
    """
    if values.dim() != 3:
        raise ValueError(f"values must be [B, k, M], got shape {list(values.shape)}")
    w = weights.to(values.dtype)
    if w.dim() == 1:
        w = w.expand(values.shape[0], -1)
    if w.shape != (values.shape[0], values.shape[2]):
        raise ValueError(f"weights must be [B, M] = {[values.shape[0], values.shape[2]]}, got {list(weights.shape)}")
    return torch.einsum("bkm,bm->bk", values, w).float()


def normalize_values(v: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Min-max normalisation of each row to [0, 1] (paper eq. 14).

    Only ``valid`` entries set the min and max. A row whose valid values are all equal (or that
    has a single valid entry) maps to all zeros, so the tilt leaves pi_ref unchanged there.

    Args:
        v: [B, k] combined values.
        valid: [B, k] bool, or None for all valid.
    Returns:
        [B, k] in [0, 1] on valid entries (invalid entries: 0).
    """
    if valid is None:
        lo = v.min(dim=-1, keepdim=True).values
        hi = v.max(dim=-1, keepdim=True).values
    else:
        lo = v.masked_fill(~valid, float("inf")).min(dim=-1, keepdim=True).values
        hi = v.masked_fill(~valid, NEG_INF).max(dim=-1, keepdim=True).values
    span = hi - lo
    flat = ~(span > 0)  # equal values, or no finite span
    out = (v - lo) / torch.where(flat, torch.ones_like(span), span)
    out = torch.where(flat, torch.zeros_like(out), out)
    if valid is not None:
        out = out.masked_fill(~valid, 0.0)
    return out


def tilt_kl(ref_logp: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """KL(pi_beta || pi_0) of every row, where pi_0 = softmax(ref_logp) over the valid candidates and
    pi_beta ∝ pi_0 · exp(beta · v): the KL the tilt itself adds at this step (the top-k truncation's
    own −log(mass of the top k) comes on top of it in the KL to the full pi_ref).

    Args:
        ref_logp: [B, k]; v: [B, k] the values the tilt multiplies (after any normalisation);
        beta: [B]; valid: [B, k] bool or None.
    Returns:
        [B] float32, >= 0 up to rounding.
    """
    scores, base = _base(ref_logp, valid)
    return _kl_of_tilt(scores, base, v, beta)


def _base(ref_logp: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores with invalid candidates at -inf, log pi_0) [B, k]."""
    scores = ref_logp.float()
    if valid is not None:
        scores = scores.masked_fill(~valid, NEG_INF)
    return scores, torch.log_softmax(scores, dim=-1)


def _kl_of_tilt(scores: torch.Tensor, base: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    tilted = torch.log_softmax(scores + beta[:, None] * v, dim=-1)
    return torch.where(torch.isfinite(tilted), tilted.exp() * (tilted - base), torch.zeros_like(tilted)).sum(-1)


def capped_beta(ref_logp: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, max_kl: torch.Tensor,
                valid: torch.Tensor | None = None, iterations: int = 40) -> torch.Tensor:
    """Per row, the largest beta' in [0, beta] whose tilt adds at most ``max_kl`` nats at this step.

    The tilt's KL grows monotonically with beta' >= 0 (d KL / d beta' = beta' · Var_{pi_beta'}(v)), so
    rows over their budget are found by bisection; rows within it (or with max_kl = inf) keep beta.
    This is the same exponential tilt with its strength set per step by a KL budget, the constrained
    form of the KL-regularised step (a trust region), not a different distribution family.

    Args:
        ref_logp, v, valid: as in :func:`tilt_kl`; beta: [B] >= 0; max_kl: [B] > 0 (inf: no cap).
    Returns:
        [B] float32 beta'.
    """
    beta = beta.float()
    scores, base = _base(ref_logp, valid)  # pi_0 once; only the tilt changes between bisection steps
    over = _kl_of_tilt(scores, base, v, beta) > max_kl
    if not bool(over.any()):
        return beta
    lo, hi = torch.zeros_like(beta), beta.clone()
    for _ in range(iterations):
        mid = (lo + hi) / 2
        too_much = _kl_of_tilt(scores, base, v, mid) > max_kl
        hi = torch.where(too_much, mid, hi)
        lo = torch.where(too_much, lo, mid)
    return torch.where(over, lo, beta)


def tilted_logprobs(
    ref_logp: torch.Tensor,
    values: torch.Tensor,
    beta: float | torch.Tensor,
    *,
    normalize: bool | torch.Tensor = True,
    valid: torch.Tensor | None = None,
    max_step_kl: torch.Tensor | None = None,
) -> torch.Tensor:
    """log pi_MAVIS over the candidates: log_softmax(log pi_ref(a) + beta · v(a)).

    Args:
        ref_logp: [B, k] log pi_ref of the candidates (any constant offset per row is fine).
        values: [B, k] combined values v (before normalisation).
        beta: scalar or [B] tilt strength (>= 0); beta = 1/eta with ``normalize=False`` gives the
            exact soft-optimal tilt when ``values`` are the optimal soft values.
        normalize: apply :func:`normalize_values` first (the paper's default); or [B] bool, per row.
        valid: [B, k] bool mask of usable candidates (others get -inf).
        max_step_kl: [B] per-row cap on the KL the tilt adds at this step (inf: none); a row over it
            is tilted with the smaller beta of :func:`capped_beta`.
    Returns:
        [B, k] float32 log-probabilities that sum (in prob space) to 1 over valid candidates.
    """
    if not isinstance(beta, torch.Tensor):
        check_beta(beta)  # tensors come from validated rows (RowTensors)
    beta_t = torch.as_tensor(beta, dtype=torch.float32, device=values.device)
    if beta_t.dim() == 1:
        beta_t = beta_t[:, None]
    if isinstance(normalize, torch.Tensor):
        v = torch.where(normalize[:, None], normalize_values(values, valid), values.float())
    else:
        v = normalize_values(values, valid) if normalize else values.float()
    if max_step_kl is not None and bool(torch.isfinite(max_step_kl).any()):
        beta_t = capped_beta(ref_logp, v, beta_t.reshape(-1).expand(v.shape[0]), max_step_kl, valid)[:, None]
    scores = ref_logp.float() + beta_t * v
    if valid is not None:
        scores = scores.masked_fill(~valid, NEG_INF)
    return torch.log_softmax(scores, dim=-1)


def resolve_weights(
    objectives: Sequence[str],
    weights: Mapping[str, float] | Sequence[Mapping[str, float]],
    batch_size: int,
) -> torch.Tensor:
    """Turn objective weights addressed by name into a [B, M] tensor whose rows sum to 1.

    Args:
        objectives: the M objective names the value models provide, in column order.
        weights: one {name: lambda} for the whole batch, or one per row. Names not mentioned
            get weight 0. Weights must be finite and >= 0, and not all 0.
        batch_size: B.
    Returns:
        [B, M] float32.
    """
    rows = [weights] * batch_size if isinstance(weights, Mapping) else list(weights)
    if len(rows) != batch_size:
        raise ValueError(f"got {len(rows)} weight dicts for a batch of {batch_size} prompts")
    index = {name: i for i, name in enumerate(objectives)}
    out = torch.zeros(batch_size, len(objectives), dtype=torch.float32)
    for b, row in enumerate(rows):
        for name, w in row.items():
            if name not in index:
                raise ValueError(
                    f"unknown objective {name!r}; the loaded value models provide: {', '.join(objectives) or '(none)'}"
                )
            w = float(w)
            if not w >= 0 or w == float("inf"):
                raise ValueError(f"objective weight for {name!r} must be finite and >= 0, got {w}")
            out[b, index[name]] = w
        total = float(out[b].sum())
        if total <= 0:
            raise ValueError(f"objective weights must not all be zero (row {b}: {dict(row)})")
        out[b] /= total
    return out
