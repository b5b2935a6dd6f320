"""`SaliencyStore`: a chunk store whose chunks wait for the queries that score their tokens (ZipCache)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from gearkit.accounting import MemoryReport, tensor_nbytes
from gearkit.cache.step import StepView
from gearkit.cache.store import ChunkStore
from gearkit.compressors.probes import normalized_saliency, probe_attention


class SaliencyStore(ChunkStore):
    """A `ChunkStore` for recipes whose stages need token saliency: the buffer's whole chunks are compressed only
    after the step's queries scored them (`observe_queries`, which gearkit's attention function calls).

    The buffered tokens' running evidence is held as `received` `[batch, kv_heads, buffered]` (the attention the
    probes gave each token) and `seen` `[batch, buffered]` (how many probes saw it); a chunk is compressed with
    saliency `received / seen` (see `gearkit.compressors.probes`). Both are bytes held (`probe_scores`).
    With `record_past`, the chunks are compressed at the next `crop` instead.
    """

    def reset(self) -> None:
        super().reset()
        self.received: Tensor | None = None
        self.seen: Tensor | None = None

    def _compressed(self, lanes, sink, saliency=None):
        # On append, nothing is compressed: the chunks wait for their scores (see `observe_queries`).
        return lanes if saliency is None else super()._compressed(lanes, sink, saliency)

    def append(self, key_states: Tensor, value_states: Tensor, position_ids: Tensor | None = None) -> StepView:
        """`ChunkStore.append` without compression; the new tokens start with no saliency."""
        step = super().append(key_states, value_states, position_ids)
        new = self.buffered - (0 if self.received is None else self.received.shape[-1])
        received = self.keys.new_zeros(*self.keys.shape[:2], new, dtype=torch.float32)
        seen = self.keys.new_zeros(self.keys.shape[0], new, dtype=torch.float32)
        self.received = received if self.received is None else torch.cat([self.received, received], -1)
        self.seen = seen if self.seen is None else torch.cat([self.seen, seen], -1)
        return step

    def observe_queries(
        self, query: Tensor, keys: Tensor, attention_mask: Tensor | None, scaling: float | None
    ) -> None:
        """Add the step's probe attention to the buffered tokens' saliency, then compress the buffer's whole chunks.

        Args:
            query: `[batch, heads, queries, head_dim]`, the step's queries.
            keys: `[batch, kv_heads, kv_len, head_dim]`, every key the step attends to (the buffer is its end).
            attention_mask: the step's mask (see `gearkit.compressors.probes.visible_keys`).
            scaling: softmax scale.
        """
        if not self.buffered:
            return
        buffered = self.buffered
        step_received, step_seen = probe_attention(query, keys, attention_mask, scaling, self.recipe.probes)
        self.received = self.received + step_received[..., -buffered:]
        self.seen = self.seen + step_seen[..., -buffered:]
        if not self.record_past:
            self._compress_buffer()

    def _compress_buffer(self) -> None:
        """Compress the buffer's whole chunks with the saliency their tokens gathered; their evidence goes."""
        size = self.buffer_size
        full = self.buffered // size * size
        if full:
            saliency = normalized_saliency(self.received, self.seen)[..., :full]
            self._commit(self._compressed(self.lanes, self.sink, rearrange(saliency, "b h (n c) -> (n b) h c", c=size)))
            self.received, self.seen = self.received[..., full:].clone(), self.seen[..., full:].clone()

    def select(self, index: Tensor) -> None:
        super().select(index)
        if self.received is not None:
            index = index.to(self.received.device)
            self.received, self.seen = self.received.index_select(0, index), self.seen.index_select(0, index)

    def _truncate(self, keep: int) -> None:
        """`ChunkStore._truncate`; tokens back from a compressed chunk start with no saliency."""
        from_buffer = self.length - keep <= self.buffered
        super()._truncate(keep)
        kept = self.buffered
        if from_buffer:
            self.received, self.seen = self.received[..., :kept].clone(), self.seen[..., :kept].clone()
        else:
            self.received = self.received.new_zeros(*self.received.shape[:2], kept)
            self.seen = self.seen.new_zeros(self.seen.shape[0], kept)

    def held_tensors(self) -> list[Tensor]:
        return super().held_tensors() + ([] if self.received is None else [self.received, self.seen])

    def memory_report(self) -> MemoryReport:
        report = super().memory_report()
        if self.received is not None:
            report.components["probe_scores"] = tensor_nbytes(self.received) + tensor_nbytes(self.seen)
        return report
