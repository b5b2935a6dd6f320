"""gearkit's attention function for `transformers`, registered through the public `AttentionInterface`.

A model loaded with `attn_implementation=register()` (or switched with `model.set_attn_implementation(...)`)
calls `gearkit_attention` in every attention layer. When the keys and values it receives are the ones a
`GearLayer` just returned from `update` (`offer` hands them over), the layer sees the step's queries
(`GearLayer.observe_queries`, used by saliency-driven recipes) and, when the update offered a step that reads the
storage, that step computes the attention itself (`gearkit.cache.StepView.attend`: decode attention read straight
from the compressed storage). Everything else — prefill, other caches, layers that decline —
goes to `transformers`' own SDPA attention, so the model's output comes from its normal path; a model that
soft-caps its attention scores (Gemma 2), which SDPA cannot, gets the same attention computed densely with the cap
(`capped_attention`).
"""

from __future__ import annotations

import contextvars
import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gearkit.kernels.reference import attention_reference

if TYPE_CHECKING:
    from gearkit.cache import StepView
    from gearkit.integrations.hf import GearLayer

NAME = "gearkit"

# The handoff from a cache layer's `update` to the attention call that follows it, in this context: the layer, a weak
# reference to the key tensor `update` returned (transformers calls the attention function right after the update,
# with that very tensor), and the step to read from the storage (None: the standard path).
_pending: contextvars.ContextVar[tuple[object, weakref.ref, object] | None] = contextvars.ContextVar(
    "gearkit_pending", default=None
)


def offer(layer: GearLayer, keys: Tensor, step: StepView | None = None) -> None:
    """Hand the step `layer.update` just prepared to the attention call that follows (called by `GearLayer.update`).

    Args:
        layer: the cache layer (its `observe_queries` sees the step's queries).
        keys: the key tensor `update` returned.
        step: a `gearkit.cache.StepView` whose attention reads the compressed storage, or None.

    Raises:
        RuntimeError: when the previous offer carried a step that no attention call took: its compressed past
            would be lost silently.
    """
    check_taken()
    _pending.set((layer, weakref.ref(keys), step))


def check_taken() -> None:
    """Raise `RuntimeError` if a step offered for reading the storage was never read (see `offer`)."""
    entry = _pending.get()
    if entry is not None and entry[2] is not None:
        _pending.set(None)
        raise RuntimeError(
            "the previous step returned only the buffer for gearkit's attention function, which never read the "
            "compressed storage; do not call the cache's update outside a model step"
        )


def withdraw() -> None:
    """Forget an offer (a cache rolled back to before the step that made it)."""
    _pending.set(None)


def take(keys: Tensor) -> tuple[GearLayer, StepView | None] | None:
    """`(layer, step)` of the offer made with exactly `keys`, consumed, or None."""
    entry = _pending.get()
    if entry is None or entry[1]() is not keys:
        return None
    _pending.set(None)
    return entry[0], entry[2]


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

    softcap = kwargs.get("softcap")
    offered = take(key)
    if offered is not None:
        layer, step = offered
        layer.observe_queries(query, key, attention_mask, scaling)
        if step is not None:
            if dropout:
                raise ValueError("attention over the compressed storage does not apply dropout; call model.eval()")
            return step.attend(query, key, value, attention_mask, scaling, softcap), None
    if softcap is not None:
        if dropout:
            raise ValueError("gearkit's soft-capped attention does not apply dropout; call model.eval()")
        return capped_attention(query, key, value, attention_mask, scaling, softcap), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def capped_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None,
    softcap: float,
) -> Tensor:
    """Dense attention with soft-capped scores (`cap * tanh(scores / cap)`, then the mask), as Gemma 2's eager
    attention computes it, for the calls SDPA cannot serve.

    Args:
        query: `[batch, heads, queries, head_dim]`.
        key: `[batch, kv_heads, kv_len, head_dim]`.
        value: like `key`.
        attention_mask: boolean (True = attend) or additive float `[batch, 1, queries, kv_len]`, or None for
            causal attention of the queries as the last `queries` positions.
        scaling: softmax scale, default `head_dim ** -0.5`.
        softcap: the cap.

    Returns:
        `[batch, queries, heads, head_dim]` in the query's dtype (zeros for a query that sees nothing).
    """
    nq, kv = query.shape[-2], key.shape[-2]
    if attention_mask is None:
        visible = torch.ones(nq, kv, dtype=torch.bool, device=query.device).tril(kv - nq)[None]
        bias = torch.where(visible, 0.0, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        bias = torch.where(attention_mask[:, 0], 0.0, float("-inf"))
    else:
        bias = attention_mask[:, 0].float()
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out, _ = attention_reference(query, key, value, bias, scaling, softcap)
    return out.to(query.dtype).transpose(1, 2)


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
