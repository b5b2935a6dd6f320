"""`ChunkStore`: one layer's compressed KV cache, without any model framework."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from gearkit.accounting import MemoryReport, add_counts
from gearkit.cache.chunks import ChunkList, Lane, Lanes
from gearkit.cache.sinks import SinkCopy, padding
from gearkit.cache.step import StepShared, StepView
from gearkit.compressors.base import Context
from gearkit.compressors.checks import check_finite, check_kv
from gearkit.recipe import Recipe


def to_buffer(states: Tensor, dtype: torch.dtype | None, name: str) -> Tensor:
    """`states` `KV` in the buffer `dtype` (None: its own), checked in one pass over the cast (a NaN or Inf in `states`
    survives it). Raises `ValueError` naming the input, or the cast's overflow."""
    check_kv(states, name, finite=False)
    stored = states.to(dtype or states.dtype)
    if stored.numel() and not torch.isfinite(stored).all():
        check_kv(states, name)
        check_finite(
            stored,
            f"{name} overflow {stored.dtype}, the cache's buffer dtype; keep a wider one: --buffer-dtype float32 "
            "(or model) on the command line, buffer_dtype=torch.float32 (or None, the model's dtype) in make_cache "
            "or GearCache",
        )
    return stored


class ChunkStore:
    """One layer's compressed chunks, sink copy and full-precision buffer (see the package docstring).

    Args:
        recipe: the key/value pipelines, the buffer size (= chunk size) and the sink tokens.
        buffer_dtype: storage dtype of the buffer and the sink copy; None keeps the incoming dtype.
        layer: the model layer this store serves (stages with per-layer artifacts need it).
        shared: the memo the layers of one cache share for a step's biases (default: this store's own).
    """

    BLOCK_TOKENS = 4096  # tokens of compressed chunks decode attention reads at once: its working set

    def __init__(
        self,
        recipe: Recipe,
        buffer_dtype: torch.dtype | None = torch.float16,
        layer: int | None = None,
        shared: StepShared | None = None,
    ):
        self.recipe, self.buffer_dtype, self.layer = recipe, buffer_dtype, layer
        self.shared = StepShared() if shared is None else shared
        self.reset()

    def reset(self) -> None:
        """Forget every token."""
        self.lanes: Lanes | None = None
        self.sink: SinkCopy | None = None
        self.length = 0
        self.dtype: torch.dtype | None = None  # the compute dtype: that of the incoming states

    buffer_size = property(lambda self: self.recipe.buffer_size, doc="Tokens per compressed chunk.")
    is_initialized = property(lambda self: self.lanes is not None, doc="Whether a first append has run.")
    keys = property(lambda self: self.lanes.keys.buffer if self.lanes else None, doc="The buffer's keys `KV`.")
    values = property(lambda self: self.lanes.values.buffer if self.lanes else None, doc="The buffer's values `KV`.")
    chunks = property(lambda self: self.lanes.keys.chunks.chunks if self.lanes else 0, doc="Chunks per sequence.")
    buffered = property(lambda self: self.keys.shape[-2] if self.lanes else 0, doc="Tokens in the buffer.")

    def tokens_to_next_chunk(self) -> int:
        """How many more tokens fill the buffer, so that the next chunk is compressed."""
        return self.buffer_size - self.buffered

    def view(self) -> StepView:
        """Everything held, as a `StepView` with no new tokens."""
        return StepView(*self.lanes, self.sink, self.buffer_size, self.dtype, self.shared)

    def dequantized(self) -> tuple[Tensor, Tensor]:
        """Everything held, decompressed: keys and values `KV`."""
        return self.view().dense()

    def snapshot(self) -> dict:
        """The store's state, for `restore`: held tensors are never written in place, so a shallow copy is it."""
        return dict(vars(self))

    def restore(self, snapshot: dict) -> None:
        """Go back to the state `snapshot()` returned (it stays valid for another restore)."""
        vars(self).update(snapshot)

    def append(self, key_states: Tensor, value_states: Tensor, position_ids: Tensor | None = None) -> StepView:
        """Add new tokens (keys and values `KV`) and compress the buffer's whole chunks; return what this step
        attends to (the store before it compressed anything, plus the new tokens). `position_ids` `[batch or 1, new]`
        (as `transformers` computes them) are read on the first append: where a left-padded row's tokens start.
        Everything is computed before any state changes, so a failure (`ValueError` for non-finite or malformed
        states, or states that overflow the buffer dtype) leaves the store as it was."""
        new = (
            to_buffer(key_states, self.buffer_dtype, "key_states"),
            to_buffer(value_states, self.buffer_dtype, "value_states"),
        )
        lanes, sink, dtype = self.lanes, self.sink, self.dtype
        if lanes is None:
            chunks = ChunkList(max(1, self.BLOCK_TOKENS // self.buffer_size))
            lanes = Lanes(*(Lane(p, t[:, :, :0], chunks) for p, t in zip((self.recipe.key, self.recipe.value), new)))
            sink = SinkCopy.empty(*new, padding(position_ids, key_states), self.recipe.sink_tokens)
            dtype = key_states.dtype
        lanes = Lanes(*(lane.extended(t) for lane, t in zip(lanes, new)))
        sink = sink.added(*new, self.length)
        step = StepView(*lanes, sink, self.buffer_size, dtype, self.shared)
        compressed = self._compressed(lanes, sink)
        self.sink, self.dtype = sink, dtype
        self._commit(compressed)
        self.length += key_states.shape[-2]
        return step

    def observe_queries(self, query: Tensor, keys: Tensor, attention_mask: Tensor | None, scaling) -> None:
        """See a step's queries `[batch, heads, queries, head_dim]`: nothing to do here (see `SaliencyStore`)."""

    def _compressed(self, lanes: Lanes, sink: SinkCopy, saliency: Tensor | None = None) -> Lanes:
        """`lanes` with the buffer's whole chunks compressed (nothing changes yet); `saliency`, per token of those
        chunks `[(chunks batch), kv_heads, chunk]`, where the pipelines need it."""
        size, first = self.buffer_size, self.chunks * self.buffer_size  # first: the buffer's first cache index
        n = lanes.keys.buffer.shape[-2] // size
        if not n:
            return lanes
        ctx = Context(saliency, sink.chunk_starts(first, n, size), self.layer)
        return Lanes(*(lane.compressed(size, sink.excluded(first, n, size), ctx) for lane in lanes))

    def _commit(self, lanes: Lanes) -> None:
        """Take over `lanes`; on the first chunk, warn if the recipe enlarges the cache instead of compressing it."""
        first = not self.chunks and lanes.keys.chunks.chunks
        if first and max(lane.chunks.groups[-1].bits_per_element for lane in lanes) > 16:
            message = f"recipe {self.recipe.name!r} stores more bits per element than fp16 (16) on this data"
            warnings.warn(message + ": it enlarges the cache instead of compressing it", stacklevel=3)
        self.lanes = lanes

    def select(self, index: Tensor) -> None:
        """Keep batch entries `index` (reorder, repeat, drop) in the buffer, the sink copy and every chunk."""
        if self.lanes is not None:
            index = index.to(self.keys.device)
            self.lanes, self.sink = Lanes(*(lane.select(index) for lane in self.lanes)), self.sink.select(index)

    def crop(self, remove: int) -> None:
        """Remove the last `remove` tokens. Tokens of a partly removed chunk that survive go back to the buffer as
        their decompressed values (and are compressed again when the buffer fills): the one case where compressed
        tokens are re-encoded."""
        remove = min(remove, self.length)
        if not remove or self.lanes is None:
            return
        keep, size = self.length - remove, self.buffer_size
        if remove <= self.buffered:  # buffered tokens only
            whole, held, start = self.chunks, [lane.buffer for lane in self.lanes], self.chunks * size
        else:
            whole, held, start = keep // size, self.dequantized(), 0
        tail = slice(whole * size - start, keep - start)
        self.lanes = Lanes(
            *(lane.truncated(whole, h[:, :, tail].to(lane.buffer.dtype).clone()) for lane, h in zip(self.lanes, held))
        )
        self.sink, self.length = self.sink.cropped(keep), keep

    def held_tensors(self) -> list[Tensor]:
        """Every tensor this store holds (compressed parts, buffer, sink copy)."""
        return [] if self.lanes is None else [*self.sink.tensors(), *(t for lane in self.lanes for t in lane.tensors())]

    def memory_report(self) -> MemoryReport:
        """Bytes held, by component (`buffer`, `sink`, `row_starts`, the parts' components, `dictionary` shares)."""
        if self.lanes is None:
            return MemoryReport({}, 0, 0)
        shared = sum(lane.pipeline.shared_nbytes(self.layer) for lane in self.lanes)  # this layer's dictionary share
        counts = add_counts(self.sink.components(), *(lane.components() for lane in self.lanes))
        batch, heads = self.keys.shape[:2]
        elements = batch * heads * self.length * (self.keys.shape[-1] + self.values.shape[-1])
        return MemoryReport({**counts, "dictionary": shared} if shared else counts, self.length, elements)
