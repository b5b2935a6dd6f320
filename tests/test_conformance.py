"""The conformance matrix, keyed on stages: every stage (alone, in a pipeline) keeps the same contract."""

import inspect
from types import SimpleNamespace

import pytest
import torch
from conftest import kv_like
from test_dictionary import tiny_set

import gearkit
from gearkit import (
    Chain,
    ChannelSeparableQuantizer,
    CodebookQuantizer,
    Context,
    FullPrecision,
    HadamardRotation,
    LowRankResidual,
    MixedPrecision,
    PerHead,
    PerLayer,
    Pipeline,
    PreRoPE,
    Quantizer,
    Rotation,
    SignSketch,
    SparseDictionary,
    SparseOutlier,
    Stage,
    Wrapper,
)
from gearkit.parts import cat_batch, select_batch

DICTIONARY = tiny_set()  # head dim 16, layers 0 and 1, pre-RoPE keys

STAGES = {
    "quantizer-channel": Quantizer(2, 8, "channel"),
    "quantizer-token-3bit": Quantizer(3, None, "token"),
    "quantizer-across-heads": Quantizer(4, 8, "token", across_heads=True),
    "outlier-token": SparseOutlier(0.2, "token"),
    "outlier-channel": SparseOutlier(0.1, "channel"),
    "outlier-across-heads": SparseOutlier(0.1, "token", across_heads=True),
    "lowrank-power": LowRankResidual(2),
    "lowrank-svd": LowRankResidual(1, "svd"),
    "full-precision": FullPrecision(torch.bfloat16),
    "rotation": Rotation(Quantizer(3, 8, "token"), seed=3),
    "hadamard-rotation": HadamardRotation(Quantizer(3, 8, "token"), seed=3),
    "codebook-vector": CodebookQuantizer(3),
    "codebook-channel-centered": CodebookQuantizer(2, 8, "channel", centered=True),
    "codebook-calibrated": CodebookQuantizer(2, levels=[-2.0, -0.5, 0.25, 1.5]),
    "hadamard-codebook": HadamardRotation(CodebookQuantizer(2, 8), seed=1),
    "sign-sketch": SignSketch(64, seed=1),  # 4 bits per element: the round-trip check wants error below the norm
    "pre-rope-codebook": PreRoPE(CodebookQuantizer(3, None, "channel", centered=True), 10000.0),
    "channel-separable": ChannelSeparableQuantizer(3),
    "mixed-precision": MixedPrecision(Quantizer(4, None, "channel"), ChannelSeparableQuantizer(2), 0.25),
    "dictionary-key": SparseDictionary(DICTIONARY, "key", 2),
    "dictionary-value-int8": SparseDictionary(DICTIONARY, "value", 2, coef_bits=8),
    "per-layer": PerLayer([Quantizer(2, 8, "channel"), HadamardRotation(CodebookQuantizer(3), seed=2)]),  # layer 1's
    "chain": Chain([PreRoPE(LowRankResidual(1), 10000.0), HadamardRotation(CodebookQuantizer(2), seed=1)]),
    "per-head": PerHead([Quantizer(2, 8, "channel"), MixedPrecision(Quantizer(4, None, "channel"), Quantizer(2), 0.5)]),
}
SHAPE = (2, 2, 16, 16)  # [batch, kv_heads, tokens, head_dim]


def context(stage: Stage, shape=SHAPE) -> Context:
    """What a cache would supply: saliency where required, positions and layer always."""
    b, h, t, _ = shape
    saliency = (
        torch.randn(b, h, t, generator=torch.Generator().manual_seed(t)) if "saliency" in stage.requires else None
    )
    return Context(saliency, torch.arange(b) * 100, 1)


def storage_bytes(c) -> int:
    return sum(t.untyped_storage().nbytes() for t in c.tensors().values())


@pytest.fixture(params=list(STAGES))
def stage(request) -> Stage:
    return STAGES[request.param]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_keeps_shape_dtype_device_and_bytes_equal_storage(stage, dtype):
    x = kv_like(0, SHAPE).to(dtype)
    pipeline = Pipeline([stage])
    c = pipeline.compress(x, ctx=context(stage))
    y = pipeline.decompress(c)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device and torch.isfinite(y).all()
    assert c.nbytes == storage_bytes(c) == sum(c.components().values())
    assert ((y.float() - x.float()).norm() / x.float().norm()) < 1.0  # it reconstructs something of x


def test_batch_join_and_select_never_touch_the_bytes(stage):
    pipeline = Pipeline([stage])
    a, b = kv_like(1, SHAPE), kv_like(2, SHAPE)
    ca, cb = pipeline.compress(a, ctx=context(stage)), pipeline.compress(b, ctx=context(stage))
    joined = cat_batch([ca, cb])
    assert torch.equal(pipeline.decompress(joined), torch.cat([pipeline.decompress(ca), pipeline.decompress(cb)]))
    picked = select_batch(joined, torch.tensor([3, 0]))
    assert torch.equal(
        pipeline.decompress(picked), torch.cat([pipeline.decompress(cb)[1:], pipeline.decompress(ca)[:1]])
    )
    assert joined.nbytes == ca.nbytes + cb.nbytes


@pytest.mark.parametrize("shape", [(0, 2, 16, 16), (2, 2, 0, 16)], ids=["no-batch", "no-tokens"])
def test_empty_tensors_round_trip(stage, shape):
    pipeline = Pipeline([stage])
    x = torch.empty(shape)
    c = pipeline.compress(x, ctx=context(stage, shape))
    assert pipeline.decompress(c).shape == shape and c.nbytes == storage_bytes(c)


def test_compression_is_deterministic_and_survives_config_round_trip(stage):
    x = kv_like(3, SHAPE)
    again = Stage.from_dict(stage.to_dict()) if not isinstance(stage, SparseDictionary) else stage
    c1 = Pipeline([stage]).compress(x, ctx=context(stage))
    c2 = Pipeline([again]).compress(x, ctx=context(stage))
    assert all(torch.equal(t, c2.tensors()[k]) for k, t in c1.tensors().items())


def test_dictionary_stage_written_as_data_names_its_source(tmp_path):
    path = DICTIONARY.save(tmp_path / "d.safetensors")
    stage = SparseDictionary(path, "key", 2, coef_bits=8)
    again = Stage.from_dict(stage.to_dict())
    assert again.to_dict() == stage.to_dict() and again.to_dict()["dictionary"] == str(path)
    with pytest.raises(TypeError, match="cannot write"):
        STAGES["dictionary-key"].to_dict()  # a set held in memory is not data


def test_torch_compile_traces_every_stage(stage):
    x = kv_like(4, SHAPE)
    pipeline = Pipeline([stage])
    ctx = context(stage)
    eager = pipeline.decompress(pipeline.compress(x, ctx=ctx))
    compiled = torch.compile(lambda t: pipeline.decompress(pipeline.compress(t, ctx=ctx)), backend="eager")
    assert torch.equal(compiled(x), eager)


def test_requirements_are_declared_and_checked_once():
    mixed = STAGES["mixed-precision"]
    assert mixed.requires == {"saliency"} and Rotation(mixed).requires == {"saliency"}
    assert Pipeline([SparseOutlier(0.1), mixed]).requires == {"saliency"}
    assert PreRoPE(HadamardRotation(mixed)).requires == {"saliency", "positions"}
    with pytest.raises(ValueError, match="saliency"):
        Pipeline([mixed]).compress(kv_like(0, SHAPE))
    with pytest.raises(ValueError, match="unknown context"):
        Pipeline([Quantizer(2)]).compress(kv_like(0, SHAPE), salience=torch.ones(2, 2, 16))
    # a multi-group dictionary pipeline works as a module once the layer is given
    pipeline = Pipeline([STAGES["dictionary-key"]])
    assert pipeline(kv_like(0, SHAPE), layer=1).shape == SHAPE


def test_every_stage_the_docs_name_is_exported():
    documented = {
        "Quantizer",
        "ChannelSeparableQuantizer",
        "SparseOutlier",
        "LowRankResidual",
        "FullPrecision",
        "Rotation",
        "MixedPrecision",
        "SparseDictionary",
        "HadamardRotation",
        "CodebookQuantizer",
        "PreRoPE",
        "PerLayer",
        "PerHead",
        "Chain",
        "SignSketch",
    }
    assert documented <= set(gearkit.__all__)
    assert {name for name, cls in Stage.known().items() if cls.__module__.startswith("gearkit.")} <= set(
        gearkit.__all__
    )
    for name in gearkit.__all__:
        assert getattr(gearkit, name) is not None


def test_every_gearkit_stage_is_registered():
    """Recipe data names registered stages only (`register_stage`), so a gearkit stage class left unregistered could
    not be read back from a recipe file."""
    classes, todo = set(), list(Stage.__subclasses__())
    while todo:
        cls = todo.pop()
        classes.add(cls)
        todo += cls.__subclasses__()
    ours = {cls for cls in classes if cls.__module__.startswith("gearkit.") and not inspect.isabstract(cls)}
    assert ours and ours <= set(Stage.known().values())


# -- wrappers around every leaf ------------------------------------------------------------------------------------
LEAVES = {name: s for name, s in STAGES.items() if not isinstance(s, Wrapper)}
WRAPPERS = {
    "rotation": lambda leaf: Rotation(leaf, seed=1),
    "hadamard": lambda leaf: HadamardRotation(leaf, seed=1),
    "pre-rope": lambda leaf: PreRoPE(leaf, 10000.0),
    "per-layer": lambda leaf: PerLayer([FullPrecision(), leaf]),  # the context's layer 1 takes the leaf
    "per-head": lambda leaf: PerHead([leaf, leaf]),
    "chain": lambda leaf: Chain([leaf]),
    "mixed": lambda leaf: MixedPrecision(leaf, leaf, 0.5),
}
HOOKS = ("requires", "check_chunk", "check_model", "shared_nbytes", "exact_mask", "scores", "weighted", "decode")
READS_STORED = ("quantizer-channel", "quantizer-token-3bit", "codebook-vector", "codebook-channel-centered")


def wrapped(wrapper: str, leaf: str) -> Stage:
    if wrapper == "mixed" and LEAVES[leaf].requires - {"layer"}:
        pytest.skip("MixedPrecision's children see a token subset: no saliency or positions")
    return WRAPPERS[wrapper](LEAVES[leaf])


def block_reads(stage: Stage, c, chunks: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores` and `weighted` of a block of `chunks` chunks (the batch of SHAPE stacked chunk-major)."""
    b, h, t, d = c.shape
    q = torch.randn(1, b // chunks, h, 3, d, generator=torch.Generator().manual_seed(5))
    p = torch.rand(chunks, b // chunks, h, 3, t, generator=torch.Generator().manual_seed(6))
    pipeline = Pipeline([stage])
    return pipeline.scores(c, q, chunks), pipeline.weighted(c, p)


@pytest.mark.parametrize("leaf", list(LEAVES))
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_wrappers_forward_every_hook_to_every_leaf(wrapper, leaf, monkeypatch):
    stage = wrapped(wrapper, leaf)
    x, ctx = kv_like(7, SHAPE), context(stage)
    c = Pipeline([stage]).compress(x, ctx=ctx)
    assert c.nbytes == storage_bytes(c) and torch.isfinite(Pipeline([stage]).decompress(c)).all()
    # shared artifacts (a dictionary) are counted through the wrapper, once however many slots hold the leaf
    assert stage.shared_nbytes(1) == LEAVES[leaf].shared_nbytes(1)
    # the stored-form reads equal decoding the block and multiplying
    scores, weighted = block_reads(stage, c)
    decoded = Pipeline([stage]).decompress(c).float()
    b, h, t, d = SHAPE
    q = torch.randn(1, b // 2, h, 3, d, generator=torch.Generator().manual_seed(5))
    p = torch.rand(2, b // 2, h, 3, t, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(scores, q @ decoded.reshape(2, -1, h, t, d).mT, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(weighted, (p @ decoded.reshape(2, -1, h, t, d)).sum(0), atol=1e-4, rtol=1e-4)

    # a child's refusal of the model reaches the caller
    def refuse(config):
        raise ValueError("the leaf refuses this model")

    monkeypatch.setattr(LEAVES[leaf], "check_model", refuse)
    with pytest.raises(ValueError, match="the leaf refuses"):
        stage.check_model(SimpleNamespace(num_hidden_layers=2, num_key_value_heads=2, rope_theta=10000.0))


@pytest.mark.parametrize("leaf", READS_STORED)
@pytest.mark.parametrize("wrapper", ["rotation", "hadamard", "per-layer", "per-head", "chain", "mixed"])
def test_wrappers_read_the_stored_form_where_the_child_has_one(wrapper, leaf, monkeypatch):
    stage = wrapped(wrapper, leaf)
    c = Pipeline([stage]).compress(kv_like(8, SHAPE), ctx=context(stage))
    expected = block_reads(stage, c)

    def no_decoding(part):
        raise AssertionError("the block was decoded")

    monkeypatch.setattr(LEAVES[leaf], "decode", no_decoding)
    for got, want in zip(block_reads(stage, c), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("wrapper", ["per-layer", "per-head", "chain"])
def test_exact_entries_behind_a_wrapper_are_excluded_and_restored(wrapper):
    x = kv_like(9, SHAPE) * 5
    pipeline = Pipeline([WRAPPERS[wrapper](SparseOutlier(0.25, "token")), Quantizer(2, 8, "token")])
    c = pipeline.compress(x, ctx=Context(layer=1))
    exact = pipeline.stages[0].exact_mask(c.parts[0])
    assert exact is not None and exact.float().mean() == 0.25
    y = pipeline.decompress(c)
    assert torch.equal(y[exact], x.half().float()[exact])  # restored exactly, whatever the 2-bit codes say


@pytest.mark.parametrize("wrapper", ["rotation", "hadamard", "pre-rope"])
def test_rotations_keep_what_stays_exact_across_them(wrapper):
    stage = WRAPPERS[wrapper](SparseOutlier(1.0, "token"))  # every channel of every vector stored
    part = stage.encode(kv_like(10, SHAPE), ctx=context(stage))
    mask = stage.exact_mask(part)
    assert mask is not None and bool(mask.all())  # whole vectors (rotation), whole RoPE pairs (pre-RoPE)


def test_every_wrapper_states_each_hook_deliberately():
    """A wrapper's hooks come from `Wrapper` (reaching its children) or from the wrapper itself; a hook that falls
    through to `Stage`'s leaf default would silently skip the children."""
    deliberate = {("PreRoPE", "scores"), ("PreRoPE", "weighted")}  # reads its own part decompressed, on purpose
    kinds = {Rotation, HadamardRotation, PreRoPE, PerLayer, PerHead, Chain, MixedPrecision}
    assert kinds <= {cls for cls in Stage.known().values() if issubclass(cls, Wrapper)}
    for cls in kinds:
        for hook in HOOKS:
            resolved = getattr(cls, hook)
            if getattr(Stage, hook, None) is resolved and (cls.__name__, hook) not in deliberate:
                raise AssertionError(f"{cls.__name__}.{hook} falls through to the leaf default")
