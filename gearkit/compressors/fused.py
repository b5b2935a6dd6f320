"""GEAR's fused layout: chunks stored by `[SparseOutlier?, Quantizer, LowRankResidual?]` with groups of one head.

The one place that recognises the layout and reads it. Decode reads a block of such chunks without rebuilding it:
the codes and the low-rank term through their stages' own products, and the outliers (which replace what the codes
give at their positions) as sparse corrections computed from the codes at those positions only. The Triton kernels
(`gearkit.kernels.attention`, `Pipeline.decompress` on a GPU) read the same layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from gearkit.compressors.base import Stage
from gearkit.compressors.lowrank import LowRankResidual
from gearkit.compressors.outlier import SparseOutlier
from gearkit.compressors.quantizer import Quantizer
from gearkit.kernels.layout import StorageLayout
from gearkit.parts import CompressedTensor, LowRankPart, OutlierPart, QuantizedPart

SHAPE = "[SparseOutlier?, Quantizer, LowRankResidual?]"


def layout_of(stages: Sequence[Stage], shape: tuple[int, ...]) -> tuple[StorageLayout | None, str | None]:
    """How chunks of `shape` `[entries, kv_heads, T, head_dim]` coded by `stages` are laid out, if in this layout.

    Returns:
        `(layout, None)` for `[SparseOutlier?, Quantizer, LowRankResidual?]` whose quantizer groups lie within one head
        and divide its rows, else `(None, why not)`.
    """
    stages = list(stages)
    outlier = stages.pop(0) if stages and isinstance(stages[0], SparseOutlier) else None
    quant = stages.pop(0) if stages and type(stages[0]) is Quantizer else None
    lowrank = stages.pop(0) if stages and isinstance(stages[0], LowRankResidual) else None
    if quant is None or stages:
        return None, f"the fused layout is {SHAPE}"
    layout = quant.read_layout(shape)
    if layout is None:
        return None, "the fused layout reads quantizer groups of one head that divide the rows"
    heads, t, d = shape[1:]
    k2, o_channel, o_heads = 0, False, False
    if outlier is not None:
        o_channel, o_heads = outlier.axis == "channel", outlier.across_heads
        k2 = 2 * outlier.count_per_side(heads * d if o_heads else t if o_channel else d)
    rank = lowrank.rank if lowrank else 0
    return dataclasses.replace(layout, k2=k2, o_channel=o_channel, rank=rank, o_heads=o_heads), None


def _parts(c: CompressedTensor) -> tuple[QuantizedPart, OutlierPart | None, LowRankPart | None]:
    q = next(p for p in c.parts if isinstance(p, QuantizedPart))
    o = next((p for p in c.parts if isinstance(p, OutlierPart)), None)
    lr = next((p for p in c.parts if isinstance(p, LowRankPart)), None)
    return q, o, lr


def _outliers(
    q: QuantizedPart, o: OutlierPart, lr: LowRankPart | None, layout: StorageLayout, chunks: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Chunks' stored outliers as corrections to what their codes (and low-rank term) give: the token and channel
    of each, long `[chunks, batch, heads, N]`, and its value minus that reconstruction, float32 (0 where an outlier
    stored across heads belongs to another head). Only the codes at the outliers' positions are read (code `i` of
    an entry starts at bit `i * bits`)."""
    entries, heads = q.shape[:2]
    rows, length = layout.rows
    along = o.indices.long()  # [entries, T, k2] across heads, else [entries, heads, outlier rows, k2]
    across = torch.arange(along.shape[-2], device=along.device)[:, None].expand_as(along)
    if layout.o_heads:  # indices are head * D + channel
        head, token, channel = along.div(layout.head_dim, rounding_mode="floor"), across, along % layout.head_dim
    else:
        head = torch.arange(heads, device=along.device)[:, None, None].expand_as(along)
        token, channel = (along, across) if layout.o_channel else (across, along)
    head, token, channel = (x.reshape(entries, -1) for x in (head, token, channel))
    row, col = (channel, token) if layout.q_channel else (token, channel)  # in the quantizer's layout
    row = row + rows * head  # rows of all heads of an entry in turn
    bit = (row * length + col) * layout.bits
    data = q.codes.reshape(entries, -1)
    byte = bit >> 3
    word = data.gather(1, byte).int() | data.gather(1, (byte + 1).clamp(max=data.shape[1] - 1)).int() << 8
    code = (word >> (bit & 7)) & ((1 << layout.bits) - 1)
    group = row * (length // layout.group) + col // layout.group
    scale, zero = (t.reshape(entries, -1).gather(1, group).float() for t in (q.scale, q.zero))
    rebuilt = torch.addcmul(zero, scale, code.float())
    if lr is not None:  # left[t] . right[d]
        rank = lr.left.shape[-1]
        at_token = (head * layout.tokens + token)[..., None].expand(-1, -1, rank)
        at_channel = (head * layout.head_dim + channel)[..., None].expand(-1, -1, rank)
        left = lr.left.float().reshape(entries, -1, rank).gather(1, at_token)
        right = lr.right.float().reshape(entries, -1, rank).gather(1, at_channel)
        rebuilt = rebuilt + (left * right).sum(-1)
    delta = o.values.float().reshape(entries, -1) - rebuilt
    if layout.o_heads:  # every head sees all of a token's outliers, with zero weight for the other heads'
        mine = head[:, None] == torch.arange(heads, device=head.device)[:, None]
        token, channel = (x[:, None].expand(-1, heads, -1) for x in (token, channel))
        delta = torch.where(mine, delta[:, None], 0.0)
    return tuple(x.reshape(chunks, entries // chunks, heads, -1) for x in (token, channel, delta))


def _codes_and_lowrank(stages: Sequence[Stage], c: CompressedTensor) -> list[tuple[Stage, object]]:
    """The (stage, part) pairs whose products add up: the quantizer and the low-rank term, not the outliers."""
    return [(s, p) for s, p in zip(stages, c.parts) if not isinstance(s, SparseOutlier)]


def scores(stages: Sequence[Stage], c: CompressedTensor, q: Tensor, chunks: int, layout: StorageLayout) -> Tensor:
    """`q` `[1, batch, kv_heads, rows, head_dim]` times a block of keys `c` stored in `layout` by `stages`:
    float32 `[chunks, batch, kv_heads, rows, T]`."""
    out = sum(stage.scores(part, q, chunks) for stage, part in _codes_and_lowrank(stages, c))
    quant, o, lr = _parts(c)
    if o is not None:  # scores[t] += q[d] * delta(t, d)
        token, channel, delta = (
            x[..., None, :].expand(*out.shape[:-1], -1) for x in _outliers(quant, o, lr, layout, chunks)
        )
        out = out.scatter_add(-1, token, q.expand(chunks, *q.shape[1:]).gather(-1, channel) * delta)
    return out


def weighted(stages: Sequence[Stage], c: CompressedTensor, p: Tensor, layout: StorageLayout) -> Tensor:
    """Weights `p` `[chunks, batch, kv_heads, rows, T]` times a block of values `c` stored in `layout` by `stages`,
    summed over the chunks: float32 `[batch, kv_heads, rows, head_dim]`."""
    out = sum(stage.weighted(part, p) for stage, part in _codes_and_lowrank(stages, c))
    quant, o, lr = _parts(c)
    if o is None:
        return out
    # out[d] += p[t] * delta(t, d), every chunk's corrections scattered into the one output
    token, channel, delta = (
        x[..., None, :].expand(*p.shape[:-1], -1) for x in _outliers(quant, o, lr, layout, p.shape[0])
    )
    correction = p.gather(-1, token) * delta  # [chunks, batch, kv_heads, rows, N]
    return out.scatter_add(-1, channel.movedim(0, -2).flatten(-2), correction.movedim(0, -2).flatten(-2))
