"""CSR recipes and their default dictionary: its settings, where it is cached, and the lookup `csr-8` / `csr-4` use.

The default dictionary is trained once on the default model and text (`gearkit dict train --default`, or the CLI
by itself the first time a command needs it; training is `gearkit.neuraldict.train_default_dictionary`, which
reads the settings here) and kept under `gearkit.paths.cache_dir()`. The built-in CSR recipes name the lookup
`default_dictionary` as the source `"gearkit:default"` (data, not code: a recipe file that names it loads without
trust), which reads the file only when a stage first codes a tensor.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from gearkit.compressors import Pipeline, SparseDictionary
from gearkit.compressors.checks import check_int
from gearkit.compressors.solvers import Solver
from gearkit.compressors.sparse_dictionary import Source, register_dictionary_source
from gearkit.models import DEFAULT_MODEL, DEFAULT_TEXT
from gearkit.paths import cache_dir
from gearkit.recipe import Recipe, register_builder

DEFAULT_DICTIONARY = dict(atoms=1024, sparsity=8, group_layers=6)  # trained on DEFAULT_MODEL and DEFAULT_TEXT
DEFAULT_RECIPES = {"csr-8": 8, "csr-4": 4}  # the built-in CSR recipes (name: key atoms per vector)


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


DEFAULT_SOURCE = register_dictionary_source("default", default_dictionary)  # "gearkit:default"


def _description(sparsity: int, dictionary: Source, solver: str | Solver, coef_bits: int, pre_rope: bool | None) -> str:
    if dictionary in (DEFAULT_SOURCE, default_dictionary):
        where = "the default dictionary"
    elif isinstance(dictionary, (str, os.PathLike)):
        where = str(dictionary)
    else:
        where = getattr(dictionary, "__name__", type(dictionary).__name__)
    bits = (sparsity * (16 + coef_bits) + (16 if coef_bits == 8 else 0)) / 64  # per element at head dim 64
    space = "" if pre_rope is False else " (pre-RoPE)"
    label = solver.upper() if isinstance(solver, str) else "custom solver"
    return (
        f"CSR: keys {sparsity} atoms{space}, values {sparsity // 2} per half, {label}, {where}; "
        f"{bits:g} bits/elt at head dim 64 + the amortised dictionary"
    )


def csr(
    sparsity: int,
    dictionary: Source = DEFAULT_SOURCE,
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
            the default is the default dictionary (`"gearkit:default"`, which `default_dictionary` finds).
        name: registry name (default `csr-{sparsity}`).
        solver: `"mp"`, `"omp"` or a callable (see `SparseDictionary`).
        coef_bits: 16 or 8.
        pre_rope: code keys before RoPE (None: as the dictionary was trained).
        buffer_size: the newest tokens kept in fp16.

    Returns:
        The recipe (not registered).

    Raises:
        ValueError: for a sparsity that is not an even int >= 2.
    """
    if check_int(sparsity, "CSR sparsity", 2) % 2:
        raise ValueError(f"CSR sparsity must be an even int >= 2 (values take sparsity / 2 per half), got {sparsity!r}")
    return Recipe(
        name or f"csr-{sparsity}",
        Pipeline([SparseDictionary(dictionary, "key", sparsity, 1, solver, coef_bits, pre_rope)]),
        Pipeline([SparseDictionary(dictionary, "value", sparsity // 2, 2, solver, coef_bits)]),
        buffer_size,
        description=_description(sparsity, dictionary, solver, coef_bits, pre_rope),
    )


def register_default_recipes(dictionary: Source = DEFAULT_SOURCE, *, replace: bool = False) -> None:
    """Register `csr-8` and `csr-4` on `dictionary` (built on first `get`).

    Args:
        dictionary: their dictionary (see `csr`); a file of your own replaces the default one.
        replace: replace recipes already registered under those names.

    Raises:
        ValueError: for names already registered without `replace`.
    """
    for name, sparsity in DEFAULT_RECIPES.items():
        build = functools.partial(csr, sparsity, dictionary, name=name)
        register_builder(name, _description(sparsity, dictionary, "mp", 16, None), build, replace=replace)


__all__ = [
    "DEFAULT_DICTIONARY",
    "DEFAULT_SOURCE",
    "DEFAULT_RECIPES",
    "csr",
    "default_dictionary",
    "default_dictionary_path",
    "register_default_recipes",
]
