"""A fixed random rotation of each head vector around another stage (incoherence processing)."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from gearkit.compressors.base import NO_CONTEXT, Context, Stage, Wrapper, register_stage
from gearkit.compressors.checks import check_seed
from gearkit.parts import Part


def random_orthogonal(dim: int, seed: int = 0) -> Tensor:
    """A seeded random orthogonal matrix `[dim, dim]` (float32, CPU), Haar-distributed."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # sign fix makes the distribution uniform


_orthogonal = functools.cache(random_orthogonal)  # a QR per call is slower than the rotation itself


def whole_vectors(mask: Tensor | None) -> Tensor | None:
    """The entries of bool `mask` `KV` that make up whole vectors (every channel set), or None when there are none:
    what stays exact across a rotation of each vector."""
    if mask is None:
        return None
    whole = mask.all(-1, keepdim=True).expand_as(mask)
    return whole if whole.any() else None


@register_stage
class Rotation(Wrapper):
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
        self.inner, self.seed = inner, check_seed(seed)

    def config(self) -> dict:
        return {"inner": self.inner, "seed": self.seed}

    def _matrix(self, dim: int, device) -> Tensor:
        return _orthogonal(dim, self.seed).to(device)

    def rotate(self, x: Tensor) -> Tensor:
        """`x @ Q` for float32 `x` `[..., head_dim]`."""
        return x @ self._matrix(x.shape[-1], x.device)

    def unrotate(self, y: Tensor) -> Tensor:
        """`y @ Q^T`, the inverse of `rotate`."""
        return y @ self._matrix(y.shape[-1], y.device).T

    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> Part:
        """Encode the rotated `x` `KV`. A rotation mixes every channel of a vector,
        so only exclusions of whole vectors (sink tokens) survive it."""
        return self.inner.encode(self.rotate(x.float()), whole_vectors(exclude), ctx)

    def decode(self, part: Part) -> Tensor:
        """The inner stage's reconstruction rotated back: float32 `KV`."""
        return self.unrotate(self.inner.decode(part))

    def exact_mask(self, part: Part) -> Tensor | None:
        """Whole vectors the inner stage stores exactly (a rotation mixes every channel of a vector, as in `encode`),
        bool `KV`, or None."""
        return whole_vectors(self.inner.exact_mask(part))

    # An orthogonal rotation keeps dot products: the queries turn (and the output turns back), not the stored vectors.
    def scores(self, part: Part, q: Tensor, chunks: int) -> Tensor:
        """`q @ x^T` = `rotate(q) @ rotate(x)^T` (see `Stage.scores`): `[chunks, batch, kv_heads, rows, T]`."""
        return self.inner.scores(part, self.rotate(q), chunks)

    def weighted(self, part: Part, p: Tensor) -> Tensor:
        """`p @ x` = `unrotate(p @ rotate(x))` (see `Stage.weighted`): `[batch, kv_heads, rows, head_dim]`."""
        return self.unrotate(self.inner.weighted(part, p))

    def extra_repr(self) -> str:
        return f"seed={self.seed}"


DENSE_HADAMARD_UP_TO = 256  # head dims up to this are transformed by one product with the cached matrix


def _butterflies(x: Tensor) -> Tensor:
    """`x @ H` (unnormalised) by log2(d) passes of butterflies `(a, b) -> (a + b, a - b)` of growing width."""
    d = x.shape[-1]
    lead, h = x.shape[:-1], 1
    while h < d:
        pairs = x.reshape(*lead, d // (2 * h), 2, h)
        x = torch.stack([pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]], -2).reshape(
            *lead, d
        )
        h *= 2
    return x


@functools.cache
def _hadamard_matrix(d: int) -> Tensor:
    """The orthonormal Hadamard matrix `[d, d]` (float32, CPU), in the butterflies' order."""
    return _butterflies(torch.eye(d)) / math.sqrt(d)


def hadamard_transform(x: Tensor) -> Tensor:
    """The orthonormal Walsh-Hadamard transform along the last axis: `x @ H / sqrt(d)`.

    It is its own inverse. Up to `DENSE_HADAMARD_UP_TO` channels it is one product with the cached matrix (a
    BLAS product beats log2(d) strided passes by ~10x at d = 64 on a CPU), above that O(d log d) butterflies.

    Args:
        x: float `[..., d]`, `d` a power of two.

    Returns:
        float `[..., d]`.

    Raises:
        ValueError: if `d` is not a power of two.
    """
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"the fast Hadamard transform needs a power-of-two head dim, got {d} (use Rotation)")
    if d <= DENSE_HADAMARD_UP_TO:
        return x @ _hadamard_matrix(d).to(x.device, x.dtype)
    return _butterflies(x) / math.sqrt(d)


@register_stage
class HadamardRotation(Rotation):
    """A randomized Hadamard rotation around another stage: random signs, then the fast Walsh-Hadamard transform.

    Like `Rotation` but with a structured matrix (no QR to build, see `hadamard_transform`), and only for
    power-of-two head dims (others get a clear error). Nothing is stored but the seed of the signs.

    Args:
        inner: the stage that encodes the rotated tensor.
        seed: seed of the random signs.
    """

    def check_chunk(self, tokens: int, head_dim: int | None = None) -> None:
        if head_dim is not None and head_dim & (head_dim - 1):
            raise ValueError(f"HadamardRotation needs a power-of-two head dim, got {head_dim}")
        super().check_chunk(tokens, head_dim)

    def _signs(self, dim: int, device) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        return (torch.randint(0, 2, (dim,), generator=gen) * 2 - 1).float().to(device)

    def rotate(self, x: Tensor) -> Tensor:
        """`H (s * x) / sqrt(d)` for float32 `x` `[..., head_dim]`."""
        return hadamard_transform(x * self._signs(x.shape[-1], x.device))

    def unrotate(self, y: Tensor) -> Tensor:
        """The inverse of `rotate`."""
        return hadamard_transform(y) * self._signs(y.shape[-1], y.device)
