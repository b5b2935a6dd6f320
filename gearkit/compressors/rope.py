"""The rotary position embedding (RoPE) of a LLaMA-style model, applied and undone from token positions.

Used to code keys before RoPE (CSR dictionaries, pre-RoPE quantization): the rotation smears a key's channel
structure over positions, and it is a rotation, so it can be undone before coding and redone after decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gearkit.compressors.base import text_config


def rope_parameters(config) -> tuple[float | None, str]:
    """`(rope_theta, rope_type)` of a `transformers` config (older configs: `rope_theta` and `rope_scaling`)."""
    text = text_config(config)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    rope = rope if isinstance(rope, dict) else {}
    theta = rope.get("rope_theta", getattr(text, "rope_theta", None))
    kind = rope.get("rope_type", rope.get("type", "default"))
    return (None if theta is None else float(theta)), kind


def inverse_frequencies(head_dim: int, theta: float) -> Tensor:
    """Plain RoPE's inverse frequencies `theta ** (-2i / head_dim)`: float32 `[head_dim / 2]`."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # as transformers computes it


class RoPE(nn.Module):
    """The rotary position embedding of a LLaMA-style model (`transformers`' `rotate_half` convention), applied
    and undone from token positions.

    At position `p` a key `x` becomes `a * (x * cos(p f) + rotate_half(x) * sin(p f))` with the model's inverse
    frequencies `f` (each used twice) and attention scaling `a`; `undo` applies the inverse map.

    Args:
        inv_freq: `[head_dim / 2]` inverse frequencies.
        attention_scaling: the factor the model multiplies cos and sin by (1 for plain RoPE).
    """

    def __init__(self, inv_freq: Tensor, attention_scaling: float = 1.0):
        super().__init__()
        if inv_freq.dim() != 1 or not inv_freq.numel():
            raise ValueError(f"inv_freq must be a non-empty 1-D tensor, got shape {tuple(inv_freq.shape)}")
        if not attention_scaling > 0:
            raise ValueError(f"attention_scaling must be positive, got {attention_scaling}")
        self.register_buffer("inv_freq", inv_freq.detach().float().clone(), persistent=False)
        self.attention_scaling = float(attention_scaling)

    @classmethod
    def from_model(cls, model: nn.Module) -> RoPE:
        """The rotary parameters of a `transformers` model: its rotary embedding module's `inv_freq` and
        `attention_scaling` (the first module that has both)."""
        for module in model.modules():
            if isinstance(getattr(module, "inv_freq", None), Tensor) and hasattr(module, "attention_scaling"):
                return cls(module.inv_freq, module.attention_scaling)
        raise ValueError(f"{type(model).__name__} has no rotary embedding module (inv_freq and attention_scaling)")

    @property
    def head_dim(self) -> int:
        """Dimension of the vectors it rotates."""
        return 2 * self.inv_freq.numel()

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled cos and sin `[..., head_dim / 2]` (float32) for int `positions` `[...]`, as the model computes
        them (the model repeats them over both halves)."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling

    def _turn(self, x: Tensor, positions: Tensor, sign: float) -> Tensor:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"rotary embedding of head dim {self.head_dim} cannot rotate vectors of dim {x.shape[-1]}")
        if positions.shape != (x.shape[0], x.shape[-2]):
            raise ValueError(
                f"positions must be [batch, tokens] = {(x.shape[0], x.shape[-2])}, got {tuple(positions.shape)}"
            )
        cos, sin = (t[:, None] for t in self.cos_sin(positions))
        x = x.float()
        first, second = x[..., : self.head_dim // 2], x[..., self.head_dim // 2 :]
        if sign > 0:  # the model's x * cos + rotate_half(x) * sin, op for op
            return torch.cat([first * cos + -second * sin, second * cos + first * sin], -1)
        scale = self.attention_scaling**2
        return torch.cat([first * cos + second * sin, second * cos - first * sin], -1) / scale

    def apply(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate `x` `KV` to `positions` `[batch, tokens]`; float32 out."""
        return self._turn(x, positions, 1.0)

    def undo(self, x: Tensor, positions: Tensor) -> Tensor:
        """Inverse of `apply`: `x` `KV` as it was before the rotation to
        `positions` `[batch, tokens]`; float32 out."""
        return self._turn(x, positions, -1.0)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, attention_scaling={self.attention_scaling}"
