"""Named recipes: a key pipeline, a value pipeline and a streaming-buffer size.

Look one up by exact name with `get`, list them with `names`, add your own with `register`:

    >>> from gearkit import Pipeline, Quantizer, LowRankResidual, Recipe, recipes
    >>> mine = Recipe("mine-3", key=Pipeline([Quantizer(3, 64, "channel"), LowRankResidual(2)]),
    ...               value=Pipeline([Quantizer(3, 64, "token")]), buffer_size=64)
    >>> recipes.register(mine)
"""

from __future__ import annotations

import dataclasses

import torch

from gearkit.compressors import FullPrecision, LowRankResidual, Pipeline, Quantizer, SparseOutlier


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a KV cache is compressed.

    Attributes:
        name: registry name.
        key: pipeline for keys `[batch, kv_heads, tokens, head_dim]`.
        value: pipeline for values, same layout.
        buffer_size: the newest tokens kept in full precision; when the buffer holds this many they are
            compressed as one chunk. 1 compresses every token as it arrives.
        description: one line for tables and `gearkit recipes`.
    """

    name: str
    key: Pipeline
    value: Pipeline
    buffer_size: int = 64
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.buffer_size, int) or self.buffer_size < 1:
            raise ValueError(f"buffer_size must be a positive int, got {self.buffer_size!r}")
        for role in ("key", "value"):
            if not isinstance(getattr(self, role), Pipeline):
                raise TypeError(f"recipe {role} must be a gearkit Pipeline")


_REGISTRY: dict[str, Recipe] = {}


def register(recipe: Recipe, *, replace: bool = False) -> Recipe:
    """Add `recipe` under `recipe.name`; an existing name needs `replace=True`. Returns the recipe."""
    if recipe.name in _REGISTRY and not replace:
        raise ValueError(f"a recipe named {recipe.name!r} is already registered (pass replace=True)")
    _REGISTRY[recipe.name] = recipe
    return recipe


def get(name: str) -> Recipe:
    """The recipe registered under exactly `name`.

    Raises:
        ValueError: for an unknown name; the message lists the known names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(names())}") from None


def names() -> list[str]:
    """Registered recipe names, in registration order."""
    return list(_REGISTRY)


def _quantized(name: str, bits: int, description: str, *, key_group: int | None, value_group: int | None,
               key_axis: str = "channel", outliers: float = 0.0, rank: int = 0, buffer_size: int = 64,
               across_heads: bool = False) -> Recipe:
    """A recipe whose key and value pipelines are [outliers?] + quantizer + [low-rank?]."""

    def pipeline(axis: str, group: int | None, heads: bool) -> Pipeline:
        stages = [SparseOutlier(outliers, axis)] if outliers else []
        stages.append(Quantizer(bits, group, axis, across_heads=heads))
        if rank:
            stages.append(LowRankResidual(rank))
        return Pipeline(stages)

    return Recipe(
        name,
        key=pipeline(key_axis, key_group, False),
        value=pipeline("token", value_group, across_heads),
        buffer_size=buffer_size,
        description=description,
    )


def _builtin() -> list[Recipe]:
    fp16 = Recipe("fp16", Pipeline([FullPrecision(torch.float16)]), Pipeline([FullPrecision(torch.float16)]),
                  buffer_size=64, description="uncompressed fp16 storage (the baseline)")
    out = [fp16]
    for bits in (2, 4, 8):
        out.append(_quantized(f"uniform-{bits}", bits, f"per-token {bits}-bit, one scale/zero per head vector",
                              key_group=None, value_group=None, key_axis="token"))
    for bits in (2, 3, 4):
        out.append(_quantized(f"kivi-{bits}", bits, f"KIVI {bits}-bit: keys per-channel, values per-token, groups of 32",
                              key_group=32, value_group=32, buffer_size=128))
    for bits in (2, 3, 4):
        out.append(_quantized(f"gear-{bits}", bits, f"GEAR {bits}-bit: 2% outliers + KIVI-style groups of 64 + rank-2 residual",
                              key_group=64, value_group=64, outliers=0.02, rank=2))
        out.append(_quantized(f"gear-l-{bits}", bits, f"GEAR-L {bits}-bit: KIVI-style groups of 64 + rank-2 residual",
                              key_group=64, value_group=64, rank=2))
    out.append(_quantized("kcvt-4", 4, "GEAR on a KCVT 4-bit backbone: keys per-channel per chunk, values per-token across heads",
                          key_group=None, value_group=None, outliers=0.02, rank=2, across_heads=True))
    return out


for _r in _builtin():
    register(_r)
