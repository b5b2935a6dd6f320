"""ZipCache's channel-separable tokenwise quantization (CSTQuant)."""

from __future__ import annotations

import torch
from torch import Tensor

from gearkit.compressors.base import NO_CONTEXT, Context, Stage, register_stage
from gearkit.compressors.checks import check_storable
from gearkit.compressors.quantizer import Quantizer
from gearkit.parts import ChannelScaledPart


@register_stage
class ChannelSeparableQuantizer(Stage):
    """Divide each channel by `c = sqrt(max_t |x[t, channel]|)`, quantize each token with one scale and zero,
    and multiply back on decode (ZipCache's CSTQuant).

    The normalisation evens out channel magnitudes, so one scale/zero per token does about as well as
    groupwise quantization with far fewer parameters. `c` is taken over the tokens of the tensor being encoded
    (a chunk, in a cache), per (batch, head, channel), and stored in `param_dtype`; its bytes are counted. An
    all-zero channel gets `c = 1`.

    Args:
        bits: code width, one of 1, 2, 3, 4, 8.
        param_dtype: dtype of the stored channel scales and of the per-token scale and zero.
    """

    def __init__(self, bits: int, param_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.tokenwise = Quantizer(bits, None, "token", param_dtype=param_dtype)
        self.param_dtype = param_dtype

    def config(self) -> dict:
        return {"bits": self.tokenwise.bits, "param_dtype": self.param_dtype}

    def channel_scale(self, x: Tensor, exclude: Tensor | None = None) -> Tensor:
        """`sqrt(max_t |x|)` per channel, as stored: `[batch, kv_heads, 1, head_dim]` in `param_dtype`."""
        magnitude = x.float().abs() if exclude is None else x.float().abs().masked_fill(exclude, 0.0)
        peak = magnitude.amax(-2, keepdim=True) if x.shape[-2] else magnitude.new_ones(*x.shape[:2], 1, x.shape[-1])
        c = peak.sqrt().to(self.param_dtype)
        return check_storable(torch.where(c > 0, c, torch.ones_like(c)), "channel scales", "param_dtype")

    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> ChannelScaledPart:
        """Quantize `x` `KV` token by token after channel normalisation."""
        c = self.channel_scale(x, exclude)
        return ChannelScaledPart(self.tokenwise.encode(x.float() / c.float(), exclude), c)

    def decode(self, part: ChannelScaledPart) -> Tensor:
        """float32 `KV`."""
        return self.tokenwise.decode(part.quantized) * part.channel_scale.float()

    def error_bound(self, part: ChannelScaledPart) -> Tensor:
        """Per-element error bound `c * scale / 2`: float32 `KV`."""
        return self.tokenwise.error_bound(part.quantized) * part.channel_scale.float()

    def extra_repr(self) -> str:
        return f"bits={self.tokenwise.bits}, param_dtype={self.param_dtype}"
