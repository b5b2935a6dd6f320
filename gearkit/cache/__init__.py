"""The framework-free chunk store: one layer's compressed KV cache, without any model framework.

A `ChunkStore` holds a recipe's compressed chunks plus a small full-precision buffer of the newest tokens, one `Lane`
per role (keys, values). New tokens enter the buffer; when it holds `recipe.buffer_size` tokens they are compressed as
one chunk and appended to the compressed storage, where they stay as compressed bytes and are never re-compressed.
Attention of the current step sees the compressed past, the buffer and the new tokens (the buffer is compressed
after the step, so a token never sees a compressed copy of the step it belongs to).

A recipe may keep the first `sink_tokens` tokens of each sequence (attention sinks) as an exact copy (`SinkCopy`):
the chunk that holds them is compressed with those positions excluded (they do not widen any quantization range),
and reads take them from the copy. The chunk grid is unchanged. Recipes whose stages need token saliency (ZipCache)
get a `SaliencyStore`, whose chunks are compressed once the step's queries have scored them. A sliding-window layer
given a recipe gets a `WindowStore`, which drops the chunks its window has left.

Held tensors are never written in place, so a `StepView` (what one step attends to) stays valid after the store
moves on. `gearkit.integrations.hf.GearLayer` adapts a store to `transformers`.
"""

from __future__ import annotations

import torch

from gearkit.cache.chunks import ChunkList, Lane, Lanes
from gearkit.cache.saliency import SaliencyStore
from gearkit.cache.sinks import SinkCopy
from gearkit.cache.step import StepShared, StepView
from gearkit.cache.store import ChunkStore
from gearkit.cache.window import WindowStore
from gearkit.compressors.rope import RoPE
from gearkit.recipe import Recipe

__all__ = [
    "ChunkList",
    "ChunkStore",
    "Lane",
    "Lanes",
    "SaliencyStore",
    "SinkCopy",
    "StepShared",
    "StepView",
    "WindowStore",
    "make_store",
]


def make_store(
    recipe: Recipe,
    buffer_dtype: torch.dtype | None = torch.float16,
    layer: int | None = None,
    shared: StepShared | None = None,
    rope: RoPE | None = None,
    window: int | None = None,
) -> ChunkStore:
    """The store a layer needs: a `WindowStore` for a sliding `window`, a `SaliencyStore` when a stage needs token
    saliency, else a `ChunkStore` (arguments as `ChunkStore`; `window`: the layer's sliding window, None for full
    attention)."""
    if window is not None:
        return WindowStore(recipe, window, buffer_dtype, layer, shared, rope)
    kind = SaliencyStore if recipe.needs_saliency else ChunkStore
    return kind(recipe, buffer_dtype, layer, shared, rope)
