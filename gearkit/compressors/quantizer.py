"""Uniform asymmetric group quantization with bit-packed codes."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor

from gearkit.compressors.base import NO_CONTEXT, Context, Stage, register_stage
from gearkit.compressors.checks import MAX_GROUP, Axis, check_axis, check_bool, check_float_dtype, check_int
from gearkit.kernels import ops
from gearkit.kernels.backend import use_triton
from gearkit.kernels.layout import KERNEL_BITS, StorageLayout, is_pow2
from gearkit.kernels.products import stored_product
from gearkit.kernels.reference import check_bits, dequantize_groups, pack_bits, unpack_bits, unpack_float
from gearkit.parts import QuantizedPart


@register_stage
class Quantizer(Stage):
    """Uniform asymmetric quantizer: `scale = (max - min) / (2**bits - 1)`, `code = round((x - min) / scale)`.

    Groups run along one axis of `KV`:

    - `axis="channel"` (per-channel, KIVI keys): a group is `group_size` consecutive tokens of one channel;
    - `axis="token"` (per-token, KIVI values): a group is `group_size` consecutive channels of one token;
      with `across_heads=True` a token's channels of all heads form one row (KCVT values).

    `group_size=None` makes the whole row one group. When the row length is not a multiple of
    `group_size` the last group is shorter: it gets its own scale and zero and no padding is stored.

    Args:
        bits: code width, one of 1, 2, 3, 4, 8.
        group_size: entries per group (at most `MAX_GROUP`), or None for whole rows.
        axis: "token" or "channel", the axis along which groups run (see above).
        across_heads: group a token's channels across all heads (only with `axis="token"`).
        param_dtype: dtype of the stored scale and zero.
    """

    def __init__(
        self,
        bits: int,
        group_size: int | None = None,
        axis: Axis = "token",
        across_heads: bool = False,
        param_dtype: torch.dtype = torch.float16,
    ):
        super().__init__()
        self.bits = check_bits(bits)
        self.group_size = None if group_size is None else check_int(group_size, "group_size", 1, MAX_GROUP)
        self.axis = check_axis(axis)
        if check_bool(across_heads, "across_heads") and axis != "token":
            raise ValueError("across_heads groups a token's channels, so it needs axis='token'")
        self.across_heads = across_heads
        self.param_dtype = check_float_dtype(param_dtype, "param_dtype")

    def config(self) -> dict:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "axis": self.axis,
            "across_heads": self.across_heads,
            "param_dtype": self.param_dtype,
        }

    # Layout: rows are the last axis, cut into groups.
    def _to_rows(self, x: Tensor) -> Tensor:
        if self.axis == "channel":
            return x.transpose(-1, -2)
        if self.across_heads:
            return rearrange(x, "b h t d -> b t (h d)")
        return x

    def _from_rows(self, rows: Tensor, shape: tuple[int, ...]) -> Tensor:
        if self.axis == "channel":
            return rows.transpose(-1, -2)
        if self.across_heads:
            return rearrange(rows, "b t (h d) -> b h t d", h=shape[1])
        return rows

    def _rows_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        b, h, t, d = shape
        if self.axis == "channel":
            return (b, h, d, t)
        return (b, t, h * d) if self.across_heads else (b, h, t, d)

    def _groups(self, length: int) -> tuple[int, int]:
        """(group size, number of groups) for rows of `length`."""
        size = self.group_size or max(length, 1)
        return size, math.ceil(length / size)

    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> QuantizedPart:
        """Quantize `x` `KV`; `exclude`d entries do not widen any range."""
        rows = self._to_rows(x.float())
        length = rows.shape[-1]
        size, n = self._groups(length)
        pad = n * size - length
        valid = None if exclude is None else ~self._to_rows(exclude)
        if pad:
            # Padding repeats the row's last entry (or is marked invalid), so it never widens a range.
            rows = torch.cat([rows, rows[..., -1:].expand(*rows.shape[:-1], pad)], -1)
            if valid is not None:
                valid = torch.cat([valid, valid.new_zeros(*valid.shape[:-1], pad)], -1)
        if x.numel() and use_triton(x.device, self.kernel_unsupported(length)):  # fused quantize + pack
            packed, scale, zero = ops.quantize_pack(
                rows.reshape(-1, length),
                None if valid is None else valid.reshape(-1, length),
                self.bits,
                size,
                self.param_dtype,
            )
            lead = rows.shape[:-1]
            return QuantizedPart(
                packed.reshape(x.shape[0], -1),
                scale.reshape(*lead, n),
                zero.reshape(*lead, n),
                self.bits,
                tuple(x.shape),
            )
        grouped = rows.reshape(*rows.shape[:-1], n, size)
        codes, scale, zero = ops.quantize_groups(
            grouped, self.bits, self.param_dtype, None if valid is None else valid.reshape(grouped.shape)
        )
        codes = codes.reshape(*rows.shape[:-1], n * size)[..., :length]
        # Packed per batch entry, so parts can be concatenated and reordered along the batch.
        packed = pack_bits(codes.reshape(x.shape[0], math.prod(self._rows_shape(x.shape)[1:])), self.bits)
        return QuantizedPart(packed, scale, zero, self.bits, tuple(x.shape))

    def kernel_unsupported(self, length: int) -> str | None:
        """Why the Triton kernels cannot handle rows of `length` with this quantizer, or None if they can."""
        size = self.group_size or length
        if self.bits not in KERNEL_BITS or self.param_dtype not in (torch.float16, torch.float32):
            return f"the kernels cover {KERNEL_BITS}-bit codes with fp16/fp32 parameters, not {self}"
        if not (is_pow2(length) and is_pow2(size) and 8 <= length <= 4096 and length % size == 0):
            return f"the kernels need power-of-two rows (8 to 4096) and groups dividing them, got {length} and {size}"
        return None

    def _ungroup(self, grouped: Tensor, shape: tuple[int, ...]) -> Tensor:
        """`[..., n_groups, group]` in row layout back to `shape`."""
        rows_shape = self._rows_shape(shape)
        flat = grouped.flatten(-2)[..., : rows_shape[-1]]
        return self._from_rows(flat, shape)

    def _grouped_codes(self, part: QuantizedPart, unpack=unpack_float) -> Tensor:
        """The codes in groups `[..., n_groups, group]` (float32 by default: decoding reads them by table lookup)."""
        rows_shape = self._rows_shape(part.shape)
        size, n = self._groups(rows_shape[-1])
        codes = unpack(part.codes, part.bits, math.prod(rows_shape[1:])).reshape(rows_shape)
        if n * size != rows_shape[-1]:
            codes = torch.nn.functional.pad(codes, (0, n * size - rows_shape[-1]))
        return codes.reshape(*rows_shape[:-1], n, size)

    def decode(self, part: QuantizedPart) -> Tensor:
        """Dequantize: float32 `KV`."""
        if part.bits != self.bits:
            raise ValueError(f"part holds {part.bits}-bit codes but this quantizer is {self.bits}-bit")
        return self._ungroup(dequantize_groups(self._grouped_codes(part), part.scale, part.zero), part.shape)

    def read_layout(self, shape: tuple[int, ...]) -> StorageLayout | None:
        """The rows decode attention reads the codes of chunks `[entries, kv_heads, T, head_dim]` in, or None
        where it cannot (groups across heads, or groups that do not divide the rows)."""
        if self.across_heads:
            return None
        _, _, t, d = shape
        length = t if self.axis == "channel" else d
        group = min(self.group_size or length, length)  # a group longer than the row is the row
        return None if length % group else StorageLayout(t, d, self.bits, group, self.axis == "channel")

    def codebook(self, device=None) -> Tensor | None:
        """The level each code stands for, float32 `[2**bits]`, or None: a uniform code is its own level."""
        return None

    def scores(self, part: QuantizedPart, q: Tensor, chunks: int) -> Tensor:
        """`q @ x^T` on the packed codes (see `Stage.scores`): `[chunks, batch, kv_heads, rows, T]`."""
        layout = self.read_layout(part.shape)
        if layout is None:
            return super().scores(part, q, chunks)
        levels = self.codebook(q.device)
        return stored_product(q, part.codes, part.scale, part.zero, layout, chunks, not layout.q_channel, levels)

    def weighted(self, part: QuantizedPart, p: Tensor) -> Tensor:
        """`p @ x` on the packed codes, summed over chunks (see `Stage.weighted`): `[batch, kv_heads, rows, D]`."""
        layout = self.read_layout(part.shape)
        if layout is None:
            return super().weighted(part, p)
        levels = self.codebook(p.device)
        return stored_product(p, part.codes, part.scale, part.zero, layout, p.shape[0], layout.q_channel, levels).sum(0)

    def codes(self, part: QuantizedPart) -> Tensor:
        """The integer codes of a part, uint8 `KV`."""
        return self._ungroup(self._grouped_codes(part, unpack_bits), part.shape)

    def error_bound(self, part: QuantizedPart) -> Tensor:
        """Per-element bound on the quantization error, `scale / 2`: float32 `KV`."""
        size, _ = self._groups(self._rows_shape(part.shape)[-1])
        half = (part.scale.float() / 2)[..., None].expand(*part.scale.shape, size)
        return self._ungroup(half, part.shape)

    def extra_repr(self) -> str:
        heads = ", across_heads=True" if self.across_heads else ""
        return (
            f"bits={self.bits}, group_size={self.group_size}, axis={self.axis!r}{heads}, param_dtype={self.param_dtype}"
        )
