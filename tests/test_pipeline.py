import pytest
import torch
import torch.utils._pytree as pytree
from conftest import kv_like, kv_tensors, rel_error
from hypothesis import assume, given
from hypothesis import strategies as st

from gearkit import (
    Chain,
    CompressedTensor,
    FullPrecision,
    LowRankResidual,
    PerLayer,
    Pipeline,
    Quantizer,
    SparseOutlier,
    recipes,
)
from gearkit.compressors.rope import RoPE, inverse_frequencies
from gearkit.parts import cat_batch, select_batch


def gear(bits=2, group=16, axis="channel", ratio=0.05, rank=2):
    return Pipeline([SparseOutlier(ratio, axis), Quantizer(bits, group, axis), LowRankResidual(rank)])


def scores(pipeline: Pipeline, x: torch.Tensor) -> dict:
    """What a cache supplies, as keyword arguments: random token saliency for pipelines that need it (ZipCache),
    each entry's first position and a rotary embedding for those that code keys before RoPE."""
    out = {}
    if "saliency" in pipeline.requires:
        out["saliency"] = torch.randn(x.shape[:3], generator=torch.Generator().manual_seed(x.shape[0] + x.shape[2]))
    if "positions" in pipeline.requires:
        out["positions"] = 64 * torch.arange(x.shape[0])
    if "rope" in pipeline.requires:
        out["rope"] = RoPE(inverse_frequencies(x.shape[-1], 10000.0))
    return out


def fits(pipeline: Pipeline, x: torch.Tensor) -> bool:
    """Whether the pipeline takes chunks shaped like `x` (Hadamard rotations need power-of-two head dims)."""
    try:
        pipeline.check_chunk(x.shape[2], x.shape[3])
    except ValueError:
        return False
    return True


def storage_bytes(c: CompressedTensor) -> int:
    return sum(t.untyped_storage().nbytes() for t in c.tensors().values())


# Recipes made for no model in particular; the CSR recipes read a model-specific dictionary and have the same
# properties checked with small dictionaries in test_dictionary.py, per-layer allocations in test_per_layer.py.
SELF_CONTAINED = [n for n in recipes.names() if not recipes.get(n).model_bound]

backbones = st.builds(
    lambda bits, group, axis: (Quantizer(bits, group, axis), axis),
    bits=st.sampled_from([2, 3, 4]),
    group=st.sampled_from([None, 16, 32]),
    axis=st.sampled_from(["token", "channel"]),
)


@given(
    x=kv_tensors(min_tokens=16, max_tokens=64, head_dims=(16, 32, 64)),
    backbone=backbones,
    rank=st.integers(1, 4),
    ratio=st.sampled_from([0.02, 0.05, 0.1]),
)
def test_each_correction_never_increases_the_error(x, backbone, rank, ratio):
    quantizer, axis = backbone
    plain = rel_error(x, Pipeline([quantizer])(x))
    with_lowrank = rel_error(x, Pipeline([quantizer, LowRankResidual(rank)])(x))
    with_outliers = rel_error(x, Pipeline([SparseOutlier(ratio, axis), quantizer])(x))
    full = rel_error(x, Pipeline([SparseOutlier(ratio, axis), quantizer, LowRankResidual(rank)])(x))
    tol = 1 + 1e-6
    assert with_lowrank <= plain * tol
    assert with_outliers <= plain * tol
    assert full <= with_outliers * tol


@given(x=kv_tensors(min_tokens=4), name=st.sampled_from(SELF_CONTAINED))
def test_reported_bytes_equal_the_storage_held(x, name):
    recipe = recipes.get(name)
    assume(fits(recipe.key, x) and fits(recipe.value, x))
    for pipeline in (recipe.key, recipe.value):
        c = pipeline.compress(x, **scores(pipeline, x))
        assert c.nbytes == storage_bytes(c) == sum(c.components().values())
        assert c.bits_per_element == 8 * c.nbytes / x.numel()


def test_breakdown_names_every_component():
    c = gear().compress(kv_like(0, (1, 2, 32, 16)))
    assert set(c.components()) == {"outliers", "codes", "scales", "lowrank"}
    assert c.compression_ratio == pytest.approx(2 * c.numel / c.nbytes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", SELF_CONTAINED)
def test_shape_and_dtype_are_preserved(dtype, name):
    x = kv_like(1, (2, 3, 33, 16)).to(dtype)
    recipe = recipes.get(name)
    for pipeline in (recipe.key, recipe.value):
        out = pipeline(x, **scores(pipeline, x))
        assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


def test_outliers_are_exact_inside_a_pipeline():
    x = kv_like(2, (1, 2, 32, 16)).half()
    pipeline = gear()
    c = pipeline.compress(x)
    mask = pipeline.stages[0].exact_mask(c.parts[0])
    assert mask.any() and torch.equal(pipeline.decompress(c)[mask], x[mask])


def test_same_input_and_seed_give_bit_identical_parts():
    x = kv_like(3, (2, 3, 48, 32))
    a, b = gear().compress(x), gear().compress(x)
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_parts_are_pytrees():
    c = gear().compress(kv_like(4, (1, 2, 16, 16)))
    leaves, spec = pytree.tree_flatten(c)
    assert len(leaves) == len(c.tensors()) and all(isinstance(t, torch.Tensor) for t in leaves)
    again = pytree.tree_unflatten(leaves, spec)
    assert torch.equal(gear().decompress(again), gear().decompress(c))


@pytest.mark.parametrize(
    "bad, match",
    [
        (float("nan"), "NaN or Inf"),
        (float("inf"), "NaN or Inf"),
        (float("-inf"), "NaN or Inf"),
    ],
)
def test_non_finite_input_is_a_clear_error(bad, match):
    x = torch.randn(1, 1, 8, 8)
    x[0, 0, 3, 3] = bad
    with pytest.raises(ValueError, match=match):
        gear(rank=1).compress(x)
    with pytest.raises(ValueError, match=match):
        Quantizer(2)(x)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(8, 8), "4-D"),
        (torch.randn(1, 1, 1, 8, 8), "4-D"),
        (torch.ones(1, 1, 4, 4, dtype=torch.int32), "floating"),
    ],
)
def test_wrong_tensors_are_a_clear_error(x, match):
    with pytest.raises(ValueError, match=match):
        gear(rank=1).compress(x)


def test_a_pipeline_needs_stages():
    with pytest.raises(ValueError, match="at least one stage"):
        Pipeline([])
    with pytest.raises(TypeError, match="Stage"):
        Pipeline([torch.nn.Linear(2, 2)])


def test_parts_must_match_the_pipeline():
    c = gear().compress(kv_like(5, (1, 1, 16, 16)))
    with pytest.raises(ValueError, match="parts"):
        Pipeline([Quantizer(2)]).decompress(c)


@pytest.mark.parametrize("shape", [(0, 3, 5, 8), (1, 3, 0, 8), (2, 1, 0, 64)])
@pytest.mark.parametrize("name", SELF_CONTAINED)
def test_empty_tensors_round_trip(shape, name):
    recipe = recipes.get(name)
    for pipeline in (recipe.key, recipe.value):
        x = torch.empty(shape, dtype=torch.float16)
        c = pipeline.compress(x, **scores(pipeline, x))
        out = pipeline.decompress(c)
        assert out.shape == x.shape and out.dtype == x.dtype and c.bits_per_element == 0.0


def test_fp16_baseline_holds_two_bytes_per_element():
    c = Pipeline([FullPrecision()]).compress(kv_like(6, (1, 2, 10, 16)))
    assert c.bits_per_element == 16


def test_torch_compile_fullgraph_matches_eager():
    """The compile contract: no graph breaks (fullgraph), stored bytes bit-identical to eager, and the round
    trip identical too when inductor keeps the storage dtype's rounding (`emulate_precision_casts`; without
    it, a compiled round trip may skip the fp16 rounding of factors it never materialises)."""
    x = kv_like(7, (1, 2, 64, 64))
    pipeline = gear(bits=2, group=32)
    eager = pipeline.compress(x)
    compiled = torch.compile(pipeline.compress, fullgraph=True)(x)
    te, tc = eager.tensors(), compiled.tensors()
    assert te.keys() == tc.keys() and all(torch.equal(te[k], tc[k]) for k in te)  # stored bytes identical
    round_trip = torch.compile(pipeline, fullgraph=True, options={"emulate_precision_casts": True})
    assert torch.equal(round_trip(x), pipeline(x))
    with pytest.raises(RuntimeError, match="NaN or Inf"):  # the input check survives compilation
        round_trip(x.index_fill(2, torch.tensor([3]), float("nan")))
    dynamic = torch.compile(pipeline.compress, fullgraph=True, dynamic=True)  # custom ops' fake strides hold
    for batch in (2, 3):
        y = kv_like(batch, (batch, 2, 64, 64))
        assert torch.equal(dynamic(y).parts[1].codes, pipeline.compress(y).parts[1].codes)


@pytest.mark.parametrize("name", SELF_CONTAINED)
def test_batch_entries_are_independent_so_parts_concatenate_and_reorder(name):
    recipe = recipes.get(name)
    a, b = kv_like(8, (2, 3, 32, 16)), kv_like(9, (1, 3, 32, 16))
    for pipeline in (recipe.key, recipe.value):
        sa, sb = scores(pipeline, a), scores(pipeline, b)
        joined = cat_batch([pipeline.compress(a, **sa), pipeline.compress(b, **sb)])
        joint = {k: sa[k] if k == "rope" else torch.cat([sa[k], sb[k]]) for k in sa}  # one embedding per layer
        whole = pipeline.compress(torch.cat([a, b]), **joint)
        assert joined.nbytes == whole.nbytes and joined.shape == whole.shape
        assert torch.allclose(pipeline.decompress(joined), pipeline.decompress(whole), atol=1e-5)
        index = torch.tensor([2, 0, 0])
        picked = select_batch(whole, index)
        assert torch.equal(pipeline.decompress(picked), pipeline.decompress(whole)[index])


@given(x=kv_tensors(min_tokens=2), split=st.integers(1, 2))
def test_a_chain_is_its_pipeline_as_one_stage(x, split):
    """A Chain stores and rebuilds what its stages inlined in the outer pipeline would (so a PerLayer entry can be
    several stages), and entries a stage inside it stores exactly stay exact."""
    stages = [SparseOutlier(0.1, "token"), Quantizer(2, None, "token"), LowRankResidual(1)]
    flat, nested = Pipeline(stages), Pipeline([*stages[:split], Chain(stages[split:])])
    c, n = flat.compress(x), nested.compress(x)
    assert n.nbytes == c.nbytes and n.components() == c.components()
    assert torch.allclose(nested.decompress(n), flat.decompress(c), atol=1e-5 * x.abs().max().item())
    chain = Pipeline([PerLayer([Chain(stages)])])
    mask = chain.stages[0].exact_mask(chain.compress(x, layer=0).parts[0])
    assert mask is not None and torch.equal(chain(x, layer=0)[mask], x[mask].half().float())
