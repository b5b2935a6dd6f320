"""gearkit: composable KV-cache compression (GEAR, KIVI, ZipCache, CSR).

Importing gearkit loads only torch and einops; integrations (transformers, Lightning) and Triton kernels
load when used.
"""

from gearkit import recipes
from gearkit.compressed import (
    ChannelScaledPart, CompressedTensor, DensePart, LowRankPart, OutlierPart, Part, QuantizedPart,
)
from gearkit.compressors import (
    ChannelSeparableQuantizer, FullPrecision, LowRankResidual, Pipeline, Quantizer, SparseOutlier, Stage,
)
from gearkit.recipes import Recipe

__version__ = "0.1.0"

__all__ = [
    # stages and their composition
    "Stage", "Quantizer", "ChannelSeparableQuantizer", "SparseOutlier", "LowRankResidual", "FullPrecision", "Pipeline",
    # stored parts
    "Part", "CompressedTensor", "QuantizedPart", "ChannelScaledPart", "OutlierPart", "LowRankPart", "DensePart",
    # recipes
    "Recipe", "recipes",
]
