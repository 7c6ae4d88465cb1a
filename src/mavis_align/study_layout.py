"""Where the reproduction study keeps its results (shared by :mod:`.study`, which writes them, and
:mod:`.report`, which reads them)."""

from __future__ import annotations

import json
from pathlib import Path


def final_value_dir(mavis_dir: Path, objective: str) -> tuple[int, Path]:
    """(iteration, value-model folder) of the last finished iteration of ``objective``."""
    i, best = 0, None
    while (mavis_dir / f"iter{i}" / objective / "value" / "best" / "meta.json").exists():
        best = (i, mavis_dir / f"iter{i}" / objective / "value" / "best")
        i += 1
    if best is None:
        raise FileNotFoundError(f"no trained value model for {objective!r} under {mavis_dir}")
    return best


def point_name(iteration: int, objective: str, beta: float) -> str:
    """File stem of a MAVIS point of the single-objective grid."""
    return f"iter{iteration}-{objective}-beta{float(beta):g}"


def load_points(folder: Path) -> dict[str, dict]:
    """{file stem: evaluator result} of every point in ``folder`` (empty when it does not exist)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.exists() else {}
