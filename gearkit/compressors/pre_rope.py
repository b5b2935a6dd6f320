"""Code keys before the rotary embedding: undo RoPE from token positions, encode, redo it after decoding."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gearkit.compressors.base import NO_CONTEXT, Context, Stage, Wrapper, register_stage
from gearkit.deprecation import ignored_argument
from gearkit.parts import Part, PositionedPart


@register_stage
class PreRoPE(Wrapper):
    """Encode keys as they were before the model's rotary embedding, with any inner stage (KVQuant's pre-RoPE keys).

    RoPE turns pairs of channels by a position-dependent angle, which smears the strong per-channel structure of
    keys (the reason per-channel quantization works) over positions. This stage undoes the rotation from each
    token's position (`Context.positions`: each batch entry's first position, which the cache supplies), lets
    `inner` encode the pre-RoPE keys, and re-applies the rotation after decoding. The rotation is the model's own
    (`Context.rope`: base, scaling, partial rotary dim, interleaved or half-split pairs, per layer type), which the
    cache reads from the model's config, so a recipe holds no model constant and serves any RoPE model. The first
    position of each batch entry is stored (int32, `positions`); the part keeps the rotation as static metadata.

    Args:
        inner: the stage that encodes the pre-RoPE keys.
        rope_theta: ignored (the cache supplies the model's rotary embedding); accepted with a `DeprecationWarning`
            so recipe data written before stays readable.
    """

    REQUIRES = frozenset({"positions", "rope"})

    def __init__(self, inner: Stage, rope_theta: float | None = None):
        super().__init__()
        if not isinstance(inner, Stage):
            raise TypeError(f"PreRoPE wraps a gearkit Stage, got {type(inner).__name__}")
        if rope_theta is not None:
            if (
                isinstance(rope_theta, bool)
                or not isinstance(rope_theta, (int, float))
                or not 1 < rope_theta < math.inf
            ):
                raise ValueError(f"rope_theta must be a finite number > 1, got {rope_theta!r}")
            ignored_argument("PreRoPE", "rope_theta", "the cache supplies the model's rotary embedding from its config")
        self.inner = inner

    def config(self) -> dict:
        return {"inner": self.inner}

    @staticmethod
    def _positions(start: Tensor, tokens: int) -> Tensor:
        return start[:, None].long() + torch.arange(tokens, device=start.device)

    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> PositionedPart:
        """Encode keys `x` `KV` at positions `ctx.positions` int `[batch]` (entry `i`'s token `t` is at
        `positions[i] + t`) under the rotary embedding `ctx.rope`. Exclusions survive where both channels of a turned
        pair are excluded (whole sink tokens)."""
        b, _, t, _ = x.shape
        start, rope = ctx.positions, ctx.rope
        if start is None or rope is None:
            raise ValueError("PreRoPE needs each batch entry's first position and the layer's rotary embedding")
        start = start.to(x.device, torch.int32)
        if start.shape != (b,):
            raise ValueError(f"positions must be [batch] = [{b}], got {tuple(start.shape)}")
        pre = rope.undo(x.float(), self._positions(start, t))
        return PositionedPart(self.inner.encode(pre, rope.whole_pairs(exclude), ctx), start, rope)

    def route(self, part: PositionedPart) -> tuple[Stage, Part]:
        return self.inner, part.inner

    def exact_mask(self, part: PositionedPart) -> Tensor | None:
        """Entries the inner stage stores exactly before RoPE that stay exact once it is redone (whole turned pairs,
        channels RoPE does not turn), bool `KV`, or None."""
        return part.rope.whole_pairs(self.inner.exact_mask(part.inner))

    # Before RoPE the inner stage codes other vectors than the ones attention reads: the stored-form reads of the
    # inner part do not apply, so decode reads this part decompressed (the Stage defaults).
    scores = Stage.scores
    weighted = Stage.weighted

    def decode(self, part: PositionedPart) -> Tensor:
        """The inner reconstruction turned back to its positions: float32 `KV`."""
        y = self.inner.decode(part.inner)
        return part.rope.apply(y, self._positions(part.start, y.shape[-2]))
