"""Pure-torch reference kernels: bit packing and group quantization.

These are the CPU path of every stage and the oracle that faster kernels are tested against.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import Tensor

SUPPORTED_BITS = (1, 2, 3, 4, 8)


def check_bits(bits: int) -> int:
    """Return `bits` if it is a supported code width, else raise `ValueError` naming the supported ones."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:  # 3.0 is not a width
        raise ValueError(f"unsupported bit width {bits!r}; supported widths are {SUPPORTED_BITS}")
    return int(bits)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that `pack_bits` uses for `numel` codes of width `bits` (blocks of 8 codes take `bits` bytes)."""
    return numel if bits == 8 else -(-numel // 8) * bits


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes along the last dimension into a dense little-endian bit stream.

    Every block of 8 consecutive codes occupies exactly `bits` bytes, code `j` of a block sitting at bit
    offset `j * bits`. Widths that divide 8 get the usual layout; 3-bit codes really take 3 bits each. Only
    the last block of each row may be padded.

    Args:
        codes: integer tensor `[..., n]` with values in `[0, 2**bits)`.
        bits: code width, one of `SUPPORTED_BITS`.

    Returns:
        uint8 tensor `[..., packed_nbytes(n, bits)]`.
    """
    check_bits(bits)
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.clone(memory_format=torch.contiguous_format)
    lead, n = codes.shape[:-1], codes.shape[-1]
    blocks = torch.nn.functional.pad(codes, (0, (-n) % 8)).reshape(*lead, -(-n // 8), 8).to(torch.int32)
    code_shift = torch.arange(8, device=codes.device, dtype=torch.int32) * bits
    word = (blocks << code_shift).sum(-1, dtype=torch.int32)  # at most 32 bits; fields are disjoint, so sum == OR
    byte_shift = torch.arange(bits, device=codes.device, dtype=torch.int32) * 8
    return ((word[..., None] >> byte_shift) & 0xFF).to(torch.uint8).reshape(*lead, packed_nbytes(n, bits))


_WORD = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # an integer type as wide as a field's codes


@functools.cache
def _code_table(bits: int, device: torch.device) -> Tensor:
    """Lookup table from a packed field to its codes (see `unpack_bits`): for each field value, its uint8 codes
    reinterpreted as one integer (`[256]` for widths that divide 8: a byte, `[4096]` for 3 bits: half of a
    3-byte block, 12 bits, 4 whole codes), so a lookup moves one machine word."""
    width = 12 if bits == 3 else 8
    field = torch.arange(1 << width, dtype=torch.int64)
    codes = ((field[:, None] >> torch.arange(0, width, bits)) & ((1 << bits) - 1)).to(torch.uint8)
    return codes.view(_WORD[codes.shape[1]])[:, 0].to(device)


def unpack_bits(data: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack_bits`, by table lookup (fewer passes than shifting widened integers).

    Args:
        data: uint8 tensor `[..., packed_nbytes(n, bits)]`.
        bits: code width used when packing.
        n: number of codes per row.

    Returns:
        uint8 tensor `[..., n]`.
    """
    check_bits(bits)
    if data.shape[-1] != packed_nbytes(n, bits):
        raise ValueError(f"{data.shape[-1]} packed bytes per row cannot hold {n} codes of {bits} bits")
    if bits == 8:
        return data
    lead = data.shape[:-1]
    if bits == 3:  # a 3-byte block's low and high 12 bits each hold 4 codes
        blocks = data.reshape(*lead, data.shape[-1] // 3, 3)
        if sys.byteorder == "little":  # the block padded to 4 bytes is one little-endian int32 (fewest passes)
            word = torch.nn.functional.pad(blocks, (0, 1)).view(torch.int32)
        else:
            b0, b1, b2 = blocks.int().unbind(-1)
            word = (b0 | (b1 << 8) | (b2 << 16))[..., None]
        index = torch.cat([word & 0xFFF, word >> 12], -1)
    else:
        index = data.int()
    codes = _code_table(bits, data.device).index_select(0, index.flatten()).view(torch.uint8)
    return codes.reshape(*lead, data.shape[-1] * 8 // bits)[..., :n]


def unpack_float(data: Tensor, bits: int, n: int) -> Tensor:
    """`unpack_bits(data, bits, n)` as float32 `[..., n]` (the codes as the products of decode read them)."""
    return unpack_bits(data, bits, n).float()


def _round_toward(v: Tensor, dtype: torch.dtype, down: bool) -> Tensor:
    """Cast `v` to `dtype`, rounding down (or up) instead of to nearest."""
    r = v.to(dtype)
    off = r.float() > v if down else r.float() < v
    direction = torch.full_like(r, float("-inf") if down else float("inf"))
    return torch.where(off, torch.nextafter(r, direction), r)


def quantize_groups(
    x: Tensor, bits: int, param_dtype: torch.dtype = torch.float16, valid: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Uniform asymmetric quantization of each group (last dimension) of `x`.

    The stored zero is rounded down and the stored scale up, so the grid `zero + scale * [0, 2**bits - 1]`
    covers every valid entry and the per-element error is at most `scale / 2` with the stored parameters.
    A constant group gets `scale = 0` and reconstructs to its value (exactly when `param_dtype` holds it).

    Args:
        x: float tensor `[..., n_groups, group]`, finite.
        bits: code width, one of `SUPPORTED_BITS`.
        param_dtype: dtype of the stored scale and zero.
        valid: optional bool tensor shaped like `x`; False entries are ignored when choosing the range
            (their codes are still produced, clamped to the grid).

    Returns:
        `(codes, scale, zero)`: uint8 `[..., n_groups, group]`, and `[..., n_groups]` in `param_dtype`.
    """
    qmax = (1 << check_bits(bits)) - 1
    x = x.float()
    if valid is None:
        lo, hi = x.amin(-1), x.amax(-1)
    else:
        lo = x.masked_fill(~valid, float("inf")).amin(-1)
        hi = x.masked_fill(~valid, float("-inf")).amax(-1)
        empty = ~valid.any(-1)
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    zero = _round_toward(lo, param_dtype, down=True)
    # A tensor divisor: CUDA divides by a Python scalar through its reciprocal, which is not IEEE division
    # and would make the stored scales depend on the device.
    scale = _round_toward((hi - zero.float()) / torch.full_like(hi, qmax), param_dtype, down=False)
    if not (torch.isfinite(zero).all() and torch.isfinite(scale).all()):
        raise ValueError(
            f"values span a range that {param_dtype} cannot store as a scale and zero; "
            "use a wider param_dtype (e.g. torch.float32)"
        )
    s, z = scale.float()[..., None], zero.float()[..., None]
    steps = torch.where(s > 0, (x - z) / torch.where(s > 0, s, 1.0), 0.0)
    codes = steps.round().clamp(0, qmax).to(torch.uint8)
    return codes, scale, zero


def dequantize_groups(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Reconstruct `zero + scale * codes` in float32.

    Args:
        codes: uint8 (or float32 from `unpack_float`) tensor `[..., n_groups, group]`.
        scale: tensor `[..., n_groups]`.
        zero: tensor `[..., n_groups]`.

    Returns:
        float32 tensor `[..., n_groups, group]`.
    """
    return torch.addcmul(zero.float()[..., None], scale.float()[..., None], codes.float())


def attention_reference(
    query: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scaling: float
) -> tuple[Tensor, Tensor]:
    """Softmax attention of grouped queries over one segment of keys, in float32, with its log-sum-exp.

    Query head `j` reads KV head `j // (heads / kv_heads)` (GQA without repeating stored heads).

    Args:
        query: `[batch, heads, queries, head_dim]`.
        keys: `[batch, kv_heads, length, head_dim]`.
        values: `[batch, kv_heads, length, head_dim]`.
        bias: additive float `[batch, queries or 1, length]` (`-inf` masks a position).
        scaling: softmax scale.

    Returns:
        `(out, lse)`: float32 `[batch, heads, queries, head_dim]` (zeros for a query that sees nothing here)
        and `[batch, heads, queries]` (`-inf` then).
    """
    b, hq, nq, d = query.shape
    h = keys.shape[1]
    q = query.float().reshape(b, h, hq // h, nq, d)
    scores = torch.einsum("bhgqd,bhld->bhgql", q, keys.float()) * scaling + bias.float()[:, None, None]
    lse = scores.logsumexp(-1)
    p = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.einsum("bhgql,bhld->bhgqd", p, values.float())
    return out.reshape(b, hq, nq, d), lse.reshape(b, hq, nq)


def merge_attention(segments: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Combine per-segment attention `(out [..., head_dim], lse [...])` into attention over all segments."""
    lse = torch.stack([s[1] for s in segments])
    top = lse.amax(0)
    weight = torch.exp(lse - torch.where(torch.isfinite(top), top, 0.0))  # [segments, ...]
    total = weight.sum(0)
    out = sum(w[..., None] * s[0] for w, s in zip(weight, segments))
    return out / torch.where(total > 0, total, 1.0)[..., None]
