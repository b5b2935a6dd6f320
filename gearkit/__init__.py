"""gearkit: composable KV-cache compression (GEAR, KIVI, ZipCache, CSR).

Importing gearkit loads only torch and einops; integrations (transformers, Lightning) and Triton kernels
load when used.
"""

from gearkit import compressors, parts, recipes
from gearkit.accounting import MemoryReport
from gearkit.compressors import *  # noqa: F403 (the stages)
from gearkit.deprecation import moved
from gearkit.parts import *  # noqa: F403 (the stored parts)
from gearkit.recipe import Recipe

__version__ = "0.1.0"

__all__ = [*compressors.__all__, *parts.__all__, "MemoryReport", "Recipe", "recipes"]

__getattr__ = moved(__name__, {"Rotary": "gearkit.compressors.rope:RoPE"})
