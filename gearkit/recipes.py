"""The built-in recipes, each a small builder registered by name (built on its first `get`), and the registry's
functions.

Look one up by exact name with `get`, list them with `names`, add your own with `register`:

    >>> from gearkit import Pipeline, Quantizer, LowRankResidual, Recipe, recipes
    >>> mine = Recipe("mine-3", key=Pipeline([Quantizer(3, 64, "channel"), LowRankResidual(2)]),
    ...               value=Pipeline([Quantizer(3, 64, "token")]), buffer_size=64)
    >>> recipes.register(mine)

The registry itself (`get`, `names`, `register`, `register_builder`, `describe`) lives in `gearkit.recipe` with the
`Recipe` type; CSR recipes (`csr`) in `gearkit.csr`; calibrated recipes (`gk-*`, shipped for the default model or
made by `gearkit calibrate` for another) in `gearkit.allocations`, found for the model in use by `for_model`. How the
frontier recipes (TurboQuant, KVQuant, `gk-*`) were measured and chosen: docs/concepts/frontier.md.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from gearkit.allocations import calibrated, shipped
from gearkit.compressors import (
    Chain,
    ChannelSeparableQuantizer,
    CodebookQuantizer,
    FullPrecision,
    HadamardRotation,
    LowRankResidual,
    MixedPrecision,
    Pipeline,
    PreRoPE,
    Quantizer,
    Rotation,
    SparseOutlier,
    Stage,
)
from gearkit.csr import csr, default_dictionary_path, register_default_recipes
from gearkit.models import DEFAULT_MODEL, model_identity
from gearkit.recipe import Recipe, describe, get, names, register, register_builder


def _pipeline(*stages: Stage) -> Pipeline:
    return Pipeline(list(stages))


def _fp16(name: str, description: str) -> Recipe:
    """Uncompressed storage, the baseline every ratio is taken against."""
    return Recipe(name, _pipeline(FullPrecision()), _pipeline(FullPrecision()), 64, description=description)


def _uniform(name: str, description: str, bits: int) -> Recipe:
    """Per-token uniform quantization, one scale and zero per head vector."""
    return Recipe(name, _pipeline(Quantizer(bits)), _pipeline(Quantizer(bits)), 64, description=description)


def _kivi(name: str, description: str, bits: int) -> Recipe:
    """KIVI as published: keys per channel, values per token, groups of 32, 128 recent tokens in full precision."""
    key, value = _pipeline(Quantizer(bits, 32, "channel")), _pipeline(Quantizer(bits, 32, "token"))
    return Recipe(name, key, value, 128, description=description)


def _gear(name: str, description: str, bits: int) -> Recipe:
    """GEAR as published on a KIVI-style backbone: 2% outliers, groups of 64, a rank-2 residual per 64-token chunk."""
    return Recipe(
        name,
        _pipeline(SparseOutlier(0.02, "channel"), Quantizer(bits, 64, "channel"), LowRankResidual(2)),
        _pipeline(SparseOutlier(0.02, "token"), Quantizer(bits, 64, "token"), LowRankResidual(2)),
        64,
        description=description,
    )


def _gear_l(name: str, description: str, bits: int) -> Recipe:
    """GEAR-L: GEAR without outliers."""
    return Recipe(
        name,
        _pipeline(Quantizer(bits, 64, "channel"), LowRankResidual(2)),
        _pipeline(Quantizer(bits, 64, "token"), LowRankResidual(2)),
        64,
        description=description,
    )


def _kcvt(name: str, description: str) -> Recipe:
    """GEAR on a KCVT backbone: keys per channel over the whole chunk, values per token across heads."""
    return Recipe(
        name,
        _pipeline(SparseOutlier(0.02, "channel"), Quantizer(4, None, "channel"), LowRankResidual(2)),
        _pipeline(SparseOutlier(0.02, "token"), Quantizer(4, None, "token", across_heads=True), LowRankResidual(2)),
        64,
        description=description,
    )


def _sink(name: str, description: str, bits: int) -> Recipe:
    """KIVI's axes in groups of 64, with the first 4 tokens (attention sinks) kept in fp16."""
    key, value = _pipeline(Quantizer(bits, 64, "channel")), _pipeline(Quantizer(bits, 64, "token"))
    return Recipe(name, key, value, 64, sink_tokens=4, description=description)


def _sinkrot(name: str, description: str, key_bits: int, value_bits: int) -> Recipe:
    # a dense seeded rotation serves every head dim (the Hadamard transform needs a power of two)
    key, value = Quantizer(key_bits, 64, "channel"), Rotation(CodebookQuantizer(value_bits))
    return Recipe(name, _pipeline(key), _pipeline(value), 64, sink_tokens=4, description=description)


def _calibrated(name: str, description: str) -> Recipe:
    return dataclasses.replace(shipped(name), description=description)


def _sink_gear(name: str, description: str) -> Recipe:
    """`sink-2` with GEAR's outliers, which pay for their bytes at 2 bits; no low-rank term."""
    return Recipe(
        name,
        _pipeline(SparseOutlier(0.02, "channel"), Quantizer(2, 64, "channel")),
        _pipeline(SparseOutlier(0.01, "token", across_heads=True), Quantizer(2, 64, "token")),
        64,
        sink_tokens=4,
        description=description,
    )


def _zipcache(name: str, description: str) -> Recipe:
    """ZipCache as published: salient tokens at 4 bits, the rest at 2; keys per channel, values CSTQuant."""
    return Recipe(
        name,
        _pipeline(MixedPrecision(Quantizer(4, None, "channel"), Quantizer(2, None, "channel"), 0.4)),
        _pipeline(MixedPrecision(ChannelSeparableQuantizer(4), ChannelSeparableQuantizer(2), 0.4)),
        128,
        description=description,
    )


def _zipcache_gear(name: str, description: str) -> Recipe:
    """ZipCache's saliency at 3/2 bits on a quarter of the tokens, GEAR's outliers (one per side of each key
    channel) and 4 fp16 sink tokens, which take the channel extremes out of the per-channel ranges
    (measurements: docs/concepts/zipcache.md)."""
    return Recipe(
        name,
        _pipeline(
            SparseOutlier(0.01, "channel"),
            MixedPrecision(Quantizer(3, None, "channel"), Quantizer(2, None, "channel"), 0.25),
        ),
        _pipeline(MixedPrecision(Quantizer(3, None, "token"), Quantizer(2, None, "token"), 0.25)),
        128,
        sink_tokens=4,
        description=description,
    )


def _turboquant(name: str, description: str, key_bits: int, value_bits: int) -> Recipe:
    """TurboQuant's MSE quantizer: a randomized Hadamard rotation, then a Lloyd-Max code per coordinate, the
    vector's scale (its norm / sqrt(d)) in fp16."""
    key, value = (_pipeline(HadamardRotation(CodebookQuantizer(b))) for b in (key_bits, value_bits))
    return Recipe(name, key, value, 64, description=description)


def _kvquant(name: str, description: str, bits: int) -> Recipe:
    """KVQuant: 1% dense-and-sparse outliers per token (across heads), then a non-uniform code; keys per channel
    and before RoPE (outliers and codes both in the pre-RoPE space, under the model's own rotary embedding, which
    the cache reads from its config), values per token."""
    outliers = SparseOutlier(0.01, "token", across_heads=True)
    key = PreRoPE(Chain([outliers, CodebookQuantizer(bits, 64, "channel", centered=True)]))
    value = _pipeline(SparseOutlier(0.01, "token", across_heads=True), CodebookQuantizer(bits))
    return Recipe(name, _pipeline(key), value, 64, sink_tokens=1, description=description)


def _builtin(name: str, description: str, build: Callable[..., Recipe], *args) -> None:
    """Register the built-in recipe `name`, built on first use as `build(name, description, *args)`."""
    register_builder(name, description, functools.partial(build, name, description, *args))


def _register_catalog() -> None:
    """Register every built-in recipe as a builder, in the order `names()` lists them."""
    _builtin("fp16", "uncompressed fp16 storage (the baseline)", _fp16)
    for b in (2, 4, 8):
        _builtin(f"uniform-{b}", f"per-token {b}-bit, one scale/zero per head vector", _uniform, b)
    for b in (2, 3, 4):
        _builtin(f"kivi-{b}", f"KIVI {b}-bit: keys per-channel, values per-token, groups of 32", _kivi, b)
    for b in (2, 3, 4):
        _builtin(
            f"gear-{b}",
            f"GEAR {b}-bit: 2% outliers + KIVI-style groups of 64 + rank-2 residual per chunk",
            _gear,
            b,
        )
        _builtin(f"gear-l-{b}", f"GEAR-L {b}-bit: KIVI-style groups of 64 + rank-2 residual per chunk", _gear_l, b)
    _builtin(
        "kcvt-4",
        "GEAR on a KCVT 4-bit backbone: keys per-channel per chunk, values per-token across heads",
        _kcvt,
    )
    for b in (2, 3, 4):
        _builtin(
            f"sink-{b}",
            f"{b}-bit per-channel keys / per-token values in groups of 64, 4 fp16 sink tokens",
            _sink,
            b,
        )
    # calibration-free: what a new model gets without any data
    for budget, (kb, vb) in {"2.5": (2, 2), "3": (3, 2), "3.5": (3, 3), "4": (4, 3)}.items():
        _builtin(
            f"sinkrot-{budget}",
            f"calibration-free, any model: {kb}-bit per-channel keys in groups of 64, {vb}-bit Lloyd-Max codes of "
            "rotated values (one norm per vector), 4 fp16 sink tokens",
            _sinkrot,
            kb,
            vb,
        )
    _builtin(
        "sink-gear-2",
        "sink-2 + GEAR outliers (2% per key channel, 1% per token across heads), no low-rank term",
        _sink_gear,
    )
    _builtin(
        "zipcache",
        "ZipCache: 40% most salient tokens (probe-normalized attention) at 4 bits, the rest at 2; "
        "keys per channel, values CSTQuant, per 128-token chunk",
        _zipcache,
    )
    _builtin(
        "zipcache-gear",
        "25% most salient tokens at 3 bits, the rest at 2, GEAR outliers on key channels, 4 fp16 sink "
        "tokens, per 128-token chunk",
        _zipcache_gear,
    )
    register_default_recipes()
    for code_bits, (kb, vb) in {"2.5": (3, 2), "3.5": (4, 3)}.items():
        _builtin(
            f"turboquant-{code_bits}",
            f"TurboQuant {code_bits} code bits: Hadamard rotation + Lloyd-Max codes, keys {kb}-bit, "
            f"values {vb}-bit, fp16 norms (not in the paper's count)",
            _turboquant,
            kb,
            vb,
        )
    for b in (2, 3):
        _builtin(
            f"kvquant-{b}",
            f"KVQuant {b}-bit: pre-RoPE per-channel keys, per-token values, Gaussian "
            "non-uniform codes (not calibrated), 1% outliers, 1 fp16 sink token",
            _kvquant,
            b,
        )
    # gearkit's own: each layer's width under a budget of all-in bits, calibrated for the default model; another
    # model finds its own calibration (`for_model`)
    for name in CALIBRATED:
        _builtin(name, describe_calibrated(name), _calibrated)


CALIBRATED = ("gk-2.5", "gk-3", "gk-3.5", "gk-4.5")  # the names `gearkit calibrate` writes by default


def describe_calibrated(name: str) -> str:
    """The one line of a `gk-*` recipe."""
    budget = name.removeprefix("gk-")
    return (
        f"gearkit's calibrated bit allocation at {budget} all-in bits: each layer's keys and values at the width "
        f"its sensitivity earns (shipped for {DEFAULT_MODEL}; `gearkit calibrate` makes it for another model)"
    )


def for_model(name: str, config, model_name: str = "") -> Recipe:
    """The recipe `name` for the model of `config`: the registered recipe, unless it was calibrated for another
    model and a calibration of this one exists (shipped, or written by `gearkit calibrate` into gearkit's cache
    dir). A recipe file path (`.json`) is read as it is.

    Args:
        name: a registered name or a recipe file.
        config (transformers.PretrainedConfig): the model's config.
        model_name: the model's name (used in messages).
    """
    recipe = get(name)
    if recipe.model is None or name.endswith(".json"):
        return recipe
    identity = model_identity(config, model_name or getattr(config, "_name_or_path", "") or "this model")
    if recipe.serves(identity):
        return recipe
    return calibrated(recipe.name, identity) or recipe  # the cache then refuses it, naming `gearkit calibrate`


def needs_calibration(name: str, identity: dict | None = None) -> bool:
    """Whether recipe `name` needs a calibration step before it serves the model of `identity`
    (`gearkit.models.model_identity`; None: the default model): `gearkit calibrate` for a recipe calibrated for
    another model, `gearkit dict train` for a CSR recipe without a dictionary for it."""
    recipe = get(name)
    if recipe.needs_dictionary:
        return identity is not None or not default_dictionary_path().is_file()
    if recipe.model is None or identity is None:
        return False
    return not recipe.serves(identity) and calibrated(recipe.name, identity) is None


_register_catalog()

__all__ = [
    "CALIBRATED",
    "for_model",
    "needs_calibration",
    "csr",
    "describe",
    "get",
    "names",
    "register",
    "register_builder",
]
