"""Sparse outliers: the largest and smallest entries of each row, stored exactly."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from gearkit.compressors.base import NO_CONTEXT, Context, Stage, register_stage
from gearkit.compressors.checks import Axis, check_axis, check_bool, check_float_dtype, check_fraction, check_storable
from gearkit.parts import OutlierPart


def index_dtype(length: int) -> torch.dtype:
    """The smallest integer dtype that addresses every position of a row of `length`."""
    if length <= 256:
        return torch.uint8
    if length <= 2**15:
        return torch.int16
    return torch.int32


@register_stage
class SparseOutlier(Stage):
    """Take the top and bottom `ratio / 2` of each row out and store them exactly (value + position).

    Rows run along `axis` of `KV`: with `axis="token"` a row is one token's
    vector (values in GEAR), with `axis="channel"` a row is one channel's run over the tokens (keys in GEAR).
    With `across_heads=True` (token axis only) a row is a token's vectors of all heads, which allows finer
    fractions (one entry per side of 3 heads x 64 channels is 1%).
    Each row keeps `count_per_side(row_length)` = `round(ratio * row_length / 2)` entries at each end, so the
    fraction is counted from the real row length.

    Args:
        ratio: fraction of each row stored exactly, in [0, 1].
        axis: "token" or "channel".
        value_dtype: dtype of the stored values; entries are exact when this dtype holds them (fp16 caches).
        across_heads: rows span all heads of a token (only with `axis="token"`).
    """

    def __init__(
        self, ratio: float, axis: Axis = "token", value_dtype: torch.dtype = torch.float16, across_heads: bool = False
    ):
        super().__init__()
        self.ratio = check_fraction(ratio, "outlier ratio")
        self.axis = check_axis(axis)
        if check_bool(across_heads, "across_heads") and axis != "token":
            raise ValueError("across_heads takes a token's vectors of all heads, so it needs axis='token'")
        self.value_dtype, self.across_heads = check_float_dtype(value_dtype, "value_dtype"), across_heads

    def config(self) -> dict:
        return {
            "ratio": self.ratio,
            "axis": self.axis,
            "value_dtype": self.value_dtype,
            "across_heads": self.across_heads,
        }

    def count_per_side(self, row_length: int) -> int:
        """Entries taken from each end of a row of `row_length`."""
        return min(int(self.ratio * row_length / 2 + 0.5), row_length // 2)

    def _to_rows(self, x: Tensor) -> Tensor:
        if self.across_heads:
            return rearrange(x, "b h t d -> b t (h d)")
        return x.transpose(-1, -2) if self.axis == "channel" else x

    def _from_rows(self, rows: Tensor, heads: int) -> Tensor:
        if self.across_heads:
            return rearrange(rows, "b t (h d) -> b h t d", h=heads)
        return rows.transpose(-1, -2) if self.axis == "channel" else rows

    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> OutlierPart:
        """Store the extremes of each row of `x` `KV`."""
        rows = self._to_rows(x.float())
        length = rows.shape[-1]
        k = self.count_per_side(length)
        skip = None if exclude is None else self._to_rows(exclude)
        high_pool = rows if skip is None else rows.masked_fill(skip, float("-inf"))
        top = high_pool.topk(k, dim=-1).indices
        # The bottom k are chosen among the rest, so a flat row never yields the same position twice.
        low_pool = rows.scatter(-1, top, float("inf"))
        if skip is not None:
            low_pool = low_pool.masked_fill(skip, float("inf"))
        bottom = low_pool.topk(k, dim=-1, largest=False).indices
        idx = torch.cat([top, bottom], -1)
        values = check_storable(
            rows.gather(-1, idx).to(self.value_dtype), "outlier values", "SparseOutlier value_dtype"
        )
        return OutlierPart(values, idx.to(index_dtype(length)), length, x.shape[1])

    def _scatter(self, part: OutlierPart, src: Tensor) -> Tensor:
        rows = src.new_zeros(*part.values.shape[:-1], part.row_length).scatter(-1, part.indices.long(), src)
        return self._from_rows(rows, part.heads)

    def decode(self, part: OutlierPart) -> Tensor:
        """The stored entries in place, zeros elsewhere: float32 `KV`."""
        return self._scatter(part, part.values.float())

    def exact_mask(self, part: OutlierPart) -> Tensor:
        """Bool `KV`, True where an entry is stored."""
        return self._scatter(part, torch.ones_like(part.values, dtype=torch.bool))

    def extra_repr(self) -> str:
        heads = ", across_heads=True" if self.across_heads else ""
        return f"ratio={self.ratio}, axis={self.axis!r}, value_dtype={self.value_dtype}{heads}"
