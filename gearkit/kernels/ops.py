"""gearkit's kernels as `torch.library` custom ops, so `torch.compile` treats them as single opaque calls.

Quantization must be opaque to the compiler: fused code may skip the rounding of fp16 scales and zeros
inside a kernel, which would make the codes disagree with the parameters actually stored.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from gearkit.kernels import reference


@torch.library.custom_op("gearkit::quantize_groups", mutates_args=())
def quantize_groups(
    x: Tensor, bits: int, param_dtype: torch.dtype, valid: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Group quantization; see `gearkit.kernels.reference.quantize_groups` (shapes and semantics)."""
    return reference.quantize_groups(x, bits, param_dtype, valid)


@quantize_groups.register_fake
def _(x, bits, param_dtype, valid=None):
    return (
        x.new_empty(x.shape, dtype=torch.uint8),
        x.new_empty(x.shape[:-1], dtype=param_dtype),
        x.new_empty(x.shape[:-1], dtype=param_dtype),
    )
