"""Named recipes: a key pipeline, a value pipeline and a streaming-buffer size.

Look one up by exact name with `get`, list them with `names`, add your own with `register`:

    >>> from gearkit import Pipeline, Quantizer, LowRankResidual, Recipe, recipes
    >>> mine = Recipe("mine-3", key=Pipeline([Quantizer(3, 64, "channel"), LowRankResidual(2)]),
    ...               value=Pipeline([Quantizer(3, 64, "token")]), buffer_size=64)
    >>> recipes.register(mine)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from gearkit.compressors import (
    ChannelSeparableQuantizer,
    CodebookQuantizer,
    FullPrecision,
    HadamardRotation,
    LowRankResidual,
    MixedPrecision,
    PerHead,
    PerLayer,
    Pipeline,
    PreRoPE,
    Probes,
    Quantizer,
    SparseDictionary,
    SparseOutlier,
    Stage,
)
from gearkit.compressors.checks import check_int
from gearkit.compressors.solvers import Solver
from gearkit.compressors.sparse_dictionary import Source
from gearkit.models import DEFAULT_MODEL, DEFAULT_TEXT
from gearkit.paths import cache_dir

FORMAT_VERSION = 1  # of `Recipe.to_dict()`
DEFAULT_ROPE_THETA = 100000.0  # the default model's RoPE base, for recipes that code keys before RoPE


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a KV cache is compressed.

    Attributes:
        name: registry name.
        key: pipeline for keys `[batch, kv_heads, tokens, head_dim]`.
        value: pipeline for values, same layout.
        buffer_size: the newest tokens kept in full precision; when the buffer holds this many they are
            compressed as one chunk. 1 compresses every token as it arrives.
        sink_tokens: the first tokens of a sequence, kept in full precision for good (attention sinks).
        description: one line for tables and `gearkit recipes`.
        probes: which queries score token saliency, for pipelines with saliency-driven stages (ZipCache).
    """

    name: str
    key: Pipeline
    value: Pipeline
    buffer_size: int = 64
    sink_tokens: int = 0
    description: str = ""
    probes: Probes = dataclasses.field(default_factory=Probes)

    @property
    def needs_dictionary(self) -> bool:
        """Whether a stage reads a trained dictionary (CSR), which must fit the model."""
        return any(isinstance(s, SparseDictionary) for p in (self.key, self.value) for s in p.stages)

    @property
    def model_bound(self) -> bool:
        """Whether the recipe was made for one model: a trained dictionary (CSR) or a per-layer bit allocation
        (a stage that picks its coding by the model layer), so it serves only that model, in a cache that knows
        each layer."""
        return self.needs_dictionary or "layer" in self.key.requires | self.value.requires

    @property
    def needs_saliency(self) -> bool:
        """Whether a stage needs token saliency (the cache then takes queries from gearkit's attention function)."""
        return "saliency" in self.key.requires | self.value.requires

    def __post_init__(self):
        check_int(self.buffer_size, "buffer_size")
        check_int(self.sink_tokens, "sink_tokens", 0)
        for role in ("key", "value"):
            if not isinstance(getattr(self, role), Pipeline):
                raise TypeError(f"recipe {role} must be a gearkit Pipeline")
            getattr(self, role).check_chunk(
                self.buffer_size
            )  # e.g. a rank above the chunk size fails here, not in generate
        if not isinstance(self.probes, Probes):
            raise TypeError(f"recipe probes must be a gearkit Probes, got {type(self.probes).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as JSON-ready data (stages by class name and constructor arguments), with a format version.

        Raises:
            TypeError: for a stage argument that is not data (a dictionary set held in memory, a lambda).
        """
        return {
            "format": "gearkit.Recipe",
            "version": FORMAT_VERSION,
            "name": self.name,
            "key": self.key.to_dict(),
            "value": self.value.to_dict(),
            "buffer_size": self.buffer_size,
            "sink_tokens": self.sink_tokens,
            "description": self.description,
            "probes": dataclasses.asdict(self.probes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Rebuild a recipe from `to_dict()` data.

        Raises:
            ValueError: if the data is not a gearkit recipe of this format version.
        """
        if data.get("format") != "gearkit.Recipe" or data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"not a gearkit recipe of format version {FORMAT_VERSION}: "
                f"format {data.get('format')!r}, version {data.get('version')!r}"
            )
        return cls(
            data["name"],
            Pipeline.from_dict(data["key"]),
            Pipeline.from_dict(data["value"]),
            data["buffer_size"],
            data["sink_tokens"],
            data["description"],
            Probes(**data["probes"]),
        )


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


def _pipeline(*stages) -> Pipeline:
    return Pipeline(list(stages))


def _builtin() -> list[Recipe]:
    out = [
        Recipe(
            "fp16",
            _pipeline(FullPrecision()),
            _pipeline(FullPrecision()),
            64,
            description="uncompressed fp16 storage (the baseline)",
        )
    ]
    for b in (2, 4, 8):
        out.append(
            Recipe(
                f"uniform-{b}",
                _pipeline(Quantizer(b)),
                _pipeline(Quantizer(b)),
                64,
                description=f"per-token {b}-bit, one scale/zero per head vector",
            )
        )
    for b in (2, 3, 4):  # KIVI as published: groups of 32, 128 recent tokens in full precision
        out.append(
            Recipe(
                f"kivi-{b}",
                _pipeline(Quantizer(b, 32, "channel")),
                _pipeline(Quantizer(b, 32, "token")),
                128,
                description=f"KIVI {b}-bit: keys per-channel, values per-token, groups of 32",
            )
        )
    for b in (2, 3, 4):  # GEAR as published on a KIVI-style backbone: 2% outliers, rank 2 per 64-token chunk
        out.append(
            Recipe(
                f"gear-{b}",
                _pipeline(SparseOutlier(0.02, "channel"), Quantizer(b, 64, "channel"), LowRankResidual(2)),
                _pipeline(SparseOutlier(0.02, "token"), Quantizer(b, 64, "token"), LowRankResidual(2)),
                64,
                description=f"GEAR {b}-bit: 2% outliers + KIVI-style groups of 64 + rank-2 residual per chunk",
            )
        )
        out.append(
            Recipe(
                f"gear-l-{b}",
                _pipeline(Quantizer(b, 64, "channel"), LowRankResidual(2)),
                _pipeline(Quantizer(b, 64, "token"), LowRankResidual(2)),
                64,
                description=f"GEAR-L {b}-bit: KIVI-style groups of 64 + rank-2 residual per chunk",
            )
        )
    out.append(
        Recipe(
            "kcvt-4",
            _pipeline(SparseOutlier(0.02, "channel"), Quantizer(4, None, "channel"), LowRankResidual(2)),
            _pipeline(SparseOutlier(0.02, "token"), Quantizer(4, None, "token", across_heads=True), LowRankResidual(2)),
            64,
            description="GEAR on a KCVT 4-bit backbone: keys per-channel per chunk, values per-token across heads",
        )
    )
    # gearkit's own, from measuring where the bytes earn their keep (see the README's frontier): groups of 64,
    # the first 4 tokens (attention sinks) kept in fp16, and GEAR's outliers only where they pay (at 2 bits).
    for b in (2, 3, 4):
        out.append(
            Recipe(
                f"sink-{b}",
                _pipeline(Quantizer(b, 64, "channel")),
                _pipeline(Quantizer(b, 64, "token")),
                64,
                sink_tokens=4,
                description=f"{b}-bit per-channel keys / per-token values in groups of 64, 4 fp16 sink tokens",
            )
        )
    out.append(
        Recipe(
            "sink-gear-2",
            _pipeline(SparseOutlier(0.02, "channel"), Quantizer(2, 64, "channel")),
            _pipeline(SparseOutlier(0.01, "token", across_heads=True), Quantizer(2, 64, "token")),
            64,
            sink_tokens=4,
            description="sink-2 + GEAR outliers (2% per key channel, 1% per token across heads), no low-rank term",
        )
    )
    out += _zipcache()
    out += [csr(8), csr(4)]
    out += _frontier()
    return out


def _turboquant(bits: int) -> Pipeline:
    """TurboQuant's MSE quantizer: a randomized Hadamard rotation, then a Lloyd-Max code per coordinate, the
    vector's scale (its norm / sqrt(d)) in fp16."""
    return _pipeline(HadamardRotation(CodebookQuantizer(bits)))


def _kvquant(bits: int, role: str) -> Pipeline:
    """KVQuant: 1% dense-and-sparse outliers per token (across heads), then a non-uniform code; keys per channel and
    before RoPE, values per token."""
    if role == "key":
        return _pipeline(
            PreRoPE(SparseOutlier(0.01, "token", across_heads=True), DEFAULT_ROPE_THETA),
            PreRoPE(CodebookQuantizer(bits, 64, "channel", centered=True), DEFAULT_ROPE_THETA),
        )
    return _pipeline(SparseOutlier(0.01, "token", across_heads=True), CodebookQuantizer(bits))


def _frontier() -> list[Recipe]:
    """The anchors of issue 15 (TurboQuant, KVQuant) reproduced with gearkit's stages, and gearkit's own
    per-layer bit allocations for the default model at 2.5, 3, 3.5 and 4.5 all-in bits, chosen on `idle-help` by
    `benchmarks/bit_allocation.py` from the stages `benchmarks/frontier_sweep.py` found best."""
    out = []
    for code_bits, (kb, vb) in {"2.5": (3, 2), "3.5": (4, 3)}.items():
        out.append(
            Recipe(
                f"turboquant-{code_bits}",
                _turboquant(kb),
                _turboquant(vb),
                64,
                description=f"TurboQuant {code_bits} code bits: Hadamard rotation + Lloyd-Max codes, keys {kb}-bit, "
                f"values {vb}-bit, fp16 norms (not in the paper's count)",
            )
        )
    for bits in (2, 3):
        out.append(
            Recipe(
                f"kvquant-{bits}",
                _kvquant(bits, "key"),
                _kvquant(bits, "value"),
                64,
                sink_tokens=1,
                description=f"KVQuant {bits}-bit: pre-RoPE per-channel keys, per-token values, Gaussian "
                "non-uniform codes (not calibrated), 1% outliers, 1 fp16 sink token",
            )
        )
    # gearkit's own: each layer's (or KV head's) keys and values at the width its sensitivity earns under the budget
    # (bit allocation, benchmarks/bit_allocation.py on idle-help), from a ladder of per-channel key groups of 64
    # (post-RoPE), rotated Lloyd-Max codes, a rank-1 pre-RoPE low-rank term before 2-bit rotated codes, and 4 fp16
    # sink tokens. Calibrated codebooks did not earn their bytes (docs/concepts/frontier.md).
    for budget, name in (("2.5", "gk-2.5"), ("3.0", "gk-3"), ("3.5", "gk-3.5"), ("4.5", "gk-4.5")):
        out.append(allocated(budget, name))
    return out


ALLOCATIONS = Path(__file__).parent / "allocations"  # per-layer bit widths, written by benchmarks/bit_allocation.py


def allocation_stage(widths: list[str | list[str]], ladder: dict[str, dict]) -> PerLayer:
    """The `PerLayer` stage of one role's allocation: each layer's width by ladder name, or a list of names (one
    per KV head: a `PerHead` of them).

    Args:
        widths: per layer, a ladder name or a list of ladder names by KV head.
        ladder: ladder name -> `Stage.to_dict()` data.

    Raises:
        KeyError: for a name the ladder does not hold.
    """

    def stage(name: str) -> Stage:
        if name not in ladder:
            raise KeyError(f"allocation names width {name!r}; the ladder holds {', '.join(ladder)}")
        return Stage.from_dict(ladder[name])

    return PerLayer([PerHead([stage(n) for n in w]) if isinstance(w, list) else stage(w) for w in widths])


def allocated(budget: str, name: str | None = None, model: str = DEFAULT_MODEL, path: Path | None = None) -> Recipe:
    """A recipe whose keys and values take each layer's width (or each KV head's) from a stored bit allocation
    (`PerLayer`, with `PerHead` where a layer's heads differ).

    `benchmarks/bit_allocation.py` measures each layer's sensitivity on the tuning text and chooses the widths
    under a global budget of all-in bits; the result is data in `gearkit/allocations/<model>.json`, so the recipe
    (and `to_dict()` of it) names every layer's stage. It serves only a model with as many layers (and KV heads).

    Args:
        budget: the budget's key in the file, e.g. `"3.0"`.
        name: registry name (default `alloc-<budget>`).
        model: the model the allocation was measured on.
        path: the allocation file (default: the stored one for `model`).

    Returns:
        The recipe (not registered).

    Raises:
        FileNotFoundError: when no allocation is stored for `model`.
        KeyError: for a budget the file does not hold.
    """
    path = Path(path) if path is not None else ALLOCATIONS / f"{model}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no bit allocation stored for {model!r} ({path}); run benchmarks/bit_allocation.py")
    data = json.loads(path.read_text())
    if budget not in data["allocations"]:
        raise KeyError(f"no allocation for budget {budget!r} in {path}; stored: {', '.join(data['allocations'])}")
    chosen, ladder = data["allocations"][budget], data["ladder"]
    key, value = (Pipeline([allocation_stage(chosen[role], ladder[role])]) for role in ("key", "value"))
    counts = {
        role: ", ".join(
            f"{c} {n}"
            for n, c in Counter(w if isinstance(w, str) else "split by KV head" for w in chosen[role]).most_common()
        )
        for role in ("key", "value")
    }
    return Recipe(
        name or f"alloc-{budget}",
        key,
        value,
        data["buffer"],
        sink_tokens=data["sink_tokens"],
        description=f"per-layer widths for {model}, {budget} all-in bits, tuned on {data['tuned_on']} (layers: "
        f"keys {counts['key']}; values {counts['value']}; {data['sink_tokens']} fp16 sink tokens)",
    )


DEFAULT_DICTIONARY = dict(atoms=1024, sparsity=8, group_layers=6)  # what `gearkit dict train --default` trains


def default_dictionary_path() -> Path:
    """Where the default dictionary lives: `<gearkit cache dir>/dictionaries/<model>-<text>-a..-s..-g...safetensors`."""
    d = DEFAULT_DICTIONARY
    name = f"{DEFAULT_MODEL}-{DEFAULT_TEXT}-a{d['atoms']}-s{d['sparsity']}-g{d['group_layers']}-v1.safetensors"
    return cache_dir() / "dictionaries" / name


def default_dictionary() -> Path:
    """The default CSR dictionary's path (the source of `csr-8` and `csr-4`).

    Raises:
        FileNotFoundError: if it has not been trained yet; the message says how (`gearkit dict train --default`,
            which the CLI also runs by itself the first time a command needs it).
    """
    path = default_dictionary_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"the default CSR dictionary is not trained yet ({path}); train it once with "
            "`gearkit dict train --default` (a few minutes on a CPU), or pass your own dictionary"
        )
    return path


def csr(
    sparsity: int,
    dictionary: Source = default_dictionary,
    *,
    name: str | None = None,
    solver: str | Solver = "mp",
    coef_bits: int = 16,
    pre_rope: bool | None = None,
    buffer_size: int = 64,
) -> Recipe:
    """A CSR recipe at the paper's Matching Pursuit levels: keys `sparsity` atoms per vector (`s_n = 1`), values
    `sparsity / 2` atoms per half (`s_n = 2`).

    With fp16 coefficients and int16 indices every kept atom costs 32 bits, so at head dim `d` keys and values
    each cost `32 * sparsity / d` bits per element: at head dim 64, `csr-8` is 4 bits and `csr-4` 2 bits (plus the
    amortised dictionary); at head dim 128 (the paper's models) 2 and 1 bits.

    Args:
        sparsity: key atoms per vector `s` (even: values take `s / 2` per half).
        dictionary: a `DictionarySet`, a path to one, or a callable returning either (read on first use);
            the default trains one on the default text once and caches it.
        name: registry name (default `csr-{sparsity}`).
        solver: `"mp"`, `"omp"` or a callable (see `SparseDictionary`).
        coef_bits: 16 or 8.
        pre_rope: code keys before RoPE (None: as the dictionary was trained).
        buffer_size: the newest tokens kept in fp16.

    Returns:
        The recipe (not registered).
    """
    if check_int(sparsity, "CSR sparsity", 2) % 2:
        raise ValueError(f"CSR sparsity must be an even int >= 2 (values take sparsity / 2 per half), got {sparsity!r}")
    where = dictionary if isinstance(dictionary, (str, os.PathLike)) else "the default dictionary"
    bits = (sparsity * (16 + coef_bits) + (16 if coef_bits == 8 else 0)) / 64  # per element at head dim 64
    space = "" if pre_rope is False else " (pre-RoPE)"
    label = solver.upper() if isinstance(solver, str) else "custom solver"
    return Recipe(
        name or f"csr-{sparsity}",
        _pipeline(SparseDictionary(dictionary, "key", sparsity, 1, solver, coef_bits, pre_rope)),
        _pipeline(SparseDictionary(dictionary, "value", sparsity // 2, 2, solver, coef_bits)),
        buffer_size,
        description=f"CSR: keys {sparsity} atoms{space}, values {sparsity // 2} per half, {label}, {where}; "
        f"{bits:g} bits/elt at head dim 64 + the amortised dictionary",
    )


def _zipcache() -> list[Recipe]:
    """ZipCache as published, and gearkit's composition of its saliency with sink tokens and GEAR's outliers."""

    def mixed(high, low, ratio):
        return MixedPrecision(high, low, ratio)

    return [
        Recipe(
            "zipcache",
            _pipeline(mixed(Quantizer(4, None, "channel"), Quantizer(2, None, "channel"), 0.4)),
            _pipeline(mixed(ChannelSeparableQuantizer(4), ChannelSeparableQuantizer(2), 0.4)),
            128,
            description="ZipCache: 40% most salient tokens (probe-normalized attention) at 4 bits, the rest at 2; "
            "keys per channel, values CSTQuant, per 128-token chunk",
        ),
        # Measured on idle-help (benchmarks/results/zipcache_idle-help.md): at this budget 3/2 bits on a quarter of
        # the tokens beats 4/2 bits on a tenth; GEAR's outliers (1 per side of each key channel) and 4 fp16 sink
        # tokens take the channel extremes out of the per-channel ranges.
        Recipe(
            "zipcache-gear",
            _pipeline(
                SparseOutlier(0.01, "channel"),
                mixed(Quantizer(3, None, "channel"), Quantizer(2, None, "channel"), 0.25),
            ),
            _pipeline(mixed(Quantizer(3, None, "token"), Quantizer(2, None, "token"), 0.25)),
            128,
            sink_tokens=4,
            description="25% most salient tokens at 3 bits, the rest at 2, GEAR outliers on key channels, 4 fp16 sink "
            "tokens, per 128-token chunk",
        ),
    ]


for _r in _builtin():
    register(_r)
