"""What produced an output: resolved config, seed, package versions, git commit."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path

PACKAGES = ("mavis-align", "torch", "transformers", "peft", "safetensors", "h5py", "numpy", "accelerate", "tokenizers")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> dict[str, object] | None:
    """{"commit": sha, "dirty": bool} of the checkout this package runs from, or None."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5)
        return {"commit": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def run_record(config: dict, seed: int | None) -> dict:
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "seed": seed,
        "versions": package_versions(),
        "git": git_commit(),
        "placement": _placement(),
    }


def _placement() -> str:
    """The device and dtype the models of this run load with (see :mod:`mavis_align.placement`)."""
    from .placement import current

    return current().describe()


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` as indented JSON through a temporary file, so a reader (or a resumed run after
    a kill) never sees a half-written file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def write_run_record(folder: str | Path, config: dict, seed: int | None, name: str = "run.json") -> Path:
    """Write :func:`run_record` as JSON to ``folder/name`` and return the path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(run_record(config, seed), indent=2, default=str) + "\n")
    return path
