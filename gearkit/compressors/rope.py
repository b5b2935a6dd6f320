"""The rotary position embedding (RoPE) of a model, applied and undone from token positions.

Used to code keys before RoPE (CSR dictionaries, pre-RoPE quantization): the rotation smears a key's channel
structure over positions, and it is a rotation, so it can be undone before coding and redone after decoding.
`gearkit.models.family` reads each layer's rotary embedding from a model's config; a cache hands it to the stages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def inverse_frequencies(rotary_dim: int, theta: float) -> Tensor:
    """Plain RoPE's inverse frequencies `theta ** (-2i / rotary_dim)`: float32 `[rotary_dim / 2]`."""
    steps = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float()
    return 1.0 / (theta ** (steps / rotary_dim))  # as transformers computes them


class RoPE:
    """A model's rotary position embedding: which channels it turns in pairs, by which frequencies, at which scale.

    At position `p` each pair `(a, b)` of the rotated channels becomes `s * (a cos(p f) - b sin(p f), b cos(p f) +
    a sin(p f))` with the pair's inverse frequency `f` and the attention scaling `s`, op for op as `transformers`
    computes it; `undo` applies the inverse map. The first `rotary_dim = 2 * len(inv_freq)` channels are turned
    (partial rotary: GPT-NeoX, StableLM, Phi, GLM), the rest pass unchanged; pairs are half-split (channels `i` and
    `i + rotary_dim / 2`, `rotate_half`: Llama and most families) or interleaved (channels `2i` and `2i + 1`: Cohere,
    GLM). A layer without RoPE (NoPE) has no frequencies: both maps are the identity.

    A `RoPE` is a value (equal and hashable by its parameters), so a stored part keeps it as static metadata, with
    no bytes, to decode without a context.

    Args:
        inv_freq: `[rotary_dim / 2]` inverse frequencies (a tensor or numbers; held as float32).
        attention_scaling: the factor the model multiplies cos and sin by (1 for plain RoPE; YaRN's is larger).
        head_dim: the dimension of the vectors it rotates (default: `rotary_dim`, no channel passes unchanged).
        interleaved: whether pairs are adjacent channels rather than the two halves of the rotated channels.

    Raises:
        ValueError: for non-finite or non-1-D frequencies, a non-positive scaling, or a head dim below the rotary dim.
    """

    def __init__(
        self,
        inv_freq: Tensor | Sequence[float],
        attention_scaling: float = 1.0,
        head_dim: int | None = None,
        interleaved: bool = False,
    ):
        freqs = torch.as_tensor(inv_freq, dtype=torch.float32).detach().cpu()
        if freqs.dim() != 1 or not torch.isfinite(freqs).all():
            raise ValueError(f"inv_freq must be a finite 1-D tensor, got shape {tuple(freqs.shape)}")
        if not attention_scaling > 0:
            raise ValueError(f"attention_scaling must be positive, got {attention_scaling}")
        rotary = 2 * freqs.numel()
        head_dim = rotary if head_dim is None else head_dim
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < max(rotary, 1):
            raise ValueError(f"head_dim must be an int of at least the rotary dim {rotary}, got {head_dim!r}")
        self._freqs = freqs
        self.attention_scaling = float(attention_scaling)
        self.head_dim, self.interleaved = head_dim, bool(interleaved)
        self._key = (tuple(freqs.tolist()), self.attention_scaling, head_dim, self.interleaved)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> RoPE:
        """The rotary parameters of a `transformers` model's first rotary embedding module (`inv_freq` and
        `attention_scaling`), half-split over the rotary dim. Models with several rotary embeddings (Gemma 3),
        partial rotary or interleaved pairs: `gearkit.models.model_family(config)` reads each layer's from the
        config."""
        for module in model.modules():
            if isinstance(getattr(module, "inv_freq", None), Tensor) and hasattr(module, "attention_scaling"):
                return cls(module.inv_freq, module.attention_scaling)
        raise ValueError(f"{type(model).__name__} has no rotary embedding module (inv_freq and attention_scaling)")

    @property
    def inv_freq(self) -> Tensor:
        """The inverse frequencies, float32 `[rotary_dim / 2]`."""
        return self._freqs

    @property
    def rotary_dim(self) -> int:
        """Channels it turns (the first ones)."""
        return 2 * self._freqs.numel()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RoPE) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        pairs = "interleaved" if self.interleaved else "half-split"
        return (
            f"RoPE(head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, {pairs}, "
            f"attention_scaling={self.attention_scaling:g})"
        )

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled cos and sin `[..., rotary_dim / 2]` (float32) for int `positions` `[...]`, as the model computes
        them (the model repeats them over both channels of each pair)."""
        freqs = positions[..., None].float() * self._freqs.to(positions.device)
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling

    def _pairs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The first and second channel of each turned pair, `[..., rotary_dim / 2]`, and the channels passed."""
        r = self.rotary_dim
        turned, passed = x[..., :r], x[..., r:]
        if self.interleaved:
            return turned[..., 0::2], turned[..., 1::2], passed
        return turned[..., : r // 2], turned[..., r // 2 :], passed

    def _join(self, first: Tensor, second: Tensor, passed: Tensor) -> Tensor:
        turned = torch.stack([first, second], -1).flatten(-2) if self.interleaved else torch.cat([first, second], -1)
        return torch.cat([turned, passed], -1)

    def _turn(self, x: Tensor, positions: Tensor, forward: bool) -> Tensor:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"rotary embedding of head dim {self.head_dim} cannot rotate vectors of dim {x.shape[-1]}")
        if positions.shape != (x.shape[0], x.shape[-2]):
            raise ValueError(
                f"positions must be [batch, tokens] = {(x.shape[0], x.shape[-2])}, got {tuple(positions.shape)}"
            )
        x = x.float()
        if not self.rotary_dim:
            return x
        cos, sin = (t[:, None] for t in self.cos_sin(positions))
        first, second, passed = self._pairs(x)
        if forward:  # the model's x * cos + rotate_half(x) * sin, op for op
            return self._join(first * cos + -second * sin, second * cos + first * sin, passed)
        scale = self.attention_scaling**2
        return self._join((first * cos + second * sin) / scale, (second * cos - first * sin) / scale, passed)

    def apply(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate `x` `KV` to `positions` `[batch, tokens]`; float32 out."""
        return self._turn(x, positions, True)

    def undo(self, x: Tensor, positions: Tensor) -> Tensor:
        """Inverse of `apply`: `x` `KV` as it was before the rotation to `positions` `[batch, tokens]`; float32 out."""
        return self._turn(x, positions, False)

    def whole_pairs(self, mask: Tensor | None) -> Tensor | None:
        """The entries of bool `mask` `KV` that stay exact across the rotation: both channels of a turned pair set,
        or a channel that is not turned; None when there are none."""
        if mask is None:
            return None
        first, second, passed = self._pairs(mask)
        both = first & second
        kept = self._join(both, both, passed)
        return kept if kept.any() else None
