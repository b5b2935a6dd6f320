"""Which implementation runs a kernel: the pure-torch reference or Triton.

- `"auto"` (default): Triton on CUDA tensors when Triton is installed and the layout is supported, torch
  otherwise (CPU included: the Triton interpreter is a test tool, not a fast path); decode attention's torch path
  reads the stored chunks as the pipelines say (`gearkit.decode_attention`);
- `"torch"`: always the reference (decode attention decompresses each block);
- `"triton"`: always Triton; raises when it cannot run (no Triton, a CPU tensor without `TRITON_INTERPRET=1`,
  or a layout the kernels do not cover), never falls back silently.

The choice is process-wide (`set_backend`), scoped (`with use_backend(...)`), or from the environment variable
`GEARKIT_BACKEND` read at call time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")
_chosen: str | None = None


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    return name


def get_backend() -> str:
    """The backend in force: the one set in code, else `$GEARKIT_BACKEND`, else `"auto"`."""
    return _chosen or _check(os.environ.get("GEARKIT_BACKEND", "auto"))


def set_backend(name: str) -> None:
    """Set the process-wide backend: `"auto"`, `"torch"` or `"triton"`."""
    global _chosen
    _chosen = _check(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the enclosed code with backend `name`, then restore the previous choice."""
    global _chosen
    previous, _chosen = _chosen, _check(name)
    try:
        yield
    finally:
        _chosen = previous


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # a file-system search: once per process


def triton_unavailable(device: torch.device) -> str | None:
    """Why Triton cannot run on `device` here, or None if it can."""
    if not _triton_installed():
        return "Triton is not installed (pip install triton)"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton needs a CUDA device (got {device.type}), or TRITON_INTERPRET=1 to interpret on the CPU"
    return None


def may_use_triton(device: torch.device) -> bool:
    """Whether a call on `device` could run Triton at all (cheap: callers then work out whether the layout is
    covered, and `use_triton` decides)."""
    backend = get_backend()
    return backend == "triton" or (backend == "auto" and device.type == "cuda")


def use_triton(device: torch.device, unsupported: str | None = None) -> bool:
    """Whether a kernel call on `device` should run Triton.

    Args:
        device: device of the call's tensors.
        unsupported: why the call's layout is outside what the Triton kernel covers, or None.

    Raises:
        RuntimeError: the backend is `"triton"` and Triton cannot run this call.
    """
    backend = get_backend()
    if backend == "torch":
        return False
    reason = unsupported or triton_unavailable(device)
    if backend == "triton" and reason:
        raise RuntimeError(f"kernel backend 'triton' was requested but cannot run: {reason}")
    if backend == "auto" and device.type != "cuda":
        return False
    return reason is None
