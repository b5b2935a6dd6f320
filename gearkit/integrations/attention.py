"""gearkit's attention function for `transformers`, registered through the public `AttentionInterface`.

A model loaded with `attn_implementation=register()` (or switched with `model.set_attn_implementation(...)`)
calls `gearkit_attention` in every attention layer. When the keys and values it receives are the ones a
`GearLayer` just returned from `update`, the layer gets the step's queries (`GearLayer.observe_queries`, used
by saliency-driven recipes) and may compute the step's attention itself (`GearLayer.attend`: decode attention
read straight from the compressed storage). Everything else — prefill, other caches, layers that decline —
goes to `transformers`' own SDPA attention, so the model's output comes from its normal path.
"""

from __future__ import annotations

import contextvars
import weakref

import torch
from torch import Tensor

NAME = "gearkit"

# The GearLayer whose `update` ran last in this context, and a weak reference to the key tensor it returned:
# transformers calls the attention function right after the cache update, with that very tensor.
_updated: contextvars.ContextVar[tuple[object, weakref.ref] | None] = contextvars.ContextVar(
    "gearkit_updated", default=None
)


def mark_updated(layer, keys: Tensor) -> None:
    """Record that `layer.update` returned `keys` (called by `GearLayer.update`)."""
    _updated.set((layer, weakref.ref(keys)))


def updated_layer(keys: Tensor):
    """The layer whose last `update` returned exactly `keys`, or None."""
    entry = _updated.get()
    if entry is None or entry[1]() is not keys:
        return None
    return entry[0]


def gearkit_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """Attention over a gearkit cache layer, or `transformers`' SDPA attention for anything else.

    Args:
        module: the model's attention module (for `num_key_value_groups`).
        query: `[batch, heads, queries, head_dim]`.
        key: `[batch, kv_heads, kv_len, head_dim]` as returned by the cache's `update`.
        value: `[batch, kv_heads, kv_len, head_dim]`.
        attention_mask: boolean `[batch, 1, queries, positions]` (True = attend) over every position the cache
            holds plus the queries, or None for plain causal attention.
        dropout: attention dropout (a step that reads the compressed storage refuses it).
        scaling: softmax scale, default `head_dim ** -0.5`.

    Returns:
        `(output, None)`, output `[batch, queries, heads, head_dim]`.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = updated_layer(key)
    if layer is not None:
        layer.observe_queries(query, key, attention_mask, scaling)
        out = layer.attend(query, key, value, attention_mask, scaling, dropout)
        if out is not None:
            return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register() -> str:
    """Register gearkit's attention function (and SDPA's mask format for it) with `transformers`.

    Idempotent. Use the returned name as `attn_implementation` when loading or configuring a model.

    Returns:
        The implementation name, `"gearkit"`.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, gearkit_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
