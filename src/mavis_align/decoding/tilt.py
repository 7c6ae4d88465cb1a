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


def tilted_logprobs(
    ref_logp: torch.Tensor,
    values: torch.Tensor,
    beta: float | torch.Tensor,
    *,
    normalize: bool | torch.Tensor = True,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """log pi_MAVIS over the candidates: log_softmax(log pi_ref(a) + beta · v(a)).

    Args:
        ref_logp: [B, k] log pi_ref of the candidates (any constant offset per row is fine).
        values: [B, k] combined values v (before normalisation).
        beta: scalar or [B] tilt strength (>= 0); beta = 1/eta with ``normalize=False`` gives the
            exact soft-optimal tilt when ``values`` are the optimal soft values.
        normalize: apply :func:`normalize_values` first (the paper's default); or [B] bool, per row.
        valid: [B, k] bool mask of usable candidates (others get -inf).
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
