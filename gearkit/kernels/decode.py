"""Decode attention over compressed chunks: the Triton kernel reads the stored bytes, the reference
decompresses them; both return the segment's output and log-sum-exp so segments merge exactly."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gearkit.compressed import CompressedTensor
from gearkit.kernels import ops
from gearkit.kernels.backend import use_triton
from gearkit.kernels.layout import StorageLayout, layout_ints, layout_tensors
from gearkit.kernels.reference import attention_reference, merge_attention

Layout = tuple[StorageLayout | None, str | None]  # a layout, or why there is none


def _splits(programs: int, chunks: int, device: torch.device) -> int:
    """Sequence splits so that about two programs run per streaming multiprocessor (flash-decoding)."""
    if device.type != "cuda":
        return min(chunks, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(chunks, -(-2 * sms // programs)))


def compressed_attention(query: Tensor, keys: CompressedTensor, key_layout: Layout, values: CompressedTensor,
                         value_layout: Layout, chunks: int, bias: Tensor, scaling: float,
                         rebuild: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Attention of a few queries over a cache's compressed chunks, read from their stored form.

    Args:
        query: `[batch, heads, queries, head_dim]`; query head `j` reads KV head `j // (heads / kv_heads)`.
        keys: stored chunks stacked chunk-major along the batch: shape `[(chunks batch), kv_heads, T, head_dim]`.
        key_layout: `(layout, None)` if the kernels read `keys`, else `(None, reason)` (`Pipeline.kernel_layout`).
        values: like `keys`.
        value_layout: like `key_layout`, for `values`.
        chunks: number of chunks per sequence.
        bias: additive float `[batch, chunks * T]` (`-inf` masks a position), the same for every query.
        scaling: softmax scale.
        rebuild: returns the chunks decompressed, keys and values float32 `[batch, kv_heads, chunks * T,
            head_dim]`: the reference path, taken when the kernels do not run.

    Returns:
        `(out, lse)`: float32 `[batch, heads, queries, head_dim]` and `[batch, heads, queries]`.
    """
    b, hq, nq, d = query.shape
    heads = keys.shape[1]
    (key_layout, key_reason), (value_layout, value_reason) = key_layout, value_layout
    if not use_triton(query.device, key_reason or value_reason):
        k, v = rebuild()
        return attention_reference(query, k, v, bias[:, None], scaling)
    group = hq // heads
    rows = group * nq
    block = max(16, 1 << (rows - 1).bit_length())
    q = torch.nn.functional.pad(query.float().reshape(b, heads, rows, d), (0, 0, 0, block - rows))
    splits = _splits(b * heads, chunks, query.device)
    m, l, acc = ops.decode_attention(q, bias, list(layout_tensors(keys)), layout_ints(key_layout),
                                     list(layout_tensors(values)), layout_ints(value_layout), chunks, splits,
                                     float(scaling), query.dtype in (torch.float16, torch.bfloat16))
    # Each split's partial result as (output, log-sum-exp), merged like any other segments.
    seen = l > 0
    out_s = acc / torch.where(seen, l, 1.0)[..., None]
    lse_s = torch.where(seen, m + l.clamp_min(1e-38).log(), float("-inf"))
    out = merge_attention(list(zip(out_s.unbind(2), lse_s.unbind(2))))
    lse = lse_s.logsumexp(2)
    return out[:, :, :rows].reshape(b, hq, nq, d), lse[:, :, :rows].reshape(b, hq, nq)
