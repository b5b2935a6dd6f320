"""A fixed random rotation of each head vector around another stage (incoherence processing)."""

from __future__ import annotations

import torch
from torch import Tensor

from gearkit.compressed import Part
from gearkit.compressors.base import NO_CONTEXT, Context, Stage
from gearkit.compressors.checks import check_int


def random_orthogonal(dim: int, seed: int = 0) -> Tensor:
    """A seeded random orthogonal matrix `[dim, dim]` (float32, CPU), Haar-distributed."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # sign fix makes the distribution uniform


class Rotation(Stage):
    """Encode `x @ Q` with `inner` and decode back with `Q^T`, for a fixed seeded orthogonal `Q` per head dim.

    A rotation spreads a few large channels over all channels, so per-token quantization of rotated vectors
    has smaller ranges and smaller error; it is orthogonal, so errors keep their size when rotated back, and
    it costs no stored bytes (`Q` is regenerated from the seed). The inner stage's part is stored as is.

    Args:
        inner: the stage that encodes the rotated tensor.
        seed: seed of the rotation.
    """

    def __init__(self, inner: Stage, seed: int = 0):
        super().__init__()
        if not isinstance(inner, Stage):
            raise TypeError(f"Rotation wraps a gearkit Stage, got {type(inner).__name__}")
        self.inner, self.seed = inner, check_int(seed, "seed", 0)

    @property
    def requires(self) -> frozenset[str]:
        return self.inner.requires

    def config(self) -> dict:
        return {"inner": self.inner, "seed": self.seed}

    def check_chunk(self, tokens: int, head_dim: int | None = None) -> None:
        self.inner.check_chunk(tokens, head_dim)

    def _matrix(self, dim: int, device) -> Tensor:
        return random_orthogonal(dim, self.seed).to(device)

    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> Part:
        """Encode `x @ Q`, `x` `[batch, kv_heads, tokens, head_dim]` (exclusions do not survive a rotation)."""
        return self.inner.encode(x.float() @ self._matrix(x.shape[-1], x.device), None, ctx)

    def decode(self, part: Part) -> Tensor:
        """`inner.decode(part) @ Q^T`: float32 `[batch, kv_heads, tokens, head_dim]`."""
        y = self.inner.decode(part)
        return y @ self._matrix(y.shape[-1], y.device).T

    def extra_repr(self) -> str:
        return f"seed={self.seed}"
