"""A logistic-regression probe on sentence embeddings, trained in torch, stored as safetensors.

Used for the learned default rewards (positivity, humor, harmful-request detection). No pickle:
the weights are two tensors and the metadata is a JSON string in the safetensors header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open


@dataclass
class LinearProbe:
    """p(y=1|x) = sigmoid(x . weight + bias).

    Attributes:
        weight: [D] float32.
        bias: [] float32.
        meta: free-form JSON-serialisable description (training data, accuracy, encoder).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    meta: dict = field(default_factory=dict)

    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, D] -> probabilities [N]."""
        if features.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"probe expects {self.weight.shape[0]}-dim features, got {features.shape[-1]}")
        return torch.sigmoid(features.float() @ self.weight + self.bias)

    def save(self, path: str | Path) -> None:
        save_file(
            {"weight": self.weight.contiguous(), "bias": self.bias.reshape(1).contiguous()},
            str(path),
            metadata={"mavis_probe": json.dumps(self.meta, sort_keys=True)},
        )

    @classmethod
    def load(cls, path: str | Path) -> "LinearProbe":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"probe weights {path} not found")
        tensors = load_file(str(path))
        if set(tensors) != {"weight", "bias"}:
            raise ValueError(f"{path} is not a mavis-align probe (tensors: {sorted(tensors)})")
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("mavis_probe", "{}"))
        return cls(tensors["weight"].float(), tensors["bias"].float().reshape(()), meta)


def fit_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    l2: float = 1e-3,
    max_iter: int = 200,
    class_balance: bool = True,
) -> LinearProbe:
    """Fit L2-regularised logistic regression with L-BFGS (deterministic for fixed inputs).

    Args:
        features: [N, D] float.
        labels: [N] in {0, 1}.
        l2: weight of 0.5*||w||^2 in the mean loss.
        class_balance: weight examples so both classes contribute equally.
    """
    x = features.float()
    y = labels.float()
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features must be [N, D] and labels [N]; got {tuple(x.shape)} and {tuple(y.shape)}")
    if not ((y == 0) | (y == 1)).all() or y.min() == y.max():
        raise ValueError("labels must be 0/1 and contain both classes")
    pos = y.mean()
    sample_w = torch.where(y == 1, 0.5 / pos, 0.5 / (1 - pos)) if class_balance else torch.ones_like(y)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ w + b
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * sample_w).mean()
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearProbe(w.detach().clone(), b.detach().clone())
