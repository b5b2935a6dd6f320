"""Non-uniform scalar quantization: Lloyd-Max codebooks for Gaussian coordinates, bit-packed codes.

After a random rotation every coordinate of a head vector is close to Gaussian whatever the data (TurboQuant), so
one fixed codebook, optimal for N(0, 1), fits every layer and head once each group is divided by its RMS: nothing
is calibrated and nothing but the codes and one scale per group is stored.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from gearkit.compressed import CodebookPart
from gearkit.compressors.base import NO_CONTEXT, Context
from gearkit.compressors.checks import Axis, check_storable
from gearkit.compressors.quantizer import Quantizer
from gearkit.kernels.reference import check_bits, pack_bits, unpack_bits


@functools.lru_cache(maxsize=None)
def _levels(bits: int) -> tuple[float, ...]:
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    n = 2**bits
    levels = normal.icdf((torch.arange(n, dtype=torch.float64) + 0.5) / n)  # start from equal-mass cells
    for _ in range(1000):  # Lloyd's iteration on the density: levels are the centroids of their cells
        edges = torch.cat([levels.new_tensor([-math.inf]), (levels[1:] + levels[:-1]) / 2, levels.new_tensor([math.inf])])
        pdf, cdf = normal.log_prob(edges).exp(), normal.cdf(edges)
        new = (pdf[:-1] - pdf[1:]) / (cdf[1:] - cdf[:-1])  # E[X | a < X < b] for a standard normal
        if torch.allclose(new, levels, rtol=0, atol=1e-12):
            break
        levels = new
    return tuple(levels.tolist())


def lloyd_max_levels(bits: int) -> Tensor:
    """The Lloyd-Max (minimum mean squared error) levels of a `bits`-bit scalar quantizer for N(0, 1).

    Computed once per width by Lloyd's iteration on the Gaussian density (deterministic, no data); for N(0, 1/d),
    the coordinates of a randomly rotated unit vector of dimension d, divide them by sqrt(d).

    Args:
        bits: code width, one of 1, 2, 3, 4, 8.

    Returns:
        float32 `[2**bits]`, ascending and symmetric around 0 (1 bit: +-0.798; 2 bits: +-0.453, +-1.510).
    """
    return torch.tensor(_levels(check_bits(bits)), dtype=torch.float32)


class CodebookQuantizer(Quantizer):
    """Non-uniform scalar quantizer: each group divided by its RMS, each entry coded as the nearest Lloyd-Max level
    for N(0, 1) (`lloyd_max_levels`), codes bit-packed.

    Meant for rotated vectors (`HadamardRotation`, `Rotation`), whose coordinates are close to Gaussian: with
    `group_size=None` and `axis="token"` a group is a whole head vector, so the scale is its norm / sqrt(head_dim)
    (TurboQuant's MSE quantizer). The stored scale is the least-squares scale of the chosen codes (it can only
    lower the error the RMS scale gives). `centered=True` also stores each group's mean and codes the
    deviations from it (channels of keys have offsets). Groups are laid out as in `Quantizer`.

    Args:
        bits: code width, one of 1, 2, 3, 4, 8.
        group_size: entries per group, or None for whole rows.
        axis: "token" or "channel", the axis along which groups run (see `Quantizer`).
        centered: store a per-group mean as well as the scale.
        param_dtype: dtype of the stored scale (and center).
    """

    def __init__(self, bits: int, group_size: int | None = None, axis: Axis = "token", centered: bool = False,
                 param_dtype: torch.dtype = torch.float16):
        super().__init__(bits, group_size, axis, False, param_dtype)
        if not isinstance(centered, bool):
            raise TypeError(f"centered must be a bool, got {centered!r}")
        self.centered = centered

    def config(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "axis": self.axis, "centered": self.centered,
                "param_dtype": self.param_dtype}

    def kernel_unsupported(self, length: int) -> str | None:
        return "the fused kernels read uniform codes, not codebook indices"

    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> CodebookPart:
        """Quantize `x` `[batch, kv_heads, tokens, head_dim]`; `exclude`d entries do not count in any statistic."""
        rows = self._to_rows(x.float())
        length = rows.shape[-1]
        size, n = self._groups(length)
        valid = torch.ones_like(rows, dtype=torch.bool) if exclude is None else ~self._to_rows(exclude)
        pad = (0, n * size - length)  # padding is invalid, so it never enters a statistic
        rows, valid = torch.nn.functional.pad(rows, pad), torch.nn.functional.pad(valid, pad)
        grouped, valid = rows.reshape(*rows.shape[:-1], n, size), valid.reshape(*rows.shape[:-1], n, size)
        grouped = grouped.masked_fill(~valid, 0.0)
        count = valid.sum(-1, keepdim=True).clamp(min=1)
        center = grouped.sum(-1, keepdim=True) / count if self.centered else None
        if center is not None:
            center = center.to(self.param_dtype).float()  # code against the center that is stored
            grouped = (grouped - center).masked_fill(~valid, 0.0)
        rms = (grouped.square().sum(-1, keepdim=True) / count).sqrt()
        levels = lloyd_max_levels(self.bits).to(x.device)
        edges = (levels[1:] + levels[:-1]) / 2
        codes = torch.bucketize(grouped / rms.clamp(min=torch.finfo(torch.float32).tiny), edges)
        coded = levels[codes].masked_fill(~valid, 0.0)
        # least-squares scale for these codes (0 for an all-zero group)
        scale = (grouped * coded).sum(-1, keepdim=True) / coded.square().sum(-1, keepdim=True).clamp(min=1e-30)
        scale = check_storable(scale.squeeze(-1).to(self.param_dtype), "CodebookQuantizer scales", "param_dtype")
        codes = codes.reshape(*rows.shape[:-1], n * size)[..., :length]
        packed = pack_bits(codes.reshape(x.shape[0], math.prod(self._rows_shape(x.shape)[1:])), self.bits)
        return CodebookPart(packed, scale, None if center is None else center.squeeze(-1).to(self.param_dtype), self.bits,
                            tuple(x.shape))

    def decode(self, part: CodebookPart) -> Tensor:
        """Dequantize: float32 `[batch, kv_heads, tokens, head_dim]`."""
        if part.bits != self.bits:
            raise ValueError(f"part holds {part.bits}-bit codes but this quantizer is {self.bits}-bit")
        codes = self._grouped_codes(part, unpack_bits).long()
        out = lloyd_max_levels(self.bits).to(codes.device)[codes] * part.scale.float()[..., None]
        if part.center is not None:
            out = out + part.center.float()[..., None]
        return self._ungroup(out, part.shape)

    def error_bound(self, part: CodebookPart) -> Tensor:
        """Refused: a Gaussian codebook's outermost cells are unbounded, so there is no per-element bound.

        Raises:
            TypeError: always.
        """
        raise TypeError("a Gaussian codebook's outermost cells are unbounded; there is no per-element bound")

    def extra_repr(self) -> str:
        centered = ", centered=True" if self.centered else ""
        return f"bits={self.bits}, group_size={self.group_size}, axis={self.axis!r}{centered}, param_dtype={self.param_dtype}"
