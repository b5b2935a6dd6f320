"""gearkit's kernels as `torch.library` custom ops, so `torch.compile` traces through them as single calls.

Quantization must be opaque to the compiler: fused code may skip the rounding of fp16 scales and zeros
inside a kernel, which would make the codes disagree with the parameters actually stored. The Triton ops
(`quantize_pack`, `reconstruct`, `decode_attention`) import Triton only when they run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gearkit.kernels import reference
from gearkit.kernels.layout import StorageLayout


@torch.library.custom_op("gearkit::quantize_groups", mutates_args=())
def quantize_groups(
    x: Tensor, bits: int, param_dtype: torch.dtype, valid: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Group quantization; see `gearkit.kernels.reference.quantize_groups` (shapes and semantics).

    Outputs are contiguous whatever the input's strides, as the fake implementation states."""
    return tuple(t.contiguous() for t in reference.quantize_groups(x, bits, param_dtype, valid))


@quantize_groups.register_fake
def _(x, bits, param_dtype, valid=None):
    return (
        x.new_empty(x.shape, dtype=torch.uint8),
        x.new_empty(x.shape[:-1], dtype=param_dtype),
        x.new_empty(x.shape[:-1], dtype=param_dtype),
    )


def _quantize_pack_outputs(rows: Tensor, bits: int, group: int, param_dtype: torch.dtype):
    r, length = rows.shape
    return (
        rows.new_empty(r, length * bits // 8, dtype=torch.uint8),
        rows.new_empty(r, length // group, dtype=param_dtype),
        rows.new_empty(r, length // group, dtype=param_dtype),
    )


@torch.library.custom_op("gearkit::quantize_pack", mutates_args=())
def quantize_pack(
    rows: Tensor, valid: Tensor | None, bits: int, group: int, param_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton: quantize rows `[R, L]` in groups of `group` and bit-pack each row.

    Same codes, scales and zeros as `reference.quantize_groups` followed by `reference.pack_bits`.

    Returns:
        `(packed uint8 [R, L * bits / 8], scale [R, L / group], zero [R, L / group])`.
    """
    from gearkit.kernels import triton_kernels

    out = _quantize_pack_outputs(rows, bits, group, param_dtype)
    triton_kernels.quantize_pack(rows.contiguous(), None if valid is None else valid.contiguous(), bits, group, out)
    if not (torch.isfinite(out[1]).all() and torch.isfinite(out[2]).all()):
        raise ValueError(
            f"values span a range that {param_dtype} cannot store as a scale and zero; "
            "use a wider param_dtype (e.g. torch.float32)"
        )
    return out


@quantize_pack.register_fake
def _(rows, valid, bits, group, param_dtype):
    return _quantize_pack_outputs(rows, bits, group, param_dtype)


@torch.library.custom_op("gearkit::reconstruct", mutates_args=())
def reconstruct(tensors: list[Tensor], layout: list[int], entries: int, heads: int, dtype: torch.dtype) -> Tensor:
    """Triton: reconstruct a stored chunk stack (see `layout.layout_tensors`) as `[entries, heads, T, D]` in
    `dtype` (computed in float32)."""
    from gearkit.kernels import triton_kernels

    spec = StorageLayout(*layout)
    out = tensors[0].new_empty(entries, heads, spec.tokens, spec.head_dim, dtype=dtype)
    triton_kernels.reconstruct(spec, tensors, out)
    return out


@reconstruct.register_fake
def _(tensors, layout, entries, heads, dtype):
    spec = StorageLayout(*layout)
    return tensors[0].new_empty(entries, heads, spec.tokens, spec.head_dim, dtype=dtype)


def _attention_outputs(query: Tensor, splits: int):
    b, h, m, d = query.shape
    return (
        query.new_empty(b, h, splits, m, dtype=torch.float32),
        query.new_empty(b, h, splits, m, dtype=torch.float32),
        query.new_empty(b, h, splits, m, d, dtype=torch.float32),
    )


@torch.library.custom_op("gearkit::decode_attention", mutates_args=())
def decode_attention(
    query: Tensor,
    bias: Tensor,
    key_tensors: list[Tensor],
    key_layout: list[int],
    value_tensors: list[Tensor],
    value_layout: list[int],
    chunks: int,
    splits: int,
    scaling: float,
    dot_f16: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton: split-sequence attention of `query` `[B, kv_heads, M, D]` (float32, M a power of two >= 16) over
    `chunks` stored chunks per sequence with additive `bias` `[B, chunks * T]`.

    Returns:
        Per split: running max and sum `[B, kv_heads, splits, M]` and unnormalised output `[B, kv_heads, splits, M, D]`.
    """
    from gearkit.kernels import triton_kernels

    out = _attention_outputs(query, splits)
    per_split = -(-chunks // splits)
    triton_kernels.decode_attention(
        query.contiguous(),
        bias.float().contiguous(),
        StorageLayout(*key_layout),
        key_tensors,
        StorageLayout(*value_layout),
        value_tensors,
        chunks,
        per_split,
        scaling,
        dot_f16,
        out,
    )
    return out


@decode_attention.register_fake
def _(query, bias, key_tensors, key_layout, value_tensors, value_layout, chunks, splits, scaling, dot_f16):
    return _attention_outputs(query, splits)
