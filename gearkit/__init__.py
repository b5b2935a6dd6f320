"""gearkit: composable KV-cache compression (GEAR, KIVI, ZipCache, CSR).

Importing gearkit loads only torch and einops; integrations (transformers, Lightning) and Triton kernels
load when used.
"""

from gearkit import compressed, compressors, recipes
from gearkit.compressed import *  # noqa: F403 (the stored parts and MemoryReport)
from gearkit.compressors import *  # noqa: F403 (the stages)
from gearkit.compressors import Rotary  # noqa: F401 (RoPE's old name, for one release)
from gearkit.recipes import Recipe

__version__ = "0.1.0"

__all__ = [*compressors.__all__, *compressed.__all__, "Recipe", "recipes"]
