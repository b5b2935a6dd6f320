"""Triton kernels: fused quantize-and-pack, reconstruction of a stored chunk, and decode attention over it.

Imported only when the Triton backend runs (see `gearkit.kernels.backend`). Each kernel has a pure-torch
reference that is the CPU path and the test oracle: `reference.quantize_groups` + `reference.pack_bits`,
`Pipeline.decompress`, and `reference.attention_reference` over the decompressed chunks.

Stored layouts (see `gearkit.kernels.layout.StorageLayout`): a chunk entry `e` holds `[heads, T, D]`; codes are
packed per entry in the quantizer's row order (`[h, d, t]` for per-channel groups, `[h, t, d]` per token; 3-bit
codes as 8 codes per 3 bytes, straddling byte boundaries, like `reference.pack_bits`);
scales and zeros are `[E, h, rows, n_groups]` (no zeros for a codebook centered at 0; a codebook's codes index a
float32 level table `[2**bits]`); outliers `[E, h, rows, k2]` (rows along their own axis);
low-rank factors `left [E, h, T, r]`, `right [E, h, D, r]`. `T`, `D`, group sizes are powers of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_half_even(y):
    """`torch.round` for y >= 0: nearest integer, ties to even."""
    r = tl.floor(y + 0.5)
    odd = (r.to(tl.int32) % 2) == 1
    return tl.where(((r - y) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _to_param(v, DOWN: tl.constexpr, PARAM_F16: tl.constexpr):
    """Cast float32 `v` to the parameter dtype rounding down (DOWN) or up, as `reference._round_toward`."""
    if PARAM_F16:
        r = v.to(tl.float16)
        rf = r.to(tl.float32)
        bits = r.to(tl.int16, bitcast=True).to(tl.int32)
        if DOWN:
            off = rf > v
            nxt = tl.where(rf == 0, -32767, tl.where(rf > 0, bits - 1, bits + 1))  # -32767: 0x8001, -tiniest
        else:
            off = rf < v
            nxt = tl.where(rf == 0, 1, tl.where(rf > 0, bits + 1, bits - 1))
        return tl.where(off, nxt, bits).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        return v


@triton.jit
def _quantize_pack_kernel(
    x_ptr,
    valid_ptr,
    packed_ptr,
    scale_ptr,
    zero_ptr,
    R,
    BITS: tl.constexpr,
    NG: tl.constexpr,
    G: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_VALID: tl.constexpr,
    PARAM_F16: tl.constexpr,
):
    L: tl.constexpr = NG * G
    PB: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = row[:, None, None] * L + tl.arange(0, NG)[None, :, None] * G + tl.arange(0, G)[None, None, :]
    inside = row[:, None, None] < R
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if HAS_VALID:
        ok = tl.load(valid_ptr + offs, mask=inside, other=0) != 0
        lo = tl.min(tl.where(ok, x, float("inf")), 2)
        hi = tl.max(tl.where(ok, x, float("-inf")), 2)
        some = tl.max(ok.to(tl.int32), 2) > 0
        lo = tl.where(some, lo, 0.0)
        hi = tl.where(some, hi, 0.0)
    else:
        lo = tl.min(x, 2)
        hi = tl.max(x, 2)
    zero = _to_param(lo, True, PARAM_F16)
    zf = zero.to(tl.float32)
    scale = _to_param(tl.math.div_rn(hi - zf, tl.full(hi.shape, QMAX, tl.float32)), False, PARAM_F16)
    s = scale.to(tl.float32)[:, :, None]
    positive = s > 0
    steps = tl.where(positive, tl.math.div_rn(x - zf[:, :, None], tl.where(positive, s, 1.0)), 0.0)
    codes = tl.minimum(tl.maximum(_round_half_even(steps), 0.0), QMAX).to(tl.int32)
    stored = row[:, None] < R
    if BITS == 3:  # 8 codes make a 24-bit word, stored as its 3 bytes
        word = tl.sum(tl.reshape(codes, (ROWS, L // 8, 8)) << (tl.arange(0, 8) * 3)[None, None, :], 2)
        at = packed_ptr + row[:, None] * (L * 3 // 8) + tl.arange(0, L // 8)[None, :] * 3
        for k in tl.static_range(3):
            tl.store(at + k, ((word >> (8 * k)) & 0xFF).to(tl.uint8), mask=stored)
    else:
        if BITS == 8:
            packed = tl.reshape(codes, (ROWS, L))
        else:
            fields = tl.reshape(codes, (ROWS, L // PB, PB)) << (tl.arange(0, PB) * BITS)[None, None, :]
            packed = tl.sum(fields, 2)  # disjoint bit fields: the sum is their OR
        cols = tl.arange(0, L // PB)[None, :]
        tl.store(packed_ptr + row[:, None] * (L // PB) + cols, packed.to(tl.uint8), mask=stored)
    params = row[:, None] * NG + tl.arange(0, NG)[None, :]
    tl.store(scale_ptr + params, scale, mask=stored)
    tl.store(zero_ptr + params, zero, mask=stored)


def quantize_pack(rows, valid, bits: int, group: int, out):
    """Launch: quantize rows `[R, L]` in groups of `group` and pack; writes `out = (packed, scale, zero)`
    (`[R, L * bits / 8]` uint8, `[R, L / group]` twice)."""
    packed, scale, zero = out
    r, length = rows.shape
    block = max(1, min(16, 4096 // length))  # rows per program: at most 4096 entries in registers
    _quantize_pack_kernel[(triton.cdiv(r, block),)](
        rows,
        rows if valid is None else valid,
        packed,
        scale,
        zero,
        r,
        BITS=bits,
        NG=length // group,
        G=group,
        ROWS=block,
        HAS_VALID=valid is not None,
        PARAM_F16=scale.dtype == torch.float16,
    )


@triton.jit
def _tile(
    e,
    h,
    H,
    codes,
    scale,
    zero,
    out_val,
    out_idx,
    left,
    right,
    levels,
    T: tl.constexpr,
    D: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    NG: tl.constexpr,
    Q_CHANNEL: tl.constexpr,
    K2: tl.constexpr,
    O_CHANNEL: tl.constexpr,
    RANK: tl.constexpr,
    O_HEADS: tl.constexpr,
    LEVELS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
):
    """Reconstruct entry `e`, head `h` of a stored chunk as float32 `[T, D]`: codes dequantized (`zero + scale *
    code`, or `zero? + scale * levels[code]` for a codebook), plus the low-rank term, with the sparse outliers in
    place (they replace the other terms where stored)."""
    PB: tl.constexpr = 8 // BITS
    t = tl.arange(0, T)[:, None]
    d = tl.arange(0, D)[None, :]
    eh = e * H + h
    entry = codes + e * (H * T * D * BITS // 8)
    if BITS == 3:  # codes straddle bytes: each reads the two bytes holding its bit offset
        if Q_CHANNEL:
            row, bit = entry + (h * D + d) * (T * 3 // 8), t * 3
        else:
            row, bit = entry + (h * T + t) * (D * 3 // 8), d * 3
        lo = tl.load(row + (bit >> 3)).to(tl.int32)
        hi = tl.load(row + (bit >> 3) + 1, mask=(bit & 7) > 5, other=0).to(tl.int32)
        code3 = ((lo | (hi << 8)) >> (bit & 7)) & 7
    # Each packed byte and each scale/zero is loaded once, then spread over the codes/groups it covers.
    if Q_CHANNEL:  # codes run along tokens: byte (h, d, t // PB)
        dd = tl.arange(0, D)[None, None, :]
        if BITS == 3:
            code = code3
        else:
            tb = tl.arange(0, T // PB)[:, None, None]
            byte = tl.load(entry + (h * D + dd) * (T // PB) + tb).to(tl.int32)
            code = tl.reshape((byte >> (tl.arange(0, PB)[None, :, None] * BITS)) & ((1 << BITS) - 1), (T, D))
        p = (eh * D + dd) * NG + tl.arange(0, NG)[:, None, None]
        spread = (NG, GROUP, D)
    else:  # codes run along channels: byte (h, t, d // PB)
        tt = tl.arange(0, T)[:, None, None]
        if BITS == 3:
            code = code3
        else:
            db = tl.arange(0, D // PB)[None, :, None]
            byte = tl.load(entry + (h * T + tt) * (D // PB) + db).to(tl.int32)
            code = tl.reshape((byte >> (tl.arange(0, PB)[None, None, :] * BITS)) & ((1 << BITS) - 1), (T, D))
        p = (eh * T + tt) * NG + tl.arange(0, NG)[None, :, None]
        spread = (T, NG, GROUP)
    ss = tl.reshape(tl.broadcast_to(tl.load(scale + p).to(tl.float32), spread), (T, D))
    if LEVELS > 0:  # noqa: SIM108 (constexpr) a codebook: a table of a few floats, read by index (stays in cache)
        val = ss * tl.load(levels + code)
    else:
        val = ss * code.to(tl.float32)
    if HAS_ZERO:
        val += tl.reshape(tl.broadcast_to(tl.load(zero + p).to(tl.float32), spread), (T, D))
    for r in tl.static_range(RANK):
        a = tl.load(left + (eh * T + t) * RANK + r).to(tl.float32)
        b = tl.load(right + (eh * D + d) * RANK + r).to(tl.float32)
        val += a * b
    for j in tl.static_range(K2):
        if O_HEADS:  # a token's outliers among the channels of all heads
            o = (e * T + t) * K2 + j
            hit = tl.load(out_idx + o).to(tl.int32) == h * D + d
        elif O_CHANNEL:
            o = (eh * D + d) * K2 + j
            hit = tl.load(out_idx + o).to(tl.int32) == t
        else:
            o = (eh * T + t) * K2 + j
            hit = tl.load(out_idx + o).to(tl.int32) == d
        val = tl.where(hit, tl.load(out_val + o).to(tl.float32), val)
    return val


@triton.jit
def _reconstruct_kernel(
    out,
    H,
    codes,
    scale,
    zero,
    out_val,
    out_idx,
    left,
    right,
    levels,
    T: tl.constexpr,
    D: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    NG: tl.constexpr,
    Q_CHANNEL: tl.constexpr,
    K2: tl.constexpr,
    O_CHANNEL: tl.constexpr,
    RANK: tl.constexpr,
    O_HEADS: tl.constexpr,
    LEVELS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
):
    pid = tl.program_id(0)
    val = _tile(
        pid // H,
        pid % H,
        H,
        codes,
        scale,
        zero,
        out_val,
        out_idx,
        left,
        right,
        levels,
        T,
        D,
        BITS,
        GROUP,
        NG,
        Q_CHANNEL,
        K2,
        O_CHANNEL,
        RANK,
        O_HEADS,
        LEVELS,
        HAS_ZERO,
    )
    tl.store(out + pid * T * D + tl.arange(0, T)[:, None] * D + tl.arange(0, D)[None, :], val.to(out.dtype.element_ty))


def reconstruct(layout, tensors, out):
    """Launch: reconstruct every entry and head of a stored chunk stack into `out` `[E, H, T, D]`."""
    e, h = out.shape[:2]
    _reconstruct_kernel[(e * h,)](out, h, *tensors, **layout.constexprs())


@triton.jit
def _decode_attention_kernel(
    q,
    bias,
    m_out,
    l_out,
    acc_out,
    B,
    H,
    N,
    S,
    per_split,
    scaling,
    kc,
    ks,
    kz,
    kov,
    koi,
    kl,
    kr,
    klv,
    vc,
    vs,
    vz,
    vov,
    voi,
    vl,
    vr,
    vlv,
    T: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_F16: tl.constexpr,
    K_BITS: tl.constexpr,
    K_GROUP: tl.constexpr,
    K_NG: tl.constexpr,
    K_QCH: tl.constexpr,
    K_K2: tl.constexpr,
    K_OCH: tl.constexpr,
    K_RANK: tl.constexpr,
    K_OHD: tl.constexpr,
    K_LEVELS: tl.constexpr,
    K_ZERO: tl.constexpr,
    V_BITS: tl.constexpr,
    V_GROUP: tl.constexpr,
    V_NG: tl.constexpr,
    V_QCH: tl.constexpr,
    V_K2: tl.constexpr,
    V_OCH: tl.constexpr,
    V_RANK: tl.constexpr,
    V_OHD: tl.constexpr,
    V_LEVELS: tl.constexpr,
    V_ZERO: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    qt = tl.load(q + (bh * BLOCK_M + rows[:, None]) * D + d[None, :])
    if DOT_F16:
        qt = qt.to(tl.float16)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    first = split * per_split
    last = tl.minimum(first + per_split, N)
    for n in range(first, last):
        e = n * B + b
        k = _tile(
            e, h, H, kc, ks, kz, kov, koi, kl, kr, klv, T, D,
            K_BITS, K_GROUP, K_NG, K_QCH, K_K2, K_OCH, K_RANK, K_OHD, K_LEVELS, K_ZERO,
        )  # fmt: skip
        if DOT_F16:  # noqa: SIM108 (a constexpr branch: Triton compiles only one side)
            scores = tl.dot(qt, tl.trans(k.to(tl.float16)))
        else:
            scores = tl.dot(qt, tl.trans(k), input_precision="ieee")
        scores = scores * scaling + tl.load(bias + (b * N + n) * T + tl.arange(0, T))[None, :]
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked block adds nothing
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(
            e, h, H, vc, vs, vz, vov, voi, vl, vr, vlv, T, D,
            V_BITS, V_GROUP, V_NG, V_QCH, V_K2, V_OCH, V_RANK, V_OHD, V_LEVELS, V_ZERO,
        )  # fmt: skip
        if DOT_F16:
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v.to(tl.float16))
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    at = (bh * S + split) * BLOCK_M + rows
    tl.store(m_out + at, m_i)
    tl.store(l_out + at, l_i)
    tl.store(acc_out + at[:, None] * D + d[None, :], acc)


def decode_attention(
    q, bias, key_layout, key_tensors, value_layout, value_tensors, chunks, per_split, scaling, dot_f16, out
):
    """Launch split-sequence decode attention; writes partial `(max, sum, acc)` per split into `out`
    (`[B, H, S, M]`, `[B, H, S, M]`, `[B, H, S, M, D]`). `q` is `[B, H, M, D]` float32, M a power of two."""
    m_out, l_out, acc_out = out
    b, h, splits, block_m = m_out.shape
    k, v = key_layout.constexprs(), value_layout.constexprs()
    _decode_attention_kernel[(b * h, splits)](
        q,
        bias,
        m_out,
        l_out,
        acc_out,
        b,
        h,
        chunks,
        splits,
        per_split,
        scaling,
        *key_tensors,
        *value_tensors,
        T=k["T"],
        D=k["D"],
        BLOCK_M=block_m,
        DOT_F16=dot_f16,
        **{f"K_{n}": k[c] for n, c in _PREFIXED},
        **{f"V_{n}": v[c] for n, c in _PREFIXED},
    )


_PREFIXED = (
    ("BITS", "BITS"),
    ("GROUP", "GROUP"),
    ("NG", "NG"),
    ("QCH", "Q_CHANNEL"),
    ("K2", "K2"),
    ("OCH", "O_CHANNEL"),
    ("RANK", "RANK"),
    ("OHD", "O_HEADS"),
    ("LEVELS", "LEVELS"),
    ("ZERO", "HAS_ZERO"),
)
