"""Saliency from probe queries and the mixed-precision stage (ZipCache)."""

import math

import pytest
import torch
from conftest import kv_like, kv_tensors
from hypothesis import given
from hypothesis import strategies as st

from gearkit import ChannelSeparableQuantizer, Context, MixedPrecision, Pipeline, Probes, Quantizer, SparseOutlier
from gearkit.compressors.mixed import salient_mask
from gearkit.compressors.probes import normalized_saliency, probe_attention
from gearkit.kernels.products import dense_scores, dense_weighted
from gearkit.kernels.reference import packed_nbytes
from gearkit.parts import MixedPart, cat_batch, select_batch

STAGES = {
    "channel": lambda b: Quantizer(b, None, "channel"),
    "token-16": lambda b: Quantizer(b, 16, "token"),
    "cst": ChannelSeparableQuantizer,
}


def scores_for(x: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(x.shape[:3], generator=torch.Generator().manual_seed(seed))


# -- probes and scores ---------------------------------------------------------------------------------------


@given(
    n=st.integers(0, 300),
    pad=st.integers(0, 40),
    recent=st.sampled_from([0.0, 0.05, 0.3]),
    rand=st.sampled_from([0.0, 0.05, 0.5]),
)
def test_probes_are_the_most_recent_and_a_seeded_random_set_of_real_queries(n, pad, recent, rand):
    probes = Probes(recent, rand, seed=3)
    valid = torch.tensor([[False] * pad + [True] * n, [True] * (n + pad)], dtype=torch.bool)
    index, used = probes.positions(valid)
    own = index[0][used[0]] - pad  # the padded sequence's probes, in its own positions
    alone, alone_used = probes.positions(torch.ones(1, n, dtype=torch.bool))
    assert torch.equal(own, alone[0][alone_used[0]])  # padding does not change the choice
    n_recent = min(n, max(1, math.ceil(recent * n))) if n else 0
    assert own.numel() == n_recent + min(n - n_recent, round(rand * n))
    assert set(range(n - n_recent, n)) <= set(own.tolist())
    assert own.unique().numel() == own.numel() and (own >= 0).all()


def full_attention(query, keys, visible, scaling):
    """The reference: the whole attention matrix `[b, heads, q, kv]`."""
    group = query.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, 1)
    logits = (query @ k.transpose(-1, -2) * scaling).masked_fill(~visible[:, None], float("-inf"))
    return torch.softmax(logits, -1).nan_to_num(0.0)


@given(
    seed=st.integers(0, 2**16),
    kv_heads=st.sampled_from([1, 3]),
    group=st.sampled_from([1, 3]),
    q_len=st.integers(1, 40),
    past=st.integers(0, 30),
    pad=st.integers(0, 5),
)
def test_probe_attention_is_the_probes_rows_of_the_full_attention_summed_over_each_group(
    seed, kv_heads, group, q_len, past, pad
):
    g = torch.Generator().manual_seed(seed)
    length = past + q_len
    query = torch.randn(2, kv_heads * group, q_len, 8, generator=g)
    keys = torch.randn(2, kv_heads, length, 8, generator=g)
    causal = torch.arange(length)[None] <= (torch.arange(q_len) + past)[:, None]
    not_pad = (torch.arange(length) >= min(pad, length - 1))[None].expand(2, -1).clone()
    not_pad[0] = True
    visible = causal[None] & not_pad[:, None]
    probes = Probes(0.1, 0.2, seed=seed)
    received, seen = probe_attention(query, keys, visible[:, None], 0.3, probes)
    own = visible[:, torch.arange(q_len), torch.arange(q_len) + past]
    index, used = probes.positions(own)
    weights = full_attention(query, keys, visible, 0.3)
    for b in range(2):
        rows = index[b][used[b]]
        expected = weights[b][:, rows].sum(1).reshape(kv_heads, group, length).sum(1)
        torch.testing.assert_close(received[b], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(seen[b], visible[b, rows].sum(0).float())
    assert (seen[1, : min(pad, length - 1)] == 0).all() and (received[1, :, : min(pad, length - 1)] == 0).all()
    none_mask = probe_attention(query, keys, None, 0.3, probes)
    plain = probe_attention(query, keys, causal[None, None].expand(2, 1, -1, -1), 0.3, probes)
    torch.testing.assert_close(none_mask, plain)  # None means plain causal attention


def test_left_padding_gives_each_sequence_its_batch_of_one_scores():
    g = torch.Generator().manual_seed(0)
    query, keys = torch.randn(2, 6, 50, 8, generator=g), torch.randn(2, 2, 50, 8, generator=g)
    query[1, :, :7], keys[1, :, :7] = 9.0, -9.0  # padding positions with wild values: they must not matter
    mask = (torch.arange(50)[None] <= torch.arange(50)[:, None])[None, None].repeat(2, 1, 1, 1)
    mask[1, ..., :7] = False
    probes = Probes(0.1, 0.1)
    received, seen = probe_attention(query, keys, mask, None, probes)
    scores = normalized_saliency(received, seen)
    alone = normalized_saliency(*probe_attention(query[1:, :, 7:], keys[1:, :, 7:], None, None, probes))
    torch.testing.assert_close(scores[1:, :, 7:], alone)
    assert torch.isinf(scores[1, :, :7]).all()


def test_normalization_divides_by_the_probes_that_see_each_token():
    received = torch.tensor([[[4.0, 1.0, 0.5, 0.0]]])
    seen = torch.tensor([[8.0, 2.0, 1.0, 0.0]])
    assert normalized_saliency(received, seen).tolist() == [[[0.5, 0.5, 0.5, float("-inf")]]]


@given(seed=st.integers(0, 2**16), tokens=st.integers(0, 70), ratio=st.sampled_from([0.0, 0.1, 0.4, 1.0]))
def test_salient_mask_marks_exactly_the_top_scores(seed, tokens, ratio):
    scores = torch.randn(2, 3, tokens, generator=torch.Generator().manual_seed(seed))
    mask = salient_mask(scores, ratio)
    k = round(ratio * tokens)
    assert (mask.sum(-1) == k).all()
    if 0 < k < tokens:
        assert (scores[mask].reshape(2, 3, k).amin(-1) >= scores[~mask].reshape(2, 3, -1).amax(-1)).all()


# -- the mixed-precision stage -------------------------------------------------------------------------------


@given(
    x=kv_tensors(),
    kind=st.sampled_from(list(STAGES)),
    ratio=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_error_bounds_hold_and_salient_tokens_get_the_high_stage(x, kind, ratio, seed):
    stage = MixedPrecision(STAGES[kind](4), STAGES[kind](2), ratio)
    scores = scores_for(x, seed)
    part = stage.encode(x, ctx=Context(saliency=scores))
    out = stage.decode(part)
    tol = 1e-5 * x.abs().amax()
    assert ((out - x).abs() <= stage.error_bound(part) + tol).all()
    mask = stage.salient(part)
    assert torch.equal(mask, salient_mask(scores, ratio))
    high = STAGES[kind](4)
    x_high = x[mask].reshape(*x.shape[:2], -1, x.shape[-1])
    torch.testing.assert_close(out[mask].reshape(x_high.shape), high(x_high))  # salient tokens: the 4-bit stage alone


@given(x=kv_tensors(), ratio=st.sampled_from([0.0, 0.3, 1.0]))
def test_bytes_are_exact_and_the_salient_map_is_one_bit_per_token_and_head(x, ratio):
    b, h, t, d = x.shape
    pipeline = Pipeline([MixedPrecision(Quantizer(4, None, "channel"), Quantizer(2, None, "channel"), ratio)])
    c = pipeline.compress(x, saliency=scores_for(x, 0))
    assert c.nbytes == sum(v.untyped_storage().nbytes() for v in c.tensors().values())
    parts = c.components()
    k = round(ratio * t)
    assert parts["saliency_map"] == b * packed_nbytes(h * t, 1) == b * math.ceil(h * t / 8)
    assert parts["codes"] == b * (packed_nbytes(h * d * k, 4) + packed_nbytes(h * d * (t - k), 2))
    assert parts["scales"] == 2 * 2 * b * h * d * ((k > 0) + (k < t))  # fp16 scale + zero per channel and subset


def test_parts_concatenate_and_reorder_along_the_batch_and_compose_with_outliers():
    stage = MixedPrecision(ChannelSeparableQuantizer(4), ChannelSeparableQuantizer(2), 0.3)
    pipeline = Pipeline([SparseOutlier(0.04, "channel"), stage])
    a, b = kv_like(0, (2, 3, 32, 8)), kv_like(1, (1, 3, 32, 8))
    sa, sb = scores_for(a, 0), scores_for(b, 1)
    joined = cat_batch([pipeline.compress(a, saliency=sa), pipeline.compress(b, saliency=sb)])
    assert isinstance(joined.parts[1], MixedPart)
    whole = pipeline.decompress(joined)
    assert torch.equal(whole, pipeline.decompress(pipeline.compress(torch.cat([a, b]), saliency=torch.cat([sa, sb]))))
    assert torch.equal(pipeline.decompress(select_batch(joined, torch.tensor([2]))), whole[2:])
    outliers = pipeline.stages[0].exact_mask(joined.parts[0])
    assert torch.equal(whole[outliers], torch.cat([a, b]).half().float()[outliers])  # outliers still come back exactly


@pytest.mark.parametrize("ratio", [0.0, 0.25, 1.0])
def test_reads_of_a_block_put_each_stages_tokens_back_in_place_even_when_one_side_is_empty(ratio):
    """`scores`/`weighted` read each stage's stored form by the salient map, and equal decoding then multiplying;
    a side with no tokens is not asked (a quantizer cannot lay out zero tokens)."""
    stage = MixedPrecision(Quantizer(4, 8, "channel"), Quantizer(2, 4, "channel"), ratio)
    x = kv_like(3, (4, 2, 16, 8))  # two chunks of a batch of two, chunk-major
    part = stage.encode(x, ctx=Context(saliency=scores_for(x, 3)))
    gen = torch.Generator().manual_seed(0)
    q, p = torch.randn(1, 2, 2, 3, 8, generator=gen), torch.randn(2, 2, 2, 3, 16, generator=gen)
    y = stage.decode(part)
    torch.testing.assert_close(stage.scores(part, q, 2), dense_scores(q, y, 2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stage.weighted(part, p), dense_weighted(p, y), rtol=1e-4, atol=1e-4)


def test_bad_input_gets_clear_errors():
    x = kv_like(0, (1, 2, 16, 8))
    stage = MixedPrecision(Quantizer(4), Quantizer(2), 0.5)
    with pytest.raises(ValueError, match="needs per-token saliency"):
        Pipeline([stage]).compress(x)
    with pytest.raises(ValueError, match="saliency must be"):
        stage.encode(x, ctx=Context(saliency=torch.zeros(1, 2, 15)))
    with pytest.raises(ValueError, match="NaN"):
        stage.encode(x, ctx=Context(saliency=torch.full((1, 2, 16), float("nan"))))
    with pytest.raises(ValueError, match="fraction"):
        MixedPrecision(Quantizer(4), Quantizer(2), 1.5)
    with pytest.raises(TypeError, match="needs no saliency"):
        MixedPrecision(stage, Quantizer(2))
    with pytest.raises(ValueError, match="fraction"):
        Probes(recent=-0.1)
    with pytest.raises(ValueError, match="cannot be grouped"):
        probe_attention(torch.zeros(1, 4, 2, 8), torch.zeros(1, 3, 5, 8), None, None, Probes())
