"""GEAR's fused layout: chunks stored by `[SparseOutlier?, Quantizer, LowRankResidual?]` with groups of one head (the
quantizer uniform or a `CodebookQuantizer`).

The one place that recognises the layout and reads it. Decode reads a block of such chunks without rebuilding it:
the codes and the low-rank term through their stages' own products, and the outliers (which replace what the codes
give at their positions) as sparse corrections computed from the codes at those positions only. The Triton kernels
(`gearkit.kernels.attention`, `Pipeline.decompress` on a GPU) read the same layout, also where it sits inside a
`PerLayer` (the layer's stage), a `Chain`, or one rotation (`KernelRead`: the kernels never see the rotation, the
query turns before them and their output turns back after them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from gearkit.compressors.base import Stage
from gearkit.compressors.codebook import CodebookQuantizer
from gearkit.compressors.lowrank import LowRankResidual
from gearkit.compressors.outlier import SparseOutlier
from gearkit.compressors.per_layer import PerHead, PerLayer
from gearkit.compressors.quantizer import Quantizer
from gearkit.compressors.rotation import Rotation
from gearkit.kernels.layout import StorageLayout, layout_tensors
from gearkit.parts import CompressedTensor, LayerPart, LowRankPart, OutlierPart, Part, QuantizedPart

SHAPE = "[SparseOutlier?, Quantizer or CodebookQuantizer, LowRankResidual?]"


def layout_of(stages: Sequence[Stage], shape: tuple[int, ...]) -> tuple[StorageLayout | None, str | None]:
    """How chunks of `shape` `[entries, kv_heads, T, head_dim]` coded by `stages` are laid out, if in this layout.

    Returns:
        `(layout, None)` for `[SparseOutlier?, Quantizer, LowRankResidual?]` whose quantizer groups lie within one head
        and divide its rows, else `(None, why not)`.
    """
    stages = list(stages)
    outlier = stages.pop(0) if stages and isinstance(stages[0], SparseOutlier) else None
    quant = stages.pop(0) if stages and type(stages[0]) in (Quantizer, CodebookQuantizer) else None
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


@dataclasses.dataclass(frozen=True)
class KernelRead:
    """How the Triton kernels read one pipeline's chunks (of one layer): the fused layout of the stored parts, and a
    rotation of each head vector around it, or None. The kernels never see the rotation: as `Rotation.scores` and
    `Rotation.weighted` do on the torch path, the query turns before them (`q @ R`, dot products are kept) and
    their output turns back after them (`out @ R^T`); the log-sum-exp needs nothing.

    Attributes:
        layout: the fused layout of the stored parts.
        quantizer: the stage whose codes the layout holds (a codebook's levels are the table the kernels index).
        rotation: the rotation around the fused stages, or None.
    """

    layout: StorageLayout
    quantizer: Quantizer
    rotation: Rotation | None = None

    def tensors(self, c: CompressedTensor) -> list[Tensor]:
        """The tensors the kernels read of chunks `c` `[entries, kv_heads, T, head_dim]` (see `layout_tensors`)."""
        parts = stored_parts(c)
        codes = next(p for p in parts.parts if isinstance(p, QuantizedPart)).codes
        return list(layout_tensors(parts, self.quantizer.codebook(codes.device)))

    def unsupported(self, c: CompressedTensor) -> str | None:
        """Why the kernels cannot read chunks `c` (code widths, sizes; see `StorageLayout.triton_unsupported`)."""
        return self.layout.triton_unsupported(stored_parts(c))

    def turn_query(self, q: Tensor) -> Tensor:
        """Queries `[..., head_dim]` in the stored vectors' frame, in their own dtype."""
        return q if self.rotation is None else self.rotation.rotate(q.float()).to(q.dtype)

    def turn_back(self, out: Tensor) -> Tensor:
        """Float32 outputs `[..., head_dim]` read in the stored frame, back in the model's."""
        return out if self.rotation is None else self.rotation.unrotate(out)


def _unwrap(c: CompressedTensor) -> tuple[int | None, tuple[Part, ...]]:
    """The model layer a `PerLayer` tagged chunks `c` with, or None, and the parts under its tag and under a `Chain`'s
    part (a rotation stores its inner stage's part as it is)."""
    layer, parts = None, c.parts
    while len(parts) == 1 and isinstance(parts[0], (LayerPart, CompressedTensor)):
        if isinstance(parts[0], LayerPart):
            layer, parts = parts[0].layer, (parts[0].inner,)
        else:
            parts = parts[0].parts
    return layer, parts


def stored_parts(c: CompressedTensor) -> CompressedTensor:
    """The parts the kernels read of chunks `c`, as one `CompressedTensor` (see `_unwrap`)."""
    parts = _unwrap(c)[1]
    return c if parts is c.parts else CompressedTensor(parts, c.shape, c.dtype)


def layer_of(c: CompressedTensor) -> int | None:
    """The model layer a `PerLayer` tagged chunks `c` with (every `PerLayer` of a pipeline picks by the same layer),
    or None."""
    return _unwrap(c)[0]


def read_of(stages: Sequence[Stage], c: CompressedTensor) -> tuple[KernelRead | None, str | None]:
    """How the Triton kernels read chunks `c` `[entries, kv_heads, T, head_dim]` coded by `stages`.

    The fused layout is looked for through a `PerLayer` (the stage of the layer `c` is tagged with), a `Chain` (its
    stages) and at most one `Rotation`/`HadamardRotation`.

    Returns:
        `(read, None)`, or `(None, why not)`.
    """
    stages, parts, rotation = list(stages), c.parts, None
    while len(stages) == 1 and len(parts) == 1:
        stage, part = stages[0], parts[0]
        if isinstance(stage, PerLayer):
            stages, parts = [stage.stage_for(part.layer)], (part.inner,)
        elif isinstance(part, CompressedTensor):  # a `Chain`: a pipeline of stages as one stage
            stages, parts = list(stage.pipeline.stages), part.parts
        elif isinstance(stage, Rotation) and rotation is None:
            stages, rotation = [stage.inner], stage
        elif isinstance(stage, Rotation):
            return None, "the kernels read one rotation around the fused layout, not several"
        elif isinstance(stage, PerHead):
            return None, "PerHead stages are read on the torch path (a launch per head costs more than it saves)"
        else:
            break
    layout, why = layout_of(stages, c.shape)
    if layout is None:
        return None, why
    return KernelRead(layout, next(s for s in stages if isinstance(s, Quantizer)), rotation), None


def _parts(c: CompressedTensor) -> tuple[QuantizedPart, OutlierPart | None, LowRankPart | None]:
    q = next(p for p in c.parts if isinstance(p, QuantizedPart))
    o = next((p for p in c.parts if isinstance(p, OutlierPart)), None)
    lr = next((p for p in c.parts if isinstance(p, LowRankPart)), None)
    return q, o, lr


def _outliers(
    q: QuantizedPart,
    o: OutlierPart,
    lr: LowRankPart | None,
    layout: StorageLayout,
    chunks: int,
    levels: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Chunks' stored outliers as corrections to what their codes (and low-rank term) give: the token and channel
    of each, long `[chunks, batch, heads, N]`, and its value minus that reconstruction, float32 (0 where an outlier
    stored across heads belongs to another head). Only the codes at the outliers' positions are read (code `i` of
    an entry starts at bit `i * bits`); a codebook's codes index `levels` (float32 `[2**bits]`, else None)."""
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
    rebuilt = q.scale.reshape(entries, -1).gather(1, group).float() * (
        code.float() if levels is None else levels[code.long()]
    )
    if q.zero is not None:
        rebuilt = rebuilt + q.zero.reshape(entries, -1).gather(1, group).float()
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


def _levels(stages: Sequence[Stage], device: torch.device) -> Tensor | None:
    """The fused stages' codebook (float32 `[2**bits]`), or None for uniform codes."""
    return next(s for s in stages if isinstance(s, Quantizer)).codebook(device)


def _codes_and_lowrank(stages: Sequence[Stage], c: CompressedTensor) -> list[tuple[Stage, object]]:
    """The (stage, part) pairs whose products add up: the quantizer and the low-rank term, not the outliers."""
    return [(s, p) for s, p in zip(stages, c.parts) if not isinstance(s, SparseOutlier)]


def scores(stages: Sequence[Stage], c: CompressedTensor, q: Tensor, chunks: int, layout: StorageLayout) -> Tensor:
    """`q` `[1, batch, kv_heads, rows, head_dim]` times a block of keys `c` stored in `layout` by `stages`:
    float32 `[chunks, batch, kv_heads, rows, T]`."""
    out = sum(stage.scores(part, q, chunks) for stage, part in _codes_and_lowrank(stages, c))
    quant, o, lr = _parts(c)
    if o is not None:  # scores[t] += q[d] * delta(t, d)
        levels = _levels(stages, q.device)
        token, channel, delta = (
            x[..., None, :].expand(*out.shape[:-1], -1) for x in _outliers(quant, o, lr, layout, chunks, levels)
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
    levels = _levels(stages, p.device)
    token, channel, delta = (
        x[..., None, :].expand(*p.shape[:-1], -1) for x in _outliers(quant, o, lr, layout, p.shape[0], levels)
    )
    correction = p.gather(-1, token) * delta  # [chunks, batch, kv_heads, rows, N]
    return out.scatter_add(-1, channel.movedim(0, -2).flatten(-2), correction.movedim(0, -2).flatten(-2))
