"""Non-uniform scalar quantization: Lloyd-Max codebooks for Gaussian coordinates, bit-packed codes.

After a random rotation every coordinate of a head vector is close to Gaussian whatever the data (TurboQuant), so
one fixed codebook, optimal for N(0, 1), fits every layer and head once each group is divided by its RMS: nothing
is calibrated and nothing but the codes and one scale per group is stored.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gearkit.compressors.base import NO_CONTEXT, Context, register_stage
from gearkit.compressors.checks import Axis, check_bool, check_storable
from gearkit.compressors.quantizer import Quantizer
from gearkit.kernels.reference import check_bits, pack_bits, unpack_bits
from gearkit.parts import QuantizedPart


@functools.cache
def _levels(bits: int) -> tuple[float, ...]:
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    n = 2**bits
    levels = normal.icdf((torch.arange(n, dtype=torch.float64) + 0.5) / n)  # start from equal-mass cells
    for _ in range(1000):  # Lloyd's iteration on the density: levels are the centroids of their cells
        edges = torch.cat(
            [levels.new_tensor([-math.inf]), (levels[1:] + levels[:-1]) / 2, levels.new_tensor([math.inf])]
        )
        pdf, cdf = normal.log_prob(edges).exp(), normal.cdf(edges)
        new = (pdf[:-1] - pdf[1:]) / (cdf[1:] - cdf[:-1])  # E[X | a < X < b] for a standard normal
        if torch.allclose(new, levels, rtol=0, atol=1e-12):
            break
        levels = new
    return tuple(levels.tolist())


@functools.cache
def _level_table(bits: int, levels: tuple[float, ...] | None, device: torch.device) -> Tensor:
    """A codebook's levels on `device`, built once (decode reads them for every block)."""
    table = lloyd_max_levels(bits) if levels is None else torch.tensor(levels, dtype=torch.float32)
    return table.to(device)


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


def kmeans_levels(samples: Tensor, bits: int, weights: Tensor | None = None, iterations: int = 100) -> Tensor:
    """A calibrated codebook: 1-D k-means (Lloyd's iteration on data) of RMS-normalised entries.

    Starts from the Lloyd-Max levels, so a Gaussian sample gives them back; a cell that empties keeps its level.

    Args:
        samples: float `[n]`, the normalised entries (e.g. `x / rms` of each group, as `CodebookQuantizer` codes them).
        bits: code width, one of 1, 2, 3, 4, 8.
        weights: optional non-negative float `[n]` (sensitivity-weighted k-means), default all 1.
        iterations: at most this many Lloyd steps.

    Returns:
        float32 `[2**bits]`, ascending.
    """
    x = samples.double().flatten()
    w = torch.ones_like(x) if weights is None else weights.double().flatten()
    levels = lloyd_max_levels(bits).double()
    for _ in range(iterations):
        cells = torch.bucketize(x, (levels[1:] + levels[:-1]) / 2)
        mass = torch.zeros_like(levels).index_add_(0, cells, w)
        total = torch.zeros_like(levels).index_add_(0, cells, w * x)
        new = torch.where(mass > 0, total / mass.clamp(min=1e-300), levels)
        if torch.allclose(new, levels, rtol=0, atol=1e-9):
            break
        levels = new
    return levels.sort().values.float()


@register_stage
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
        levels: a calibrated codebook instead of the Gaussian one: `2**bits` ascending finite numbers, the levels
            of RMS-normalised entries (KVQuant's non-uniform datatypes, fit by k-means on calibration data: see
            `kmeans_levels`). Part of the configuration, so a recipe carries its codebooks as data.

    Raises:
        ValueError: for levels that are not `2**bits` ascending finite numbers.
    """

    def __init__(
        self,
        bits: int,
        group_size: int | None = None,
        axis: Axis = "token",
        centered: bool = False,
        param_dtype: torch.dtype = torch.float16,
        levels: Sequence[float] | None = None,
    ):
        super().__init__(bits, group_size, axis, False, param_dtype)
        check_bool(centered, "centered")
        if levels is not None:
            numbers = not isinstance(levels, (str, bytes)) and isinstance(levels, Sequence)
            numbers = numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in levels)
            if (
                not numbers
                or len(levels) != 2**bits
                or not all(map(math.isfinite, levels))
                or any(a >= b for a, b in itertools.pairwise(levels))
            ):
                raise ValueError(f"a {bits}-bit codebook needs {2**bits} ascending finite levels, got {levels!r}")
            levels = tuple(map(float, levels))
        self.centered, self.levels = centered, levels

    def config(self) -> dict:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "axis": self.axis,
            "centered": self.centered,
            "param_dtype": self.param_dtype,
            "levels": None if self.levels is None else list(self.levels),
        }

    def codebook(self, device=None) -> Tensor:
        """The levels codes index: float32 `[2**bits]` (calibrated if given, else `lloyd_max_levels(bits)`)."""
        return _level_table(self.bits, self.levels, torch.device(device or "cpu"))

    def kernel_unsupported(self, length: int) -> str | None:
        return "the fused kernels read uniform codes, not codebook indices"

    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> QuantizedPart:
        """Quantize `x` `KV`; `exclude`d entries do not count in any statistic."""
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
        levels = self.codebook(x.device)
        edges = (levels[1:] + levels[:-1]) / 2
        codes = torch.bucketize(grouped / rms.clamp(min=torch.finfo(torch.float32).tiny), edges)
        coded = levels[codes].masked_fill(~valid, 0.0)
        # least-squares scale for these codes (0 for an all-zero group)
        scale = (grouped * coded).sum(-1, keepdim=True) / coded.square().sum(-1, keepdim=True).clamp(min=1e-30)
        scale = check_storable(scale.squeeze(-1).to(self.param_dtype), "CodebookQuantizer scales", "param_dtype")
        codes = codes.reshape(*rows.shape[:-1], n * size)[..., :length]
        packed = pack_bits(codes.reshape(x.shape[0], math.prod(self._rows_shape(x.shape)[1:])), self.bits)
        return QuantizedPart(
            packed,
            scale,
            None if center is None else center.squeeze(-1).to(self.param_dtype),
            self.bits,
            tuple(x.shape),
        )

    def decode(self, part: QuantizedPart) -> Tensor:
        """Dequantize: float32 `KV`."""
        if part.bits != self.bits:
            raise ValueError(f"part holds {part.bits}-bit codes but this quantizer is {self.bits}-bit")
        codes = self._grouped_codes(part, unpack_bits).long()
        out = (
            self.codebook(codes.device).index_select(0, codes.flatten()).view(codes.shape)
            * part.scale.float()[..., None]
        )
        if part.zero is not None:
            out = out + part.zero.float()[..., None]
        return self._ungroup(out, part.shape)

    def error_bound(self, part: QuantizedPart) -> Tensor:
        """Refused: a Gaussian codebook's outermost cells are unbounded, so there is no per-element bound.

        Raises:
            TypeError: always.
        """
        raise TypeError("a Gaussian codebook's outermost cells are unbounded; there is no per-element bound")

    def extra_repr(self) -> str:
        centered = ", centered=True" if self.centered else ""
        calibrated = ", calibrated levels" if self.levels is not None else ""
        return (
            f"bits={self.bits}, group_size={self.group_size}, axis={self.axis!r}{centered}{calibrated}, "
            f"param_dtype={self.param_dtype}"
        )
