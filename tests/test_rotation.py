import pytest
import torch
from conftest import kv_tensors
from hypothesis import given
from hypothesis import strategies as st

from gearkit import FullPrecision, Pipeline, Quantizer
from gearkit.compressors.rotation import HadamardRotation, Rotation, hadamard_transform, random_orthogonal


@given(dim=st.integers(1, 128), seed=st.integers(0, 1000))
def test_rotation_matrix_is_orthogonal_and_seeded(dim, seed):
    q = random_orthogonal(dim, seed)
    assert torch.allclose(q @ q.T, torch.eye(dim), atol=1e-5)
    assert torch.equal(q, random_orthogonal(dim, seed))


@given(x=kv_tensors())
def test_rotation_keeps_the_inner_error_size(x):
    stage = Rotation(Quantizer(3, 8, "token"), seed=3)
    part = stage.encode(x)
    rotated = x @ random_orthogonal(x.shape[-1], 3)
    inner_error = (stage.inner.decode(part) - rotated).norm()
    assert torch.allclose((stage.decode(part) - x).norm(), inner_error, rtol=1e-4, atol=1e-5)


def test_lossless_inner_round_trips_and_costs_nothing_extra():
    x = torch.randn(2, 3, 10, 64)
    c = Pipeline([Rotation(FullPrecision(torch.float32))]).compress(x)
    assert c.nbytes == x.numel() * 4
    assert torch.allclose(Pipeline([Rotation(FullPrecision(torch.float32))]).decompress(c), x, atol=1e-5)


def sylvester(d: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@given(log_dim=st.integers(0, 8), seed=st.integers(0, 1000))
def test_fast_hadamard_is_the_orthonormal_sylvester_matrix_and_its_own_inverse(log_dim, seed):
    d = 2**log_dim
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(seed))
    y = hadamard_transform(x)
    assert torch.allclose(y, x @ sylvester(d) / d**0.5, atol=1e-5)
    assert torch.allclose(hadamard_transform(y), x, atol=1e-5)


@given(x=kv_tensors(head_dims=(1, 2, 8, 16)))
def test_hadamard_rotation_keeps_the_inner_error_size_and_costs_nothing(x):
    stage = HadamardRotation(Quantizer(3, 8, "token"), seed=5)
    part = stage.encode(x)
    inner_error = (stage.inner.decode(part) - stage.rotate(x)).norm()
    assert torch.allclose((stage.decode(part) - x).norm(), inner_error, rtol=1e-4, atol=1e-5)
    lossless = Pipeline([HadamardRotation(FullPrecision(torch.float32), seed=5)])
    c = lossless.compress(x)
    assert c.nbytes == x.numel() * 4 and torch.allclose(lossless.decompress(c), x, atol=1e-4 * x.abs().max().item())


def test_hadamard_rotation_is_seeded_and_refuses_other_head_dims():
    x = torch.randn(1, 1, 4, 16)
    a, b = HadamardRotation(FullPrecision(), 1), HadamardRotation(FullPrecision(), 2)
    assert torch.equal(a.rotate(x), HadamardRotation(FullPrecision(), 1).rotate(x)) and not torch.equal(
        a.rotate(x), b.rotate(x)
    )
    with pytest.raises(ValueError, match="power-of-two"):
        Pipeline([a]).compress(torch.randn(1, 1, 4, 24))
    with pytest.raises(ValueError, match="power-of-two"):
        a.check_chunk(64, 96)


def test_rotations_keep_whole_vector_exclusions_only():
    x = torch.randn(1, 2, 8, 16)
    exclude = torch.zeros_like(x, dtype=torch.bool)
    exclude[:, :, 0] = True  # a sink token: the whole vector
    exclude[:, :, 3, 5] = True  # one outlier entry: mixed away by the rotation
    seen = []

    class Spy(FullPrecision):
        def encode(self, t, exclude=None, ctx=None):
            seen.append(exclude)
            return super().encode(t, exclude)

    for rotation in (HadamardRotation(Spy()), Rotation(Spy())):
        rotation.encode(x, exclude)
        assert seen[-1][:, :, 0].all() and seen[-1][:, :, 1:].sum() == 0
