import math

import pytest
import torch
from conftest import kv_tensors, rel_error
from hypothesis import given
from hypothesis import strategies as st

from gearkit import CodebookQuantizer, HadamardRotation, Pipeline, Quantizer
from gearkit.compressors.codebook import kmeans_levels, lloyd_max_levels
from gearkit.kernels.reference import packed_nbytes


def test_lloyd_max_levels_are_the_known_gaussian_ones():
    assert torch.allclose(lloyd_max_levels(1), torch.tensor([-1.0, 1.0]) * math.sqrt(2 / math.pi), atol=1e-6)
    assert torch.allclose(lloyd_max_levels(2), torch.tensor([-1.5104, -0.4528, 0.4528, 1.5104]), atol=1e-4)  # Max, 1960
    for bits in (1, 2, 3, 4):
        levels = lloyd_max_levels(bits)
        assert levels.numel() == 2**bits and (levels.diff() > 0).all() and torch.allclose(levels, -levels.flip(0))
    # centroid condition, checked by sampling: each level is the mean of the Gaussian mass nearest to it
    z = torch.randn(400_000, generator=torch.Generator().manual_seed(0))
    levels = lloyd_max_levels(3)
    nearest = (z[:, None] - levels).abs().argmin(1)
    means = torch.stack([z[nearest == i].mean() for i in range(8)])
    assert torch.allclose(means, levels, atol=0.02)


@pytest.mark.parametrize("bits", [5, 0, True])
def test_unsupported_widths_are_refused(bits):
    with pytest.raises(ValueError, match="bit width"):
        CodebookQuantizer(bits)


@given(
    x=kv_tensors(),
    bits=st.sampled_from([1, 2, 3, 4]),
    centered=st.booleans(),
    group=st.sampled_from([None, 8]),
    axis=st.sampled_from(["token", "channel"]),
)
def test_codes_are_packed_exactly_and_the_scale_only_helps(x, bits, centered, group, axis):
    q = CodebookQuantizer(bits, group, axis, centered)
    part = q.encode(x)
    b = x.shape[0]
    assert part.codes.shape == (b, packed_nbytes(x.numel() // b, bits)) and part.codes.dtype == torch.uint8
    assert int(q.codes(part).max()) < 2**bits
    groups = part.scale.numel()
    assert part.nbytes == part.codes.numel() + 2 * groups * (2 if centered else 1)
    # the stored least-squares scale is never worse than coding the same indices with the RMS scale
    y = q.decode(part)
    assert torch.isfinite(y).all() and y.shape == x.shape
    rows = q._to_rows(x)
    size, n = q._groups(rows.shape[-1])
    grouped = torch.nn.functional.pad(rows, (0, n * size - rows.shape[-1])).reshape(*rows.shape[:-1], n, size)
    real = torch.nn.functional.pad(torch.ones_like(rows), (0, n * size - rows.shape[-1])).reshape(grouped.shape)
    center = part.zero.float()[..., None] if centered else 0.0
    dev = (grouped - center) * real
    rms = (dev.square().sum(-1, keepdim=True) / real.sum(-1, keepdim=True)).sqrt()
    levels = lloyd_max_levels(bits)[q._grouped_codes(part).long()]
    naive = q._ungroup(levels * rms + center, x.shape)
    assert (y - x).norm() <= (naive - x).norm() * (1 + 2e-3) + 1e-6  # fp16 scale rounding aside


def test_gaussian_error_matches_lloyd_max_distortion():
    x = torch.randn(1, 4, 256, 64, generator=torch.Generator().manual_seed(1))
    mse = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}  # Lloyd-Max distortion of N(0, 1) (Max, 1960)
    for bits, d in mse.items():
        err = rel_error(x, Pipeline([CodebookQuantizer(bits)])(x)) ** 2
        assert err <= d * 1.02  # least-squares scales can only lower it
        assert err >= d * 0.8


def test_rotation_makes_a_codebook_beat_uniform_codes_on_heavy_channels():
    x = torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(2))
    x[..., 3] *= 20  # one outlier channel, as in keys
    rotated_lm = rel_error(x, Pipeline([HadamardRotation(CodebookQuantizer(3))])(x))
    plain_lm = rel_error(x, Pipeline([CodebookQuantizer(3)])(x))
    uniform = rel_error(x, Pipeline([Quantizer(3, None, "token")])(x))
    assert rotated_lm < 0.7 * min(plain_lm, uniform)


def test_excluded_entries_do_not_move_any_statistic_and_constant_groups_are_exact():
    x = torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(3))
    exclude = torch.zeros_like(x, dtype=torch.bool)
    exclude[..., 2, :] = True
    wild = x.clone()
    wild[..., 2, :] = 1e4
    for q in (CodebookQuantizer(3, None, "channel", centered=True), CodebookQuantizer(2, 4, "token")):
        a, b = q.decode(q.encode(x, exclude)), q.decode(q.encode(wild, exclude))
        assert torch.equal(a[~exclude], b[~exclude])
    constant = torch.full((1, 1, 8, 4), 0.375)
    q = CodebookQuantizer(2, None, "channel", centered=True)
    assert torch.equal(q.decode(q.encode(constant)), constant)
    zeros = torch.zeros(1, 1, 4, 8)
    assert torch.equal(CodebookQuantizer(3).decode(CodebookQuantizer(3).encode(zeros)), zeros)


def test_scales_that_overflow_fp16_are_refused():
    with pytest.raises(ValueError, match="overflow"):
        CodebookQuantizer(2).encode(torch.full((1, 1, 2, 4), 1e6))
    big = torch.full((1, 1, 2, 4), 1e6)
    q = CodebookQuantizer(2, param_dtype=torch.float32)
    assert torch.allclose(q.decode(q.encode(big)), big, rtol=1e-3)


def test_calibrated_levels_fit_their_data_and_travel_as_data():
    gen = torch.Generator().manual_seed(1)
    gauss = torch.randn(200_000, generator=gen)
    assert torch.allclose(kmeans_levels(gauss, 2), lloyd_max_levels(2), atol=0.02)  # Gaussian data: Lloyd-Max back
    # un-rotated value vectors are far from Gaussian (a few heavy channels): k-means levels fit them better
    x = torch.randn(1, 2, 64, 16, generator=gen) * torch.tensor([8.0, 3.0] + [0.5] * 14)
    rms = x.square().mean(-1, keepdim=True).sqrt()
    calibrated = CodebookQuantizer(2, levels=kmeans_levels(x / rms, 2).tolist())
    assert rel_error(x, Pipeline([calibrated])(x)) < 0.9 * rel_error(x, Pipeline([CodebookQuantizer(2)])(x))
    again = CodebookQuantizer.from_dict(calibrated.to_dict())
    assert again.levels == calibrated.levels and torch.equal(Pipeline([again])(x), Pipeline([calibrated])(x))
    weighted = kmeans_levels(torch.tensor([-1.0, 0.0, 1.0, 3.0]), 1, weights=torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert torch.allclose(weighted, torch.tensor([-0.5, 1.0]))  # a zero-weight sample pulls no level


@pytest.mark.parametrize(
    "levels", [[0.0, 1.0], [0.0, 1.0, 1.0, 2.0], [0.0, 1.0, float("nan"), 2.0], [2.0, 1.0, 0.0, -1.0]]
)
def test_malformed_calibrated_levels_are_refused(levels):
    with pytest.raises(ValueError, match="ascending finite levels"):
        CodebookQuantizer(2, levels=levels)
