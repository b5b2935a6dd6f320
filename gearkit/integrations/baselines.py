"""Hugging Face's own KV caches as peers of gearkit's: the `QuantizedCache` baselines and their byte accounting.

A user of `transformers` already has `QuantizedCache` (quanto and HQQ backends) and `DynamicCache`; every
evaluation shows them beside gearkit's recipes. This module names the baselines (`HF_BASELINES`), builds one
(`make_baseline`), checks that its backend can run (`check_baseline`, including the stale build lock that makes
quanto's C++ extension wait forever), and counts the bytes such caches hold (`memory_report`,
`compressed_tokens`).

Users reach all of it through `gearkit.integrations.hf`: its `make_cache`, `memory_report`, `check_cache_name`,
`HF_BASELINES` and `available_baselines` serve recipes and baselines alike.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path

from transformers.cache_utils import Cache, QuantizedCache

from gearkit.accounting import MemoryReport
from gearkit.models import head_dim

HF_BASELINES = {
    "hf-quanto-2": ("quanto", 2),
    "hf-quanto-4": ("quanto", 4),
    "hf-hqq-2": ("hqq", 2),
    "hf-hqq-4": ("hqq", 4),
}

STEP = 64  # tokens fed per model call: a QuantizedCache quantizes when its 128-token residual fills, steps stay inside


def available_baselines() -> list[str]:
    """The Hugging Face `QuantizedCache` baselines whose backend package is installed."""
    have = {
        "quanto": importlib.util.find_spec("optimum") is not None
        and importlib.util.find_spec("optimum.quanto") is not None,
        "hqq": importlib.util.find_spec("hqq") is not None,
    }
    return [name for name, (backend, _) in HF_BASELINES.items() if have[backend]]


STALE_LOCK_S = 600  # a build lock this old, with no library beside it, belongs to an interrupted build


def check_build_lock(directory: str | os.PathLike, library: str, stale_after: float = STALE_LOCK_S) -> None:
    """Raise `FileExistsError` naming the file to delete if a PyTorch C++ extension build in `directory` is blocked
    by a stale lock (PyTorch waits on such a lock forever, silently).

    The lock is stale if the built library (`library*.so`) lies beside it, or if it is older than `stale_after`
    seconds; a younger lock without a library may be a build in progress and is left alone.
    """
    lock = Path(directory) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if any(Path(directory).glob(f"{library}*.so")) or age > stale_after:
        raise FileExistsError(
            f"a stale build lock (from an interrupted build) blocks {library}: delete {lock} and run again"
        )


def check_baseline(name: str) -> str:
    """Return `name` if it is one of `HF_BASELINES` and can run here.

    Raises:
        ValueError: for a name that is no baseline, or a baseline whose backend is not installed.
        FileExistsError: for a quanto baseline whose C++ extension build is blocked by a stale lock.
    """
    if name not in HF_BASELINES:
        raise ValueError(f"unknown Hugging Face baseline {name!r}; known: {', '.join(HF_BASELINES)}")
    if name not in available_baselines():
        raise ValueError(
            f"{name} needs its backend package: pip install {'optimum-quanto' if 'quanto' in name else 'hqq'}"
        )
    if HF_BASELINES[name][0] == "quanto":  # its C++ extension is compiled on first use, under a lock file
        from optimum.quanto.library.extensions import get_extension

        extension = get_extension("quanto_cpp")
        check_build_lock(extension.build_directory, extension.name)
    return name


def make_baseline(name: str, model) -> QuantizedCache:
    """A fresh `QuantizedCache` for baseline `name` (its backend and bits from `HF_BASELINES`).

    Args:
        name: one of `HF_BASELINES`.
        model (transformers.PreTrainedModel): the model the cache serves.

    Raises:
        ValueError, FileExistsError: as `check_baseline`.
    """
    backend, bits = HF_BASELINES[check_baseline(name)]
    return QuantizedCache(backend=backend, config=model.config, nbits=bits)


def residual_tokens(layer) -> int:
    """Tokens a Hugging Face cache layer holds as plain keys/values: a `QuantizedCache` layer's full-precision
    residual, or all of a `DynamicCache` layer's tokens (its `keys` are `KV`)."""
    return layer.keys.shape[-2] if layer.keys is not None and layer.keys.dim() == 4 else 0


def memory_report(cache: Cache, config, batch: int = 1) -> MemoryReport:
    """Bytes held by one of Hugging Face's own caches for a model with `config`, holding `batch` sequences.

    For a `QuantizedCache` the quantized part is nominal (codes at `nbits`, an fp16 scale and zero per group) and
    its full-precision residual is counted at fp16, as for an fp16 model. Any other cache (a `DynamicCache`) is
    counted as the bytes of the keys and values it holds (`dense`).
    """
    text = config.get_text_config(decoder=True)
    row = batch * text.num_key_value_heads * head_dim(text) * 2  # key + value elements per token
    reports = []
    for layer in cache.layers:
        length = layer.get_seq_length()
        if not hasattr(layer, "nbits"):
            held = sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
            reports.append(MemoryReport({"dense": held}, length, row * length))
            continue
        residual = residual_tokens(layer)
        quantized = row * (length - residual)
        reports.append(
            MemoryReport(
                {
                    "codes": quantized * layer.nbits // 8,
                    "scales": math.ceil(quantized / layer.q_group_size) * 2 * 2,
                    "buffer": row * residual * 2,
                },
                length,
                row * length,
            )
        )
    return MemoryReport.total(reports)


def compressed_tokens(cache: Cache) -> tuple[int, int]:
    """How many of the tokens one of Hugging Face's own caches holds per sequence are quantized: `(quantized,
    held)` (the rest is a `QuantizedCache`'s residual; a `DynamicCache` quantizes none)."""
    if not cache.layers:
        return 0, 0
    layer = cache.layers[0]
    held = layer.get_seq_length()
    return held - residual_tokens(layer), held
