import torch
from conftest import kv_like, kv_tensors, rel_error
from hypothesis import given
from hypothesis import strategies as st

from gearkit import ChannelSeparableQuantizer, Pipeline, Quantizer
from gearkit.kernels.reference import SUPPORTED_BITS
from gearkit.parts import cat_batch, select_batch


@given(x=kv_tensors(), bits=st.sampled_from(SUPPORTED_BITS))
def test_error_is_at_most_half_a_normalised_step(x, bits):
    stage = ChannelSeparableQuantizer(bits)
    part = stage.encode(x)
    tol = 1e-5 * x.abs().amax()
    assert ((stage.decode(part) - x).abs() <= stage.error_bound(part) + tol).all()


@given(x=kv_tensors())
def test_bytes_are_exact_and_include_the_channel_scales(x):
    c = Pipeline([ChannelSeparableQuantizer(3)]).compress(x)
    b, h, t, d = x.shape
    assert c.nbytes == sum(v.untyped_storage().nbytes() for v in c.tensors().values())
    assert c.components()["scales"] == 2 * (2 * b * h * t) + 2 * b * h * d  # scale+zero per token, c per channel


def test_beats_one_scale_per_token_on_keys_with_large_channels():
    x = kv_like(0, (1, 3, 64, 64), heavy=3)
    assert rel_error(x, ChannelSeparableQuantizer(3)(x)) < 0.6 * rel_error(x, Quantizer(3, None, "token")(x))


def test_zero_channel_and_excluded_entries():
    x = kv_like(1, (1, 2, 16, 8))
    x[..., 3] = 0.0
    stage = ChannelSeparableQuantizer(4)
    part = stage.encode(x)
    assert torch.equal(part.channel_scale[..., 3], torch.ones_like(part.channel_scale[..., 3]))  # no division by 0
    assert torch.isfinite(stage.decode(part)).all()
    exclude = torch.zeros_like(x, dtype=torch.bool)
    x[0, 0, 5, 2], exclude[0, 0, 5, 2] = 1e4, True  # excluded: must not set channel 2's normalisation
    c = stage.channel_scale(x, exclude)
    assert c[0, 0, 0, 2] < 10


def test_parts_concatenate_and_reorder_along_the_batch():
    pipeline = Pipeline([ChannelSeparableQuantizer(2)])
    a, b = kv_like(2, (2, 3, 16, 8)), kv_like(3, (1, 3, 16, 8))
    joined = cat_batch([pipeline.compress(a), pipeline.compress(b)])
    assert torch.equal(pipeline.decompress(joined), torch.cat([pipeline(a), pipeline(b)]))
    assert torch.equal(pipeline.decompress(select_batch(joined, torch.tensor([2]))), pipeline(b))
