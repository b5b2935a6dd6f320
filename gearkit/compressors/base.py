"""The stage interface and the input checks every stage shares."""

from __future__ import annotations

import abc
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from gearkit.compressed import DensePart, Part

Axis = Literal["token", "channel"]
AXES = ("token", "channel")


def check_kv(x: Tensor, name: str = "x") -> None:
    """Raise `ValueError` unless `x` is a finite floating tensor `[batch, kv_heads, tokens, head_dim]`."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [batch, kv_heads, tokens, head_dim], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
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


def check_storable(t: Tensor, what: str) -> Tensor:
    """Raise `ValueError` if casting to a storage dtype overflowed `t` to Inf."""
    check_finite(t, f"{what} overflow {t.dtype}; configure a wider storage dtype (e.g. torch.float32)")
    return t


class Stage(nn.Module, abc.ABC):
    """One compression stage: `encode(x) -> part`, `decode(part) -> tensor`.

    Stages hold configuration only, never per-request state. Inside a `Pipeline` a stage encodes the
    residual the earlier stages left; `exclude` marks entries an earlier stage already stores exactly, which
    the stage should not spend precision on (the pipeline discards its output there).

    A stage with `needs_saliency = True` (ZipCache's `MixedPrecision`) also takes per-token saliency scores,
    `encode(x, exclude, saliency=...)`; a `Pipeline` forwards its `saliency` argument to such stages only.
    A stage with `needs_positions = True` (CSR's `SparseDictionary`) takes `encode(x, exclude, positions=...,
    layer=...)`: each batch entry's first sequence position and the model layer, which a `Pipeline` forwards.
    """

    needs_saliency: ClassVar[bool] = False
    needs_positions: ClassVar[bool] = False

    @abc.abstractmethod
    def encode(self, x: Tensor, exclude: Tensor | None = None) -> Part:
        """Compress `x`.

        Args:
            x: float tensor `[batch, kv_heads, tokens, head_dim]`, finite.
            exclude: optional bool tensor shaped like `x`; True entries are stored exactly elsewhere.

        Returns:
            The stored part.
        """

    @abc.abstractmethod
    def decode(self, part: Part) -> Tensor:
        """Reconstruct from a part: float32 `[batch, kv_heads, tokens, head_dim]`."""

    def exact_mask(self, part: Part) -> Tensor | None:
        """Bool `[batch, kv_heads, tokens, head_dim]` of entries this part stores exactly, or None."""
        return None

    def check_model(self, config) -> None:
        """Raise `ValueError` if this stage cannot serve the model of `config` (default: every model fits)."""

    def shared_nbytes(self, layer: int | None) -> int:
        """Bytes of shared artifacts this stage reads for `layer` (a dictionary), as this layer's share; 0 here."""
        return 0

    def forward(self, x: Tensor) -> Tensor:
        """Round trip `x` through this stage alone; returns `x`'s shape and dtype."""
        check_kv(x)
        return self.decode(self.encode(x.float())).to(x.dtype)


class FullPrecision(Stage):
    """Store the tensor as it is in `dtype` (the fp16/bf16 baseline).

    Args:
        dtype: storage dtype.
    """

    def __init__(self, dtype: torch.dtype = torch.float16):
        super().__init__()
        if not dtype.is_floating_point:
            raise ValueError(f"FullPrecision needs a floating dtype, got {dtype}")
        self.dtype = dtype

    def encode(self, x: Tensor, exclude: Tensor | None = None) -> DensePart:
        data = x.to(self.dtype, memory_format=torch.contiguous_format, copy=True)
        return DensePart(check_storable(data, "values"))

    def decode(self, part: DensePart) -> Tensor:
        return part.data.float()

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}"
