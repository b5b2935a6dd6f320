"""Which stored pipelines the fused kernels read, and the tensors and constants they read them with."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from gearkit.parts import CompressedTensor, LowRankPart, OutlierPart, QuantizedPart

KERNEL_BITS = (2, 3, 4, 8)  # what the Triton kernels code; the torch path codes every supported width
READ_BITS = (1, *KERNEL_BITS)  # what the Triton kernels read (a 1-bit code is a bit field like the others)


def is_pow2(n: int) -> bool:
    """Whether `n` is a positive power of two."""
    return n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class StorageLayout:
    """Static description of a chunk stored by `[SparseOutlier?, Quantizer, LowRankResidual?]` (the quantizer uniform
    or a codebook's).

    Attributes:
        tokens: tokens per chunk `T`.
        head_dim: `D`.
        bits: code width of the quantizer.
        group: quantization group size.
        q_channel: groups run along tokens (per-channel) rather than along channels (per-token).
        k2: outliers per row (both sides), 0 without an outlier stage.
        o_channel: outlier rows are channels (indices are token positions) rather than tokens.
        rank: rank of the low-rank term, 0 without one.
        o_heads: outlier rows are a token's channels of all heads (`across_heads`; indices are `head * D +
            channel`), stored `[entries, T, k2]`.
        levels: entries of the level table the codes index (`2**bits`, a codebook), 0 for uniform codes (a code
            is its own level).
        zero: groups store a zero (an offset added to `scale * level`); codebooks centered at 0 store none.
    """

    tokens: int
    head_dim: int
    bits: int
    group: int
    q_channel: bool
    k2: int = 0
    o_channel: bool = False
    rank: int = 0
    o_heads: bool = False
    levels: int = 0
    zero: bool = True

    @property
    def rows(self) -> tuple[int, int]:
        """`(rows, row length)` of one head of a chunk in the quantizer's layout: `(D, T)` per-channel, else
        `(T, D)`."""
        return (self.head_dim, self.tokens) if self.q_channel else (self.tokens, self.head_dim)

    def triton_unsupported(self, c: CompressedTensor) -> str | None:
        """Why the Triton kernels cannot read chunks `c` stored in this layout, or None if they can."""
        length = self.rows[1]
        q = next(p for p in c.parts if isinstance(p, QuantizedPart))
        if self.bits not in READ_BITS or q.scale.dtype not in (torch.float16, torch.float32):
            return (
                f"the kernels read {READ_BITS}-bit codes with fp16/fp32 parameters, not {self.bits}-bit "
                f"codes with {q.scale.dtype} parameters"
            )
        if not (is_pow2(self.tokens) and is_pow2(self.head_dim) and self.tokens >= 16 and self.head_dim >= 16):
            return f"chunk tokens and head_dim must be powers of two >= 16, got {self.tokens} and {self.head_dim}"
        if not (is_pow2(length) and is_pow2(self.group) and 8 <= length <= 4096):
            return (
                f"the kernels need power-of-two rows (8 to 4096) and groups dividing them, got {length} and "
                f"{self.group}"
            )
        return None

    def constexprs(self) -> dict[str, int]:
        """The kernels' compile-time constants."""
        length = self.rows[1]
        return dict(
            T=self.tokens,
            D=self.head_dim,
            BITS=self.bits,
            GROUP=self.group,
            NG=length // self.group,
            Q_CHANNEL=self.q_channel,
            K2=self.k2,
            O_CHANNEL=self.o_channel,
            RANK=self.rank,
            O_HEADS=self.o_heads,
            LEVELS=self.levels,
            HAS_ZERO=self.zero,
        )


def layout_ints(layout: StorageLayout) -> list[int]:
    """A `StorageLayout` as the int list the custom ops take."""
    return [int(v) for v in dataclasses.astuple(layout)]


def layout_tensors(c: CompressedTensor, levels: Tensor | None = None) -> tuple[Tensor, ...]:
    """The eight tensors the kernels read: codes, scale, zero, outlier values, outlier indices, left, right and the
    level table (float32 `[2**bits]`, `levels`, for codebook codes). Absent ones are stood in for by the codes,
    which the kernels then never read."""
    q = next(p for p in c.parts if isinstance(p, QuantizedPart))
    o = next((p for p in c.parts if isinstance(p, OutlierPart)), None)
    lr = next((p for p in c.parts if isinstance(p, LowRankPart)), None)
    none = q.codes
    return tuple(
        t.contiguous()
        for t in (
            q.codes,
            q.scale,
            none if q.zero is None else q.zero,
            o.values if o else none,
            o.indices if o else none,
            lr.left if lr else none,
            lr.right if lr else none,
            none if levels is None else levels.float(),
        )
    )
