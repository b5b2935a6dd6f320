import pytest
import torch
from conftest import kv_like, kv_tensors, rel_error, tiny_llama
from hypothesis import given
from hypothesis import strategies as st

from gearkit import (
    Chain,
    CodebookQuantizer,
    Context,
    FullPrecision,
    Pipeline,
    PreRoPE,
    Quantizer,
    Recipe,
    SparseOutlier,
)
from gearkit.compressors.rope import RoPE, inverse_frequencies
from gearkit.integrations.hf import make_cache

THETA = 10000.0


def rope(d: int) -> RoPE:
    return RoPE(inverse_frequencies(d, THETA))


def positions(start: torch.Tensor, t: int) -> torch.Tensor:
    return start[:, None] + torch.arange(t)


@given(x=kv_tensors(head_dims=(2, 8, 16)), first=st.integers(0, 5000))
def test_lossless_inner_round_trips_at_any_position_and_stores_the_positions(x, first):
    start = first + 7 * torch.arange(x.shape[0])
    pipeline = Pipeline([PreRoPE(FullPrecision(torch.float32))])
    c = pipeline.compress(x, positions=start, rope=rope(x.shape[-1]))
    assert torch.allclose(pipeline.decompress(c), x, atol=1e-4 * (1 + x.abs().max().item()))
    assert c.components()["positions"] == 4 * x.shape[0] and c.nbytes == x.numel() * 4 + 4 * x.shape[0]


def test_keys_whose_channels_are_constant_before_rope_are_coded_exactly():
    """The point of pre-RoPE coding: per-channel structure is intact before the rotation smears it."""
    b, h, t, d = 2, 2, 64, 16
    channel = torch.randn(b, h, 1, d, generator=torch.Generator().manual_seed(0)) * 4
    start = torch.tensor([0, 300])
    keys = rope(d).apply(channel.expand(b, h, t, d), positions(start, t))
    before = Pipeline([PreRoPE(Quantizer(2, None, "channel"))])
    after = Pipeline([Quantizer(2, None, "channel")])
    assert rel_error(keys, before(keys, positions=start, rope=rope(d))) < 1e-3 < 0.1 < rel_error(keys, after(keys))
    coded = Pipeline([PreRoPE(CodebookQuantizer(2, None, "channel", centered=True))])
    assert rel_error(keys, coded(keys, positions=start, rope=rope(d))) < 1e-3


def test_positions_and_the_rotary_embedding_are_required_and_checked():
    x, pipeline = torch.randn(2, 1, 4, 8), Pipeline([PreRoPE(FullPrecision())])
    with pytest.raises(ValueError, match="positions"):
        pipeline.compress(x, rope=rope(8))
    with pytest.raises(ValueError, match="codes keys before RoPE and needs the layer's rotary embedding"):
        pipeline.compress(x, positions=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"positions must be \[batch\]"):
        pipeline.compress(x, positions=torch.tensor([0]), rope=rope(8))
    with pytest.raises(ValueError, match="head dim 16 cannot rotate vectors of dim 8"):
        pipeline.compress(x, positions=torch.tensor([0, 0]), rope=rope(16))
    with pytest.raises(ValueError, match="head_dim must be an int of at least the rotary dim 16"):
        RoPE(inverse_frequencies(16, THETA), head_dim=8)
    with pytest.warns(DeprecationWarning, match="'rope_theta' is ignored"):
        assert PreRoPE(FullPrecision(), THETA).to_dict() == PreRoPE(FullPrecision()).to_dict()


def test_sink_exclusions_survive_and_single_entries_do_not():
    x = torch.randn(1, 2, 8, 16)
    exclude = torch.zeros_like(x, dtype=torch.bool)
    exclude[:, :, 0] = True
    exclude[:, :, 4, 3] = True
    seen = []

    class Spy(FullPrecision):
        def encode(self, t, exclude=None, ctx=None):
            seen.append(exclude)
            return super().encode(t, exclude)

    PreRoPE(Spy()).encode(x, exclude, Context(positions=torch.tensor([0]), rope=rope(16)))
    assert seen[-1][:, :, 0].all() and seen[-1][:, :, 1:].sum() == 0


@given(
    x=kv_tensors(head_dims=(8, 16, 24)),
    first=st.integers(0, 5000),
    rotary=st.sampled_from([0.25, 0.5, 1.0]),
    interleaved=st.booleans(),
    scaling=st.sampled_from([1.0, 1.3]),
)
def test_partial_and_interleaved_rotations_undo_and_redo(x, first, rotary, interleaved, scaling):
    d = x.shape[-1]
    r = RoPE(inverse_frequencies(int(d * rotary) // 2 * 2, THETA), scaling, d, interleaved)
    at = positions(first + torch.arange(x.shape[0]), x.shape[-2])
    turned = r.apply(x, at)
    assert torch.equal(turned[..., r.rotary_dim :], x[..., r.rotary_dim :])  # channels past the rotary dim pass
    tol = 1e-4 * (1 + x.abs().max().item())
    assert torch.allclose(r.undo(turned, at), x, atol=tol) and torch.allclose(r.apply(r.undo(x, at), at), x, atol=tol)
    norms = turned[..., : r.rotary_dim].norm(dim=-1), scaling * x[..., : r.rotary_dim].norm(dim=-1)
    assert torch.allclose(*norms, atol=tol)  # a rotation of each pair, scaled


def test_rotary_embeddings_are_values_with_their_pairs():
    half, inter = RoPE(inverse_frequencies(4, THETA), head_dim=6), RoPE(inverse_frequencies(4, THETA), 1.0, 6, True)
    assert half == RoPE(inverse_frequencies(4, THETA), head_dim=6) and hash(half) == hash(RoPE([1.0, 0.01], 1.0, 6))
    assert half != inter and RoPE([], head_dim=4).apply(torch.ones(1, 1, 2, 4), torch.zeros(1, 2)).eq(1).all()
    mask = torch.tensor([True, False, True, False, True, False]).expand(1, 1, 1, 6)
    assert half.whole_pairs(mask)[0, 0, 0].tolist() == [True, False, True, False, True, False]  # (0, 2) and 4 pass
    assert inter.whole_pairs(mask)[0, 0, 0].tolist() == [False, False, False, False, True, False]  # (0,1), (2,3)


def test_the_cache_supplies_positions_and_the_models_rotary_embedding():
    model = tiny_llama("gqa", rope_theta=500000.0)  # head dim 16; any base: the cache reads the model's
    recipe = Recipe(
        "pre-rope-test",
        Pipeline([PreRoPE(FullPrecision(torch.float32))]),
        Pipeline([FullPrecision(torch.float32)]),
        buffer_size=4,
        sink_tokens=1,
    )
    ids = torch.randint(2, 97, (2, 13), generator=torch.Generator().manual_seed(0))
    plain = Recipe("post-rope-test", Pipeline([FullPrecision(torch.float32)]), recipe.value, 4, 1)

    def logits(r: Recipe) -> torch.Tensor:
        cache = make_cache(r, model)
        with torch.no_grad():
            return torch.cat([model(ids[:, :9], cache=cache).logits, model(ids[:, 9:], cache=cache).logits], 1)

    assert torch.allclose(logits(recipe), logits(plain), atol=1e-5)  # lossless inner: every chunk's positions right


def kvquant_keys(bits: int = 3) -> PreRoPE:
    """KVQuant's keys: 1% outliers per token across heads and a centered per-channel codebook, both before RoPE."""
    return PreRoPE(
        Chain([SparseOutlier(0.01, "token", across_heads=True), CodebookQuantizer(bits, 64, "channel", centered=True)])
    )


def test_outliers_around_a_code_before_rope_come_back_exactly_before_rope_is_redone():
    """One PreRoPE around a Chain: the code excludes the outliers and they are restored in pre-RoPE space."""
    stage, start = kvquant_keys(), torch.tensor([0, 500])
    b, h, t, d = 2, 3, 64, 64
    x = kv_like(0, (b, h, t, d), magnitude=3)
    part = stage.encode(x, ctx=Context(positions=start, rope=rope(d)))
    pre = rope(d).undo(x, positions(start, t))
    mask = stage.inner.exact_mask(part.inner)
    assert mask is not None and (mask.sum((1, 3)) == 2).all()  # one entry per side of each token's 3 x 64
    assert torch.equal(stage.inner.decode(part.inner)[mask], pre[mask].half().float())
    exact, pairs = stage.exact_mask(part), rope(d).whole_pairs(mask)  # once RoPE is redone: where both of a pair were
    assert (exact is None and pairs is None) or torch.equal(exact, pairs)
    pipeline = Pipeline([stage])
    c = pipeline.compress(x, positions=start, rope=rope(d))
    assert torch.equal(pipeline.decompress(c), stage.decode(part)) and rel_error(x, stage.decode(part)) < 0.2


def test_kvquant_keys_serve_a_cache_end_to_end():
    model = tiny_llama("head-dim-128")  # one KV head of 128: one outlier per side of each token
    recipe = Recipe("kvquant-keys-test", Pipeline([kvquant_keys()]), Pipeline([FullPrecision()]), 8, 1)
    plain = Recipe("fp-test", Pipeline([FullPrecision()]), Pipeline([FullPrecision()]), 8, 1)
    ids = torch.randint(2, 97, (2, 30), generator=torch.Generator().manual_seed(1))

    def logits(r: Recipe) -> torch.Tensor:
        cache = make_cache(r, model)
        with torch.no_grad():
            return torch.cat([model(ids[:, :25], cache=cache).logits, model(ids[:, 25:], cache=cache).logits], 1)

    out, reference = logits(recipe), logits(plain)
    assert torch.isfinite(out).all() and 0 < rel_error(reference, out) < 0.01  # the keys are coded, and closely
