"""Compression stages (`nn.Module`s with `encode`/`decode`) and the `Pipeline` that chains them."""

from gearkit.compressors.base import Context, FullPrecision, Stage, Wrapper, register_stage
from gearkit.compressors.channel_separable import ChannelSeparableQuantizer
from gearkit.compressors.codebook import CodebookQuantizer
from gearkit.compressors.dictionary_set import DictionarySet
from gearkit.compressors.lowrank import LowRankResidual
from gearkit.compressors.mixed import MixedPrecision
from gearkit.compressors.outlier import SparseOutlier
from gearkit.compressors.per_layer import PerHead, PerLayer
from gearkit.compressors.pipeline import Chain, Pipeline
from gearkit.compressors.pre_rope import PreRoPE
from gearkit.compressors.probes import Probes
from gearkit.compressors.quantizer import Quantizer
from gearkit.compressors.rope import RoPE
from gearkit.compressors.rotation import HadamardRotation, Rotation
from gearkit.compressors.sketch import SignSketch
from gearkit.compressors.sparse_dictionary import SparseDictionary
from gearkit.deprecation import moved

__all__ = [
    # stages and their composition
    "Stage",
    "Wrapper",
    "register_stage",
    "Context",
    "Pipeline",
    "Chain",
    "Quantizer",
    "ChannelSeparableQuantizer",
    "SparseOutlier",
    "LowRankResidual",
    "FullPrecision",
    "Rotation",
    # rotation + non-uniform codebooks and the 1-bit residual sketch (TurboQuant, QJL), keys coded before RoPE (KVQuant)
    "HadamardRotation",
    "CodebookQuantizer",
    "SignSketch",
    "PreRoPE",
    # bit allocation: a stage per model layer or KV head (KVTuner)
    "PerLayer",
    "PerHead",
    # ZipCache: saliency-driven mixed precision and the probe queries that score saliency
    "MixedPrecision",
    "Probes",
    # CSR: sparse dictionary codes (NeuralDict training lives in gearkit.neuraldict, which loads Lightning)
    "SparseDictionary",
    "DictionarySet",
    "RoPE",
]

__getattr__ = moved(__name__, {"Rotary": "gearkit.compressors.rope:RoPE"})
