"""Input checks shared by stages, recipes and caches: each raises a clear error naming the problem."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Axis = Literal["token", "channel"]
AXES = ("token", "channel")

# Bounds on stage and recipe settings, checked when they are built: recipe files are untrusted input, and a setting
# far beyond what a KV cache needs would make gearkit allocate gigabytes or loop for hours instead of failing.
MAX_GROUP = 1 << 16  # entries of one quantization group (a run of tokens or of channels)
MAX_DIM = 4096  # a head dim: bounds low-rank ranks, CSR atoms per slice and slices per vector
MAX_SKETCH = 16 * MAX_DIM  # SignSketch projections per vector
MAX_TOKENS = 1 << 20  # buffer and sink tokens
MAX_ITERS = 64  # power-iteration steps
MAX_LAYER = 4096  # a model layer's index
MAX_SEED = 2**64 - 1  # what a torch.Generator takes


def check_int(value, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """Return `value` if it is an int (not a bool) in `[minimum, maximum]`, else raise `ValueError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        want = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value!r}")
    return value


def check_seed(value, name: str = "seed") -> int:
    """Return `value` if it is an int a `torch.Generator` takes as a seed, else raise `ValueError`."""
    return check_int(value, name, 0, MAX_SEED)


def check_bool(value, name: str) -> bool:
    """Return `value` if it is a bool, else raise `TypeError` naming `name`."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_float_dtype(value, name: str) -> torch.dtype:
    """Return `value` if it is a floating torch dtype, else raise `ValueError` naming `name`."""
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"{name} must be a floating dtype (e.g. torch.float16), got {value!r}")
    return value


def check_fraction(value, name: str) -> float:
    """Return `value` as a float if it is a number in [0, 1] (not a bool), else raise `ValueError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
    return float(value)


def check_kv(x: Tensor, name: str = "x", finite: bool = True) -> None:
    """Raise `ValueError` unless `x` is a floating tensor `KV`, finite unless
    `finite=False` (the caller checks a cast of it)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [batch, kv_heads, tokens, head_dim], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if finite:
        check_finite(x, f"{name} contains NaN or Inf; gearkit compresses finite values only")


def check_finite(t: Tensor, message: str) -> None:
    """Raise `ValueError(message)` if `t` holds NaN or Inf.

    Inside `torch.compile` the check becomes an assertion op in the graph (a data-dependent Python branch
    would break the graph), which raises `RuntimeError(message)` when the compiled code runs.
    """
    if not t.numel():
        return
    if torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(t).all(), message)
    elif not torch.isfinite(t).all():
        raise ValueError(message)


def check_axis(axis: str) -> str:
    """Return `axis` if it is 'token' or 'channel', else raise `ValueError`."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    return axis


def check_storable(t: Tensor, what: str, setting: str = "the stage's storage dtype") -> Tensor:
    """Raise `ValueError` if casting to a storage dtype overflowed `t` to Inf; the message names `setting`."""
    check_finite(t, f"{what} overflow {t.dtype}; set a wider {setting} (e.g. torch.float32)")
    return t
