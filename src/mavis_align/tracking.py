"""Experiment logging behind one small interface: ``--report-to trackio | wandb | tensorboard | none``.

Training already writes ``metrics.jsonl`` next to its model (always, whatever is chosen here); a
tracker mirrors the same records to a dashboard. trackio is local-first (a SQLite file per project
under ``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``) and works offline; wandb and
TensorBoard are used when installed. ``finetune`` hands the choice to TRL's ``report_to`` as is.

    tracker = make_tracker("trackio", project="mavis-align", run="iter0-helpful", config={...}, out=folder)
    tracker.log({"loss": 0.1}, step=3)
    tracker.finish()
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Protocol

REPORT_TO = ("none", "trackio", "wandb", "tensorboard")


class Tracker(Protocol):
    def log(self, metrics: dict, step: int | None = None) -> None: ...

    def finish(self) -> None: ...


class NullTracker:
    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


def _scalars(metrics: dict) -> dict[str, float]:
    """The finite numeric entries (trackers plot numbers; nested records are flattened with '/')."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update({f"{k}/{kk}": vv for kk, vv in _scalars(v).items()})
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


class TrackioTracker:
    def __init__(self, project: str, run: str, config: dict):
        import trackio

        self._t = trackio
        trackio.init(project=project, name=run, config=config)

    def log(self, metrics: dict, step: int | None = None) -> None:
        values = _scalars(metrics)
        if values:
            self._t.log(values, step=step)

    def finish(self) -> None:
        self._t.finish()


class WandbTracker:
    def __init__(self, project: str, run: str, config: dict):
        import wandb

        self._run = wandb.init(project=project, name=run, config=config)

    def log(self, metrics: dict, step: int | None = None) -> None:
        values = _scalars(metrics)
        if values:
            self._run.log(values, step=step)

    def finish(self) -> None:
        self._run.finish()


class TensorBoardTracker:
    def __init__(self, log_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=str(log_dir))
        self._w.add_text("config", "\n".join(f"    {k}: {v}" for k, v in _scalars(config).items()) or "-")

    def log(self, metrics: dict, step: int | None = None) -> None:
        for k, v in _scalars(metrics).items():
            self._w.add_scalar(k, v, global_step=step)

    def finish(self) -> None:
        self._w.close()


def check_report_to(name: str) -> str:
    if name not in REPORT_TO:
        raise ValueError(f"--report-to {name!r}: choose one of {', '.join(REPORT_TO)}")
    return name


def make_tracker(report_to: str, *, project: str, run: str, config: dict | None = None, out: str | Path | None = None) -> Tracker:
    """A tracker for ``report_to`` (see :data:`REPORT_TO`); a missing package is a one-line error."""
    check_report_to(report_to)
    if int(os.environ.get("RANK", "0")) != 0:  # data-parallel training: process 0 reports
        return NullTracker()
    config = config or {}
    try:
        if report_to == "trackio":
            return TrackioTracker(project, run, config)
        if report_to == "wandb":
            return WandbTracker(project, run, config)
        if report_to == "tensorboard":
            return TensorBoardTracker(Path(out or ".") / "tensorboard", config)
    except ImportError as err:
        pkg = {"trackio": "trackio", "wandb": "wandb", "tensorboard": "tensorboard"}[report_to]
        raise ImportError(f"--report-to {report_to} needs the {pkg} package (pip install {pkg}): {err}") from None
    return NullTracker()
