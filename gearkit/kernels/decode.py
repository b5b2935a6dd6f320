"""Decode attention over compressed chunks: the Triton kernel (GPU) and `stored_attention` (torch) read the stored
codes, the reference decompresses them; each returns its output and log-sum-exp so segments merge exactly."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gearkit.kernels import cpu, ops
from gearkit.kernels.backend import get_backend, may_use_triton, use_triton
from gearkit.kernels.layout import StorageLayout, layout_ints, layout_tensors
from gearkit.kernels.reference import attention_reference, merge_attention, unpack_bits, unpack_float
from gearkit.parts import CompressedTensor, LowRankPart, OutlierPart, QuantizedPart

Layout = tuple[StorageLayout | None, str | None]  # a layout, or why there is none
# Tokens held in full precision: keys, values [batch, kv_heads, F, head_dim] and their bias [batch, queries, F].
Exact = tuple[Tensor, Tensor, Tensor]
# How a block of stored keys and values is read: (scores, weighted), see `stored_attention`
Read = tuple[Callable[[CompressedTensor, Tensor, int], Tensor], Callable[[CompressedTensor, Tensor], Tensor]]


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


def _codes(codes: Tensor, entries: int, heads: int, layout: StorageLayout, levels: Tensor | None) -> Tensor:
    """Float32 codes `[entries, heads, rows, length]` in the quantizer's row layout (or the `levels` they index)."""
    rows, length = layout.rows
    n = heads * rows * length
    if levels is None:
        return unpack_float(codes, layout.bits, n).reshape(entries, heads, rows, length)
    index = unpack_bits(codes, layout.bits, n).flatten().long()
    return levels.index_select(0, index).reshape(entries, heads, rows, length)


def _outliers(
    q: QuantizedPart, o: OutlierPart, lr: LowRankPart | None, layout: StorageLayout, chunks: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Chunks' stored outliers as corrections to what their codes (and low-rank term) give: the token and channel
    of each, long `[chunks, batch, heads, N]`, and its value minus that reconstruction, float32 (0 where an outlier
    stored across heads belongs to another head). Only the codes at the outliers' positions are read (code `i` of
    an entry starts at bit `i * bits`)."""
    entries, heads = q.shape[:2]
    rows, length = layout.rows
    along = o.indices.long()  # [entries, T, k2] across heads, else [entries, heads, outlier rows, k2]
    across = torch.arange(along.shape[-2], device=along.device)[:, None].expand_as(along)
    if layout.o_heads:  # indices are head * D + channel
        head, token, channel = along.div(layout.head_dim, rounding_mode="floor"), across, along % layout.head_dim
    else:
        head = torch.arange(heads, device=along.device)[:, None, None].expand_as(along)
        token, channel = (along, across) if layout.o_channel else (across, along)
    head, token, channel = (x.reshape(entries, -1) for x in (head, token, channel))
    row, col = (channel, token) if layout.q_channel else (token, channel)  # in the quantizer's layout
    row = row + rows * head  # rows of all heads of an entry in turn
    bit = (row * length + col) * layout.bits
    data = q.codes.reshape(entries, -1)
    byte = bit >> 3
    word = data.gather(1, byte).int() | data.gather(1, (byte + 1).clamp(max=data.shape[1] - 1)).int() << 8
    code = (word >> (bit & 7)) & ((1 << layout.bits) - 1)
    group = row * (length // layout.group) + col // layout.group
    scale, zero = (t.reshape(entries, -1).gather(1, group).float() for t in (q.scale, q.zero))
    rebuilt = torch.addcmul(zero, scale, code.float())
    if lr is not None:  # left[t] . right[d]
        rank = lr.left.shape[-1]
        left = (
            lr.left.float()
            .reshape(entries, -1, rank)
            .gather(1, (head * layout.tokens + token)[..., None].expand(-1, -1, rank))
        )
        right = (
            lr.right.float()
            .reshape(entries, -1, rank)
            .gather(1, (head * layout.head_dim + channel)[..., None].expand(-1, -1, rank))
        )
        rebuilt = rebuilt + (left * right).sum(-1)
    delta = o.values.float().reshape(entries, -1) - rebuilt
    if layout.o_heads:  # every head sees all of a token's outliers, with zero weight for the other heads'
        mine = head[:, None] == torch.arange(heads, device=head.device)[:, None]
        token, channel = (x[:, None].expand(-1, heads, -1) for x in (token, channel))
        delta = torch.where(mine, delta[:, None], 0.0)
    return tuple(x.reshape(chunks, entries // chunks, heads, -1) for x in (token, channel, delta))


def stored_product(
    a: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    layout: StorageLayout,
    chunks: int,
    transposed: bool,
    levels: Tensor | None = None,
) -> Tensor:
    """`a` times a block's dequantized rows `W` (the quantizer's row layout), without writing `W` where it can:
    `a @ W` (`k = rows`), or `a @ W^T` if `transposed` (`k = length`). Row `r`'s group `g` dequantizes as
    `scale[r, g] * C + zero[r, g]`, `C` the code, or the level it indexes when `levels` is given (a codebook),
    `zero` None for 0. The compiled CPU kernel reads the packed codes; otherwise, with one group per row,
    the products run on the unpacked codes and the scales and zeros are folded in afterwards (`W[r] = s[r] C[r] +
    z[r]`); with several groups per row the block is dequantized.

    Args:
        a: float32 `[chunks or 1, batch, heads, m, k]`.
        codes: uint8 `[(chunks batch), packed bytes]`, each entry's codes of all heads packed in row layout.
        scale: `[(chunks batch), heads, rows, groups per row]`.
        zero: like `scale`, or None.
        layout: the rows, group and code width (`tokens`, `head_dim`, `bits`, `group`, `q_channel`).
        chunks: chunks in the block.
        transposed: multiply by `W^T` instead of `W`.
        levels: float32 `[2**bits]`: the codebook, or None for uniform codes.

    Returns:
        float32 `[chunks, batch, heads, m, length or rows]`.
    """
    rows, length = layout.rows
    entries, heads = scale.shape[:2]
    if cpu.usable(a.device, layout.group):
        out = cpu.dequant_matmul(
            a.reshape(-1, *a.shape[3:]),
            codes.reshape(entries * heads, -1),
            scale,
            zero,
            layout.bits,
            length,
            transposed,
            levels,
        )
        return out.reshape(chunks, entries // chunks, heads, *out.shape[1:])
    c = _codes(codes, entries, heads, layout, levels).reshape(chunks, entries // chunks, heads, rows, -1, layout.group)
    scale = scale.float().reshape(*c.shape[:-1], 1)
    zero = None if zero is None else zero.float().reshape(*c.shape[:-1], 1)
    if layout.group != length:
        w = (c * scale if zero is None else torch.addcmul(zero, scale, c)).flatten(-2)
        return a @ (w.mT if transposed else w)
    c, scale = c.flatten(-2), scale.flatten(-3).unsqueeze(-2)
    zero = None if zero is None else zero.flatten(-3).unsqueeze(-2)
    if transposed:  # (a @ C^T) s + sum(a) z
        out = (a @ c.mT) * scale
        return out if zero is None else out + a.sum(-1, keepdim=True) * zero
    out = (a * scale) @ c  # (a s) @ C + a @ z
    return out if zero is None else out + a @ zero.mT


def dense_scores(q: Tensor, x: Tensor, chunks: int) -> Tensor:
    """`q` `[1, batch, heads, rows, D]` times decompressed chunks `x` `[(chunks batch), heads, T, D]`:
    `[chunks, batch, heads, rows, T]`."""
    return q @ x.reshape(chunks, -1, *x.shape[1:]).mT


def dense_weighted(p: Tensor, x: Tensor) -> Tensor:
    """Weights `p` `[chunks, batch, heads, rows, T]` times decompressed chunks `x` `[(chunks batch), heads, T, D]`,
    summed over chunks: `[batch, heads, rows, D]`."""
    return (p @ x.reshape(p.shape[0], -1, *x.shape[1:])).sum(0)


def layout_scores(q: Tensor, keys: CompressedTensor, layout: StorageLayout, chunks: int) -> Tensor:
    """`q` `[1, batch, heads, rows, D]` times the keys stored in `layout`: `[chunks, batch, heads, rows, T]`."""
    part, o, lr = _parts(keys)
    # keys are rows per channel, or per token
    scores = stored_product(q, part.codes, part.scale, part.zero, layout, chunks, not layout.q_channel)
    if lr is not None:  # k = left @ right^T, applied in factored form
        left, right = (t.float().reshape(chunks, -1, *t.shape[1:]) for t in (lr.left, lr.right))
        scores = scores + (q @ right) @ left.mT
    if o is not None:  # scores[t] += q[d] * delta(t, d)
        outliers = _outliers(part, o, lr, layout, chunks)
        token, channel, delta = (x[..., None, :].expand(*scores.shape[:-1], -1) for x in outliers)
        scores = scores.scatter_add(-1, token, q.expand(chunks, *q.shape[1:]).gather(-1, channel) * delta)
    return scores


def layout_weighted(p: Tensor, values: CompressedTensor, layout: StorageLayout) -> Tensor:
    """Weights `p` `[chunks, batch, heads, rows, T]` times the values stored in `layout`, summed over chunks:
    `[batch, heads, rows, D]`."""
    chunks = p.shape[0]
    part, o, lr = _parts(values)
    # values are rows per channel, or per token
    out = stored_product(p, part.codes, part.scale, part.zero, layout, chunks, layout.q_channel)
    if lr is not None:
        left, right = (t.float().reshape(chunks, -1, *t.shape[1:]) for t in (lr.left, lr.right))
        out = out + (p @ left) @ right.mT
    if o is not None:  # out[d] += p[t] * delta(t, d)
        outliers = _outliers(part, o, lr, layout, chunks)
        token, channel, delta = (x[..., None, :].expand(*out.shape[:-1], -1) for x in outliers)
        out = out.scatter_add(-1, channel, p.gather(-1, token) * delta)
    return out.sum(0)


def stored_attention(
    query: Tensor,
    blocks: Sequence[tuple[CompressedTensor, CompressedTensor]],
    read: Read,
    bias: Tensor,
    scaling: float,
    exact: Exact | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of a few queries over stored chunks in torch, reading each block of chunks in its stored form
    (`read`: where a row has one group, the products read the packed codes, through the compiled CPU kernel or
    torch products on the unpacked codes, with scales, zeros, low-rank factors and rotations folded in). No
    sequence-major copy of the past is made, and the softmax runs online over the `exact` tokens, then block by
    block, so what a call creates is bounded by one block whatever the context.

    Args:
        query: `[batch, heads, queries, head_dim]`; query head `j` reads KV head `j // (heads / kv_heads)`.
        blocks: consecutive `(keys, values)` blocks of chunks, each stacked chunk-major along the batch:
            `[(chunks batch), kv_heads, T, head_dim]`.
        read: `(scores, weighted)`: `scores(keys, q, chunks)` takes float32 queries `[1, batch, kv_heads, rows,
            head_dim]` (a KV head's query rows) to `[chunks, batch, kv_heads, rows, T]`, and `weighted(values, p)`
            takes weights `[chunks, batch, kv_heads, rows, T]` to `[batch, kv_heads, rows, head_dim]` (summed over
            the chunks), e.g. `Pipeline.scores` and `Pipeline.weighted`.
        bias: `[batch, total chunks * T]`, the same for every query: additive float (`-inf` masks a position) or
            boolean (True = attend; see `block_bias`).
        scaling: softmax scale.
        exact: optional tokens held in full precision, attended to in the same softmax: keys and values
            `[batch, kv_heads, F, head_dim]` and their bias `[batch, queries, F]`.

    Returns:
        `(out, lse)`: float32 `[batch, heads, queries, head_dim]` (zeros for a query that sees nothing here) and
        `[batch, heads, queries]` (`-inf` then).
    """
    read_scores, read_weighted = read
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
        scores = read_scores(keys, q, n) + part  # [chunks, batch, heads, rows, T]
        first += n
        seen = scores.amax((0, -1))
        new = torch.where(total > 0, torch.maximum(top, seen), torch.where(torch.isfinite(seen), seen, 0.0))
        rescale = torch.where(total > 0, torch.exp(top - new), 0.0)  # what was summed so far, at the new reference
        p = torch.exp(scores - new[..., None])
        total = total * rescale + p.sum((0, -1))
        out = out * rescale[..., None] + read_weighted(values, p)
        top = new
    seen = total > 0
    out = out / torch.where(seen, total, 1.0)[..., None]
    lse = torch.where(seen, top + total.log(), float("-inf"))
    return out.reshape(b, hq, nq, d), lse.reshape(b, hq, nq)


def compressed_attention(
    query: Tensor,
    blocks: Sequence[tuple[CompressedTensor, CompressedTensor]],
    key_layout: Layout,
    value_layout: Layout,
    bias: Tensor,
    scaling: float,
    read: Read,
    rebuild: Callable[[CompressedTensor, CompressedTensor], tuple[Tensor, Tensor]],
    exact: Exact | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of a few queries over a cache's compressed chunks, read from their stored form: the Triton
    kernel where it covers the layouts (on a GPU), else `stored_attention` in torch (`read`); the reference
    (`rebuild` one block at a time) under the torch backend.

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
        read: how `stored_attention` reads a block of keys and of values (see there).
        rebuild: `(keys, values)` of one block decompressed, float32 `[batch, kv_heads, chunks * T, head_dim]`.
        exact: optional full-precision tokens attended to with the chunks (see `stored_attention`).

    Returns:
        `(out, lse)`: float32 `[batch, heads, queries, head_dim]` and `[batch, heads, queries]`.
    """
    (key_layout, key_reason), (value_layout, value_reason) = key_layout, value_layout
    keys, values = blocks[0]
    triton = may_use_triton(query.device) and use_triton(
        query.device,
        (key_reason or value_reason or key_layout.triton_unsupported(keys) or value_layout.triton_unsupported(values)),
    )
    if not triton and get_backend() != "torch":
        return stored_attention(query, blocks, read, bias, scaling, exact)
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


def _triton_attention(
    query: Tensor,
    keys: CompressedTensor,
    key_layout: StorageLayout,
    values: CompressedTensor,
    value_layout: StorageLayout,
    chunks: int,
    bias: Tensor,
    scaling: float,
) -> tuple[Tensor, Tensor]:
    """The Triton kernel over one block of `chunks` chunks per sequence (arguments as `compressed_attention`)."""
    b, hq, nq, d = query.shape
    heads = keys.shape[1]
    group = hq // heads
    rows = group * nq
    block = max(16, 1 << (rows - 1).bit_length())
    q = torch.nn.functional.pad(query.float().reshape(b, heads, rows, d), (0, 0, 0, block - rows))
    splits = _splits(b * heads, chunks, query.device)
    m, total, acc = ops.decode_attention(
        q,
        bias,
        list(layout_tensors(keys)),
        layout_ints(key_layout),
        list(layout_tensors(values)),
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
