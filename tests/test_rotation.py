import torch
from hypothesis import given
from hypothesis import strategies as st

from gearkit import FullPrecision, Pipeline, Quantizer
from gearkit.compressors.rotation import Rotation, random_orthogonal

from conftest import kv_tensors


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
