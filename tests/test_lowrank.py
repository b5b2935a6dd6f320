import pytest
import torch
from conftest import kv_tensors, rel_error
from hypothesis import given
from hypothesis import strategies as st

from gearkit import LowRankResidual


def low_rank_matrix(rank, shape=(2, 3, 40, 16), seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, h, t, d = shape
    return torch.randn(b, h, t, rank, generator=gen) @ torch.randn(b, h, rank, d, generator=gen)


@pytest.mark.parametrize("method", ["power", "svd"])
def test_exactly_low_rank_matrices_are_recovered(method):
    x = low_rank_matrix(3)
    out = LowRankResidual(3, method=method, factor_dtype=torch.float32)(x)
    assert rel_error(x, out) < 1e-5


def test_power_iteration_is_close_to_the_svd():
    x = low_rank_matrix(4) + 0.05 * low_rank_matrix(16, seed=1)
    svd = rel_error(x, LowRankResidual(4, method="svd", factor_dtype=torch.float32)(x))
    power = rel_error(x, LowRankResidual(4, method="power", iters=2, factor_dtype=torch.float32)(x))
    assert svd <= power * (1 + 1e-5) and power < 1.05 * svd  # the SVD is optimal; power iteration is close


@given(x=kv_tensors(min_tokens=4), rank=st.integers(1, 4))
def test_low_rank_term_never_increases_the_error(x, rank):
    rank = min(rank, x.shape[-2], x.shape[-1])
    out = LowRankResidual(rank)(x)
    assert (out - x).norm() <= x.norm() * (1 + 1e-6)


def test_factors_are_stored_not_the_product():
    part = LowRankResidual(2).encode(torch.randn(1, 3, 64, 64))
    assert part.left.shape == (1, 3, 64, 2) and part.right.shape == (1, 3, 64, 2)
    assert part.left.dtype == torch.float16
    assert part.nbytes == 2 * (64 * 2 + 64 * 2) * 3


def test_rank_larger_than_the_matrix_is_a_clear_error():
    with pytest.raises(ValueError, match="exceeds the matrix"):
        LowRankResidual(5).encode(torch.randn(1, 1, 4, 64))


@pytest.mark.parametrize("kwargs", [dict(rank=0), dict(rank=2.0), dict(rank=2, method="qr"), dict(rank=2, iters=-1)])
def test_bad_configuration_is_rejected(kwargs):
    with pytest.raises(ValueError):
        LowRankResidual(**kwargs)


def test_zero_residual_gives_zero_term_without_nan():
    out = LowRankResidual(2)(torch.zeros(1, 2, 8, 8))
    assert torch.equal(out, torch.zeros_like(out))
