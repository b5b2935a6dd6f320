"""Products with stored chunks: `a @ W` or `a @ W^T` for the dequantized rows `W` of packed codes, read without writing
`W` where it can (the compiled CPU kernel, or torch products on the unpacked codes with scales and zeros folded in),
and the dense products with decompressed chunks that stages fall back to."""

from __future__ import annotations

import torch
from torch import Tensor

from gearkit.kernels import cpu
from gearkit.kernels.layout import StorageLayout
from gearkit.kernels.reference import unpack_bits, unpack_float


def _codes(codes: Tensor, entries: int, heads: int, layout: StorageLayout, levels: Tensor | None) -> Tensor:
    """Float32 codes `[entries, heads, rows, length]` in the quantizer's row layout (or the `levels` they index)."""
    rows, length = layout.rows
    n = heads * rows * length
    if levels is None:
        return unpack_float(codes, layout.bits, n).reshape(entries, heads, rows, length)
    index = unpack_bits(codes, layout.bits, n).flatten().long()
    return levels.index_select(0, index).reshape(entries, heads, rows, length)


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
