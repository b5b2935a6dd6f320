"""Compression stages (`nn.Module`s with `encode`/`decode`) and the `Pipeline` that chains them."""

from gearkit.compressors.base import FullPrecision, Stage, check_kv
from gearkit.compressors.channel_separable import ChannelSeparableQuantizer
from gearkit.compressors.dictionary import DictionarySet, Rotary, SparseDictionary
from gearkit.compressors.lowrank import LowRankResidual
from gearkit.compressors.outlier import SparseOutlier
from gearkit.compressors.pipeline import Pipeline
from gearkit.compressors.quantizer import Quantizer
from gearkit.compressors.saliency import MixedPrecision, Probes

__all__ = ["ChannelSeparableQuantizer", "DictionarySet", "Rotary", "SparseDictionary", "FullPrecision", "LowRankResidual", "MixedPrecision", "Pipeline", "Probes", "Quantizer", "SparseOutlier", "Stage", "check_kv"]
