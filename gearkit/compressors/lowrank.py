"""Low-rank approximation of the residual, stored as two thin factors."""

from __future__ import annotations

import torch
from torch import Tensor

from gearkit.compressors.base import NO_CONTEXT, Context, Stage, register_stage
from gearkit.compressors.checks import MAX_DIM, MAX_ITERS, check_float_dtype, check_int, check_seed, check_storable
from gearkit.parts import LowRankPart

METHODS = ("power", "svd")


def hash_sketch(rows: int, cols: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """A seeded pseudo-random matrix with entries in (-1, 1): float32 `[rows, cols]`.

    Computed from the entry indices by integer hashing (no generator object), so it is the same on every
    device and traceable by `torch.compile`.
    """
    i = torch.arange(rows * cols, device=device, dtype=torch.int64) + (seed * 0x9E3779B1 + 1) % 2**31
    for _ in range(2):  # two rounds of a 31-bit multiplicative xorshift hash
        i = (i ^ (i >> 15)) * 0x2C1B3C6D % 2**31
    return (i.float() / 2**30 - 1.0).reshape(rows, cols)


@register_stage
class LowRankResidual(Stage):
    """Rank-`rank` approximation `left @ right.mT` of each (batch, head) matrix `[tokens, head_dim]`.

    `method="power"` runs seeded subspace (power) iteration: `left` is an orthonormal basis `Q` of the
    dominant column space and `right = R.mT @ Q`, so the term is the projection `Q Q^T R` and can only
    lower the Frobenius error. `method="svd"` uses the exact truncated SVD (the reference). Only the factors
    are stored, in `factor_dtype`.

    Args:
        rank: rank of the approximation, at least 1 and at most `min(tokens, head_dim)` (and `MAX_DIM`).
        method: "power" or "svd".
        iters: power-iteration steps after the initial sketch (at most `MAX_ITERS`).
        seed: seed of the Gaussian sketch.
        factor_dtype: storage dtype of the factors.
    """

    def __init__(
        self, rank: int, method: str = "power", iters: int = 2, seed: int = 0, factor_dtype: torch.dtype = torch.float16
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        check_int(rank, "rank", 1, MAX_DIM)
        check_int(iters, "iters", 0, MAX_ITERS)
        check_seed(seed)
        check_float_dtype(factor_dtype, "factor_dtype")
        self.rank, self.method, self.iters, self.seed, self.factor_dtype = rank, method, iters, seed, factor_dtype

    def config(self) -> dict:
        return {
            "rank": self.rank,
            "method": self.method,
            "iters": self.iters,
            "seed": self.seed,
            "factor_dtype": self.factor_dtype,
        }

    def check_chunk(self, tokens: int, head_dim: int | None = None) -> None:
        """Raise `ValueError` if a chunk of `tokens` tokens (and `head_dim` channels) is too small for the rank."""
        if self.rank > min(tokens, head_dim or tokens):
            raise ValueError(
                f"rank {self.rank} exceeds the matrix size [tokens={tokens}, head_dim={head_dim}]: use "
                f"a rank of at most {min(tokens, head_dim or tokens)} or larger chunks (buffer_size)"
            )

    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> LowRankPart:
        """Factor `x` `KV` (excluded entries count as zero)."""
        r = x.float() if exclude is None else x.float().masked_fill(exclude, 0.0)
        b, h, t, d = r.shape
        if r.numel() == 0:
            return LowRankPart(
                r.new_zeros(b, h, t, 0, dtype=self.factor_dtype), r.new_zeros(b, h, d, 0, dtype=self.factor_dtype)
            )
        self.check_chunk(t, d)
        if self.method == "svd":
            u, s, vh = torch.linalg.svd(r, full_matrices=False)
            root = s[..., : self.rank].sqrt()[..., None, :]  # split the singular values between the factors
            left, right = u[..., : self.rank] * root, vh[..., : self.rank, :].mT * root
        else:
            # One sketch for every matrix: a matrix's factors do not depend on its place in the batch.
            sketch = hash_sketch(d, self.rank, self.seed, r.device)
            q = torch.linalg.qr(r @ sketch).Q
            for _ in range(self.iters):
                q = torch.linalg.qr(r @ (r.mT @ q)).Q
            left, right = q, r.mT @ q
        return LowRankPart(
            check_storable(left.to(self.factor_dtype), "low-rank factors", "LowRankResidual factor_dtype"),
            check_storable(right.to(self.factor_dtype), "low-rank factors", "LowRankResidual factor_dtype"),
        )

    def decode(self, part: LowRankPart) -> Tensor:
        """`left @ right.mT`: float32 `KV`."""
        return part.left.float() @ part.right.float().mT

    # Decode reads the term in factored form: (q right) left^T and (p left) right^T never build the block.
    @staticmethod
    def _factors(part: LowRankPart, chunks: int) -> tuple[Tensor, Tensor]:
        return tuple(t.float().reshape(chunks, -1, *t.shape[1:]) for t in (part.left, part.right))

    def scores(self, part: LowRankPart, q: Tensor, chunks: int) -> Tensor:
        """`q @ x^T` from the factors (see `Stage.scores`): float32 `[chunks, batch, kv_heads, rows, T]`."""
        left, right = self._factors(part, chunks)
        return (q @ right) @ left.mT

    def weighted(self, part: LowRankPart, p: Tensor) -> Tensor:
        """`p @ x` from the factors, summed over chunks (see `Stage.weighted`): `[batch, kv_heads, rows, head_dim]`."""
        left, right = self._factors(part, p.shape[0])
        return ((p @ left) @ right.mT).sum(0)

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, method={self.method!r}, iters={self.iters}, seed={self.seed}, "
            f"factor_dtype={self.factor_dtype}"
        )
