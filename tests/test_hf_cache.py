"""GearCache with transformers: the real default model and tiny random configs of other shapes."""

import pytest
import torch
from conftest import SHAPES, kv_like, tiny_llama
from transformers import DynamicCache

from gearkit import FullPrecision, Pipeline, Quantizer, Recipe, recipes
from gearkit.cache import ChunkStore
from gearkit.integrations.hf import GearCache
from gearkit.parts import select_batch


class CountingPipeline(Pipeline):
    """Records how many tokens each compress call receives (to prove no chunk is compressed twice)."""

    def __init__(self, stages):
        super().__init__(stages)
        self.calls = []

    def compress(self, x, exclude=None, *args, **kwargs):
        self.calls.append(x.shape[0] * x.shape[2])  # chunks arrive stacked along the batch
        return super().compress(x, exclude, *args, **kwargs)


def storage(cache: GearCache) -> int:
    tensors = cache.held_tensors()
    assert len({t.untyped_storage().data_ptr() for t in tensors if t.numel()}) == len([t for t in tensors if t.numel()])
    return sum(t.untyped_storage().nbytes() for t in tensors)


def chat(tokenizer, prompts):
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    return tokenizer(texts, return_tensors="pt", padding=True)


def generate(model, inputs, cache=None, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(**inputs, cache=cache, pad_token_id=2, **kw)


# -- the real default model ------------------------------------------------------------------------------


def test_gear_4_matches_uncompressed_greedy_output(smol):
    model, tok = smol
    inputs = chat(tok, ["Explain in detail how a bicycle works."])
    reference = generate(model, inputs, max_new_tokens=72, min_new_tokens=72)
    cache = GearCache("gear-4", model.config)
    out = generate(model, inputs, cache, max_new_tokens=72, min_new_tokens=72)
    assert cache.layers[0].store.chunks >= 1  # compressed chunks were really used
    assert torch.equal(out, reference)


@pytest.mark.parametrize("name", ["gear-4", "gear-2"])
def test_batch_of_three_with_left_padding(smol, name):
    model, tok = smol
    inputs = chat(tok, ["Hi", "Write a short poem about the sea, with a title.", "List three prime numbers."])
    cache = GearCache(name, model.config)
    out = generate(model, inputs, cache, max_new_tokens=70, min_new_tokens=70)
    assert out.shape == (3, inputs["input_ids"].shape[1] + 70)
    assert cache.get_seq_length() == out.shape[1] - 1  # the last token is never fed back
    assert cache.memory_report().nbytes == storage(cache)
    reference = generate(model, inputs, max_new_tokens=8)
    assert torch.equal(out[:, : reference.shape[1]], reference)  # before any chunk is compressed: identical


def test_beam_search_and_sampling_run(smol):
    model, tok = smol
    inputs = chat(tok, ["Name a colour."])
    cache = GearCache("gear-2", model.config)
    out = generate(model, inputs, cache, max_new_tokens=70, min_new_tokens=70, num_beams=3)
    assert out.shape[0] == 1 and cache.get_seq_length() == out.shape[1] - 1
    assert cache.layers[0].keys.shape[0] == 3  # one buffer row per beam
    torch.manual_seed(0)
    out = generate(model, inputs, GearCache("kivi-2", model.config), max_new_tokens=20, do_sample=True, top_k=20)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_long_generation_never_recompresses_a_chunk(smol):
    model, tok = smol
    key, value = CountingPipeline([Quantizer(2, 32, "channel")]), CountingPipeline([Quantizer(2, 32, "token")])
    cache = GearCache(Recipe("counting-kivi-2", key, value, buffer_size=64), model.config)
    inputs = chat(tok, ["Tell me a long story about a lighthouse keeper."])
    first = generate(model, inputs, cache, max_new_tokens=100, min_new_tokens=100)
    chunk0 = select_batch(cache.layers[0].store.lanes.keys.chunks.joined(), torch.tensor([0])).tensors()
    # Continue the same cache: 100 + 520 new tokens in all.
    out = generate(
        model,
        {"input_ids": first, "attention_mask": torch.ones_like(first)},
        cache,
        max_new_tokens=520,
        min_new_tokens=520,
    )
    length = out.shape[1] - 1
    assert cache.get_seq_length() == length == inputs["input_ids"].shape[1] + 619
    for layer in cache.layers:
        assert layer.store.chunks == length // 64 and layer.keys.shape[-2] == length % 64
    # Every token is compressed exactly once: the calls add up to the compressed tokens, over all layers.
    assert sum(key.calls) == sum(value.calls) == len(cache.layers) * (length // 64) * 64
    assert all(n % 64 == 0 for n in key.calls)
    now = select_batch(cache.layers[0].store.lanes.keys.chunks.joined(), torch.tensor([0])).tensors()
    assert all(torch.equal(now[k], v) for k, v in chunk0.items())  # the first chunk's bytes never changed
    assert cache.memory_report().nbytes == storage(cache)


def test_bytes_reported_equal_bytes_held_and_beat_fp16(smol):
    model, tok = smol
    ids = torch.tensor(tok(recipes.__doc__ * 4)["input_ids"][:300])[None]
    for name in ("fp16", "kivi-2", "gear-2"):
        cache = GearCache(name, model.config)
        model(ids, cache=cache)
        report = cache.memory_report()
        assert report.nbytes == storage(cache) == sum(report.components.values())
        assert report.elements == 30 * 3 * 300 * 128 and report.tokens == 300
        if name == "fp16":
            assert report.bits_per_element == 16
        else:
            assert report.compression_ratio > 2


# -- layer-level behaviour ---------------------------------------------------------------------------------


def make_layer(name="gear-2"):
    cache = GearCache(name)
    cache.update(kv_like(0, (2, 3, 150, 64)), kv_like(1, (2, 3, 150, 64)), 0)
    return cache, cache.layers[0].store


def test_non_finite_values_leave_the_cache_unchanged():
    cache, _ = make_layer()
    before = [t.clone() for t in cache.held_tensors()]
    bad = kv_like(2, (2, 3, 1, 64))
    bad[0, 1, 0, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        cache.update(bad, kv_like(3, (2, 3, 1, 64)), 0)
    with pytest.raises(ValueError, match="overflow"):
        cache.update(kv_like(2, (2, 3, 1, 64)) * 1e6, kv_like(3, (2, 3, 1, 64)), 0)
    assert cache.get_seq_length() == 150
    assert all(torch.equal(a, b) for a, b in zip(before, cache.held_tensors()))


def test_update_returns_what_is_held_and_mask_sizes_agree():
    cache, layer = make_layer()
    assert (layer.chunks, layer.keys.shape[-2]) == (2, 22)
    keys, values = cache.update(kv_like(4, (2, 3, 3, 64)), kv_like(5, (2, 3, 3, 64)), 0)
    held_keys, held_values = layer.dequantized()
    assert torch.equal(keys, held_keys) and torch.equal(values, held_values)
    assert cache.get_mask_sizes(5, 0) == (153 + 5, 0) and keys.shape[-2] == 153


@pytest.mark.parametrize("remove", [10, 22, 23, 100, 200])
def test_crop_keeps_the_first_tokens(remove):
    cache, layer = make_layer()
    before, _ = layer.dequantized()
    cache.crop(-remove)
    keep = max(150 - remove, 0)
    assert cache.get_seq_length() == keep
    after, _ = layer.dequantized()
    assert after.shape[-2] == keep
    assert torch.equal(after, before[:, :, :keep])
    cache.update(kv_like(6, (2, 3, 64, 64)), kv_like(7, (2, 3, 64, 64)), 0)
    assert cache.get_seq_length() == keep + 64 == layer.chunks * 64 + layer.keys.shape[-2]


def test_reorder_selects_batch_entries_everywhere():
    cache, layer = make_layer()
    before, _ = layer.dequantized()
    cache.reorder_cache(torch.tensor([1, 1]))
    after, _ = layer.dequantized()
    assert torch.equal(after, before[[1, 1]])


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(ValueError, match="known recipes: fp16"):
        GearCache("gear2")


# -- tiny random configs of other shapes -------------------------------------------------------------------

EXACT = Recipe(
    "exact-fp32", Pipeline([FullPrecision(torch.float32)]), Pipeline([FullPrecision(torch.float32)]), buffer_size=8
)


@pytest.fixture(scope="module", params=list(SHAPES))
def tiny(request):
    return tiny_llama(request.param)


@pytest.mark.parametrize("prompt_len", [1, 7, 19])
def test_tiny_exact_cache_matches_dynamic_cache(tiny, prompt_len):
    ids = torch.randint(2, 97, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    kw = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False)
    reference = tiny.generate(ids, cache=DynamicCache(config=tiny.config), **kw)
    cache = GearCache(EXACT, tiny.config, buffer_dtype=None)
    out = tiny.generate(ids, cache=cache, **kw)
    assert torch.equal(out, reference)
    assert cache.layers[0].store.chunks == (prompt_len + 29) // 8


def test_tiny_compressed_generation_batch_beam_and_bytes(tiny):
    ids = torch.randint(2, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    ids[1, :4] = 0  # left padding
    mask = (ids != 0).long()
    recipe = Recipe("tiny-gear-2", recipes.get("gear-2").key, recipes.get("gear-2").value, buffer_size=16)
    for kw in (dict(), dict(num_beams=2)):
        cache = GearCache(recipe, tiny.config)
        out = tiny.generate(
            ids, attention_mask=mask, max_new_tokens=40, min_new_tokens=40, do_sample=False, cache=cache, **kw
        )
        assert out.shape[1] == 13 + 40 and cache.get_seq_length() == 13 + 39
        assert cache.memory_report().nbytes == storage(cache)
        assert all(layer.store.chunks == (13 + 39) // 16 for layer in cache.layers)


def test_sink_tokens_stay_in_full_precision():
    kivi = recipes.get("kivi-2")
    recipe = Recipe("sink-kivi-2", kivi.key, kivi.value, buffer_size=64, sink_tokens=4)
    cache = GearCache(recipe)
    keys = kv_like(0, (2, 3, 150, 64))
    keys[:, :, 0] *= 50  # a sink far outside the other tokens' range
    cache.update(keys[:, :, :2], kv_like(1, (2, 3, 2, 64)), 0)
    cache.update(keys[:, :, 2:], kv_like(1, (2, 3, 148, 64)), 0)
    layer = cache.layers[0].store
    assert (layer.sink.slots, layer.chunks, layer.keys.shape[-2]) == (4, 2, 22)  # chunk grid unchanged
    assert layer.tokens_to_next_chunk() == 64 - 22
    held, _ = layer.dequantized()
    assert torch.equal(held[:, :, :4], keys[:, :, :4].half().float())
    plain = GearCache(Recipe("plain-kivi-2", kivi.key, kivi.value, buffer_size=64))
    plain.update(keys, kv_like(1, (2, 3, 150, 64)), 0)
    rest = lambda c: (c.layers[0].store.dequantized()[0] - keys.half().float())[:, :, 4:64].norm()
    assert rest(cache) < 0.5 * rest(plain)  # the sink did not widen the first chunk's ranges
    assert cache.memory_report().components["sink"] == 2 * 2 * 3 * 4 * 64 * 2
    assert cache.memory_report().nbytes == storage(cache)
    cache.crop(-148)
    assert cache.get_seq_length() == 2 and layer.sink.slots == 2 and layer.chunks == 0
    assert torch.equal(layer.dequantized()[0], keys[:, :, :2].half().float())


def test_appending_chunks_never_copies_the_earlier_ones(monkeypatch):
    monkeypatch.setattr(ChunkStore, "BLOCK_TOKENS", 1024)
    store = ChunkStore(recipes.get("kivi-2"))  # 128-token chunks, decode attention blocks of 1024 // 128 = 8 chunks
    store.append(kv_like(0, (2, 2, 3 * 128, 64)), kv_like(1, (2, 2, 3 * 128, 64)))  # a prefill of 3 chunks
    held = lambda: [t.data_ptr() for t in store.lanes.keys.chunks.tensors()]
    before = held()
    for i in range(1, 10):  # then one chunk per append
        store.append(kv_like(i, (2, 2, 128, 64)), kv_like(i + 50, (2, 2, 128, 64)))
        assert held()[: len(before)] == before  # what was held is neither copied nor re-allocated
    assert store.chunks == 12 and len(store.lanes.keys.chunks.groups) == 10
    assert [first for first, _ in store.lanes.keys.chunks.blocks()] == [0, 8]  # short groups joined into blocks of 8
    report = store.memory_report()
    assert "slack" not in report.components
    assert report.nbytes == sum(t.untyped_storage().nbytes() for t in store.held_tensors())
