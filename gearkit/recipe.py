"""The `Recipe` type (a key pipeline, a value pipeline and a streaming-buffer size) and the registry of named recipes.

A recipe is data: `to_dict()` writes it as versioned JSON and `Recipe.from_dict` reads it back.

**Trust model.** Recipe files travel between people, so reading one is safe by default: `from_dict` builds only
registered stage classes (gearkit's, and user stages given to `gearkit.register_stage`), checks every setting
against bounds a KV cache can need (a group size, rank or sketch that would allocate gigabytes is refused), and
never imports or calls code. The one way recipe data can name code is a `"python:module.name"` reference (a custom
CSR solver or dictionary source, written by `to_dict` for a module-level function); reading such a reference
imports that module, which runs its code, so it is refused unless the caller passes `trusted=True` for data from a
source it trusts. gearkit's default CSR dictionary is named `"gearkit:default"` and needs no trust.

The registry maps names to recipes. Built-in recipes are registered as builders (a zero-argument
callable and a one-line description), so listing them costs nothing; `get` builds a recipe on first use and keeps it.
The built-in catalog is `gearkit.recipes`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from gearkit.compressors import Pipeline, Probes, SparseDictionary
from gearkit.compressors.base import data_kind
from gearkit.compressors.checks import MAX_TOKENS, check_int

FORMAT_VERSION = 1  # of `Recipe.to_dict()`
# the keys of `to_dict()` besides its format and version
FIELDS = ("name", "key", "value", "buffer_size", "sink_tokens", "description", "probes")


@dataclasses.dataclass(frozen=True, eq=False)
class Recipe:
    """How a KV cache is compressed.

    Recipes compare as data: two recipes are equal when their `to_dict()` data is (so a recipe equals itself read
    back from its data); a recipe that is not data (a dictionary set held in memory) equals only itself.

    Attributes:
        name: registry name, a non-empty string.
        key: pipeline for keys `KV`.
        value: pipeline for values, same layout.
        buffer_size: the newest tokens kept in full precision; when the buffer holds this many they are
            compressed as one chunk. 1 compresses every token as it arrives. At most `MAX_TOKENS`.
        sink_tokens: the first tokens of a sequence, kept in full precision for good (attention sinks); at most
            `MAX_TOKENS`.
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
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"recipe name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.description, str):
            raise ValueError(f"recipe description must be a string, got {self.description!r}")
        check_int(self.buffer_size, "buffer_size", 1, MAX_TOKENS)
        check_int(self.sink_tokens, "sink_tokens", 0, MAX_TOKENS)
        for role in ("key", "value"):
            if not isinstance(getattr(self, role), Pipeline):
                raise TypeError(f"recipe {role} must be a gearkit Pipeline")
            # e.g. a rank above the chunk size fails here, not in generate
            getattr(self, role).check_chunk(self.buffer_size)
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

    def __eq__(self, other: object) -> bool:
        """Whether `other` is the same recipe as data (see the class docstring)."""
        if not isinstance(other, Recipe):
            return NotImplemented
        if self is other:
            return True
        try:
            return self.to_dict() == other.to_dict()
        except TypeError:  # not data: equal only to itself
            return False

    def __hash__(self) -> int:
        """A hash that equal recipes share."""
        return hash((self.name, self.buffer_size, self.sink_tokens))  # equal recipes agree on these

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, trusted: bool = False) -> Recipe:
        """Rebuild a recipe from `to_dict()` data (see the trust model in this module's docstring).

        Args:
            data: the recipe's data, e.g. read from a JSON file.
            trusted: resolve `"python:module.name"` references (custom CSR solvers or dictionary sources) by
                importing their modules; only for data from a source you trust. Without it they are refused.

        Raises:
            ValueError: if the data is not a gearkit recipe of this format version, lacks a key or holds an unknown
                one, names code without `trusted`, or holds a setting out of bounds; the message names the key.
            TypeError: for a stage argument of the wrong kind, naming where it is.
        """
        if not isinstance(data, dict):
            raise ValueError(f"recipe data must be an object (a dict), got {data_kind(data)}")
        if data.get("format") != "gearkit.Recipe" or data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"not a gearkit recipe of format version {FORMAT_VERSION}: "
                f"format {data.get('format')!r}, version {data.get('version')!r}"
            )
        missing, unknown = [k for k in FIELDS if k not in data], sorted(set(data) - {*FIELDS, "format", "version"})
        problems = [f"lacks {k!r}" for k in missing] + [f"has an unknown key {k!r}" for k in unknown]
        if problems:
            raise ValueError(f"recipe data {' and '.join(problems)} (a recipe holds {', '.join(FIELDS)})")
        probes = data["probes"]
        fields = {f.name for f in dataclasses.fields(Probes)}
        if not isinstance(probes, dict) or not set(probes) <= fields:
            raise ValueError(f"recipe data probes must be an object with keys among {sorted(fields)}, got {probes!r}")
        return cls(
            data["name"],
            Pipeline.from_dict(data["key"], trusted=trusted, where="key"),
            Pipeline.from_dict(data["value"], trusted=trusted, where="value"),
            data["buffer_size"],
            data["sink_tokens"],
            data["description"],
            Probes(**probes),
        )


@dataclasses.dataclass
class _Entry:
    """A registered name: its description, how to build its recipe (None for a recipe given as is), the recipe
    once built."""

    description: str
    build: Callable[[], Recipe] | None
    recipe: Recipe | None = None


_REGISTRY: dict[str, _Entry] = {}


def _add(name: str, entry: _Entry, replace: bool) -> None:
    if name in _REGISTRY and not replace:
        raise ValueError(f"a recipe named {name!r} is already registered (pass replace=True)")
    _REGISTRY[name] = entry


def register(recipe: Recipe, *, replace: bool = False) -> Recipe:
    """Add `recipe` under `recipe.name`; an existing name needs `replace=True`. Returns the recipe."""
    _add(recipe.name, _Entry(recipe.description, None, recipe), replace)
    return recipe


def register_builder(name: str, description: str, build: Callable[[], Recipe], *, replace: bool = False) -> None:
    """Add a recipe that is built on the first `get(name)` (then kept), so registering and listing build nothing.

    Args:
        name: registry name; the built recipe must carry it.
        description: the built recipe's one-line description, shown by `describe` before it is built.
        build: a zero-argument callable returning the recipe.
        replace: replace an existing name.

    Raises:
        ValueError: for a name already registered without `replace`.
    """
    _add(name, _Entry(description, build), replace)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(names())}") from None


def get(name: str) -> Recipe:
    """The recipe registered under exactly `name`, built on first use.

    Raises:
        ValueError: for an unknown name (the message lists the known names), or a builder whose recipe does
            not carry the registered name and description.
    """
    entry = _entry(name)
    if entry.recipe is None:
        recipe = entry.build()
        if (recipe.name, recipe.description) != (name, entry.description):
            raise ValueError(
                f"the builder registered as {name!r} built {recipe.name!r} described as {recipe.description!r}; "
                f"registered: {entry.description!r}"
            )
        entry.recipe = recipe
    return entry.recipe


def describe(name: str) -> str:
    """The one-line description of the recipe registered under `name`, without building it.

    Raises:
        ValueError: for an unknown name; the message lists the known names.
    """
    return _entry(name).description


def names() -> list[str]:
    """Registered recipe names, in registration order."""
    return list(_REGISTRY)
