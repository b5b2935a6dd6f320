import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gearkit import (CodebookQuantizer, FullPrecision, PerLayer, Pipeline, Quantizer, Recipe, SparseOutlier, Stage,
                     recipes)
from gearkit.integrations.hf import make_cache
from gearkit.models import DEFAULT_MODEL

from conftest import kv_like, kv_tensors, tiny_llama

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
    per_layer = Recipe("pl", Pipeline([PerLayer([Quantizer(2, 8, "channel"), Quantizer(4, 8, "channel")])]),
                       Pipeline([Quantizer(4, 8, "token")]), 8)
    cache = make_cache(per_layer, model)
    model(torch.randint(2, 97, (1, 40)), cache=cache, use_cache=True)
    bits = [layer.store.memory_report().component_bits()["codes"] for layer in cache.layers]
    assert bits[0] < bits[1]  # layer 0's keys at 2 bits, layer 1's at 4
    with pytest.raises(ValueError, match="no stage for layer 2"):
        make_cache(per_layer, tiny_llama("gqa", layers=3))
    with pytest.raises(ValueError, match="2 layers; the model has 1"):
        make_cache(per_layer, tiny_llama("gqa", layers=1))


@pytest.mark.parametrize("name, budget", [("gk-2.5", 2.5), ("gk-3", 3.0), ("gk-3.5", 3.5), ("gk-4.5", 4.5)])
def test_builtin_allocations_cost_what_they_state_within_budget_and_fit_only_their_model(name, budget):
    """All-in bits at 2048 tokens: the layers' mean stored bits (from the bytes of a 64-token chunk, head dim 64,
    3 KV heads, as the default model) plus 4 fp16 sink tokens."""
    recipe = recipes.get(name)
    data = json.loads((recipes.ALLOCATIONS / f"{DEFAULT_MODEL}.json").read_text())["allocations"][str(budget)]
    x, layers = kv_like(5, (1, 3, 64, 64)), len(data["key"])
    bits = sum(p.compress(x, layer=i).bits_per_element for i in range(layers) for p in (recipe.key, recipe.value))
    all_in = bits / (2 * layers) + 16 * recipe.sink_tokens / 2048
    assert all_in == pytest.approx(data["all_in_bits"]) and all_in <= budget and recipe.model_bound
    with pytest.raises(ValueError, match=f"{layers} layers; the model has 2"):
        make_cache(recipe, tiny_llama("gqa", layers=2))
    with pytest.raises(KeyError, match="no allocation for budget '9.9'"):
        recipes.allocated("9.9")
