"""Decode attention read from the compressed storage (gearkit's attention function) against the dequantize path."""

import pytest
import torch

from gearkit import Recipe, recipes
from gearkit.integrations.attention import register
from gearkit.integrations.hf import GearCache
from gearkit.kernels.backend import use_backend

from conftest import SHAPES, tiny_llama
from test_hf_cache import chat, generate


TINY_GEAR = Recipe("tiny-sink-gear-2", recipes.get("gear-2").key, recipes.get("gear-2").value, buffer_size=16,
                   sink_tokens=2)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("queries", [1, 3])
@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "no-mask"])
def test_storage_attention_logits_match_dequantize_path(shape, queries, padded):
    model = tiny_llama(shape)
    ids = torch.randint(2, 97, (2, 40), generator=torch.Generator().manual_seed(2))
    step = torch.randint(2, 97, (2, queries), generator=torch.Generator().manual_seed(3))
    masks = {}
    if padded:  # without a mask, transformers passes none and attention is plain causal
        ids[1, :5] = 0
        masks = dict(prefill=(ids != 0).long(), step=torch.cat([(ids != 0).long(), torch.ones_like(step)], 1))
    logits = {}
    for impl in ("sdpa", register()):
        model.set_attn_implementation(impl)
        cache = GearCache(TINY_GEAR, model.config)
        model(ids, attention_mask=masks.get("prefill"), cache=cache)
        logits[impl] = model(step, attention_mask=masks.get("step"), cache=cache).logits
        assert cache.layers[0].reads_storage == (impl != "sdpa") and cache.layers[0].store.chunks == 2
    assert torch.allclose(logits["sdpa"], logits["gearkit"], atol=1e-4, rtol=1e-4)


def test_greedy_through_triton_storage_attention_equals_dequantize_path(smol):
    model, tok = smol
    inputs = chat(tok, ["Write a short story about a lighthouse keeper who finds a message in a bottle on a stormy "
                        "night. Describe the sea, the wind, the old lamp, the letter's strange handwriting, and what "
                        "the keeper decides to do when he understands who wrote it."])
    assert inputs["input_ids"].shape[1] > 64  # the prompt fills a gear-2 chunk
    reference = generate(model, inputs, GearCache("gear-2", model.config), max_new_tokens=8, min_new_tokens=8)
    model.set_attn_implementation(register())
    try:
        cache = GearCache("gear-2", model.config)
        with use_backend("triton"):  # Triton's interpreter on this CPU
            out = generate(model, inputs, cache, max_new_tokens=8, min_new_tokens=8)
    finally:
        model.set_attn_implementation("sdpa")
    assert all(layer.reads_storage and layer.store.chunks >= 1 for layer in cache.layers)
    assert torch.equal(out, reference)
