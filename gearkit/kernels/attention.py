"""The fused Triton decode attention over one block of stored chunks, split along the sequence (flash-decoding) and
merged into one output and log-sum-exp per query row."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gearkit.kernels import ops
from gearkit.kernels.layout import StorageLayout, layout_ints
from gearkit.kernels.reference import merge_attention


def _splits(programs: int, chunks: int, device: torch.device) -> int:
    """Sequence splits so that about two programs run per streaming multiprocessor (flash-decoding)."""
    if device.type != "cuda":
        return min(chunks, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(chunks, -(-2 * sms // programs)))


def triton_block_attention(
    query: Tensor,
    keys: Sequence[Tensor],
    key_layout: StorageLayout,
    values: Sequence[Tensor],
    value_layout: StorageLayout,
    chunks: int,
    bias: Tensor,
    scaling: float,
) -> tuple[Tensor, Tensor]:
    """Attention of a few queries over one block of stored chunks, by the fused Triton kernel.

    A query group smaller than the kernel's tile (16 rows: GQA groups times queries) is padded with zero rows,
    whose results are dropped; a single row (multi-head attention, one query) is read like any other group.

    Args:
        query: `[batch, heads, queries, head_dim]`; query head `j` reads KV head `j // (heads / kv_heads)`.
        keys: the tensors the kernels read of the block's keys `[(chunks batch), kv_heads, T, head_dim]` stored in
            `key_layout` (`layout_tensors`: codes, scale `[(chunks batch), kv_heads, rows, groups]`, ...).
        key_layout: how the keys are stored (`StorageLayout`).
        values: the tensors of the block's values, like `keys`, stored in `value_layout`.
        value_layout: how the values are stored.
        chunks: chunks per sequence in the block.
        bias: additive float `[batch, chunks * T]`, the same for every query (`-inf` masks a position).
        scaling: softmax scale.

    Returns:
        `(out, lse)`: float32 `[batch, heads, queries, head_dim]` and `[batch, heads, queries]`.
    """
    b, hq, nq, d = query.shape
    heads = keys[1].shape[1]  # the scales
    group = hq // heads
    rows = group * nq
    block = max(16, 1 << (rows - 1).bit_length())
    q = torch.nn.functional.pad(query.float().reshape(b, heads, rows, d), (0, 0, 0, block - rows))
    splits = _splits(b * heads, chunks, query.device)
    m, total, acc = ops.decode_attention(
        q,
        bias,
        list(keys),
        layout_ints(key_layout),
        list(values),
        layout_ints(value_layout),
        chunks,
        splits,
        float(scaling),
        query.dtype in (torch.float16, torch.bfloat16),
    )
    # Each split's partial result as (output, log-sum-exp), merged like any other segments.
    seen = total > 0
    out_s = acc / torch.where(seen, total, 1.0)[..., None]
    lse_s = torch.where(seen, m + total.clamp_min(1e-38).log(), float("-inf"))
    out = merge_attention(list(zip(out_s.unbind(2), lse_s.unbind(2))))
    lse = lse_s.logsumexp(2)
    return out[:, :, :rows].reshape(b, hq, nq, d), lse[:, :, :rows].reshape(b, hq, nq)
