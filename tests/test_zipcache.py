"""ZipCache in a transformers cache: probe saliency from gearkit's attention function, deferred compression."""

import pytest
import torch
from conftest import tiny_llama
from test_hf_cache import storage

from gearkit import MixedPrecision, Pipeline, Probes, Quantizer, Recipe, recipes
from gearkit.cache import SaliencyStore
from gearkit.integrations.attention import register
from gearkit.integrations.hf import GearCache

CHUNK = 16
TINY = Recipe(
    "tiny-zipcache",
    Pipeline([MixedPrecision(Quantizer(4, None, "channel"), Quantizer(2, None, "channel"), 0.25)]),
    Pipeline([MixedPrecision(Quantizer(4, 8, "token"), Quantizer(2, 8, "token"), 0.25)]),
    CHUNK,
    probes=Probes(0.1, 0.1),
)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(
        dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=96), attn_implementation=register()
    )


def ids(n, seed=0, batch=1):
    return torch.randint(2, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def test_prefill_attends_in_full_precision_and_then_compresses_with_saliency(tiny):
    prompt = ids(40)
    exact = GearCache(TINY, tiny.config, buffer_dtype=None)
    logits = tiny(prompt, cache=exact, use_cache=True).logits
    torch.testing.assert_close(logits, tiny(prompt).logits)  # the step saw no compressed copy
    assert exact.layers[0].store.chunks == 2  # ... although two chunks were compressed after it
    cache = GearCache(TINY, tiny.config)
    tiny(prompt, cache=cache, use_cache=True)
    layer = cache.layers[0].store
    assert isinstance(layer, SaliencyStore) and layer.chunks == 2 and layer.keys.shape[-2] == 40 - 2 * CHUNK
    assert layer.received.shape == (1, 2, 8) and layer.seen.shape == (1, 8)
    assert (layer.seen > 0).all()  # the most recent probe sees every buffered token
    mask = TINY.key.stages[0].salient(layer.lanes.keys.chunks.joined().parts[0])
    assert mask.shape == (2, 2, CHUNK) and (mask.sum(-1) == 4).all()
    report = cache.memory_report()
    assert report.nbytes == storage(cache) and report.components["saliency_map"] == 2 * 2 * 2 * (
        2 * CHUNK // 8
    )  # layers, K/V, chunks, bits
    assert report.components["probe_scores"] == 2 * (4 * 2 * 8 + 4 * 8)  # two layers, fp32 received and seen


@torch.inference_mode()
def test_decode_streams_chunks_with_saliency_from_the_decode_probes(tiny):
    cache = GearCache(TINY, tiny.config)
    out = tiny.generate(ids(20, 1), cache=cache, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    layer = cache.layers[1].store
    assert out.shape[1] == 50 and layer.chunks == 49 // CHUNK and layer.keys.shape[-2] == 49 % CHUNK
    assert layer.received.shape[-1] == layer.keys.shape[-2] and (layer.seen > 0).all()
    assert cache.memory_report().nbytes == storage(cache)
    beam = GearCache(TINY, tiny.config)
    tiny.generate(ids(20, 1, batch=2), cache=beam, max_new_tokens=20, num_beams=2, do_sample=False)
    assert beam.layers[0].store.received.shape[0] == 4 and beam.memory_report().nbytes == storage(beam)


@torch.inference_mode()
def test_batch_with_left_padding_gives_each_sequence_its_batch_of_one_result(tiny):
    # One whole chunk of padding keeps the chunk grid of the real tokens (the grid is positional for every recipe).
    a, b = ids(45, 2), ids(45 - CHUNK, 3)
    padded = torch.cat([a, torch.cat([torch.zeros(1, CHUNK, dtype=torch.long), b], 1)])
    mask = (padded != 0).long()
    mask[0] = 1
    cont = ids(2 * CHUNK, 4, batch=2)
    positions = (mask.cumsum(1) - 1).clamp_min(0)  # as generate() does, so RoPE sees each sequence's own positions
    batch = GearCache(TINY, tiny.config)
    tiny(padded, attention_mask=mask, position_ids=positions, cache=batch, use_cache=True)
    full_mask = torch.cat([mask, torch.ones_like(cont)], 1)
    cont_positions = positions[:, -1:] + 1 + torch.arange(cont.shape[1])
    got = tiny(cont, attention_mask=full_mask, position_ids=cont_positions, cache=batch, use_cache=True).logits
    for row, seq in ((0, a), (1, b)):
        alone = GearCache(TINY, tiny.config)
        tiny(seq, cache=alone, use_cache=True)
        want = tiny(cont[row : row + 1], cache=alone, use_cache=True).logits
        torch.testing.assert_close(got[row : row + 1], want, rtol=1e-4, atol=1e-4)
        kept = TINY.key.stages[0].salient(alone.layers[0].store.lanes.keys.chunks.joined().parts[0])
        in_batch = TINY.key.stages[0].salient(batch.layers[0].store.lanes.keys.chunks.joined().parts[0])
        first_real = row  # chunk-major storage: (chunk, batch); sequence b's first real chunk is the batch's second
        assert torch.equal(in_batch[2 * first_real + row], kept[0])


def test_without_gearkit_attention_the_cache_says_how_to_enable_it():
    model = tiny_llama(
        dict(num_attention_heads=2, num_key_value_heads=1, hidden_size=32), layers=1, attn_implementation="sdpa"
    )
    config = model.config
    with pytest.raises(ValueError, match="register"):
        GearCache(TINY, config)
    cache = GearCache(TINY)  # no config: the first update after a chunk is due finds no queries were seen
    with torch.inference_mode():
        model(ids(20), cache=cache, use_cache=True)
        with pytest.raises(RuntimeError, match="register"):
            model(ids(1), cache=cache, use_cache=True)
    assert GearCache(recipes.get("kivi-2"), config)  # recipes without saliency need nothing


# -- the real default model ----------------------------------------------------------------------------------


@torch.inference_mode()
def test_saliency_on_the_real_model_marks_the_sink_and_the_recently_attended_tokens(smol):
    from gearkit.models import load_text

    model, tok = smol
    prompt = tok(load_text("idle-help"), return_tensors="pt")["input_ids"][:, :256]
    recipe = recipes.get("zipcache")
    try:
        model.set_attn_implementation(register())
        cache = GearCache(recipe, model.config)
        model(prompt, cache=cache, use_cache=True)
        model.set_attn_implementation("eager")
        attentions = model(prompt, output_attentions=True).attentions  # the reference: full attention, [1, 9, t, t]
    finally:
        model.set_attn_implementation("sdpa")
    stage = recipe.key.stages[0]
    chunk, groups = recipe.buffer_size, model.config.num_attention_heads // model.config.num_key_value_heads
    sinks, recent_hits, recent_total = [], 0, 0
    for layer, attn in zip(cache.layers[2:], attentions[2:]):  # the first layers attend locally, without a sink
        salient = stage.salient(layer.store.lanes.keys.chunks.joined().parts[0])[0]  # first chunk, [kv_heads, chunk]
        sinks.append(salient[:, 0])
        # What the last 5% of queries attend to most in the first chunk, summed over each KV head's query heads.
        recent = attn[0, :, -13:, :chunk].sum(1).unflatten(0, (-1, groups)).sum(1)[:, 1:]
        top = recent.topk(5, -1).indices + 1
        recent_hits += salient.gather(1, top).sum().item()
        recent_total += top.numel()
    assert torch.stack(sinks).float().mean() > 0.9
    assert recent_hits / recent_total > 0.8
