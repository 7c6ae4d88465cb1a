"""Where models run and in which precision: the ``--device`` / ``--dtype`` of every command.

A :class:`Placement` is a device, a parameter dtype and an optional ``device_map`` for a base model
larger than one GPU. Every loader (base model, value models, reward models, the RL policies)
takes ``device=`` / ``dtype=`` arguments; where they are None it uses the *current* placement,
which the CLI and the recipe runners set for the duration of a command with :func:`using`::

    with using(device="cuda", dtype="bfloat16"):
        decoder = MavisDecoder.load("meta-llama/Llama-2-7b-chat-hf", ["helpful=v/helpful"])

``auto`` resolves to CUDA when present (``cuda:LOCAL_RANK`` under ``accelerate launch``), else
CPU; dtype ``auto`` to bfloat16 on a GPU that supports it, float16 on an older GPU, float32 on
the CPU (half precision on a CPU is slower, and is used there only when asked for).

Whatever the models' dtype, the per-step math of decoding -- top-k, NORMALIZE, the tilt,
softmax, the eq. 7 log-ratio sums -- and value targets, losses and ridge solves run in float32
(or float64): the engine casts logits and values to float32 when they leave a model, and value
heads keep float32 parameters (see :meth:`mavis_align.values.ValueModel.place`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Iterator

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Placement:
    """device: where every model goes; dtype: their parameters' dtype; device_map: accelerate's
    map for the *base* model only ("auto" shards it over the visible GPUs), None to keep it whole."""

    device: torch.device
    dtype: torch.dtype
    device_map: str | None = None

    def describe(self) -> str:
        dm = f", device_map={self.device_map}" if self.device_map else ""
        return f"{self.device} {str(self.dtype).removeprefix('torch.')}{dm}"


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None -> CUDA (the process's ``LOCAL_RANK`` GPU) when available, else CPU; other
    names as torch reads them (``cpu``, ``cuda``, ``cuda:1``, ``mps``), checked to exist."""
    if isinstance(name, torch.device):
        device = name
    elif name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError as err:
            raise ValueError(f"--device {name!r} is not a device torch knows (cpu, cuda, cuda:N, mps, auto): {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
        index = device.index if device.index is not None else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: MPS is not available on this machine")
    return device


def resolve_dtype(name: str | torch.dtype | None = "auto", device: torch.device | None = None) -> torch.dtype:
    """``auto``/None -> bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on the
    CPU; otherwise one of :data:`DTYPES`."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype {name} is not supported; choose one of {', '.join(DTYPE_CHOICES)}")
        return name
    if name is None or name == "auto":
        device = device or resolve_device("auto")
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"--dtype {name!r}: choose one of {', '.join(DTYPE_CHOICES)}") from None


def resolve(device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto", device_map: str | None = None) -> Placement:
    """A :class:`Placement` from user-facing names (``auto`` everywhere by default)."""
    dev = resolve_device(device)
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ValueError(f"--device-map {device_map!r}: choose one of {', '.join(DEVICE_MAPS)} (or leave it out)")
    return Placement(dev, resolve_dtype(dtype, dev), device_map)


@dataclass(frozen=True)
class _Request:
    device: str | torch.device = "auto"
    dtype: str | torch.dtype = "auto"
    device_map: str | None = None


_CURRENT: contextvars.ContextVar[tuple[_Request, Placement] | None] = contextvars.ContextVar("mavis_align_placement", default=None)


def _merge(device, dtype, device_map) -> _Request:
    """The current request with the given parts replaced (None keeps a part)."""
    held = _CURRENT.get()
    req = held[0] if held else _Request()
    return _Request(req.device if device is None else device, req.dtype if dtype is None else dtype,
                    req.device_map if device_map is None else device_map)


def current() -> Placement:
    """The placement set by the innermost :func:`using`, else ``resolve()`` (auto, auto)."""
    held = _CURRENT.get()
    return held[1] if held else resolve()


@contextlib.contextmanager
def using(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, device_map: str | None = None) -> Iterator[Placement]:
    """Make a placement current for the loaders called inside the block. None keeps that part of
    the enclosing placement, so a recipe that names only a dtype runs on the command's device; an
    ``auto`` dtype resolves for the device in force (bf16 on a GPU, fp32 on the CPU)."""
    req = _merge(device, dtype, device_map)
    token = _CURRENT.set((req, resolve(req.device, req.dtype, req.device_map)))
    try:
        yield _CURRENT.get()[1]
    finally:
        _CURRENT.reset(token)


def placement_of(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Placement:
    """A loader's placement: its explicit ``device``/``dtype`` over the current ones (None keeps the
    current part; an ``auto`` dtype resolves for the device chosen)."""
    if device is None and dtype is None:
        return current()
    req = _merge(device, dtype, None)
    return resolve(req.device, req.dtype, req.device_map)


def name_of(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (for records and cards)."""
    return str(dtype).removeprefix("torch.")
