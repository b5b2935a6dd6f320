"""One role's storage: the compressed chunks (`ChunkList`) and, with the buffer and the pipeline, a `Lane`."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from gearkit.accounting import add_counts, tensor_nbytes
from gearkit.compressors.base import Context
from gearkit.compressors.pipeline import Pipeline
from gearkit.parts import CompressedTensor, cat_batch, select_batch, slice_batch


class ChunkList:
    """One role's compressed chunks, kept as the compressed tensors that produced them (one per compression:
    a prefill's chunks, then each chunk the buffer fills), stacked chunk-major along the batch:
    `[(chunks batch), kv_heads, chunk, head_dim]`.

    Appending adds a reference, so it costs nothing whatever is held: nothing held is copied, re-allocated or
    re-compressed, and no capacity is held beyond the chunks themselves. An object is a snapshot (editing
    returns a new one), so a step's view stays valid. `blocks` cuts the chunks into blocks of at most `per_block`
    chunks for decode attention: views of large groups, short groups joined (a copy of at most one block).

    Args:
        per_block: chunks decode attention reads at once.
        groups: the compressed tensors, in sequence order.
        batch: sequences.
    """

    def __init__(self, per_block: int, groups: tuple[CompressedTensor, ...] = (), batch: int = 0):
        self.per_block, self.groups, self.batch = per_block, groups, batch
        self.chunks = sum(g.shape[0] for g in groups) // batch if batch else 0

    def append(self, new: CompressedTensor, batch: int) -> ChunkList:
        """These chunks plus `new` chunks `[(n batch), kv_heads, chunk, head_dim]` (chunk-major)."""
        if self.chunks and batch != self.batch:
            raise ValueError(f"appending chunks of batch {batch} to storage of batch {self.batch}")
        return ChunkList(self.per_block, (*self.groups, new), batch)

    @functools.cached_property
    def _blocks(self) -> list[tuple[int, CompressedTensor]]:
        out, pending, first, b = [], [], 0, self.batch
        for group in self.groups:
            n = group.shape[0] // b
            if n >= self.per_block:  # a large group: cut it into blocks (views)
                for start in range(0, n, self.per_block):
                    stop = min(n, start + self.per_block)
                    out.append((first + start, slice_batch(group, start * b, stop * b)))
            else:
                pending.append((first, group))
            if pending and (n >= self.per_block or sum(g.shape[0] for _, g in pending) // b >= self.per_block):
                out.append((pending[0][0], cat_batch([g for _, g in pending])))
                pending = []
            first += n
        if pending:
            out.append((pending[0][0], cat_batch([g for _, g in pending])))
        return sorted(out, key=lambda block: block[0])

    def blocks(self) -> list[tuple[int, CompressedTensor]]:
        """`(first chunk index, chunks [(n batch), kv_heads, chunk, head_dim])` in sequence order, `n <= per_block`
        except for joined short groups (fewer than `2 * per_block`)."""
        return self._blocks

    def joined(self) -> CompressedTensor | None:
        """All chunks as one compressed tensor (a copy; for inspection)."""
        return cat_batch(list(self.groups)) if self.groups else None

    def select(self, index: Tensor) -> ChunkList:
        """Keep batch entries `index` (reorder, repeat, drop) of every chunk."""
        groups = []
        for group in self.groups:
            n = group.shape[0] // self.batch
            rows = (torch.arange(n, device=index.device)[:, None] * self.batch + index).flatten()
            groups.append(select_batch(group, rows))
        return ChunkList(self.per_block, tuple(groups), index.numel())

    def truncate(self, chunks: int) -> ChunkList:
        """The first `chunks` chunks (the group holding the boundary is kept as a view of its first chunks)."""
        kept, covered = [], 0
        for group in self.groups:
            n = group.shape[0] // self.batch
            if covered + n > chunks:
                if chunks > covered:
                    rows = torch.arange((chunks - covered) * self.batch)
                    kept.append(select_batch(group, rows))  # a copy: the removed chunks' bytes are let go
                break
            kept.append(group)
            covered += n
        return ChunkList(self.per_block, tuple(kept), self.batch)

    def drop(self, chunks: int) -> ChunkList:
        """Without the first `chunks` chunks (a group holding the boundary keeps a copy of its later chunks, so the
        dropped chunks' bytes are let go)."""
        kept, covered = [], 0
        for group in self.groups:
            n = group.shape[0] // self.batch
            if covered >= chunks:
                kept.append(group)
            elif covered + n > chunks:
                kept.append(select_batch(group, torch.arange((chunks - covered) * self.batch, n * self.batch)))
            covered += n
        return ChunkList(self.per_block, tuple(kept), self.batch)

    def tensors(self) -> list[Tensor]:
        """Every tensor held."""
        return [t for group in self.groups for t in group.tensors().values()]

    def components(self) -> dict[str, int]:
        """Bytes held, by component."""
        return add_counts(*(group.components() for group in self.groups))


@dataclasses.dataclass(frozen=True)
class Lane:
    """One role's storage (keys or values): the full-precision buffer of the newest tokens, the compressed chunks
    before them, and the pipeline that compresses them. A lane is a snapshot: editing returns a new one.

    Attributes:
        pipeline: the role's pipeline.
        buffer: `[batch, kv_heads, buffered, head_dim]` in the buffer dtype.
        chunks: the compressed chunks, `[(chunks batch), kv_heads, chunk, head_dim]` each.
    """

    pipeline: Pipeline
    buffer: Tensor
    chunks: ChunkList

    def extended(self, new: Tensor) -> Lane:
        """This lane with `new` tokens `[batch, kv_heads, new, head_dim]` at the end of the buffer."""
        return dataclasses.replace(self, buffer=torch.cat([self.buffer, new], -2))

    def compressed(self, size: int, exclude: Tensor | None, ctx: Context) -> Lane:
        """This lane with the buffer's whole chunks of `size` tokens compressed.

        Args:
            size: tokens per chunk.
            exclude: bool `[(chunks batch), 1, size, 1]` (broadcast over heads and channels): entries stored exactly
                elsewhere (the sink copy), or None.
            ctx: what the chunks' pipeline needs, for the chunks stacked chunk-major.
        """
        full = self.buffer.shape[-2] // size * size
        if not full:
            return self
        chunks = rearrange(self.buffer[:, :, :full], "b h (n c) d -> (n b) h c d", c=size)
        new = self.pipeline.compress(chunks, None if exclude is None else exclude.expand(chunks.shape), ctx)
        # clone: the remaining buffer owns its bytes, so the compressed tokens' buffer memory is let go
        return Lane(self.pipeline, self.buffer[:, :, full:].clone(), self.chunks.append(new, self.buffer.shape[0]))

    def dense(self, dtype: torch.dtype) -> Tensor:
        """Every token held, chunks decompressed, in `dtype`: `[batch, kv_heads, held tokens, head_dim]`."""
        blocks = [
            rearrange(self.pipeline.decompress(view).to(dtype), "(n b) h c d -> b h (n c) d", b=self.chunks.batch)
            for _, view in self.chunks.blocks()
        ]
        return torch.cat([*blocks, self.buffer.to(dtype)], -2)

    def select(self, index: Tensor) -> Lane:
        """Keep batch entries `index` (reorder, repeat, drop) of the buffer and every chunk."""
        return Lane(self.pipeline, self.buffer.index_select(0, index), self.chunks.select(index))

    def truncated(self, chunks: int, buffer: Tensor) -> Lane:
        """The first `chunks` chunks, followed by `buffer` `[batch, kv_heads, buffered, head_dim]`."""
        return Lane(self.pipeline, buffer, self.chunks.truncate(chunks))

    def dropped(self, chunks: int) -> Lane:
        """Without the first `chunks` chunks (see `ChunkList.drop`)."""
        return Lane(self.pipeline, self.buffer, self.chunks.drop(chunks))

    def tensors(self) -> list[Tensor]:
        """Every tensor held (buffer first)."""
        return [self.buffer, *self.chunks.tensors()]

    def components(self) -> dict[str, int]:
        """Bytes held, by component (`buffer`, and the chunks' parts' components)."""
        return add_counts({"buffer": tensor_nbytes(self.buffer)}, self.chunks.components())


class Lanes(NamedTuple):
    """A store's two lanes."""

    keys: Lane
    values: Lane
