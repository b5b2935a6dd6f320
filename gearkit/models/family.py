"""What a model family needs, read from its config in one place: each layer's attention kind (full, sliding with its
window, or one a KV cache cannot serve, with the reason), KV heads, head dim and rotary embedding; attention
soft-capping; and the model's identity for calibrated recipes."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from gearkit.compressors.base import text_config
from gearkit.compressors.rope import RoPE, inverse_frequencies

# The architecture fields that decide what a calibrated recipe was measured on: fine-tunes of one architecture share
# them, while another size, head layout, attention pattern or RoPE does not.
ARCHITECTURE = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "layer_types",
    "sliding_window",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "partial_rotary_factor",
)

# Families whose RoPE turns adjacent channels (2i, 2i + 1) rather than the two halves of the rotated channels: the
# config does not say it, their modeling code does.
INTERLEAVED = frozenset({"cohere", "cohere2", "glm", "glm4"})

# RoPE types whose frequencies depend on the sequence length seen so far: a key cannot be turned back from its
# position alone.
POSITION_DEPENDENT = frozenset({"dynamic", "longrope"})

# Why a layer type holds something other than one layer's keys and values over the whole past or a sliding window.
UNSERVED = {
    "chunked_attention": "attends only within fixed chunks of tokens (chunked attention)",
    "linear_attention": "holds a recurrent state, not keys and values (linear attention)",
    "conv": "holds a convolution state, not keys and values",
    "hybrid": "holds a recurrent state beside its keys and values",
    "hybrid_sliding": "holds a recurrent state beside its keys and values",
    "dummy": "reuses another layer's keys and values, or has no attention (a shared-KV or attention-free layer)",
    "indexed_attention": "keeps an indexer's keys beside its keys and values (sparse attention)",
}


@dataclasses.dataclass(frozen=True)
class Layer:
    """One decoder layer as a KV cache sees it.

    Attributes:
        index: the model layer.
        type: the config's layer type (`"full_attention"`, `"sliding_attention"`, ...).
        window: for a sliding-window layer, the tokens each query attends to (itself and the `window - 1` before it);
            None for a layer that attends to the whole past.
        kv_heads: key/value heads.
        head_dim: channels per head.
        rope: the layer's rotary embedding (a layer without RoPE turns nothing), or None when `rope_problem` says
            why it cannot be undone from positions alone.
        rope_problem: why the layer's rotary embedding cannot serve pre-RoPE coding, or None.
        problem: why a KV cache cannot serve this layer, or None when it can (full or sliding-window attention).
    """

    index: int
    type: str
    window: int | None
    kv_heads: int
    head_dim: int
    rope: RoPE | None
    rope_problem: str | None = None
    problem: str | None = None


@dataclasses.dataclass(frozen=True)
class Family:
    """What gearkit needs of a model's architecture, read from its config by `model_family`.

    Attributes:
        model_type: the config's `model_type`.
        layers: one `Layer` per decoder layer.
        softcap: the attention soft-capping `cap` (scores become `cap * tanh(scores / cap)`: Gemma 2), or None.
    """

    model_type: str
    layers: tuple[Layer, ...]
    softcap: float | None


def head_dim(config) -> int:
    """Head dimension of a (text) model config."""
    text = text_config(config)
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def _rope(text, layer: int, layer_type: str, dim: int) -> tuple[RoPE | None, str | None]:
    """The rotary embedding of `layer`, or None and why it cannot serve pre-RoPE coding."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    no_rope = getattr(text, "no_rope_layers", None)  # SmolLM3, Llama 4: 0 marks a layer without RoPE
    if no_rope is not None and not no_rope[layer]:
        return RoPE([], head_dim=dim), None
    params = getattr(text, "rope_parameters", None)
    if not params:
        theta = getattr(text, "rope_theta", None)
        if theta is None:
            return None, "the config names no rotary embedding (rope_parameters)"
        params = {"rope_type": "default", "rope_theta": theta}
    nested = text.nested_rope_parameter_keys(params) if hasattr(text, "nested_rope_parameter_keys") else []
    if nested:  # one set per layer type (Gemma 3's local and global bases)
        if layer_type not in nested:
            return None, f"its RoPE parameters are given for {sorted(nested)}, not for its layer type {layer_type!r}"
        params = params[layer_type]
        if params is None:  # a layer type without RoPE
            return RoPE([], head_dim=dim), None
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in POSITION_DEPENDENT:
        return None, f"its {kind!r} RoPE changes its frequencies with the sequence length seen"
    if kind == "default":
        rotary_dim = int(dim * params.get("partial_rotary_factor", 1.0))
        inv_freq, scaling = inverse_frequencies(rotary_dim, params["rope_theta"]), 1.0
    elif kind in ROPE_INIT_FUNCTIONS:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](text, None, layer_type=layer_type if nested else None)
    else:
        return None, f"its RoPE type {kind!r} is unknown to transformers' ROPE_INIT_FUNCTIONS"
    return RoPE(inv_freq, scaling, dim, getattr(text, "model_type", None) in INTERLEAVED), None


def model_family(config) -> Family:
    """Read what a KV cache needs of the model with `config` (its text decoder's config): each layer's attention kind,
    window, KV heads, head dim and rotary embedding, and attention soft-capping. Layer types follow `transformers`
    (`layer_types`, else a `sliding_window` or `attention_chunk_size` per layer), as its `DynamicCache` does.

    Args:
        config (transformers.PretrainedConfig): the model's config.

    Returns:
        The `Family`.

    Raises:
        ValueError: for an encoder-decoder model, or a config with no text decoder.
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{getattr(config, 'model_type', 'this')} is an encoder-decoder model; gearkit caches the self-attention "
            "of decoder-only language models"
        )
    text = text_config(config)
    if not all(hasattr(text, k) for k in ("num_hidden_layers", "num_attention_heads", "hidden_size")):
        raise ValueError(
            f"the {getattr(config, 'model_type', type(config).__name__)} config has no text decoder gearkit can serve "
            "(no num_hidden_layers, num_attention_heads and hidden_size)"
        )
    types, kwargs = get_layer_types_and_kwargs(text)
    layers = []
    for i, (kind, extra) in enumerate(zip(types, kwargs)):
        own = text.per_layer_config[i] if getattr(text, "is_heterogeneous", False) else text
        dim = head_dim(own)
        kv_heads = getattr(own, "num_key_value_heads", None) or own.num_attention_heads
        rope, rope_problem = _rope(text, i, kind, dim)
        problem = None
        if kind not in ("full_attention", "sliding_attention"):
            problem = f"layer {i} is a {kind!r} layer: it " + UNSERVED.get(kind, "is of a kind gearkit does not know")
        window = extra.get("sliding_window") if kind == "sliding_attention" else None
        layers.append(Layer(i, kind, window, kv_heads, dim, rope, rope_problem, problem))
    return Family(getattr(text, "model_type", ""), tuple(layers), getattr(text, "attn_logit_softcapping", None))


def model_identity(config, name: str) -> dict:
    """What identifies a model for a recipe calibrated on it: its name, layers, KV heads, head dim, and a hash of its
    architecture fields (`ARCHITECTURE`, from the text decoder's config).

    Args:
        config (transformers.PretrainedConfig): the model's config.
        name: the model's name (as gearkit reports it).

    Returns:
        `{"name", "layers", "kv_heads", "head_dim", "config_hash"}`.
    """
    text = text_config(config)
    fields = {k: getattr(text, k, None) for k in ARCHITECTURE}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return {
        "name": name,
        "layers": text.num_hidden_layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim(text),
        "config_hash": digest,
    }
