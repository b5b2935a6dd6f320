"""Compare recipes on given key/value tensors: relative error and all-in bytes, compressed chunk by chunk."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from gearkit import recipes
from gearkit.cache import ChunkStore
from gearkit.recipe import Recipe


def synthetic_kv(shape: tuple[int, int, int, int], heavy_channels: int = 2, seed: int = 0) -> Tensor:
    """Gaussian `KV` with a few large-magnitude, offset channels.

    Real keys look like this: a handful of channels carry most of the magnitude, which is what per-channel
    quantization and outlier extraction are for.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    channels = torch.randperm(shape[-1], generator=gen)[: min(heavy_channels, shape[-1])]
    x[..., channels] = x[..., channels] * 8 + 4
    return x


@dataclasses.dataclass
class RecipeResult:
    """One recipe's reconstruction of a key and a value tensor."""

    recipe: str
    key_error: float
    value_error: float
    bits_per_element: float
    compression_ratio: float
    components: dict[str, int]


def needs_a_model(recipe: Recipe) -> bool:
    """Whether `recipe` needs what only a model gives: its queries (saliency), its layers, or its RoPE."""
    return recipe.needs_saliency or recipe.model_bound or "rope" in recipe.key.requires | recipe.value.requires


def _rel(x: Tensor, y: Tensor) -> float:
    return ((x.float() - y.float()).norm() / x.float().norm().clamp_min(1e-30)).item()


def compare_recipes(keys: Tensor, values: Tensor, names: Sequence[str] | None = None) -> list[RecipeResult]:
    """Relative Frobenius error and all-in bits per element of each recipe.

    Each recipe's `ChunkStore` (the cache of one layer, without a model) takes the tensors as one prefill:
    whole chunks are compressed, the remainder stays in the buffer and sink tokens in their exact copy, so the
    bytes are exactly what the recipe's cache would hold.

    Args:
        keys: `KV`.
        values: same shape as `keys`.
        names: recipe names (default: every registered recipe that needs neither token saliency, which comes
            from a model's queries, nor a model's layers (a trained dictionary, a per-layer allocation), nor its
            rotary embedding (pre-RoPE keys): plain tensors have none of them).

    Returns:
        One `RecipeResult` per recipe, in the given order.
    """
    if keys.shape != values.shape:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must have the same shape")
    results = []
    default = [n for n in recipes.names() if not needs_a_model(recipes.get(n))]
    for name in names or default:
        recipe = recipes.get(name)
        if recipe.needs_saliency:
            raise ValueError(f"recipe {name!r} needs token saliency from a model's queries; evaluate it in a cache")
        store = ChunkStore(recipe)  # fp16 buffer and sink copy, as in a cache
        store.append(keys, values)
        k_hat, v_hat = store.dequantized()
        report = store.memory_report()
        results.append(
            RecipeResult(
                name,
                _rel(keys, k_hat),
                _rel(values, v_hat),
                report.bits_per_element,
                report.compression_ratio,
                report.components,
            )
        )
    return results


def format_table(rows: Sequence[dict], floats: str = "{:.4g}") -> str:
    """Render dicts sharing keys as an aligned plain-text table."""
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[floats.format(v) if isinstance(v, float) else str(v) for v in (r[c] for c in cols)] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, cells)])
