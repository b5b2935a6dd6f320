import pytest
import torch
from conftest import kv_tensors
from hypothesis import given
from hypothesis import strategies as st

from gearkit import SparseOutlier
from gearkit.compressors.outlier import index_dtype


@given(x=kv_tensors(), ratio=st.sampled_from([0.0, 0.02, 0.1, 0.5, 1.0]), axis=st.sampled_from(["token", "channel"]))
def test_outliers_come_back_exactly_and_count_as_configured(x, ratio, axis):
    stage = SparseOutlier(ratio, axis, value_dtype=torch.float32)
    part = stage.encode(x)
    rows = x if axis == "token" else x.transpose(-1, -2)
    length = rows.shape[-1]
    k = stage.count_per_side(length)
    assert k == min(int(ratio * length / 2 + 0.5), length // 2)
    assert part.values.shape == (*rows.shape[:-1], 2 * k)
    mask = stage.exact_mask(part)
    assert int(mask.sum()) == 2 * k * rows.shape[:-1].numel()  # distinct positions
    out = stage.decode(part)
    assert torch.equal(out[mask], x[mask])
    assert not out[~mask].any()
    # They are the extremes: every stored top value >= every value left in its row, and so on.
    if 0 < 2 * k < length:
        rest = rows.masked_fill(mask if axis == "token" else mask.transpose(-1, -2), float("nan"))
        top, bottom = part.values[..., :k].amin(-1), part.values[..., k:].amax(-1)
        assert (top >= rest.nan_to_num(float("-inf")).amax(-1)).all()
        assert (bottom <= rest.nan_to_num(float("inf")).amin(-1)).all()


def test_fp16_values_are_exact_for_fp16_input():
    x = torch.randn(1, 2, 9, 64).half()
    stage = SparseOutlier(0.1)
    part = stage.encode(x.float())
    mask = stage.exact_mask(part)
    assert part.values.dtype == torch.float16
    assert torch.equal(stage.decode(part)[mask], x.float()[mask])


def test_count_uses_the_real_row_length():
    # 2% of a 64-token channel is ~1.3 entries: one from each end, not 10% of the row.
    assert SparseOutlier(0.02, "channel").count_per_side(64) == 1
    assert SparseOutlier(0.02).count_per_side(1000) == 10


@pytest.mark.parametrize(
    "length, dtype",
    [(1, torch.uint8), (256, torch.uint8), (257, torch.int16), (32768, torch.int16), (32769, torch.int32)],
)
def test_indices_use_the_smallest_type_that_addresses_the_row(length, dtype):
    assert index_dtype(length) == dtype


def test_index_dtype_is_what_is_stored():
    part = SparseOutlier(0.1, "channel").encode(torch.randn(1, 1, 300, 4))
    assert part.indices.dtype == torch.int16


def test_flat_row_takes_distinct_positions():
    stage = SparseOutlier(1.0)
    part = stage.encode(torch.ones(1, 1, 1, 6))
    assert sorted(part.indices.flatten().tolist()) == list(range(6))


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan"), "2%"])
def test_bad_ratio_is_rejected(ratio):
    with pytest.raises(ValueError, match="ratio"):
        SparseOutlier(ratio)


def test_values_too_large_for_storage_dtype_are_a_clear_error():
    x = torch.tensor([1e6, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 4)
    with pytest.raises(ValueError, match="overflow"):
        SparseOutlier(0.5).encode(x)


def test_rows_across_heads_allow_finer_fractions():
    x = torch.randn(2, 3, 5, 64)
    stage = SparseOutlier(0.01, across_heads=True, value_dtype=torch.float32)
    part = stage.encode(x)
    assert part.values.shape == (2, 5, 2) and part.indices.dtype == torch.uint8  # 2 of 192 entries per token
    mask = stage.exact_mask(part)
    assert torch.equal(stage.decode(part)[mask], x[mask]) and int(mask.sum()) == 2 * 5 * 2
    with pytest.raises(ValueError, match="across_heads"):
        SparseOutlier(0.01, "channel", across_heads=True)
