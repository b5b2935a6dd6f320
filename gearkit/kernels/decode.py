"""Decode attention over compressed chunks: the Triton kernel (GPU) and `stored_attention` (torch) read the stored
codes, the reference decompresses them; each returns its output and log-sum-exp so segments merge exactly."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gearkit.compressed import CompressedTensor, LowRankPart, OutlierPart, QuantizedPart
from gearkit.kernels import cpu, ops
from gearkit.kernels.backend import get_backend, may_use_triton, use_triton
from gearkit.kernels.layout import StorageLayout, layout_ints, layout_tensors
from gearkit.kernels.reference import attention_reference, merge_attention, unpack_float

Layout = tuple[StorageLayout | None, str | None]  # a layout, or why there is none
# Tokens held in full precision: keys, values [batch, kv_heads, F, head_dim] and their bias [batch, queries, F].
Exact = tuple[Tensor, Tensor, Tensor]


def block_bias(bias: Tensor, start: int, stop: int) -> Tensor:
    """Positions `start:stop` of a bias over the chunks as an additive float `[batch, stop - start]`: `bias` is
    additive already, or a boolean visibility (True = attend), which costs a byte per position instead of four
    until one block of it is needed."""
    part = bias[:, start:stop]
    return torch.where(part, 0.0, float("-inf")) if part.dtype == torch.bool else part.float()


def _splits(programs: int, chunks: int, device: torch.device) -> int:
    """Sequence splits so that about two programs run per streaming multiprocessor (flash-decoding)."""
    if device.type != "cuda":
        return min(chunks, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(chunks, -(-2 * sms // programs)))


def _parts(c: CompressedTensor) -> tuple[QuantizedPart, OutlierPart | None, LowRankPart | None]:
    q = next(p for p in c.parts if isinstance(p, QuantizedPart))
    o = next((p for p in c.parts if isinstance(p, OutlierPart)), None)
    lr = next((p for p in c.parts if isinstance(p, LowRankPart)), None)
    return q, o, lr


def _codes(q: QuantizedPart, layout: StorageLayout) -> Tensor:
    """Float32 codes `[entries, heads, rows, length]` in the quantizer's row layout."""
    entries, heads = q.shape[:2]
    rows, length = layout.rows
    return unpack_float(q.codes, layout.bits, heads * rows * length).reshape(entries, heads, rows, length)


def _outliers(q: QuantizedPart, o: OutlierPart, lr: LowRankPart | None, layout: StorageLayout,
              chunks: int) -> tuple[Tensor, Tensor, Tensor]:
    """Chunks' stored outliers as corrections to what their codes (and low-rank term) give: the token and channel
    of each, long `[chunks, batch, heads, N]`, and its value minus that reconstruction, float32. Only the codes at
    the outliers' positions are read (code `i` of an entry starts at bit `i * bits`)."""
    entries, heads = q.shape[:2]
    rows, length = layout.rows
    along = o.indices.long()  # [entries, heads, outlier rows, count]
    across = torch.arange(along.shape[-2], device=along.device)[:, None].expand_as(along)
    row, col = (across, along) if layout.o_channel == layout.q_channel else (along, across)  # the quantizer's layout
    first = rows * torch.arange(heads, device=row.device)[:, None, None]  # each head's first row in an entry
    row, col = (row + first).reshape(entries, -1), col.reshape(entries, -1)
    bit = (row * length + col) * layout.bits
    data = q.codes.reshape(entries, -1)
    byte = bit >> 3
    word = data.gather(1, byte).int() | data.gather(1, (byte + 1).clamp(max=data.shape[1] - 1)).int() << 8
    code = (word >> (bit & 7)) & ((1 << layout.bits) - 1)
    group = row * (length // layout.group) + col // layout.group
    scale, zero = (t.reshape(entries, -1).gather(1, group).float() for t in (q.scale, q.zero))
    rebuilt = torch.addcmul(zero, scale, code.float()).reshape(entries, heads, -1)
    row, col = row.reshape(entries, heads, -1) - first[..., 0], col.reshape(entries, heads, -1)
    token, channel = (col, row) if layout.q_channel else (row, col)
    if lr is not None:  # left[t] . right[d]
        rank = lr.left.shape[-1]
        rebuilt = rebuilt + (lr.left.float().gather(2, token[..., None].expand(-1, -1, -1, rank))
                             * lr.right.float().gather(2, channel[..., None].expand(-1, -1, -1, rank))).sum(-1)
    delta = o.values.float().reshape(entries, heads, -1) - rebuilt
    return tuple(x.reshape(chunks, entries // chunks, heads, -1) for x in (token, channel, delta))


def _product(a: Tensor, q: QuantizedPart, layout: StorageLayout, chunks: int, transposed: bool) -> Tensor:
    """`a` `[chunks or 1, batch, heads, m, k]` times a block's dequantized rows `W` `[chunks, batch, heads, rows,
    length]` (the quantizer's row layout), without writing `W` where it can: `a @ W` (`k = rows`), or `a @ W^T` if
    `transposed` (`k = length`). The compiled CPU kernel reads the packed codes; otherwise, with one group per row,
    the products run on the unpacked codes and the scales and zeros are folded in afterwards (`W[r] = s[r] C[r] +
    z[r]`); with several groups per row the block is dequantized.

    Returns:
        float32 `[chunks, batch, heads, m, length or rows]`.
    """
    rows, length = layout.rows
    entries, heads = q.shape[:2]
    if cpu.usable(a.device, layout.group):
        out = cpu.dequant_matmul(a.reshape(-1, *a.shape[3:]), q.codes.reshape(entries * heads, -1), q.scale,
                                 q.zero, layout.bits, length, transposed)
        return out.reshape(chunks, entries // chunks, heads, *out.shape[1:])
    codes = _codes(q, layout).reshape(chunks, entries // chunks, heads, rows, -1, layout.group)
    scale, zero = (t.float().reshape(*codes.shape[:-1], 1) for t in (q.scale, q.zero))
    if layout.group != length:
        w = torch.addcmul(zero, scale, codes).flatten(-2)
        return a @ (w.mT if transposed else w)
    codes, scale, zero = codes.flatten(-2), scale.flatten(-3).unsqueeze(-2), zero.flatten(-3).unsqueeze(-2)
    if transposed:  # (a @ C^T) s + sum(a) z
        return (a @ codes.mT) * scale + a.sum(-1, keepdim=True) * zero
    return (a * scale) @ codes + a @ zero.mT  # (a s) @ C + a @ z


def _scores(q: Tensor, keys: CompressedTensor, layout: StorageLayout, chunks: int) -> Tensor:
    """`q` `[1, batch, heads, rows, D]` times the stored keys: `[chunks, batch, heads, rows, T]`."""
    part, o, lr = _parts(keys)
    scores = _product(q, part, layout, chunks, not layout.q_channel)  # keys are rows per channel, or per token
    if lr is not None:  # k = left @ right^T, applied in factored form
        left, right = (t.float().reshape(chunks, -1, *t.shape[1:]) for t in (lr.left, lr.right))
        scores = scores + (q @ right) @ left.mT
    if o is not None:  # scores[t] += q[d] * delta(t, d)
        outliers = _outliers(part, o, lr, layout, chunks)
        token, channel, delta = (x[..., None, :].expand(*scores.shape[:-1], -1) for x in outliers)
        scores = scores.scatter_add(-1, token, q.expand(chunks, *q.shape[1:]).gather(-1, channel) * delta)
    return scores


def _weighted(p: Tensor, values: CompressedTensor, layout: StorageLayout) -> Tensor:
    """Weights `p` `[chunks, batch, heads, rows, T]` times the stored values, summed over chunks:
    `[batch, heads, rows, D]`."""
    chunks = p.shape[0]
    part, o, lr = _parts(values)
    out = _product(p, part, layout, chunks, layout.q_channel)  # values are rows per channel, or per token
    if lr is not None:
        left, right = (t.float().reshape(chunks, -1, *t.shape[1:]) for t in (lr.left, lr.right))
        out = out + (p @ left) @ right.mT
    if o is not None:  # out[d] += p[t] * delta(t, d)
        outliers = _outliers(part, o, lr, layout, chunks)
        token, channel, delta = (x[..., None, :].expand(*out.shape[:-1], -1) for x in outliers)
        out = out.scatter_add(-1, channel, p.gather(-1, token) * delta)
    return out.sum(0)


def stored_attention(query: Tensor, blocks: Sequence[tuple[CompressedTensor, CompressedTensor]],
                     key_layout: StorageLayout, value_layout: StorageLayout, bias: Tensor, scaling: float,
                     exact: Exact | None = None) -> tuple[Tensor, Tensor]:
    """Attention of a few queries over stored chunks in torch, reading each block of chunks in its stored
    orientation: where a row has one group (`sink-*`, `gear-*`), the products read the packed codes (the compiled
    CPU kernel, or torch products on the unpacked codes) with the scales, zeros and low-rank factors folded in;
    otherwise the block is reconstructed (`stored_rows`). No sequence-major copy of the past is made, and the
    softmax runs online over the `exact` tokens, then block by block, so what a call creates is bounded by one
    block whatever the context.

    Args:
        query: `[batch, heads, queries, head_dim]`; query head `j` reads KV head `j // (heads / kv_heads)`.
        blocks: consecutive `(keys, values)` blocks of chunks, each stacked chunk-major along the batch:
            `[(chunks batch), kv_heads, T, head_dim]`.
        key_layout: how the keys are stored.
        value_layout: how the values are stored.
        bias: `[batch, total chunks * T]`, the same for every query: additive float (`-inf` masks a position) or
            boolean (True = attend; see `block_bias`).
        scaling: softmax scale.
        exact: optional tokens held in full precision, attended to in the same softmax: keys and values
            `[batch, kv_heads, F, head_dim]` and their bias `[batch, queries, F]`.

    Returns:
        `(out, lse)`: float32 `[batch, heads, queries, head_dim]` (zeros for a query that sees nothing here) and
        `[batch, heads, queries]` (`-inf` then).
    """
    b, hq, nq, d = query.shape
    heads, t = blocks[0][0].shape[1], blocks[0][0].shape[2]
    rows = hq // heads * nq
    q = (query.float() * scaling).reshape(1, b, heads, rows, d)
    # the online softmax's state per query row: reference (the running max, 0 while nothing is seen), sum, output
    if exact is None:
        top = total = q.new_zeros(b, heads, rows)
        out = q.new_zeros(b, heads, rows, d)
    else:
        keys, values, exact_bias = exact
        exact_bias = exact_bias.float()[:, None, None].expand(b, 1, hq // heads, nq, -1).reshape(b, 1, rows, -1)
        scores = q[0] @ keys.float().mT + exact_bias  # [batch, heads, rows, F]
        top = scores.amax(-1)
        top = torch.where(torch.isfinite(top), top, 0.0)
        p = torch.exp(scores - top[..., None])
        total, out = p.sum(-1), p @ values.float()
    first = 0
    for keys, values in blocks:
        n = keys.shape[0] // b
        part = block_bias(bias, first * t, (first + n) * t).reshape(b, n, t).transpose(0, 1)[:, :, None, None]
        scores = _scores(q, keys, key_layout, n) + part  # [chunks, batch, heads, rows, T]
        first += n
        seen = scores.amax((0, -1))
        new = torch.where(total > 0, torch.maximum(top, seen), torch.where(torch.isfinite(seen), seen, 0.0))
        rescale = torch.where(total > 0, torch.exp(top - new), 0.0)  # what was summed so far, at the new reference
        p = torch.exp(scores - new[..., None])
        total = total * rescale + p.sum((0, -1))
        out = out * rescale[..., None] + _weighted(p, values, value_layout)
        top = new
    seen = total > 0
    out = out / torch.where(seen, total, 1.0)[..., None]
    lse = torch.where(seen, top + total.log(), float("-inf"))
    return out.reshape(b, hq, nq, d), lse.reshape(b, hq, nq)


def compressed_attention(query: Tensor, blocks: Sequence[tuple[CompressedTensor, CompressedTensor]],
                         key_layout: Layout, value_layout: Layout, bias: Tensor, scaling: float,
                         rebuild: Callable[[CompressedTensor, CompressedTensor], tuple[Tensor, Tensor]],
                         exact: Exact | None = None) -> tuple[Tensor, Tensor]:
    """Attention of a few queries over a cache's compressed chunks, read from their stored form: the Triton
    kernel where it covers the layouts (on a GPU), else `stored_attention` in torch where the layouts allow,
    else the reference (`rebuild` one block at a time).

    Args:
        query: `[batch, heads, queries, head_dim]`; query head `j` reads KV head `j // (heads / kv_heads)`.
        blocks: consecutive `(keys, values)` blocks of stored chunks, each stacked chunk-major along the batch:
            `[(chunks batch), kv_heads, T, head_dim]`.
        key_layout: `(layout, None)` if the stored-form paths read the keys, else `(None, reason)`
            (`Pipeline.storage_layout`).
        value_layout: like `key_layout`, for the values.
        bias: `[batch, total chunks * T]`, the same for every query: additive float (`-inf` masks a position) or
            boolean (True = attend; see `block_bias`).
        scaling: softmax scale.
        rebuild: `(keys, values)` of one block decompressed, float32 `[batch, kv_heads, chunks * T, head_dim]`.
        exact: optional full-precision tokens attended to with the chunks (see `stored_attention`).

    Returns:
        `(out, lse)`: float32 `[batch, heads, queries, head_dim]` and `[batch, heads, queries]`.
    """
    (key_layout, key_reason), (value_layout, value_reason) = key_layout, value_layout
    keys, values = blocks[0]
    triton = may_use_triton(query.device) and use_triton(query.device, (
        key_reason or value_reason or key_layout.triton_unsupported(keys) or value_layout.triton_unsupported(values)))
    if not triton and key_layout is not None and value_layout is not None and get_backend() != "torch":
        return stored_attention(query, blocks, key_layout, value_layout, bias, scaling, exact)
    segments, first, t = [], 0, keys.shape[2]
    if exact is not None:
        segments.append(attention_reference(query, *exact, scaling))
    for keys, values in blocks:
        n = keys.shape[0] // query.shape[0]
        part = block_bias(bias, first * t, (first + n) * t)
        if triton:
            segments.append(_triton_attention(query, keys, key_layout, values, value_layout, n, part, scaling))
        else:
            k, v = rebuild(keys, values)
            segments.append(attention_reference(query, k, v, part[:, None], scaling))
        first += n
    if len(segments) == 1:
        return segments[0]
    return merge_attention(segments), torch.stack([lse for _, lse in segments]).logsumexp(0)


def _triton_attention(query: Tensor, keys: CompressedTensor, key_layout: StorageLayout, values: CompressedTensor,
                      value_layout: StorageLayout, chunks: int, bias: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """The Triton kernel over one block of `chunks` chunks per sequence (arguments as `compressed_attention`)."""
    b, hq, nq, d = query.shape
    heads = keys.shape[1]
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
