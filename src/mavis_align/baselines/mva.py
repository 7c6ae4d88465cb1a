"""MVA-style decorrelated adapters with extrapolation (Multi-Value Alignment, value decorrelation).

One LoRA adapter per objective, fine-tuned like the per-objective RL baselines (the same GRPO
trainer and settings), except that adapter m is trained with an added penalty on the dependence
between its weight update and the updates of the adapters trained before it (sequential: the
first adapter is an ordinary per-objective policy). The adapters are then combined in weight space,

    theta(lambda) = theta_ref + sum_m lambda_m (theta_m - theta_ref),

as Rewarded Soups do for lambda on the simplex, and *extrapolated*: lambda outside the simplex
(e.g. (1.2, -0.2)) reaches points beyond the trained ones.

The dependence estimator (:func:`dependence_penalty`). For one weight matrix W of the base model,
the two adapters' updates are ΔW_a = s_a B_a A_a and ΔW_b = s_b B_b A_b. Their entries are taken
as paired samples of two scalar variables; under a joint Gaussian model their mutual information
is I = -1/2 log(1 - rho^2), rho the Pearson correlation of the entries. The penalty is the mean of I
over the matrices both adapters update. It is 0 exactly when the updates are uncorrelated
(e.g. orthogonal centred updates), grows without bound as one update approaches a multiple of
the other, and is differentiable in the trained adapter's factors. It measures linear
dependence only (a Gaussian estimate, not a general MI estimator).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .rl import RLConfig, train_rl_policy

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")
RHO2_MAX = 1.0 - 1e-6  # keeps the penalty finite when an update is a multiple of another


def _module_deltas(factors: Mapping[str, dict[str, torch.Tensor]], scaling: float | Mapping[str, float]) -> dict[str, torch.Tensor]:
    out = {}
    for module, parts in factors.items():
        if set(parts) != {"A", "B"}:
            raise ValueError(f"LoRA module {module} lacks its {'A' if 'A' not in parts else 'B'} factor")
        s = scaling[module] if isinstance(scaling, Mapping) else scaling
        out[module] = s * (parts["B"] @ parts["A"])
    return out


def lora_deltas(model) -> dict[str, torch.Tensor]:
    """ΔW = scaling · B A of every LoRA module of a PEFT model (differentiable), keyed by module path."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    scaling: dict[str, float] = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_B") and "default" in getattr(module, "lora_A", {}):
            key = _LORA_KEY.sub(r"\g<module>", name + ".lora_A.weight")
            factors[key] = {"A": module.lora_A["default"].weight, "B": module.lora_B["default"].weight}
            scaling[key] = float(module.scaling["default"])
    if not factors:
        raise ValueError("the model has no LoRA modules")
    return _module_deltas(factors, scaling)


def adapter_deltas(folder: str | Path) -> dict[str, torch.Tensor]:
    """ΔW of every module of a saved policy's LoRA adapter (``folder/adapter``), keyed like :func:`lora_deltas`."""
    from safetensors.torch import load_file

    adapter = Path(folder) / "adapter"
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no LoRA adapter ({config_path} is missing)")
    cfg = json.loads(config_path.read_text())
    scaling = float(cfg["lora_alpha"]) / float(cfg["r"])
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(adapter / "adapter_model.safetensors")).items():
        m = _LORA_KEY.match(key)
        if m:
            factors.setdefault(m["module"], {})[m["part"]] = tensor.float()
    return _module_deltas(factors, scaling)


def gaussian_mi(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """-1/2 log(1 - rho^2), rho the Pearson correlation of the entries of ``a`` and ``b`` (same shape)."""
    if a.shape != b.shape:
        raise ValueError(f"updates of one matrix must have one shape, got {list(a.shape)} and {list(b.shape)}")
    x, y = a.reshape(-1).float(), b.reshape(-1).float()
    x, y = x - x.mean(), y - y.mean()
    rho2 = (x @ y) ** 2 / ((x @ x) * (y @ y) + eps)
    return -0.5 * torch.log1p(-rho2.clamp(max=RHO2_MAX))


def dependence_penalty(deltas: Mapping[str, torch.Tensor], others: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean Gaussian mutual information (:func:`gaussian_mi`) between two adapters' updates over the
    matrices both update -> scalar tensor (differentiable in ``deltas``)."""
    shared = sorted(set(deltas) & set(others))
    if not shared:
        raise ValueError("the two adapters update no matrix in common (different target modules?)")
    return torch.stack([gaussian_mi(deltas[k], others[k].to(deltas[k].device)) for k in shared]).mean()


def train_decorrelated_adapter(base: str, prompts: list[str], weights: dict[str, float], out: str | Path, config: RLConfig = RLConfig(),
                               *, against: list[str | Path], mi_weight: float = 1.0, chat: bool = True, progress: bool = True,
                               report_to: str = "none") -> Path:
    """A per-objective LoRA policy (as :func:`~mavis_align.baselines.rl.train_rl_policy`) whose GRPO
    loss adds ``mi_weight`` × the summed :func:`dependence_penalty` against each adapter in ``against``
    (frozen). Skips the work when ``out/mavis_policy.json`` exists."""
    out = Path(out)
    if (out / "mavis_policy.json").exists():
        return out
    if not against:
        raise ValueError("a decorrelated adapter needs at least one earlier adapter (`against`)")
    if not mi_weight >= 0:
        raise ValueError(f"mi_weight must be >= 0, got {mi_weight}")
    metas = [json.loads((Path(f) / "mavis_policy.json").read_text()) for f in against]
    if any(m["base"] != base for m in metas):
        raise ValueError(f"adapters to decorrelate from must share the base {base!r}: {[m['base'] for m in metas]}")
    frozen = [adapter_deltas(f) for f in against]

    def penalty(peft_model) -> torch.Tensor:
        mine = lora_deltas(peft_model)
        return mi_weight * sum(dependence_penalty(mine, other) for other in frozen)

    record = {"decorrelated": {"against": [str(f) for f in against], "mi_weight": mi_weight, "estimator": "mean Gaussian MI of ΔW entries"}}
    return train_rl_policy(base, prompts, weights, out, config, chat=chat, progress=progress, report_to=report_to, penalty=penalty, meta=record)
