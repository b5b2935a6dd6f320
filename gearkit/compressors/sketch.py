"""QJL: a 1-bit sign sketch, for unbiased inner products with what earlier stages left over."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from gearkit.compressors.base import NO_CONTEXT, Context, Stage, register_stage
from gearkit.compressors.checks import MAX_SKETCH, check_float_dtype, check_int, check_seed, check_storable
from gearkit.kernels.reference import pack_bits, unpack_bits
from gearkit.parts import SketchPart


@functools.cache
def _gaussian(size: int, dim: int, seed: int) -> Tensor:
    """The seeded sketch matrix `S`: float32 `[size, dim]` of independent N(0, 1) entries (CPU)."""
    return torch.randn(size, dim, generator=torch.Generator().manual_seed(seed))


@register_stage
class SignSketch(Stage):
    """QJL (Zandieh et al., 2024): each vector `x` is multiplied by a seeded Gaussian matrix `S` `[m, head_dim]`
    and only the signs of `S x` are stored (`m` bits, packed), with one scale per vector (its norm). It decodes to
    `sqrt(pi/2) / m * |x| * S^T sign(S x)`, whose inner product with any query is an unbiased estimate of the
    query's inner product with `x` (in expectation over `S`). That is what TurboQuant adds after its MSE quantizer:
    put last in a pipeline, it sketches the residual, so attention scores are unbiased; the price is variance,
    not bias: the decoded vector's mean squared error is about `pi/2 * head_dim / m * |x|^2`.

    Args:
        size: sketch length `m` per vector (at most `MAX_SKETCH`), or None for the head dim (one bit per element).
        seed: seed of `S` (nothing of it is stored).
        param_dtype: dtype of the stored scale.
    """

    def __init__(self, size: int | None = None, seed: int = 0, param_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.size = None if size is None else check_int(size, "SignSketch size", 1, MAX_SKETCH)
        self.seed = check_seed(seed)
        self.param_dtype = check_float_dtype(param_dtype, "param_dtype")

    def config(self) -> dict:
        return {"size": self.size, "seed": self.seed, "param_dtype": self.param_dtype}

    def _matrix(self, dim: int, device) -> Tensor:
        return _gaussian(self.size or dim, dim, self.seed).to(device)

    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> SketchPart:
        """Sketch `x` `KV`; `exclude`d entries count as 0."""
        x = x.float() if exclude is None else x.float().masked_fill(exclude, 0.0)
        s = self._matrix(x.shape[-1], x.device)
        signs = (x @ s.T >= 0).to(torch.uint8)  # [batch, kv_heads, tokens, m]
        scale = x.norm(dim=-1, keepdim=True) * math.sqrt(math.pi / 2) / s.shape[0]
        scale = check_storable(scale.to(self.param_dtype), "SignSketch scales", "param_dtype")
        packed = pack_bits(signs.reshape(x.shape[0], math.prod(signs.shape[1:])), 1)
        return SketchPart(packed, scale, s.shape[0], tuple(x.shape))

    def decode(self, part: SketchPart) -> Tensor:
        """The unbiased estimate `scale * S^T sign`: float32 `KV`."""
        b, h, t, d = part.shape
        s = self._matrix(d, part.signs.device)
        signs = unpack_bits(part.signs, 1, h * t * part.size).reshape(b, h, t, part.size).float() * 2 - 1
        return part.scale.float() * (signs @ s)

    def extra_repr(self) -> str:
        return f"size={self.size}, seed={self.seed}, param_dtype={self.param_dtype}"
