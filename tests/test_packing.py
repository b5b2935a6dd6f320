import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gearkit.kernels.reference import SUPPORTED_BITS, pack_bits, packed_nbytes, unpack_bits, unpack_float


@given(bits=st.sampled_from(SUPPORTED_BITS), n=st.integers(0, 300), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trips_bit_exactly(bits, n, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_packing_uses_exactly_bits_per_code(bits):
    # 800 codes need exactly 800 * bits / 8 bytes: 3-bit codes are not rounded up to 4 bits.
    assert pack_bits(torch.zeros(800, dtype=torch.uint8), bits).numel() == 100 * bits


def test_packing_layout_is_the_usual_one_for_2_bits():
    codes = torch.tensor([1, 2, 3, 0, 3, 3, 3, 3], dtype=torch.uint8)
    assert pack_bits(codes, 2).tolist() == [1 | 2 << 2 | 3 << 4, 255]


def test_three_bit_codes_straddle_byte_boundaries():
    codes = torch.arange(8, dtype=torch.uint8)  # 24 bits: codes 2 and 5 cross a byte boundary
    packed = pack_bits(codes, 3)
    word = sum(int(b) << (8 * i) for i, b in enumerate(packed))
    assert [(word >> (3 * j)) & 7 for j in range(8)] == list(range(8))


@pytest.mark.parametrize("bits", [0, 5, 6, 7, 16, True])
def test_unsupported_widths_are_rejected(bits):
    with pytest.raises(ValueError, match="unsupported bit width"):
        pack_bits(torch.zeros(8, dtype=torch.uint8), bits)


def test_unpack_checks_the_byte_count():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(5, dtype=torch.uint8), 3, 16)


@given(
    bits=st.sampled_from(SUPPORTED_BITS), rows=st.integers(0, 3), n=st.integers(0, 130), seed=st.integers(0, 2**31 - 1)
)
def test_table_lookup_unpacking_equals_shift_unpacking(bits, rows, n, seed):
    codes = torch.randint(0, 2**bits, (rows, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = pack_bits(codes, bits)
    assert torch.equal(unpack_float(packed, bits, n), unpack_bits(packed, bits, n).float())
