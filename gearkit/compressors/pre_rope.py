"""Code keys before the rotary embedding: undo RoPE from token positions, encode, redo it after decoding."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gearkit.compressors.base import NO_CONTEXT, Context, Stage, Wrapper, register_stage
from gearkit.compressors.rope import RoPE, inverse_frequencies, rope_parameters
from gearkit.parts import Part, PositionedPart


def whole_pairs(mask: Tensor | None) -> Tensor | None:
    """The entries of bool `mask` `KV` whose RoPE pair (channels `i` and `i + head_dim / 2`) is set on both sides, or
    None when there are none: what stays exact across RoPE's turn of each pair."""
    if mask is None:
        return None
    half = mask.shape[-1] // 2
    both = mask[..., :half] & mask[..., half:]
    return torch.cat([both, both], -1) if both.any() else None


@register_stage
class PreRoPE(Wrapper):
    """Encode keys as they were before the model's rotary embedding, with any inner stage (KVQuant's pre-RoPE keys).

    RoPE turns each pair of channels `(i, i + d/2)` by a position-dependent angle, which smears the strong
    per-channel structure of keys (the reason per-channel quantization works) over positions. This stage undoes
    the rotation from each token's position (`Context.positions`: each batch entry's first position, which the
    cache supplies), lets `inner` encode the pre-RoPE keys, and re-applies the rotation after decoding. The
    rotary parameters are data (`rope_theta`, plain RoPE), so a recipe stays data; `check_model` refuses a model
    whose rotary embedding differs. The first position of each batch entry is stored (int32, `positions`).

    Args:
        inner: the stage that encodes the pre-RoPE keys.
        rope_theta: the model's RoPE base (`config.rope_parameters["rope_theta"]`).
    """

    REQUIRES = frozenset({"positions"})

    def __init__(self, inner: Stage, rope_theta: float = 10000.0):
        super().__init__()
        if not isinstance(inner, Stage):
            raise TypeError(f"PreRoPE wraps a gearkit Stage, got {type(inner).__name__}")
        if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not 1 < rope_theta < math.inf:
            raise ValueError(f"rope_theta must be a finite number > 1, got {rope_theta!r}")
        self.inner, self.rope_theta = inner, float(rope_theta)

    def config(self) -> dict:
        return {"inner": self.inner, "rope_theta": self.rope_theta}

    def check_chunk(self, tokens: int, head_dim: int | None = None) -> None:
        if head_dim is not None and head_dim % 2:
            raise ValueError(f"RoPE turns pairs of channels, so it needs an even head dim, got {head_dim}")
        super().check_chunk(tokens, head_dim)

    def check_model(self, config) -> None:
        """Raise `ValueError` unless the model uses plain RoPE with this stage's `rope_theta`."""
        theta, kind = rope_parameters(config)
        if kind != "default" or theta != self.rope_theta:
            raise ValueError(
                f"PreRoPE codes keys for plain RoPE with theta {self.rope_theta:g}; the model has "
                f"{kind!r} RoPE with theta {theta}"
            )
        super().check_model(config)

    def _rope(self, head_dim: int, device) -> RoPE:
        if head_dim % 2:
            raise ValueError(f"RoPE turns pairs of channels, so it needs an even head dim, got {head_dim}")
        return RoPE(inverse_frequencies(head_dim, self.rope_theta)).to(device)

    @staticmethod
    def _positions(start: Tensor, tokens: int) -> Tensor:
        return start[:, None].long() + torch.arange(tokens, device=start.device)

    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> PositionedPart:
        """Encode keys `x` `KV` at positions `ctx.positions` int `[batch]` (entry
        `i`'s token `t` is at `positions[i] + t`). Exclusions survive where both channels of a turned pair are
        excluded (whole sink tokens)."""
        b, _, t, d = x.shape
        start = ctx.positions
        if start is None:
            raise ValueError("PreRoPE needs each batch entry's first position (positions=...)")
        start = start.to(x.device, torch.int32)
        if start.shape != (b,):
            raise ValueError(f"positions must be [batch] = [{b}], got {tuple(start.shape)}")
        pre = self._rope(d, x.device).undo(x.float(), self._positions(start, t))
        return PositionedPart(self.inner.encode(pre, whole_pairs(exclude), ctx), start)

    def route(self, part: PositionedPart) -> tuple[Stage, Part]:
        return self.inner, part.inner

    def exact_mask(self, part: PositionedPart) -> Tensor | None:
        """Pairs of channels the inner stage stores exactly before RoPE (RoPE turns each pair, as in `encode`),
        bool `KV`, or None."""
        return whole_pairs(self.inner.exact_mask(part.inner))

    # Before RoPE the inner stage codes other vectors than the ones attention reads: the stored-form reads of the
    # inner part do not apply, so decode reads this part decompressed (the Stage defaults).
    scores = Stage.scores
    weighted = Stage.weighted

    def decode(self, part: PositionedPart) -> Tensor:
        """The inner reconstruction turned back to its positions: float32 `KV`."""
        y = self.inner.decode(part.inner)
        return self._rope(y.shape[-1], y.device).apply(y, self._positions(part.start, y.shape[-2]))

    def extra_repr(self) -> str:
        return f"rope_theta={self.rope_theta:g}"
