"""The stored parts of a compressed tensor, and the batch algebra over them.

Each part is a frozen dataclass of tensors plus static metadata (Python ints and tuples, not counted as
bytes). Parts are registered as pytrees, so they pass through `torch.compile` and `torch.utils._pytree`
utilities; their `nbytes` is the storage of the tensors they hold. Every tensor a part holds has the batch as
its leading dimension, so parts join, select and slice along the batch without touching their bytes.

Shapes: `KV` stands for a key or value tensor `[batch, kv_heads, tokens, head_dim]` throughout gearkit, and a
"block" of chunks for `[(chunks batch), kv_heads, T, head_dim]`: chunks of `T` tokens stacked chunk-major along
the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from gearkit.accounting import add_counts, bits_per_element, fp16_ratio, tensor_nbytes

__all__ = [
    "ChannelScaledPart",
    "CompressedTensor",
    "DensePart",
    "DictionaryPart",
    "HeadsPart",
    "LayerPart",
    "LowRankPart",
    "MixedPart",
    "OutlierPart",
    "Part",
    "PositionedPart",
    "QuantizedPart",
    "SketchPart",
]


class Part:
    """Base of the stored parts. Subclasses are dataclasses; their tensor fields are the bytes held."""

    component: ClassVar[str] = "data"

    def _fields(self):
        return ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor held, including those of nested parts, by dotted field name."""
        out = {}
        for name, v in self._fields():
            if isinstance(v, Tensor):
                out[name] = v
            for i, child in _child_parts(v):
                prefix = name if i is None else f"{name}.{i}"
                out.update({f"{prefix}.{k}": t for k, t in child.tensors().items()})
        return out

    @property
    def nbytes(self) -> int:
        """Total bytes held by this part (nested parts included)."""
        return sum(tensor_nbytes(t) for t in self.tensors().values())

    def components(self) -> dict[str, int]:
        """Bytes held, by component name (codes, scales, outliers, lowrank, dense); nested parts add theirs."""
        own = sum(tensor_nbytes(v) for _, v in self._fields() if isinstance(v, Tensor))
        children = [child.components() for _, v in self._fields() for _, child in _child_parts(v)]
        return add_counts({self.component: own} if own else {}, *children)


def _child_parts(value) -> list[tuple[int | None, Part]]:
    """The parts nested in a field value: a part, or a tuple of parts (indexed)."""
    if isinstance(value, Part):
        return [(None, value)]
    if isinstance(value, tuple):
        return [(i, p) for i, p in enumerate(value) if isinstance(p, Part)]
    return []


def _register(cls):
    """Make `cls` a frozen dataclass and register it as a pytree (tensors and parts are children, the rest
    static context)."""
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    names = [f.name for f in dataclasses.fields(cls)]

    def is_child(v) -> bool:
        return isinstance(v, Tensor) or bool(_child_parts(v))

    def flatten(part):
        child_names = tuple(n for n in names if is_child(getattr(part, n)))
        static = tuple((n, getattr(part, n)) for n in names if n not in child_names)
        return [getattr(part, n) for n in child_names], (child_names, static)

    def unflatten(children, context):
        child_names, static = context
        return cls(**dict(zip(child_names, children)), **dict(static))

    pytree.register_pytree_node(cls, flatten, unflatten, serialized_type_name=f"gearkit.{cls.__name__}")
    return cls


@_register
class DensePart(Part):
    """A tensor stored as it is, in a storage dtype (fp16 for the `fp16` baseline).

    Attributes:
        data: `KV`.
    """

    data: Tensor
    component: ClassVar[str] = "dense"


@_register
class QuantizedPart(Part):
    """Bit-packed integer codes with one scale (and optionally one zero) per group: an entry decodes as
    `scale * c + zero`, where `c` is its code (uniform quantization) or the level its code indexes in the
    stage's codebook (non-uniform).

    Attributes:
        codes: uint8 `[batch, packed_nbytes(numel // batch, bits)]`: each batch entry's codes, in the grouped
            layout's order, packed on their own.
        scale: `[..., n_groups]` in the quantizer's parameter dtype.
        zero: `[..., n_groups]`, same dtype, or None for 0 (codebooks centered at zero).
        bits: code width.
        shape: shape of the tensor that was quantized, `KV`.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    bits: int
    shape: tuple[int, ...]

    def components(self) -> dict[str, int]:
        scales = tensor_nbytes(self.scale) + (0 if self.zero is None else tensor_nbytes(self.zero))
        return {"codes": tensor_nbytes(self.codes), "scales": scales}


@_register
class SketchPart(Part):
    """The signs of a seeded projection of each vector, and one scale per vector (QJL's sketch).

    Attributes:
        signs: uint8 `[batch, packed_nbytes(kv_heads * tokens * size, 1)]`: one bit per projected coordinate
            (1 = non-negative), each batch entry packed on its own.
        scale: `[batch, kv_heads, tokens, 1]` in the stage's parameter dtype.
        size: projected coordinates per vector.
        shape: shape of the sketched tensor, `KV`.
    """

    signs: Tensor
    scale: Tensor
    size: int
    shape: tuple[int, ...]

    def components(self) -> dict[str, int]:
        return {"signs": tensor_nbytes(self.signs), "scales": tensor_nbytes(self.scale)}


@_register
class PositionedPart(Part):
    """An inner part coded at known sequence positions (pre-RoPE keys), and each batch entry's first position.

    Attributes:
        inner: the part of the tensor as it was coded (before the rotary embedding).
        start: int32 `[batch]` sequence position of each entry's first token.
        rope: the rotary embedding undone before coding and redone after decoding (a `gearkit.compressors.RoPE`,
            a value: static metadata, no bytes).
    """

    inner: Part
    start: Tensor
    rope: object
    component: ClassVar[str] = "positions"


@_register
class LayerPart(Part):
    """The part of the stage a `PerLayer` chose for one model layer, tagged with that layer (no bytes of its own).

    Attributes:
        inner: the chosen stage's part.
        layer: the model layer (static metadata).
    """

    inner: Part
    layer: int


@_register
class HeadsPart(Part):
    """The parts of a `PerHead`: one per KV head, each of a tensor `[batch, 1, tokens, head_dim]` (no bytes of its own).

    Attributes:
        heads: one part per KV head, in head order.
    """

    heads: tuple[Part, ...]


@_register
class OutlierPart(Part):
    """Entries stored exactly: per row, values and their positions within the row.

    Attributes:
        values: `[..., rows, count]` in the stage's value dtype.
        indices: `[..., rows, count]` in the smallest integer dtype that addresses the row.
        row_length: length of each row.
        heads: number of KV heads of the tensor the rows were taken from.
    """

    values: Tensor
    indices: Tensor
    row_length: int
    heads: int
    component: ClassVar[str] = "outliers"


@_register
class LowRankPart(Part):
    """Thin factors of a low-rank term `left @ right.mT`, one pair per (batch, head) matrix.

    Attributes:
        left: `[batch, kv_heads, tokens, rank]`.
        right: `[batch, kv_heads, head_dim, rank]`.
    """

    left: Tensor
    right: Tensor
    component: ClassVar[str] = "lowrank"


@_register
class ChannelScaledPart(Part):
    """A quantized part of channel-normalised values and the per-channel scales to undo the normalisation.

    Attributes:
        quantized: the tokenwise-quantized normalised tensor.
        channel_scale: `[batch, kv_heads, 1, head_dim]`.
    """

    quantized: QuantizedPart
    channel_scale: Tensor
    component: ClassVar[str] = "scales"


@_register
class MixedPart(Part):
    """Salient tokens and the others stored by two stages, and the bit-packed map of which is which.

    Attributes:
        salient: uint8 `[batch, packed_nbytes(kv_heads * tokens, 1)]`: one bit per (KV head, token) of each batch
            entry, packed on its own (1 = salient); counted as the `saliency_map` component.
        high: the salient tokens' part, of a tensor `[batch, kv_heads, salient, head_dim]` (sequence order).
        low: the other tokens' part, of a tensor `[batch, kv_heads, tokens - salient, head_dim]`.
        shape: shape of the whole tensor, `KV`.
    """

    salient: Tensor
    high: Part
    low: Part
    shape: tuple[int, ...]
    component: ClassVar[str] = "saliency_map"


@_register
class DictionaryPart(Part):
    """Sparse dictionary codes (CSR): per vector, atom indices and coefficients over a shared dictionary.

    The dictionary itself is not held here (it is shared by every chunk and layer of its group); caches report
    its bytes separately (`dictionary` component).

    Attributes:
        indices: int16 `[batch, kv_heads, tokens, chunks * sparsity]` atom indices, slice-major.
        coefficients: `[batch, kv_heads, tokens, chunks * sparsity]`, fp16, or int8 codes when `scale` is set.
        scale: fp16 `[batch, kv_heads, tokens, 1]` per-vector scale of int8 coefficients, or None.
        start: int32 `[batch]` sequence position of each entry's first token (pre-RoPE keys), or None.
        layer: the model layer whose dictionary group coded it (None: a single-group dictionary).
        chunks: slices per vector `s_n`.
    """

    indices: Tensor
    coefficients: Tensor
    scale: Tensor | None
    start: Tensor | None
    layer: int | None
    chunks: int
    component: ClassVar[str] = "sparse_codes"

    def components(self) -> dict[str, int]:
        out = {"atom_indices": tensor_nbytes(self.indices), "coefficients": tensor_nbytes(self.coefficients)}
        if self.scale is not None:
            out["scales"] = tensor_nbytes(self.scale)
        if self.start is not None:
            out["positions"] = tensor_nbytes(self.start)
        return out


@_register
class CompressedTensor(Part):
    """A tensor compressed by a `Pipeline`: one part per stage, plus the original shape and dtype.

    Attributes:
        parts: the stages' parts, in pipeline order.
        shape: original shape `KV`.
        dtype: original dtype, restored on decompression.
    """

    parts: tuple[Part, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def bits_per_element(self) -> float:
        """All-in stored bits per original element (0 for an empty tensor)."""
        return bits_per_element(self.nbytes, self.numel)

    @property
    def compression_ratio(self) -> float:
        """Bytes of an fp16 copy of the same elements divided by the bytes held."""
        return fp16_ratio(self.nbytes, self.numel)


def _combine(items: Sequence[Part], tensor_fn, batch: int) -> Part:
    """Rebuild a part from same-structured `items`, mapping each tensor field's values with `tensor_fn`."""
    first = items[0]
    changes = {}
    for f in dataclasses.fields(first):
        values = [getattr(p, f.name) for p in items]
        v = values[0]
        if isinstance(v, Tensor):
            changes[f.name] = tensor_fn(values)
        elif isinstance(v, Part):
            changes[f.name] = _combine(values, tensor_fn, batch)
        elif isinstance(v, tuple) and v and isinstance(v[0], Part):
            changes[f.name] = tuple(_combine(list(group), tensor_fn, batch) for group in zip(*values))
        elif f.name == "shape":
            changes[f.name] = (batch, *v[1:])
        elif any(other != v for other in values[1:]):
            raise ValueError(f"cannot combine parts whose {f.name} differ: {values}")
    return dataclasses.replace(first, **changes)


def cat_batch(items: Sequence[CompressedTensor]) -> CompressedTensor:
    """Concatenate compressed tensors along the batch (the bytes are joined, nothing is re-compressed).

    Every tensor a part holds has the batch as its leading dimension, so this is exact.

    Args:
        items: compressed tensors `[b_i, kv_heads, tokens, head_dim]` from the same pipeline.

    Returns:
        A compressed tensor `[sum(b_i), kv_heads, tokens, head_dim]`.
    """
    if len(items) == 1:
        return items[0]
    return _combine(items, lambda ts: torch.cat(ts, 0), sum(c.shape[0] for c in items))


def select_batch(item: CompressedTensor, index: Tensor) -> CompressedTensor:
    """Pick batch entries (reorder, repeat or drop) without touching their bytes.

    Args:
        item: compressed tensor `KV`.
        index: int64 `[n]` of batch positions.

    Returns:
        A compressed tensor `[n, kv_heads, tokens, head_dim]`.
    """
    return _combine([item], lambda ts: ts[0].index_select(0, index.to(ts[0].device)), index.numel())


def slice_batch(item: CompressedTensor, start: int, stop: int) -> CompressedTensor:
    """Batch entries `start:stop` as views of the same bytes (nothing is copied).

    Args:
        item: compressed tensor `KV`.
        start: first entry.
        stop: one past the last entry.

    Returns:
        A compressed tensor `[stop - start, kv_heads, tokens, head_dim]` whose tensors view `item`'s.
    """
    return _combine([item], lambda ts: ts[0][start:stop], stop - start)
