"""gearkit: composable KV-cache compression (GEAR, KIVI, ZipCache, CSR).

Importing gearkit loads only torch and einops; integrations (transformers, Lightning) and Triton kernels
load when used.
"""

from gearkit import recipes
from gearkit.compressed import (
    ChannelScaledPart, CompressedTensor, DensePart, DictionaryPart, LowRankPart, MixedPart, OutlierPart, Part, QuantizedPart,
)
from gearkit.compressors import (
    ChannelSeparableQuantizer, DictionarySet, FullPrecision, LowRankResidual, MixedPrecision, Pipeline, Probes, Quantizer,
    Rotary, SparseDictionary, SparseOutlier, Stage,
)
from gearkit.recipes import Recipe

__version__ = "0.1.0"

__all__ = [
    # stages and their composition
    "Stage", "Quantizer", "ChannelSeparableQuantizer", "SparseOutlier", "LowRankResidual", "FullPrecision", "Pipeline",
    # ZipCache: saliency-driven mixed precision and the probe queries that score saliency
    "MixedPrecision", "Probes",
    # CSR: sparse dictionary codes (NeuralDict training lives in gearkit.neuraldict, which loads Lightning)
    "SparseDictionary", "DictionarySet", "Rotary",
    # stored parts
    "Part", "CompressedTensor", "QuantizedPart", "ChannelScaledPart", "OutlierPart", "LowRankPart", "MixedPart", "DictionaryPart", "DensePart",
    # recipes
    "Recipe", "recipes",
]
