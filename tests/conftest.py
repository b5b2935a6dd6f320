import os

# Triton kernels run in Triton's interpreter on this CPU-only suite; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from gearkit.eval import synthetic_kv

# Small examples and no deadlines keep the property suite fast and steady on two CPU cores.
settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("GEARKIT_EXAMPLES", 25)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("ci")


def kv_like(seed: int, shape: tuple[int, int, int, int], heavy: int = 2, magnitude: float = 1.0) -> torch.Tensor:
    """KV-like float32 `[batch, kv_heads, tokens, head_dim]`: Gaussian with a few large, offset channels."""
    return synthetic_kv(shape, heavy, seed) * magnitude


@st.composite
def kv_tensors(draw, min_tokens=1, max_tokens=48, head_dims=(1, 2, 3, 8, 16, 24), max_batch=2, max_heads=3):
    """Hypothesis strategy: KV-like float32 tensors of varied small shapes and magnitudes."""
    shape = (
        draw(st.integers(1, max_batch)),
        draw(st.integers(1, max_heads)),
        draw(st.integers(min_tokens, max_tokens)),
        draw(st.sampled_from(head_dims)),
    )
    magnitude = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    return kv_like(draw(st.integers(0, 2**31 - 1)), shape, draw(st.integers(0, 3)), magnitude)


def rel_error(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.float() - y.float()).norm() / x.float().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="session")
def smol():
    """The real default model and tokenizer, loaded once per test session."""
    from gearkit.models import load_default_model

    return load_default_model()


# Tiny randomly initialised LLaMA shapes the integration tests share (MHA, GQA, head dim 128).
SHAPES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=64),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=128),
    "head-dim-128": dict(num_attention_heads=2, num_key_value_heads=1, hidden_size=128, head_dim=128),
}


def tiny_llama(shape: str | dict = "gqa", layers: int = 2, **config):
    """A tiny seeded `LlamaForCausalLM` in eval mode: one of `SHAPES` (or a dict of head settings), `layers`
    layers, vocabulary 97 (ids 0 pad, 1 bos/eos), plus any other config fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = SHAPES[shape] if isinstance(shape, str) else shape
    settings = dict(
        vocab_size=97,
        intermediate_size=96,
        num_hidden_layers=layers,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        **heads,
    )
    return LlamaForCausalLM(LlamaConfig(**{**settings, **config})).eval()


class Chars:
    """A character-level stand-in tokenizer (ids 2..96), enough to check prompt assembly without a download."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + ord(c) % 95 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + (i - 2 - 32) % 95) for i in ids if i > 1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny seeded Llama checkpoint directory (config, safetensors, the default model's tokenizer) named
    `tiny-llama`, whose vocabulary matches that tokenizer: what `gearkit.models.load_model` reads by path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gearkit.models import load_default_tokenizer

    tokenizer = load_default_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
