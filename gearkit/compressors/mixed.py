"""ZipCache's mixed precision: salient tokens through one stage (more bits), the others through another.

`MixedPrecision` keeps the `round(ratio * tokens)` most salient tokens of each (batch, KV head) in one stage
(e.g. 4-bit) and the rest in another (e.g. 2-bit). Which token is which is a bit-packed mask, one bit per
token per KV head, stored in the part and counted as the `saliency_map` component. Saliency comes in the stage
context (`Context.saliency`, see `gearkit.compressors.probes` for how a cache scores it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gearkit.compressors.base import NO_CONTEXT, Context, Stage, Wrapper, register_stage
from gearkit.compressors.checks import check_fraction
from gearkit.kernels.reference import pack_bits, unpack_bits
from gearkit.parts import MixedPart


def salient_count(tokens: int, ratio: float) -> int:
    """Number of salient tokens among `tokens`: `round(ratio * tokens)`."""
    return round(ratio * tokens)


def salient_mask(saliency: Tensor, ratio: float) -> Tensor:
    """The `salient_count(tokens, ratio)` highest-scoring tokens of each (batch, KV head).

    Args:
        saliency: float `[batch, kv_heads, tokens]` (`-inf` allowed, NaN not).
        ratio: fraction of tokens marked salient.

    Returns:
        bool `[batch, kv_heads, tokens]` with exactly that many True per (batch, KV head); ties go to the
        earlier token.
    """
    if saliency.dim() != 3:
        raise ValueError(f"saliency must be [batch, kv_heads, tokens], got shape {tuple(saliency.shape)}")
    if torch.isnan(saliency).any():
        raise ValueError("saliency contains NaN")
    k = salient_count(saliency.shape[-1], ratio)
    order = torch.sort(saliency.float(), dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros(saliency.shape, dtype=torch.bool, device=saliency.device).scatter(-1, order, True)


@register_stage
class MixedPrecision(Wrapper):
    """Salient tokens through one stage (more bits), the others through another (fewer bits).

    Per (batch, KV head) the `round(ratio * tokens)` tokens with the highest saliency go to `high`, the rest to
    `low`; each sees only its own tokens (in sequence order), so per-channel stages fit their ranges to their
    own subset. The part holds both parts and the bit-packed salient map (`ceil(batch-entry heads * tokens / 8)`
    bytes per batch entry, component `saliency_map`).

    Saliency is per-request data and comes in the context (`ctx.saliency`); the stage holds only configuration.
    The inner stages see a token subset, so they get the context's layer but not its saliency or positions.

    Args:
        high: stage for the salient tokens, e.g. `Quantizer(4, None, "channel")`.
        low: stage for the other tokens, e.g. `Quantizer(2, None, "channel")`.
        ratio: fraction of salient tokens per chunk, in [0, 1].
    """

    REQUIRES = frozenset({"saliency"})

    def __init__(self, high: Stage, low: Stage, ratio: float = 0.4):
        super().__init__()
        for name, s in (("high", high), ("low", low)):
            if not isinstance(s, Stage) or s.requires - {"layer"}:
                raise TypeError(
                    f"MixedPrecision {name} must be a gearkit Stage that needs no saliency or positions, got {s!r}"
                )
        self.high, self.low, self.ratio = high, low, check_fraction(ratio, "ratio")

    def held(self) -> list[Stage]:
        return [self.high] if self.high is self.low else [self.high, self.low]

    def config(self) -> dict:
        return {"high": self.high, "low": self.low, "ratio": self.ratio}

    def check_chunk(self, tokens: int, head_dim: int | None = None) -> None:
        for s, n in (
            (self.high, salient_count(tokens, self.ratio)),
            (self.low, tokens - salient_count(tokens, self.ratio)),
        ):
            s.check_chunk(n, head_dim)

    @staticmethod
    def _split(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """`x` `[b, h, t, ...]` into its `mask`ed and un-masked tokens, `[b, h, k, ...]` and `[b, h, t - k, ...]`."""
        b, h, t = mask.shape
        k = int(mask[0, 0].sum()) if mask.numel() else 0
        return x[mask].reshape(b, h, k, *x.shape[3:]), x[~mask].reshape(b, h, t - k, *x.shape[3:])

    @staticmethod
    def _merge(high: Tensor, low: Tensor, mask: Tensor) -> Tensor:
        out = high.new_empty(*mask.shape, *high.shape[3:])
        out[mask] = high.flatten(0, 2)
        out[~mask] = low.flatten(0, 2)
        return out

    def salient(self, part: MixedPart) -> Tensor:
        """The salient map of a part: bool `[batch, kv_heads, tokens]`."""
        b, h, t, _ = part.shape
        return unpack_bits(part.salient, 1, h * t).reshape(b, h, t).bool()

    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> MixedPart:
        """Split `x` `KV` by saliency and encode both halves.

        Args:
            x: the tensor.
            exclude: optional bool tensor shaped like `x` (entries stored exactly elsewhere).
            ctx: `ctx.saliency` float `[batch, kv_heads, tokens]`, higher = more salient (see
                `gearkit.compressors.probes.normalized_saliency`).

        Raises:
            ValueError: if the saliency is missing or does not match `x`.
        """
        saliency = ctx.saliency
        if saliency is None:
            raise ValueError(
                "MixedPrecision needs per-token saliency scores [batch, kv_heads, tokens] (a ZipCache "
                "cache computes them from probe queries; pass saliency= to Pipeline.compress)"
            )
        if tuple(saliency.shape) != tuple(x.shape[:3]):
            raise ValueError(
                f"saliency must be [batch, kv_heads, tokens] = {tuple(x.shape[:3])}, got {tuple(saliency.shape)}"
            )
        mask = salient_mask(saliency.to(x.device), self.ratio)
        xs, xl = self._split(x, mask)
        es, el = (None, None) if exclude is None else self._split(exclude, mask)
        b, h, t = mask.shape
        packed = pack_bits(mask.reshape(b, h * t).to(torch.uint8), 1)
        inner = Context(layer=ctx.layer)
        return MixedPart(packed, self.high.encode(xs, es, inner), self.low.encode(xl, el, inner), tuple(x.shape))

    def decode(self, part: MixedPart) -> Tensor:
        """float32 `KV`."""
        return self._merge(self.high.decode(part.high), self.low.decode(part.low), self.salient(part))

    def _both(self, fn_name: str, part: MixedPart) -> Tensor | None:
        high, low = getattr(self.high, fn_name, None), getattr(self.low, fn_name, None)
        if high is None or low is None:
            return None
        hs, ls = high(part.high), low(part.low)
        if hs is None and ls is None:
            return None
        mask = self.salient(part)
        b, h, t, d = part.shape
        k = int(mask[0, 0].sum()) if mask.numel() else 0
        hs = torch.zeros(b, h, k, d, dtype=torch.bool, device=mask.device) if hs is None else hs
        ls = torch.zeros(b, h, t - k, d, dtype=torch.bool, device=mask.device) if ls is None else ls
        return self._merge(hs, ls.to(hs.device), mask.to(hs.device))

    def _order(self, part: MixedPart) -> tuple[Tensor, int]:
        """Each (entry, KV head)'s tokens, salient ones first, each group in sequence order: long
        `[batch, kv_heads, tokens]`, and how many are salient."""
        mask = self.salient(part)
        salient = int(mask[0, 0].sum()) if mask.numel() else 0
        return torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices, salient

    # Stored-form reads: each child reads its own tokens' part; the salient map puts the tokens back in place.
    def scores(self, part: MixedPart, q: Tensor, chunks: int) -> Tensor:
        """`q @ x^T` from the two children's stored forms (see `Stage.scores`): `[chunks, batch, kv_heads, rows, T]`."""
        order, salient = self._order(part)
        sides = [
            (s, p) for s, p, n in ((self.high, part.high, salient), (self.low, part.low, part.shape[2] - salient)) if n
        ]
        by_order = torch.cat([s.scores(p, q, chunks) for s, p in sides], -1)  # [chunks, batch, heads, rows, T]
        where = order.reshape(chunks, -1, *order.shape[1:])[:, :, :, None].expand_as(by_order)
        return torch.empty_like(by_order).scatter_(-1, where, by_order)

    def weighted(self, part: MixedPart, p: Tensor) -> Tensor:
        """`p @ x` from the two children's stored forms, summed over chunks (see `Stage.weighted`)."""
        order, salient = self._order(part)
        by_order = p.gather(-1, order.reshape(p.shape[0], -1, *order.shape[1:])[:, :, :, None].expand_as(p))
        out = [
            s.weighted(x, w)
            for s, x, w in (
                (self.high, part.high, by_order[..., :salient]),
                (self.low, part.low, by_order[..., salient:]),
            )
            if w.shape[-1]
        ]
        return sum(out)

    def exact_mask(self, part: MixedPart) -> Tensor | None:
        """Entries the inner stages store exactly, bool `KV`, or None."""
        return self._both("exact_mask", part)

    def error_bound(self, part: MixedPart) -> Tensor:
        """Per-element error bound of the inner stages (both must define `error_bound`): float32, `x`'s shape."""
        bound = self._both("error_bound", part)
        if bound is None:
            raise TypeError("error_bound needs inner stages that define error_bound")
        return bound

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}"
