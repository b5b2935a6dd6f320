import pytest
import torch
from conftest import kv_like, rel_error

from gearkit import LowRankResidual, Pipeline, Quantizer, Recipe, recipes
from gearkit import recipe as registry
from gearkit.compressors.rope import RoPE, inverse_frequencies

REQUIRED = ["fp16", "uniform-2", "uniform-4", "kivi-2", "kivi-4", "gear-2", "gear-4", "gear-l-2", "gear-l-4", "kcvt-4"]


def test_required_recipes_are_registered():
    assert set(REQUIRED) <= set(recipes.names())


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown recipe 'gear2'.*kivi-2.*gear-2"):
        recipes.get("gear2")


def test_lookup_is_by_exact_name():
    with pytest.raises(ValueError):
        recipes.get("GEAR-2")


def test_a_user_recipe_takes_a_few_lines():
    mine = Recipe(
        "test-mine-3",
        key=Pipeline([Quantizer(3, 32, "channel"), LowRankResidual(2)]),
        value=Pipeline([Quantizer(3, 32, "token")]),
        buffer_size=32,
    )
    try:
        assert recipes.register(mine) is recipes.get("test-mine-3")
        with pytest.raises(ValueError, match="already registered"):
            recipes.register(mine)
    finally:
        registry._REGISTRY.pop("test-mine-3", None)


def test_builtins_are_built_once_on_first_get_and_described_before():
    """A built-in is a builder until its first `get`; its description is known before and is the built recipe's."""
    entry = registry._REGISTRY["gear-l-3"]
    assert recipes.describe("gear-l-3") == entry.description
    first = recipes.get("gear-l-3")
    assert recipes.get("gear-l-3") is first and first.description == entry.description
    for name in recipes.names():
        assert recipes.get(name).description == recipes.describe(name), name
    with pytest.raises(ValueError, match="unknown recipe 'gear2'"):
        recipes.describe("gear2")


def test_a_builder_must_build_the_recipe_it_was_registered_as():
    def build():
        return Recipe("test-other", Pipeline([Quantizer(2)]), Pipeline([Quantizer(2)]), description="two bits")

    try:
        recipes.register_builder("test-lazy", "two bits", build)
        assert recipes.names()[-1] == "test-lazy" and recipes.describe("test-lazy") == "two bits"
        with pytest.raises(ValueError, match="registered as 'test-lazy' built 'test-other'"):
            recipes.get("test-lazy")
        with pytest.raises(ValueError, match="already registered"):
            recipes.register_builder("test-lazy", "two bits", build)
    finally:
        registry._REGISTRY.pop("test-lazy", None)


def test_recipe_fields_are_checked():
    with pytest.raises(ValueError, match="buffer_size"):
        Recipe("x", Pipeline([Quantizer(2)]), Pipeline([Quantizer(2)]), buffer_size=0)
    with pytest.raises(TypeError, match="Pipeline"):
        Recipe("x", Quantizer(2), Pipeline([Quantizer(2)]))


def test_more_bits_give_less_error():
    k = kv_like(0, (1, 3, 64, 64))
    for family in ("uniform", "kivi", "gear", "gear-l"):
        two, four = recipes.get(f"{family}-2"), recipes.get(f"{family}-4")
        assert rel_error(k, four.key(k)) < rel_error(k, two.key(k))


def test_gear_corrections_reduce_key_error_over_their_backbone():
    k = kv_like(1, (1, 3, 64, 64))
    gear, gear_l = recipes.get("gear-2").key, recipes.get("gear-l-2").key
    backbone = Pipeline([Quantizer(2, 64, "channel")])
    assert rel_error(k, gear(k)) <= rel_error(k, gear_l(k)) <= rel_error(k, backbone(k))


@pytest.mark.parametrize("name", recipes.names())
def test_every_builtin_recipe_round_trips_as_data(name):
    import json

    recipe = recipes.get(name)
    data = json.loads(json.dumps(recipe.to_dict()))
    again = Recipe.from_dict(data)
    assert again.to_dict() == data and again.buffer_size == recipe.buffer_size and again.probes == recipe.probes
    if not recipe.needs_dictionary:  # the same stages: the same bytes
        k = kv_like(2, (1, 3, recipe.buffer_size, 64))
        ctx = dict(saliency=torch.randn(1, 3, recipe.buffer_size)) if recipe.needs_saliency else {}
        ctx |= dict(positions=torch.tensor([64])) if "positions" in recipe.key.requires else {}
        ctx |= dict(rope=RoPE(inverse_frequencies(64, 1e4))) if "rope" in recipe.key.requires else {}
        ctx |= dict(layer=1) if "layer" in recipe.key.requires else {}
        a, b = recipe.key.compress(k, **ctx), again.key.compress(k, **ctx)
        assert all(torch.equal(t, b.tensors()[n]) for n, t in a.tensors().items())


def test_recipe_data_of_another_format_is_refused():
    data = recipes.get("kivi-2").to_dict()
    with pytest.raises(ValueError, match="format version"):
        Recipe.from_dict({**data, "version": 99})
    with pytest.raises(ValueError, match="unknown stage 'Quantiser'"):
        Recipe.from_dict({**data, "key": {"stages": [{"stage": "Quantiser", "bits": 2}]}})


def test_stage_constraints_are_checked_against_the_chunk_size_at_construction():
    with pytest.raises(ValueError, match="rank 2 exceeds.*buffer_size"):
        Recipe("x", recipes.get("gear-2").key, recipes.get("gear-2").value, buffer_size=1)
    with pytest.raises(ValueError, match="buffer_size must be a positive int, got True"):
        Recipe("x", Pipeline([Quantizer(2)]), Pipeline([Quantizer(2)]), buffer_size=True)


def test_frontier_recipes_cost_the_bits_they_state():
    """All-in bits of one 64-token chunk at head dim 64 (3 KV heads), per role: codes + scales (+ outliers)."""
    x, start = kv_like(5, (1, 3, 64, 64)), torch.tensor([64])
    expected = {
        "turboquant-2.5": (3.25, 2.25),
        "turboquant-3.5": (4.25, 3.25),  # gk-*: see test_per_layer.py
        # 1% outliers: one per side of each token's 192 entries across heads, fp16 value + uint8 index;
        # keys: outliers and codes inside one pre-RoPE stage, which stores the chunk's int32 first position
        "kvquant-2": (2.75 + 32 / (3 * 64 * 64), 2.5),
        "kvquant-3": (3.75 + 32 / (3 * 64 * 64), 3.5),
    }
    for name, (key_bits, value_bits) in expected.items():
        built = recipes.get(name)
        coded = built.key.compress(x, positions=start, rope=RoPE(inverse_frequencies(64, 1e4)))
        assert coded.bits_per_element == pytest.approx(key_bits), name
        assert built.value.compress(x).bits_per_element == pytest.approx(value_bits), name
