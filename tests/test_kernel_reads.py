"""The Triton kernels' reads of stored forms beyond GEAR's uniform layout, in Triton's interpreter
(TRITON_INTERPRET=1, conftest), against the torch stored path: codebook codes (a level table read by index),
rotations around a readable stage (the query turned before the kernel, the output back after it), a `PerLayer`'s
stage per layer, and query groups smaller than the kernel's tile.

Tolerances: codes and levels are bit-exact (unit scales: the tile's value is the level itself); reconstructions
agree to float32 rounding; attention outputs and log-sum-exps to 1e-5 (float32 dot products; a rotation adds one
float32 product with an orthogonal matrix on each side). Each read is also run with a mutation that must fail it.
"""

import dataclasses
import importlib.util
import os

import pytest
import torch
from conftest import kv_like

from gearkit import (
    CodebookQuantizer,
    HadamardRotation,
    PerHead,
    PerLayer,
    Pipeline,
    Quantizer,
    SparseOutlier,
    decode_attention,
)
from gearkit.compressors import fused
from gearkit.compressors.rotation import Rotation
from gearkit.kernels.backend import use_backend
from gearkit.parts import CompressedTensor

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

DEVICE = torch.device(os.environ.get("GEARKIT_TEST_DEVICE", "cpu"))
TOL = dict(atol=1e-5, rtol=1e-5)


def chunks_of(pipeline, seed, entries=4, heads=2, tokens=16, head_dim=16, **context):
    return pipeline.compress(kv_like(seed, (entries, heads, tokens, head_dim), magnitude=1.5).to(DEVICE), **context)


def rolled_levels(monkeypatch):
    """Mutation: every code reads its neighbour's level."""
    tensors = fused.KernelRead.tensors

    def wrong(self, c):
        out = tensors(self, c)
        out[-1] = out[-1].roll(1)
        return out

    monkeypatch.setattr(fused.KernelRead, "tensors", wrong)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("axis,group", [("token", None), ("channel", 8)])
def test_codebook_codes_are_read_by_level_index(bits, axis, group, monkeypatch):
    quantizer = CodebookQuantizer(bits, group, axis)
    pipeline = Pipeline([quantizer])
    c = chunks_of(pipeline, bits)
    read, why = pipeline.kernel_read(c)
    assert why is None and read.unsupported(c) is None
    assert read.layout.levels == 2**bits and not read.layout.zero
    # bit-level: with unit scales the kernel's value is the level its code indexes
    (part,) = c.parts
    unit = CompressedTensor((dataclasses.replace(part, scale=torch.ones_like(part.scale)),), c.shape, c.dtype)
    with use_backend("triton"):
        got = pipeline.decompress(unit)
    levels = quantizer.codebook(DEVICE)[quantizer.codes(part).long()]
    assert torch.equal(got, levels)
    with use_backend("torch"):
        ref = pipeline.decompress(c)
    with use_backend("triton"):
        torch.testing.assert_close(pipeline.decompress(c), ref, atol=1e-6, rtol=1e-6)
    rolled_levels(monkeypatch)
    with use_backend("triton"):
        assert not torch.equal(pipeline.decompress(unit), levels)


@pytest.mark.parametrize(
    "pipeline",
    [
        Pipeline([CodebookQuantizer(3, 8, "channel", centered=True)]),  # KVQuant's keys: a center per group
        Pipeline([SparseOutlier(0.05, "token", across_heads=True), CodebookQuantizer(2)]),  # KVQuant's values
        Pipeline([HadamardRotation(CodebookQuantizer(3))]),  # TurboQuant
        Pipeline([Rotation(CodebookQuantizer(2, 8))]),  # sinkrot's values, groups per row
    ],
    ids=["centered", "outliers", "hadamard", "dense-rotation"],
)
def test_codebook_reconstructions_match_the_stages(pipeline):
    c = chunks_of(pipeline, 1)
    assert pipeline.kernel_read(c)[0].unsupported(c) is None
    with use_backend("torch"):
        ref = pipeline.decompress(c)
    with use_backend("triton"):
        torch.testing.assert_close(pipeline.decompress(c), ref, **TOL)


def attend_both(query, kp, vp, blocks, bias):
    """`attend` on the torch stored path (the CPU default) and through the Triton kernel."""
    with use_backend("auto"):
        ref = decode_attention.attend(query, kp, vp, blocks, bias, 0.25)
    with use_backend("triton"):
        got = decode_attention.attend(query, kp, vp, blocks, bias, 0.25)
    return ref, got


def blocks_of(kp, vp, sizes=(2, 1), batch=2, heads=2, **context):
    return [
        (chunks_of(kp, 10 + i, n * batch, heads, **context), chunks_of(vp, 20 + i, n * batch, heads, **context))
        for i, n in enumerate(sizes)
    ]


def query_and_bias(batch, heads, queries, tokens):
    query = torch.randn(batch, heads, queries, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    bias = torch.zeros(batch, tokens, device=DEVICE)
    bias[0, :5] = float("-inf")  # left padding
    return query, bias


@pytest.mark.parametrize(
    "kp,vp",
    [
        (Pipeline([HadamardRotation(CodebookQuantizer(3))]), Pipeline([HadamardRotation(CodebookQuantizer(2))])),
        (Pipeline([Quantizer(2, 16, "channel")]), Pipeline([Rotation(CodebookQuantizer(2))])),  # sinkrot
        (Pipeline([Rotation(CodebookQuantizer(1), seed=3)]), Pipeline([CodebookQuantizer(4, 8, centered=True)])),
    ],
    ids=["turboquant", "sinkrot", "rotated-keys"],
)
@pytest.mark.parametrize("heads,queries", [(2, 1), (4, 2)], ids=["one-row-group", "gqa"])
def test_rotated_and_codebook_pipelines_attend_through_the_kernel(kp, vp, heads, queries, monkeypatch):
    blocks = blocks_of(kp, vp)
    query, bias = query_and_bias(2, heads, queries, 3 * 16)
    (ref, ref_lse), (got, got_lse) = attend_both(query, kp, vp, blocks, bias)
    torch.testing.assert_close(got, ref, **TOL)
    torch.testing.assert_close(got_lse, ref_lse, **TOL)
    # mutation: neither query nor output turned (the kernel then reads the rotated vectors as they are)
    monkeypatch.setattr(fused.KernelRead, "turn_query", lambda self, q: q)
    monkeypatch.setattr(fused.KernelRead, "turn_back", lambda self, out: out)
    with use_backend("triton"):
        wrong, wrong_lse = decode_attention.attend(query, kp, vp, blocks, bias, 0.25)
    assert not (torch.allclose(wrong, ref, **TOL) and torch.allclose(wrong_lse, ref_lse, **TOL))


def test_codebook_levels_in_attention_fail_when_misread(monkeypatch):
    kp, vp = Pipeline([CodebookQuantizer(2, 8, "channel")]), Pipeline([CodebookQuantizer(3)])
    blocks = blocks_of(kp, vp, sizes=(2,))
    query, bias = query_and_bias(2, 4, 1, 2 * 16)
    (ref, _), (got, _) = attend_both(query, kp, vp, blocks, bias)
    torch.testing.assert_close(got, ref, **TOL)
    rolled_levels(monkeypatch)
    with use_backend("triton"):
        wrong, _ = decode_attention.attend(query, kp, vp, blocks, bias, 0.25)
    assert not torch.allclose(wrong, ref, **TOL)


def test_per_layer_reads_each_layers_stage(monkeypatch):
    kp = Pipeline([PerLayer([Quantizer(2, 16, "channel"), HadamardRotation(CodebookQuantizer(3))])])
    vp = Pipeline([PerLayer([CodebookQuantizer(2), Rotation(CodebookQuantizer(4, 8))])])
    query, bias = query_and_bias(2, 4, 1, 3 * 16)
    per_layer = []
    for layer in (0, 1):
        blocks = blocks_of(kp, vp, layer=layer)
        keys, values = blocks[0]
        (key_read, _), (value_read, _) = kp.kernel_read(keys), vp.kernel_read(values)
        assert key_read.layout.levels == (0 if layer == 0 else 8) and (key_read.rotation is None) == (layer == 0)
        assert value_read.layout.levels == (4 if layer == 0 else 16)
        assert kp.kernel_read(keys)[0] is key_read  # worked out once per layer and shape
        with use_backend("torch"):
            ref = vp.decompress(values)
        with use_backend("triton"):
            torch.testing.assert_close(vp.decompress(values), ref, **TOL)
        (ref, ref_lse), (got, got_lse) = attend_both(query, kp, vp, blocks, bias)
        torch.testing.assert_close(got, ref, **TOL)
        torch.testing.assert_close(got_lse, ref_lse, **TOL)
        per_layer.append((blocks, ref))
    # mutation: the answer cached without the layer, so layer 1 is read with layer 0's layout and table
    monkeypatch.setattr(fused, "layer_of", lambda c: None)
    forgetful = Pipeline(list(kp.stages)), Pipeline(list(vp.stages))
    with use_backend("triton"):
        decode_attention.attend(query, *forgetful, per_layer[0][0], bias, 0.25)
        wrong = decode_attention.attend(query, *forgetful, per_layer[1][0], bias, 0.25)[0]
    assert not torch.allclose(wrong, per_layer[1][1], **TOL)


def test_per_head_stays_on_the_torch_path():
    kp = Pipeline([PerLayer([PerHead([Quantizer(2, 16, "channel"), Quantizer(4, 16, "channel")])])])
    vp = Pipeline([CodebookQuantizer(2)])
    blocks = blocks_of(kp, vp, sizes=(1,), layer=0)
    read, why = kp.kernel_read(blocks[0][0])
    assert read is None and "PerHead" in why
    query, bias = query_and_bias(2, 4, 1, 16)
    with use_backend("triton"), pytest.raises(RuntimeError, match="PerHead"):
        decode_attention.attend(query, kp, vp, blocks, bias, 0.25)
    assert decode_attention.path(DEVICE, kp, vp, *blocks[0]) == "stored"  # under auto, on any device


def test_codebook_outliers_on_the_torch_stored_path_match_the_reference():
    """KVQuant's values (outliers across heads, then Gaussian codes) read in the fused layout by torch: the outlier
    corrections index the codebook's levels."""
    kp, vp = (
        Pipeline([Quantizer(2, 16, "channel")]),
        Pipeline([SparseOutlier(0.05, "token", across_heads=True), CodebookQuantizer(2)]),
    )
    assert vp.storage_layout((1, 2, 16, 16))[0] is not None
    blocks = blocks_of(kp, vp)
    query, bias = query_and_bias(2, 4, 2, 3 * 16)
    with use_backend("torch"):
        ref, ref_lse = decode_attention.attend(query, kp, vp, blocks, bias, 0.25)
    (got, got_lse), (kernel, kernel_lse) = attend_both(query, kp, vp, blocks, bias)
    for out, lse in ((got, got_lse), (kernel, kernel_lse)):
        torch.testing.assert_close(out, ref, **TOL)
        torch.testing.assert_close(lse, ref_lse, **TOL)
