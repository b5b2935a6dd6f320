import copy
import json

import pytest
import torch
from conftest import kv_like, kv_tensors, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from gearkit import (
    ChannelSeparableQuantizer,
    CodebookQuantizer,
    Context,
    FullPrecision,
    MixedPrecision,
    PerHead,
    PerLayer,
    Pipeline,
    Quantizer,
    Recipe,
    SparseOutlier,
    Stage,
    recipes,
)
from gearkit.compressors.rope import RoPE, inverse_frequencies
from gearkit.integrations.hf import make_cache
from gearkit.models import DEFAULT_MODEL

ROPE = RoPE(inverse_frequencies(64, 100000.0))  # the default model's rotary embedding (head dim 64)

WIDTHS = [Quantizer(b, None, "token") for b in (2, 3, 4)]


@settings(max_examples=30, deadline=None)
@given(x=kv_tensors(), layer=st.integers(0, 5))
def test_each_layer_gets_exactly_its_stage_and_its_bytes(x, layer):
    """The part is the chosen stage's, byte for byte; layers past the list take the default."""
    per_layer = Pipeline([PerLayer(WIDTHS, default=CodebookQuantizer(1))])
    chosen = Pipeline([WIDTHS[layer] if layer < len(WIDTHS) else CodebookQuantizer(1)])
    c, alone = per_layer.compress(x, layer=layer), chosen.compress(x)
    assert c.nbytes == alone.nbytes and c.components() == alone.components()
    assert torch.equal(per_layer.decompress(c), chosen.decompress(alone))


def test_more_bits_where_given_means_less_error():
    x = kv_like(0, (1, 2, 64, 16))
    pipeline = Pipeline([PerLayer({0: Quantizer(2, 64, "channel"), 1: Quantizer(4, 64, "channel")})])
    err = [(pipeline(x, layer=i) - x).norm() for i in (0, 1)]
    assert err[1] < err[0] / 2


def test_allocation_is_data_and_round_trips():
    stage = PerLayer({0: Quantizer(2), 2: CodebookQuantizer(3)}, default=FullPrecision())
    data = stage.to_dict()
    assert data["stages"][1] is None and data["stages"][2]["stage"] == "CodebookQuantizer"
    again = Stage.from_dict(data)
    assert again.to_dict() == data
    recipe = Recipe("alloc", Pipeline([stage]), Pipeline([Quantizer(4)]), 8)
    assert Recipe.from_dict(recipe.to_dict()).to_dict() == recipe.to_dict()


def test_missing_layers_and_bad_stages_are_refused_clearly():
    x = kv_like(1, (1, 1, 8, 8))
    pipeline = Pipeline([PerLayer([Quantizer(2), None, Quantizer(3)])])
    assert pipeline.requires == {"layer"}
    with pytest.raises(ValueError, match="layer"):
        pipeline.compress(x)
    with pytest.raises(ValueError, match="no stage for layer 1 and no default"):
        pipeline.compress(x, layer=1)
    with pytest.raises(ValueError, match="no stage for layer 7"):
        pipeline.compress(x, layer=7)
    with pytest.raises(TypeError, match="Stage"):
        PerLayer([Quantizer(2), "4-bit"])
    with pytest.raises(ValueError, match="ints >= 0"):
        PerLayer({-1: Quantizer(2)})
    with pytest.raises(ValueError, match="needs a stage"):
        PerLayer([None])


def test_exact_entries_of_the_chosen_stage_stay_exact():
    x = kv_like(2, (1, 2, 16, 8), magnitude=3)
    outliers = SparseOutlier(0.25, "token")
    pipeline = Pipeline([PerLayer([outliers]), Quantizer(2, None, "token")])
    c = pipeline.compress(x, layer=0)
    mask = pipeline.stages[0].exact_mask(c.parts[0])
    assert mask is not None and mask.any()
    assert torch.allclose(pipeline.decompress(c)[mask], x[mask].half().float())
    assert pipeline.stages[0].stage_for(0) is outliers


def test_a_cache_codes_each_layer_with_its_stage_and_refuses_models_it_does_not_fit():
    model = tiny_llama("gqa", layers=2)
    per_layer = Recipe(
        "pl",
        Pipeline([PerLayer([Quantizer(2, 8, "channel"), Quantizer(4, 8, "channel")])]),
        Pipeline([Quantizer(4, 8, "token")]),
        8,
    )
    cache = make_cache(per_layer, model)
    model(torch.randint(2, 97, (1, 40)), cache=cache, use_cache=True)
    bits = [layer.store.memory_report().component_bits()["codes"] for layer in cache.layers]
    assert bits[0] < bits[1]  # layer 0's keys at 2 bits, layer 1's at 4
    with pytest.raises(ValueError, match="no stage for layer 2"):
        make_cache(per_layer, tiny_llama("gqa", layers=3))
    with pytest.raises(ValueError, match="2 layers; the model has 1"):
        make_cache(per_layer, tiny_llama("gqa", layers=1))


@pytest.mark.parametrize("name, budget", [("gk-2.5", 2.5), ("gk-3", 3.0), ("gk-3.5", 3.5), ("gk-4.5", 4.5)])
def test_builtin_allocations_cost_their_budget_and_fit_only_their_model(name, budget):
    """All-in bits at 2048 tokens: the layers' mean stored bits (from the bytes of a 64-token chunk, head dim 64,
    3 KV heads, as the default model) plus 4 fp16 sink tokens."""
    recipe = recipes.get(name)
    x, layers = kv_like(5, (1, 3, 64, 64)), recipe.model["layers"]
    start = torch.tensor([64])  # pre-RoPE widths store the chunk's first position
    bits = sum(
        p.compress(x, layer=i, positions=start, rope=ROPE).bits_per_element
        for i in range(layers)
        for p in (recipe.key, recipe.value)
    )
    all_in = bits / (2 * layers) + 16 * recipe.sink_tokens / 2048
    assert all_in <= budget and recipe.model_bound and recipe.model["name"] == DEFAULT_MODEL
    with pytest.raises(ValueError, match=f"calibrated for {DEFAULT_MODEL} .*gearkit calibrate"):
        make_cache(recipe, tiny_llama("gqa", layers=2))
    with pytest.raises(ValueError, match="unknown recipe 'gk-9.9'"):
        recipes.get("gk-9.9")


HEAD_WIDTHS = [Quantizer(2, None, "token"), CodebookQuantizer(3), FullPrecision()]


@settings(max_examples=30, deadline=None)
@given(x=kv_tensors(max_heads=3), seed=st.integers(0, 2**31 - 1))
def test_each_head_gets_exactly_its_stage_and_its_bytes(x, seed):
    """Head h is stored and rebuilt as its stage alone would store and rebuild it: same bytes, same values."""
    heads = x.shape[1]
    order = torch.randperm(len(HEAD_WIDTHS), generator=torch.Generator().manual_seed(seed))[:heads].tolist()
    stages = [HEAD_WIDTHS[i] for i in order]
    per_head = Pipeline([PerHead(stages)])
    c = per_head.compress(x)
    alone = [Pipeline([s]).compress(x[:, h : h + 1]) for h, s in enumerate(stages)]
    assert c.nbytes == sum(a.nbytes for a in alone)
    expected = torch.cat([Pipeline([s]).decompress(a) for s, a in zip(stages, alone)], dim=1)
    assert torch.equal(per_head.decompress(c), expected)


def test_per_head_slices_saliency_keeps_exact_entries_and_refuses_other_head_counts():
    x = kv_like(3, (1, 2, 16, 8), magnitude=3)
    saliency = torch.rand(1, 2, 16, generator=torch.Generator().manual_seed(0))
    mixed = MixedPrecision(Quantizer(4, None, "channel"), ChannelSeparableQuantizer(2), 0.25)
    stage = PerHead([SparseOutlier(0.25, "token"), mixed])
    pipeline = Pipeline([stage, Quantizer(2, None, "token")])
    assert pipeline.requires == {"saliency"}
    c = pipeline.compress(x, saliency=saliency)
    alone = mixed.decode(mixed.encode(x[:, 1:], ctx=Context(saliency[:, 1:])))  # head 1 sees its own saliency
    assert torch.equal(stage.decode(c.parts[0])[:, 1:], alone)
    mask = stage.exact_mask(c.parts[0])
    assert mask[:, 0].any() and not mask[:, 1].any()
    assert torch.allclose(pipeline.decompress(c)[mask], x[mask].half().float())
    with pytest.raises(ValueError, match="2 KV heads, got a tensor with 3"):
        Pipeline([PerHead([Quantizer(2), Quantizer(3)])]).compress(kv_like(0, (1, 3, 8, 8)))
    with pytest.raises(ValueError, match="2 KV heads; the model has 4"):
        make_cache(
            Recipe("ph", Pipeline([PerHead([Quantizer(2), Quantizer(3)])]), Pipeline([Quantizer(4)]), 8),
            tiny_llama("mha"),
        )
    with pytest.raises(TypeError, match="head 1"):
        PerHead([Quantizer(2), "3-bit"])
    with pytest.raises(ValueError, match="none"):
        PerHead([])


def test_an_allocation_holds_one_stage_per_width_and_round_trips_as_data():
    """gk-3 names a width for each of 30 layers (or each of their 3 KV heads); every use of a width is one shared
    stage, which `.to`, `state_dict` and a deep copy keep; `from_dict` of its data codes every layer alike."""
    recipe = recipes.get("gk-3")
    x, start = kv_like(6, (1, 3, 64, 64)), torch.tensor([64])
    again = Recipe.from_dict(recipe.to_dict())
    for role in ("key", "value"):
        pipeline = getattr(recipe, role)
        per_layer = pipeline.stages[0]
        used = [s for layer in per_layer.stages for s in (layer.stages if isinstance(layer, PerHead) else [layer])]
        widths = {json.dumps(s.to_dict(), sort_keys=True) for s in used}
        assert len({id(s) for s in used}) == len(widths) < 10 and len(used) >= 30  # one stage per width
        assert pipeline.to("cpu") is pipeline
        pipeline.load_state_dict(pipeline.state_dict())
        copied = copy.deepcopy(pipeline)
        assert len({id(m) for m in copied.modules()}) == len({id(m) for m in pipeline.modules()})
        for layer in range(recipe.model["layers"]):
            a, b = (p.compress(x, layer=layer, positions=start, rope=ROPE) for p in (pipeline, getattr(again, role)))
            assert a.nbytes == b.nbytes and torch.equal(pipeline.decompress(a), getattr(again, role).decompress(b))
