"""`WindowStore`: a sliding-window layer's compressed cache, which lets go of the chunks its window has left."""

from __future__ import annotations

import torch
from torch import Tensor

from gearkit.accounting import MemoryReport
from gearkit.cache.chunks import Lanes
from gearkit.cache.step import StepShared, StepView
from gearkit.cache.store import ChunkStore
from gearkit.compressors.checks import check_int
from gearkit.compressors.rope import RoPE
from gearkit.recipe import Recipe


class WindowStore(ChunkStore):
    """A `ChunkStore` for a layer that attends to a sliding window of `window` tokens (each query sees itself and the
    `window - 1` tokens before it): once every later query is past a whole chunk, the chunk is dropped (its bytes let
    go). The store holds the tokens from cache index `offset` on and reports that (`mask_sizes`), so the model's own
    sliding-window mask applies to what it holds. Its report counts the tokens it holds, each component named
    `window_<component>` (shown apart from the full-attention layers').

    A window's chunks are read decompressed (they are few); a recipe that keeps sink tokens or picks salient tokens
    from queries is refused, since the window drops the sinks and takes no queries.

    Args:
        recipe: the key/value pipelines and the buffer size (= chunk size).
        window: the layer's sliding window, in tokens.
        buffer_dtype: storage dtype of the buffer; None keeps the incoming dtype.
        layer: the model layer this store serves.
        shared: the memo the layers of one cache share for a step's biases.
        rope: the layer's rotary embedding, for stages that code keys before RoPE.

    Raises:
        ValueError: for a recipe with sink tokens or saliency-driven stages, or a window that is not a positive int.
    """

    def __init__(
        self,
        recipe: Recipe,
        window: int,
        buffer_dtype: torch.dtype | None = torch.float16,
        layer: int | None = None,
        shared: StepShared | None = None,
        rope: RoPE | None = None,
    ):
        if recipe.sink_tokens:
            raise ValueError(
                f"recipe {recipe.name!r} keeps {recipe.sink_tokens} sink tokens, which a sliding-window layer drops "
                "with its window: give the sliding layers a recipe with sink_tokens=0"
            )
        if recipe.needs_saliency:
            raise ValueError(
                f"recipe {recipe.name!r} picks salient tokens from the queries, which a sliding-window layer's "
                "store does not take: give the sliding layers a recipe without saliency-driven stages"
            )
        self.window = check_int(window, "window")
        super().__init__(recipe, buffer_dtype, layer, shared, rope)

    def append(self, key_states: Tensor, value_states: Tensor, position_ids: Tensor | None = None) -> StepView:
        """`ChunkStore.append`, then the chunks no later query sees are dropped (unless `record_past` holds them
        until the next `crop`)."""
        step = super().append(key_states, value_states, position_ids)
        if not self.record_past:
            self._drop()
        return step

    def crop(self, remove: int) -> None:
        """`ChunkStore.crop`, then the chunks no later query sees are dropped."""
        super().crop(remove)
        self._drop()

    def _drop(self) -> None:
        """Drop the held chunks that lie wholly before the first token a later query can see."""
        if self.lanes is None:
            return
        size = self.buffer_size
        visible = self.length - (self.window - 1)  # the first cache index the next query sees
        chunks = min(self.chunks, max(visible, 0) // size - self.offset // size)
        if chunks > 0:
            self.lanes = Lanes(*(lane.dropped(chunks) for lane in self.lanes))
            self.offset += chunks * size

    def memory_report(self) -> MemoryReport:
        """Bytes held, by component (each named `window_<component>`), over the tokens held."""
        report = super().memory_report()
        return MemoryReport({f"window_{k}": n for k, n in report.components.items()}, report.tokens, report.elements)
