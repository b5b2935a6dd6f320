"""What a model family needs, read from its config in one place."""

from __future__ import annotations

import hashlib
import json

from gearkit.compressors.base import text_config

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


def head_dim(config) -> int:
    """Head dimension of a (text) model config."""
    text = text_config(config)
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


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
