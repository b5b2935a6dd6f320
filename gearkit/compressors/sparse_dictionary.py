"""CSR's stage: each KV vector (or each of `chunks` slices of it) as a few atoms of a learned dictionary.

Keys are coded before RoPE by default: the rotation the model applied at each token position is undone
before coding and redone after decoding (`RoPE`, with the model's own inverse frequencies), so that one
dictionary serves every position. The part then holds each entry's first position (int32, counted as the
`positions` component). A stage reads its dictionary lazily, on first use, from a `DictionarySet`, a file path,
a zero-argument callable that returns either, or a named source that gearkit resolves itself (`"gearkit:default"`,
the default dictionary: recipe data names it without naming code); the dictionary's bytes are not part of any
compressed tensor but are reported by the cache (`dictionary` component), amortised over the layers that share it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from gearkit.compressors.base import CODE, NO_CONTEXT, Context, Stage, register_stage
from gearkit.compressors.checks import MAX_DIM, check_bool, check_int, check_storable
from gearkit.compressors.dictionary_set import DictionarySet, Role, load_cached
from gearkit.compressors.solvers import SOLVERS, Solver, combine_atoms
from gearkit.parts import DictionaryPart

Source = DictionarySet | str | os.PathLike | Callable[[], "DictionarySet | str | os.PathLike"]
NAMED = "gearkit:"  # a dictionary source gearkit resolves itself, by name: data, not code
_NAMED_SOURCES: dict[str, Callable[[], DictionarySet | str | os.PathLike]] = {}


def register_dictionary_source(name: str, source: Callable[[], DictionarySet | str | os.PathLike]) -> str:
    """Let recipe data name the dictionary source `source` as `"gearkit:<name>"`, a name gearkit resolves itself
    (so loading such data imports and calls nothing of the data's choosing). gearkit's default CSR dictionary is
    `"gearkit:default"` (`gearkit.csr`).

    Args:
        name: the name after `gearkit:`.
        source: a zero-argument callable returning a `DictionarySet` or a path to one, called on first use.

    Returns:
        The source's name in recipe data, `"gearkit:<name>"`.

    Raises:
        ValueError: for a name another source holds.
        TypeError: for a source that is not callable.
    """
    if not callable(source):
        raise TypeError(f"a named dictionary source must be a zero-argument callable, got {type(source).__name__}")
    if _NAMED_SOURCES.get(name, source) is not source:
        raise ValueError(f"the dictionary source {NAMED}{name} is already registered")
    _NAMED_SOURCES[name] = source
    return NAMED + name


@register_stage
class SparseDictionary(Stage):
    """Code each vector (or each of `chunks` slices of it) as `sparsity` atoms of a learned dictionary.

    Storage per vector: `chunks * sparsity` int16 atom indices and as many coefficients, fp16 (`coef_bits=16`)
    or int8 with one fp16 scale per vector (`coef_bits=8`); with pre-RoPE keys also one int32 first position
    per batch entry. At head dim 64: `csr-8` keys (s=8, s_n=1) are 8 * 32 / 64 = 4 bits per element, and so are
    its values (s=4 per half); `csr-4` halves that (2 bits). The dictionary's own bytes are reported by the
    cache (`GearCache.memory_report()`, component `dictionary`), amortised over the layers that share it.

    Args:
        dictionary: a `DictionarySet`, a path to one, a zero-argument callable returning either, or a named
            source (`"gearkit:default"`, see `register_dictionary_source`); read on first use (so recipes can name
            a dictionary that is loaded only when needed). A module-level callable is written as recipe data as
            `"python:module.name"`, which only trusted data may hold (`Stage.from_dict(..., trusted=True)`).
        role: `"key"` or `"value"`: which of the set's dictionaries to use.
        sparsity: atoms per slice `s` (at most `MAX_DIM`).
        chunks: slices per vector `s_n` (None: the set's `key_chunks` / `value_chunks`; at most `MAX_DIM`).
        solver: `"mp"`, `"omp"`, or a callable `(x [n, dim], atoms [dim, A], s) -> (index [n, s], coef [n, s])`
            (written as recipe data like a callable dictionary source).
        coef_bits: 16 (fp16 coefficients) or 8 (int8 codes and an fp16 scale per vector).
        pre_rope: code keys before RoPE (undo the rotation from token positions, redo it after decoding). None:
            as the set's key dictionaries were trained. Needs a set trained on pre-RoPE keys; ignored for values.
    """

    def __init__(
        self,
        dictionary: Source,
        role: Role,
        sparsity: int,
        chunks: int | None = None,
        solver: str | Solver = "mp",
        coef_bits: int = 16,
        pre_rope: bool | None = None,
    ):
        super().__init__()
        if role not in ("key", "value"):
            raise ValueError(f"role must be 'key' or 'value', got {role!r}")
        check_int(sparsity, "sparsity", 1, MAX_DIM)
        if chunks is not None:
            check_int(chunks, "chunks", 1, MAX_DIM)
        if isinstance(coef_bits, bool) or not isinstance(coef_bits, int) or coef_bits not in (8, 16):
            raise ValueError(f"coef_bits must be 16 (fp16) or 8 (int8 + fp16 scale per vector), got {coef_bits!r}")
        if not (solver in SOLVERS if isinstance(solver, str) else callable(solver)):
            raise ValueError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)} (or pass a callable)")
        if pre_rope is not None:
            check_bool(pre_rope, "pre_rope")
        if isinstance(dictionary, str) and dictionary.startswith(CODE):
            raise ValueError(
                f"dictionary {dictionary!r} names code, which only trusted recipe data may do "
                "(Stage.from_dict(data, trusted=True)); in Python, pass the function itself"
            )
        # gearkit's own sources are held by name, so recipe data names them without naming code
        dictionary = next((NAMED + n for n, s in _NAMED_SOURCES.items() if s is dictionary), dictionary)
        if isinstance(dictionary, str) and dictionary.startswith(NAMED):
            if dictionary.removeprefix(NAMED) not in _NAMED_SOURCES:
                known = ", ".join(NAMED + n for n in _NAMED_SOURCES)
                raise ValueError(f"unknown dictionary source {dictionary!r}; known: {known}")
        elif not (isinstance(dictionary, (DictionarySet, str, os.PathLike)) or callable(dictionary)):
            raise TypeError(
                f"dictionary must be a DictionarySet, a path or a callable, got {type(dictionary).__name__}"
            )
        self.source, self.role, self.sparsity, self._chunks = dictionary, role, sparsity, chunks
        self.solver, self.coef_bits, self._pre_rope = solver, coef_bits, pre_rope
        self._produced: DictionarySet | None = None  # what a callable source returned, kept

    def config(self) -> dict:
        return {
            "dictionary": self.source,
            "role": self.role,
            "sparsity": self.sparsity,
            "chunks": self._chunks,
            "solver": self.solver,
            "coef_bits": self.coef_bits,
            "pre_rope": self._pre_rope,
        }

    # -- the dictionary, read lazily ---------------------------------------------------------------------------
    @property
    def dictionaries(self) -> DictionarySet:
        """The `DictionarySet`, read (or produced by the source callable) on first access."""
        source = self.source
        if isinstance(source, str) and source.startswith(NAMED):
            source = _NAMED_SOURCES[source.removeprefix(NAMED)]
        if isinstance(source, DictionarySet):
            return source
        if self._produced is not None:
            return self._produced
        if callable(source):
            source = source()
            if isinstance(source, DictionarySet):
                self._produced = source
                return source
        path = Path(source).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no dictionary file {str(path)!r} (train one with: gearkit dict train)")
        return load_cached(str(path), path.stat().st_mtime)

    @property
    def chunks(self) -> int:
        """Slices per vector `s_n`."""
        if self._chunks is not None:
            return self._chunks
        d = self.dictionaries
        return d.key_chunks if self.role == "key" else d.value_chunks

    @property
    def pre_rope(self) -> bool:
        """Whether keys are coded before RoPE."""
        if self.role != "key":
            return False
        trained = self.dictionaries.rope is not None
        if self._pre_rope and not trained:
            raise ValueError(
                "pre-RoPE coding needs a dictionary set trained on pre-RoPE keys (it carries the rotary "
                "parameters); this one was trained on post-RoPE keys"
            )
        return trained if self._pre_rope is None else self._pre_rope

    def check_model(self, config) -> None:
        """Raise `ValueError` unless the dictionary fits the model of `config`."""
        self.dictionaries.check_model(config)

    def shared_nbytes(self, layer: int | None) -> int:
        """This layer's share of the dictionary's bytes (see `DictionarySet.nbytes`)."""
        return self.dictionaries.nbytes(self.role, layer)

    def _atoms(self, layer: int | None, dim: int, device: torch.device) -> Tensor:
        atoms = self.dictionaries.dictionary(self.role, layer).to(device=device, dtype=torch.float32)
        if atoms.shape[0] * self.chunks != dim:
            raise ValueError(
                f"the {self.role} dictionary has atoms of dim {atoms.shape[0]}; {self.chunks} slice(s) of a "
                f"head_dim-{dim} vector need dim {dim / self.chunks:g}"
            )
        return atoms

    def _solve(self, x: Tensor, atoms: Tensor) -> tuple[Tensor, Tensor]:
        solve = SOLVERS[self.solver] if isinstance(self.solver, str) else self.solver
        return solve(x, atoms, self.sparsity)

    # -- Stage API -------------------------------------------------------------------------------------------
    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> DictionaryPart:
        """Code `x` `KV`.

        Args:
            x: the vectors.
            exclude: bool like `x`; those entries are zeroed before coding (stored exactly elsewhere).
            ctx: `ctx.positions` int `[batch]`, the sequence position of each entry's first token (entry `i`'s
                token `t` is at `positions[i] + t`; None: 0), used for pre-RoPE keys; `ctx.layer`, the model
                layer, which picks the dictionary group (None: a set with one group).
        """
        positions, layer = ctx.positions, ctx.layer
        b, h, t, d = x.shape
        atoms = self._atoms(layer, d, x.device)
        start = None
        if self.pre_rope:
            start = (
                torch.zeros(b, dtype=torch.int32, device=x.device)
                if positions is None
                else positions.to(x.device, torch.int32)
            )
            if start.shape != (b,):
                raise ValueError(f"positions must be [batch] = [{b}], got {tuple(start.shape)}")
            x = self.dictionaries.rope.to(x.device).undo(x, start[:, None].long() + torch.arange(t, device=x.device))
        x = x.float()
        if exclude is not None:
            x = x.masked_fill(exclude, 0.0)
        index, coef = self._solve(x.reshape(-1, d // self.chunks), atoms)
        codes = self.chunks * self.sparsity
        index = index.reshape(b, h, t, codes).to(torch.int16)
        coef = coef.reshape(b, h, t, codes)
        scale = None
        if self.coef_bits == 8:
            scale = check_storable((coef.abs().amax(-1, keepdim=True) / 127).half(), "coefficient scales", "coef_bits")
            coef = (
                torch.round(coef / scale.float().clamp_min(torch.finfo(torch.float16).tiny))
                .clamp(-127, 127)
                .to(torch.int8)
            )
        else:
            coef = check_storable(coef.half(), "coefficients", "coef_bits (8 stores a scale)")
        return DictionaryPart(index, coef, scale, start, layer, self.chunks)

    def decode(self, part: DictionaryPart) -> Tensor:
        b, h, t, _ = part.indices.shape
        d = self.dictionaries.dictionary(self.role, part.layer).shape[0] * part.chunks
        atoms = self._atoms(part.layer, d, part.indices.device)
        coef = part.coefficients.float()
        if part.scale is not None:
            coef = coef * part.scale.float()
        per_slice = part.indices.shape[-1] // part.chunks
        out = combine_atoms(
            part.indices.reshape(b, h, t, part.chunks, per_slice), coef.reshape(b, h, t, part.chunks, per_slice), atoms
        ).reshape(b, h, t, d)
        if part.start is not None:
            positions = part.start[:, None].long() + torch.arange(t, device=out.device)
            out = self.dictionaries.rope.to(out.device).apply(out, positions)
        return out

    def extra_repr(self) -> str:
        source = self.source if isinstance(self.source, (str, os.PathLike)) else type(self.source).__name__
        solver = self.solver if isinstance(self.solver, str) else getattr(self.solver, "__name__", "custom")
        return (
            f"role={self.role}, sparsity={self.sparsity}, chunks={self._chunks}, solver={solver}, "
            f"coef_bits={self.coef_bits}, pre_rope={self._pre_rope}, dictionary={source}"
        )
