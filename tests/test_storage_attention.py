"""Decode attention read from the compressed storage (gearkit's attention function) against the dequantize path."""

import pytest
import torch
from conftest import SHAPES, tiny_llama
from test_hf_cache import chat, generate

from gearkit import Recipe, recipes
from gearkit.cache import ChunkStore
from gearkit.eval.speed import largest_tensor
from gearkit.integrations.attention import register
from gearkit.integrations.hf import GearCache, make_cache
from gearkit.kernels.backend import use_backend

TINY_GEAR = Recipe(
    "tiny-sink-gear-2", recipes.get("gear-2").key, recipes.get("gear-2").value, buffer_size=16, sink_tokens=2
)


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
    inputs = chat(
        tok,
        [
            "Write a short story about a lighthouse keeper who finds a message in a bottle on a stormy "
            "night. Describe the sea, the wind, the old lamp, the letter's strange handwriting, and what "
            "the keeper decides to do when he understands who wrote it."
        ],
    )
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


# -- decode reads the storage block by block: the default path (issue 14) --------------------------------------

READS_STORAGE = [n for n in recipes.names() if not (recipes.get(n).needs_saliency or recipes.get(n).model_bound)]


@torch.inference_mode()
def decode_logits(model, recipe, attention: str, ids, mask, steps: int = 3):
    cache = make_cache(recipe, model, attention=attention)
    logits = [model(ids, attention_mask=mask, cache=cache).logits[:, -1]]
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        logits.append(model(token, attention_mask=mask, cache=cache).logits[:, -1])
    return torch.stack(logits, 1), cache


@pytest.mark.parametrize("name", READS_STORAGE)
def test_every_recipe_decodes_from_storage_as_from_the_dequantized_past(name):
    model = tiny_llama("gqa")
    size = recipes.get(name).buffer_size
    ids = torch.randint(2, 97, (2, 2 * size + 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :size] = 0  # left padding by a whole chunk
    ref, _ = decode_logits(model, name, "sdpa", ids, mask)
    got, cache = decode_logits(model, name, "gearkit", ids, mask)
    assert all(layer.reads_storage for layer in cache.layers) and cache.layers[0].store.chunks == 2
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch-products"])
def test_per_layer_per_head_rotated_and_codebook_stages_decode_from_their_codes(compiled, monkeypatch):
    """The gk-* kind of recipe (a stage per layer and per KV head: per-channel codes, Hadamard + codebook, a
    low-rank term on pre-RoPE keys then codebook; centered codebooks per channel) read by the stages' own
    products (the compiled CPU kernel, or torch): no quantizer or rotation decodes anything while the stored
    path attends."""
    if not compiled:
        monkeypatch.setenv("GEARKIT_CPU_KERNEL", "0")
    from gearkit import (
        Chain,
        CodebookQuantizer,
        HadamardRotation,
        LowRankResidual,
        PerHead,
        PerLayer,
        Pipeline,
        PreRoPE,
        Quantizer,
    )
    from gearkit.compressors.rotation import Rotation

    keys = Pipeline(
        [
            PerLayer(
                [
                    PerHead(
                        [
                            Quantizer(3, 16, "channel"),
                            HadamardRotation(CodebookQuantizer(2)),
                            Chain([PreRoPE(LowRankResidual(1)), HadamardRotation(CodebookQuantizer(2))]),
                        ]
                    ),
                    CodebookQuantizer(3, 16, "channel", centered=True),
                ]
            )
        ]
    )
    values = Pipeline(
        [
            PerLayer(
                [
                    HadamardRotation(CodebookQuantizer(3)),
                    PerHead(
                        [
                            Quantizer(2, 16, "token"),
                            HadamardRotation(CodebookQuantizer(4, 16)),
                            Quantizer(4, None, "token"),
                        ]
                    ),
                ]
            )
        ]
    )
    recipe = Recipe("tiny-gk", keys, values, buffer_size=16, sink_tokens=2)
    model = tiny_llama(dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=192))
    ids = torch.randint(2, 97, (2, 3 * 16 + 5), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    ref, _ = decode_logits(model, recipe, "sdpa", ids, mask)

    def refuse(self, part):
        raise AssertionError(f"{type(self).__name__} decoded its part")

    for stage in (Quantizer, CodebookQuantizer, Rotation):
        monkeypatch.setattr(stage, "decode", refuse)
    got, cache = decode_logits(model, recipe, "gearkit", ids, mask)
    assert cache.layers[0].reads_storage and cache.layers[0].store.chunks == 3
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize(
    "heads",
    [
        dict(num_attention_heads=4, num_key_value_heads=1, hidden_size=320),  # MQA, dim 80
        dict(num_attention_heads=3, num_key_value_heads=3, hidden_size=288),
    ],  # MHA, dim 96
    ids=["mqa-80", "mha-96"],
)
def test_other_head_dims_read_the_storage(heads):
    model = tiny_llama(heads)
    ids = torch.randint(2, 97, (1, 40), generator=torch.Generator().manual_seed(6))
    ref, _ = decode_logits(model, TINY_GEAR, "sdpa", ids, torch.ones_like(ids))
    got, cache = decode_logits(model, TINY_GEAR, "gearkit", ids, torch.ones_like(ids))
    assert cache.layers[0].reads_storage
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


def test_beam_search_sampling_and_crop_through_storage_attention():
    model = tiny_llama("gqa")
    ids = torch.randint(2, 97, (1, 40), generator=torch.Generator().manual_seed(7))
    outs = {}
    for attention in ("sdpa", "gearkit"):
        cache = make_cache(TINY_GEAR, model, attention=attention)
        outs[attention] = model.generate(
            ids, cache=cache, max_new_tokens=12, min_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0
        )
    assert torch.equal(outs["sdpa"], outs["gearkit"])
    torch.manual_seed(0)
    sampled = model.generate(
        ids, cache=make_cache(TINY_GEAR, model), max_new_tokens=8, do_sample=True, top_k=5, pad_token_id=0
    )
    assert sampled.shape[1] == 48
    cache = make_cache(TINY_GEAR, model)
    with torch.inference_mode():
        model(ids, cache=cache)
        cache.crop(-20)  # into a compressed chunk: the survivors go back to the buffer
        after = model(ids[:, 20:21], cache=cache).logits
    plain = make_cache(TINY_GEAR, model, attention="sdpa")
    with torch.inference_mode():
        model(ids, cache=plain)
        plain.crop(-20)
        torch.testing.assert_close(after, model(ids[:, 20:21], cache=plain).logits, atol=2e-4, rtol=2e-4)


@torch.inference_mode()
def test_a_decode_step_creates_nothing_that_grows_with_the_context(monkeypatch):
    monkeypatch.setattr(ChunkStore, "BLOCK_TOKENS", 1024)  # what one step reads at once, below both contexts
    model = tiny_llama("head-dim-128", layers=1)
    largest = {}
    for attention in ("sdpa", "gearkit"):
        for length in (1100, 4428):  # the same buffer fill (12 tokens past a chunk boundary)
            ids = torch.randint(2, 97, (1, length), generator=torch.Generator().manual_seed(8))
            cache = make_cache("sink-3", model, attention=attention)
            model(ids, cache=cache)
            model(ids[:, -1:], cache=cache)  # the first step may build lookup tables once
            _, largest[attention, length] = largest_tensor(lambda ids=ids, cache=cache: model(ids[:, -1:], cache=cache))
    assert largest["gearkit", 4428] <= 1.1 * largest["gearkit", 1100]  # bounded: one block at a time
    assert largest["sdpa", 4428] > 3 * largest["sdpa", 1100]  # the compatibility path rebuilds the past


def test_saliency_recipes_refuse_the_sdpa_compatibility_mode():
    model = tiny_llama("gqa")
    with pytest.raises(ValueError, match="needs attention='gearkit'"):
        make_cache("zipcache", model, attention="sdpa")


def test_a_switch_to_sdpa_mid_stream_keeps_the_compressed_past():
    model = tiny_llama("gqa")
    ids = torch.randint(2, 97, (1, 45), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        cache = make_cache(TINY_GEAR, model)  # gearkit's attention
        model(ids[:, :40], cache=cache)
        model(ids[:, 40:41], cache=cache)
        assert cache.layers[0].reads_storage
        model.set_attn_implementation("sdpa")
        switched = model(ids[:, 41:42], cache=cache).logits
        assert not cache.layers[0].reads_storage
        plain = make_cache(TINY_GEAR, model, attention="sdpa")
        model(ids[:, :40], cache=plain)
        model(ids[:, 40:41], cache=plain)
        torch.testing.assert_close(switched, model(ids[:, 41:42], cache=plain).logits, atol=2e-4, rtol=2e-4)
