import pytest
import torch
from conftest import kv_tensors
from hypothesis import given
from hypothesis import strategies as st

from gearkit import Quantizer
from gearkit.accounting import tensor_nbytes
from gearkit.kernels.reference import SUPPORTED_BITS, quantize_groups

quantizers = st.builds(
    Quantizer,
    bits=st.sampled_from(SUPPORTED_BITS),
    group_size=st.sampled_from([None, 1, 3, 8, 32]),
    axis=st.sampled_from(["token", "channel"]),
)


@given(x=kv_tensors(), q=quantizers)
def test_error_is_at_most_half_a_step(x, q):
    part = q.encode(x)
    err = (q.decode(part) - x).abs()
    tol = 1e-6 * x.abs().amax()  # float32 arithmetic only; the grid itself covers every entry
    assert (err <= q.error_bound(part) + tol).all()


@given(
    values=st.lists(st.floats(-3e4, 3e4, allow_nan=False, width=32), min_size=1, max_size=64),
    bits=st.sampled_from(SUPPORTED_BITS),
)
def test_error_bound_holds_for_adversarial_values(values, bits):
    x = torch.tensor(values).reshape(1, 1, 1, -1)
    q = Quantizer(bits, None, "token")
    part = q.encode(x)
    assert (q.decode(part) - x).abs().le(q.error_bound(part) + 1e-6 * x.abs().amax()).all()


@given(x=kv_tensors(), bits=st.sampled_from(SUPPORTED_BITS), group=st.sampled_from([None, 5, 16]))
def test_codes_in_range(x, bits, group):
    codes, _, _ = quantize_groups(x.reshape(-1, x.shape[-1])[:, None, :], bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    q = Quantizer(bits, group, "channel")
    assert int(q.codes(q.encode(x)).max()) <= 2**bits - 1


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_last_group_may_be_shorter_and_costs_no_padding(axis):
    x = torch.randn(1, 2, 37, 16)
    q = Quantizer(3, 8, axis)
    part = q.encode(x)
    rows, length = (2 * 37, 16) if axis == "token" else (2 * 16, 37)
    groups = -(-length // 8)
    assert part.scale.shape[-1] == groups
    assert tensor_nbytes(part.codes) == -(-(rows * length) // 8) * 3  # only real codes are packed
    assert (q.decode(part) - x).abs().le(q.error_bound(part) + 1e-6).all()


def test_bits_per_element_is_exact():
    q = Quantizer(3, 64, "token")
    part = q.encode(torch.randn(1, 1, 64, 64))
    # 3 bits per code + fp16 scale and zero per 64 entries
    assert part.nbytes * 8 / 64**2 == 3 + 32 / 64


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_constant_groups_reconstruct_exactly(dtype):
    x = torch.full((1, 2, 10, 8), 0.375, dtype=dtype)  # representable in fp16
    x[0, 1] = -2.5
    for axis in ("token", "channel"):
        q = Quantizer(2, 4, axis)
        out = q(x)
        assert torch.equal(out, x) and torch.isfinite(out).all()


def test_range_too_wide_for_fp16_parameters_is_a_clear_error():
    x = torch.tensor([-6e4, 6e4]).reshape(1, 1, 1, 2)
    with pytest.raises(ValueError, match="wider param_dtype"):
        Quantizer(1).encode(x)  # one step of 1.2e5 does not fit fp16
    out = Quantizer(1, param_dtype=torch.float32)(x)
    assert torch.allclose(out, x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=5), "unsupported bit width"),
        (dict(bits=2, group_size=0), "group_size"),
        (dict(bits=2, axis="head"), "axis"),
        (dict(bits=2, axis="channel", across_heads=True), "across_heads"),
    ],
)
def test_bad_configuration_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Quantizer(**kwargs)


def test_across_heads_groups_all_heads_of_a_token():
    x = torch.randn(2, 3, 5, 4)
    q = Quantizer(4, None, "token", across_heads=True)
    part = q.encode(x)
    assert part.scale.shape == (2, 5, 1)
    assert (q.decode(part) - x).abs().le(q.error_bound(part) + 1e-6).all()
