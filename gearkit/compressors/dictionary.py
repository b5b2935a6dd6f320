"""CSR (Cache Sparse Representation): each KV vector as a few atoms of a learned dictionary.

A vector (or each of `chunks` equal slices of it) is coded as `sparsity` (index, coefficient) pairs over a
dictionary `D` `[dim, atoms]` with unit-norm columns, by a pluggable sparse solver: Matching Pursuit (`"mp"`,
the paper's) or Orthogonal Matching Pursuit (`"omp"`, least squares on the chosen atoms; stronger, slower).
Both run batched over every vector at once; only the `sparsity` iterations are a Python loop.

Keys are coded before RoPE by default: the rotation the model applied at each token position is undone
before coding and redone after decoding (`Rotary`, with the model's own inverse frequencies), so that one
dictionary serves every position. The part then holds each entry's first position (int32, counted as the
`positions` component).

Dictionaries are shared artifacts (`DictionarySet`: per group of adjacent layers, for keys and values, with
the model they fit), saved as safetensors and trained by NeuralDict (`gearkit.neuraldict`). A stage reads its
dictionary lazily, on first use, from a `DictionarySet`, a file path or a zero-argument callable that returns
either; their bytes are not part of any compressed tensor but are reported by the cache (`dictionary`
component), amortised over the layers (and so the tokens) that share them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from gearkit.compressed import DictionaryPart
from gearkit.compressors.base import Stage, check_storable

FORMAT_VERSION = 1
MAX_ATOMS = 2**15  # indices are stored as int16
Role = Literal["key", "value"]
Solver = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]


# -- sparse solvers ------------------------------------------------------------------------------------------
def _pick(atoms_t: Tensor, index: Tensor) -> Tensor:
    """Rows of `atoms_t` `[..., atoms, dim]` (one matrix, or one per leading group) at `index` `[..., *rest]`;
    returns `[..., *rest, dim]`."""
    if atoms_t.dim() == 2:
        return atoms_t[index]
    groups = atoms_t.shape[:-2]
    flat = index.reshape(*groups, -1)
    picked = atoms_t.gather(-2, flat[..., None].expand(*flat.shape, atoms_t.shape[-1]))
    return picked.reshape(*index.shape, atoms_t.shape[-1])


def _check_solver_args(x: Tensor, atoms: Tensor, sparsity: int) -> None:
    if x.shape[-1] != atoms.shape[-2]:
        raise ValueError(f"vectors of dim {x.shape[-1]} cannot be coded over atoms of dim {atoms.shape[-2]}")
    if not isinstance(sparsity, int) or sparsity < 1:
        raise ValueError(f"sparsity must be a positive int, got {sparsity!r}")


def matching_pursuit(x: Tensor, atoms: Tensor, sparsity: int) -> tuple[Tensor, Tensor]:
    """Matching Pursuit: `sparsity` times, take the atom most correlated with the residual and subtract its
    projection. Differentiable in `x` and `atoms` through the coefficients (the choices are not).

    Args:
        x: `[..., n, dim]` vectors.
        atoms: `[dim, atoms]`, or `[..., dim, atoms]` with the leading dims of `x`; unit-norm columns.
        sparsity: atoms per vector `s`.

    Returns:
        `(index, coef)`: int64 `[..., n, s]` atom indices and `[..., n, s]` coefficients, so that
        `x ≈ sum_j coef[..., j] * atoms[:, index[..., j]]`.
    """
    _check_solver_args(x, atoms, sparsity)
    atoms_t, residual, indices, coefs = atoms.mT, x, [], []
    for _ in range(sparsity):
        corr = residual @ atoms
        index = corr.abs().argmax(-1)
        coef = corr.gather(-1, index[..., None]).squeeze(-1)
        residual = residual - coef[..., None] * _pick(atoms_t, index)
        indices.append(index)
        coefs.append(coef)
    return torch.stack(indices, -1), torch.stack(coefs, -1)


def orthogonal_matching_pursuit(x: Tensor, atoms: Tensor, sparsity: int, ridge: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Orthogonal Matching Pursuit: like MP, but after each choice the coefficients of all chosen atoms are
    refit by least squares (normal equations with a tiny ridge), and an atom is never chosen twice.

    Args:
        x: `[..., n, dim]` vectors.
        atoms: `[dim, atoms]`, or `[..., dim, atoms]` with the leading dims of `x`; unit-norm columns.
        sparsity: atoms per vector `s` (at most the number of atoms).
        ridge: added to the Gram matrix's diagonal, relative to 1 (the atoms' squared norm).

    Returns:
        `(index, coef)` as `matching_pursuit`.
    """
    _check_solver_args(x, atoms, sparsity)
    if sparsity > atoms.shape[-1]:
        raise ValueError(f"OMP picks distinct atoms: sparsity {sparsity} exceeds the {atoms.shape[-1]} atoms")
    atoms_t, residual = atoms.mT, x
    index = x.new_zeros(*x.shape[:-1], 0, dtype=torch.long)
    coef = x.new_zeros(*x.shape[:-1], 0)
    for k in range(1, sparsity + 1):
        score = (residual @ atoms).abs().scatter(-1, index, -1.0)  # chosen atoms are never chosen again
        index = torch.cat([index, score.argmax(-1, keepdim=True)], -1)
        chosen = _pick(atoms_t, index)  # [..., n, k, dim]
        gram = chosen @ chosen.mT + ridge * torch.eye(k, dtype=x.dtype, device=x.device)
        coef = torch.linalg.solve(gram, (chosen @ x[..., None])).squeeze(-1)
        residual = x - (coef[..., None, :] @ chosen).squeeze(-2)
    return index, coef


SOLVERS: dict[str, Solver] = {"mp": matching_pursuit, "omp": orthogonal_matching_pursuit}


def reconstruct(index: Tensor, coef: Tensor, atoms: Tensor) -> Tensor:
    """`sum_j coef[..., j] * atoms[:, index[..., j]]`: `[..., n, dim]` from `[..., n, s]` codes and `atoms`
    `[dim, atoms]` (or `[..., dim, atoms]`)."""
    if atoms.dim() == 2:  # one fused gather + weighted sum
        flat = torch.nn.functional.embedding_bag(index.reshape(-1, index.shape[-1]).long(), atoms.mT.contiguous(),
                                                 per_sample_weights=coef.reshape(-1, coef.shape[-1]).to(atoms.dtype),
                                                 mode="sum")
        return flat.reshape(*index.shape[:-1], atoms.shape[0])
    return (coef[..., None, :].to(atoms.dtype) @ _pick(atoms.mT, index.long())).squeeze(-2)


# -- rotary position embedding ---------------------------------------------------------------------------------
class Rotary(nn.Module):
    """The rotary position embedding of a LLaMA-style model (`transformers`' `rotate_half` convention), applied
    and undone from token positions.

    At position `p` a key `x` becomes `a * (x * cos(p f) + rotate_half(x) * sin(p f))` with the model's inverse
    frequencies `f` (each used twice) and attention scaling `a`; `undo` applies the inverse map.

    Args:
        inv_freq: `[head_dim / 2]` inverse frequencies.
        attention_scaling: the factor the model multiplies cos and sin by (1 for plain RoPE).
    """

    def __init__(self, inv_freq: Tensor, attention_scaling: float = 1.0):
        super().__init__()
        if inv_freq.dim() != 1 or not inv_freq.numel():
            raise ValueError(f"inv_freq must be a non-empty 1-D tensor, got shape {tuple(inv_freq.shape)}")
        if not attention_scaling > 0:
            raise ValueError(f"attention_scaling must be positive, got {attention_scaling}")
        self.register_buffer("inv_freq", inv_freq.detach().float().clone(), persistent=False)
        self.attention_scaling = float(attention_scaling)

    @classmethod
    def from_model(cls, model: nn.Module) -> Rotary:
        """The rotary parameters of a `transformers` model: its rotary embedding module's `inv_freq` and
        `attention_scaling` (the first module that has both)."""
        for module in model.modules():
            if isinstance(getattr(module, "inv_freq", None), Tensor) and hasattr(module, "attention_scaling"):
                return cls(module.inv_freq, module.attention_scaling)
        raise ValueError(f"{type(model).__name__} has no rotary embedding module (inv_freq and attention_scaling)")

    @property
    def head_dim(self) -> int:
        """Dimension of the vectors it rotates."""
        return 2 * self.inv_freq.numel()

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled cos and sin `[..., head_dim / 2]` (float32) for int `positions` `[...]`, as the model computes
        them (the model repeats them over both halves)."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling

    def _turn(self, x: Tensor, positions: Tensor, sign: float) -> Tensor:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"rotary embedding of head dim {self.head_dim} cannot rotate vectors of dim {x.shape[-1]}")
        if positions.shape != (x.shape[0], x.shape[-2]):
            raise ValueError(f"positions must be [batch, tokens] = {(x.shape[0], x.shape[-2])}, got {tuple(positions.shape)}")
        cos, sin = (t[:, None] for t in self.cos_sin(positions))
        x = x.float()
        first, second = x[..., : self.head_dim // 2], x[..., self.head_dim // 2 :]
        if sign > 0:  # the model's x * cos + rotate_half(x) * sin, op for op
            return torch.cat([first * cos + -second * sin, second * cos + first * sin], -1)
        scale = self.attention_scaling**2
        return torch.cat([first * cos + second * sin, second * cos - first * sin], -1) / scale

    def apply(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate `x` `[batch, kv_heads, tokens, head_dim]` to `positions` `[batch, tokens]`; float32 out."""
        return self._turn(x, positions, 1.0)

    def undo(self, x: Tensor, positions: Tensor) -> Tensor:
        """Inverse of `apply`: `x` `[batch, kv_heads, tokens, head_dim]` as it was before the rotation to
        `positions` `[batch, tokens]`; float32 out."""
        return self._turn(x, positions, -1.0)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, attention_scaling={self.attention_scaling}"


# -- dictionaries as artifacts ---------------------------------------------------------------------------------
def model_signature(config) -> dict:
    """What a dictionary must agree with to fit a model: `{model_type, num_hidden_layers, hidden_size,
    num_key_value_heads, head_dim, rope_theta}` from a `transformers` config."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    rope = getattr(text, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(text, "rope_theta", None)) if isinstance(rope, dict) else None
    return {
        "model_type": getattr(text, "model_type", None),
        "num_hidden_layers": text.num_hidden_layers,
        "hidden_size": text.hidden_size,
        "num_key_value_heads": getattr(text, "num_key_value_heads", text.num_attention_heads),
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        "rope_theta": None if theta is None else float(theta),
    }


@dataclasses.dataclass(eq=False)
class DictionarySet:
    """Key and value dictionaries for every layer of one model, one pair per group of adjacent layers.

    Attributes:
        keys: `[groups, head_dim / key_chunks, atoms]` key dictionaries (unit-norm columns; held as fp16).
        values: `[groups, head_dim / value_chunks, atoms]` value dictionaries.
        groups: the layers of each group, e.g. `((0, 1, 2), (3, 4, 5))`.
        key_chunks: `s_n` for keys: each key is coded as this many equal slices.
        value_chunks: `s_n` for values.
        rope: the model's rotary embedding when the key dictionaries were trained on pre-RoPE keys, else None.
        model: the model it was trained for: its name plus `model_signature(config)`.
        sparsity: atoms per key slice and per value slice the dictionaries were trained with.
        version: file format version.
    """

    keys: Tensor
    values: Tensor
    groups: tuple[tuple[int, ...], ...]
    key_chunks: int = 1
    value_chunks: int = 2
    rope: Rotary | None = None
    model: dict = dataclasses.field(default_factory=dict)
    sparsity: tuple[int, int] = (8, 4)
    version: int = FORMAT_VERSION

    def __post_init__(self):
        self.keys, self.values = self.keys.detach().half(), self.values.detach().half()  # atoms are stored as fp16
        self.groups = tuple(tuple(int(i) for i in g) for g in self.groups)
        for name, t in (("keys", self.keys), ("values", self.values)):
            if t.dim() != 3 or t.shape[0] != len(self.groups):
                raise ValueError(f"{name} must be [groups={len(self.groups)}, dim, atoms], got {tuple(t.shape)}")
            if not 1 <= t.shape[-1] <= MAX_ATOMS:
                raise ValueError(f"{name}: atoms must be between 1 and {MAX_ATOMS} (int16 indices), got {t.shape[-1]}")
        layers = [i for g in self.groups for i in g]
        if len(set(layers)) != len(layers) or not all(g for g in self.groups):
            raise ValueError(f"layer groups must be non-empty and disjoint, got {self.groups}")
        self._group_of = {layer: k for k, g in enumerate(self.groups) for layer in g}

    @property
    def atoms(self) -> int:
        """Atoms per dictionary."""
        return self.keys.shape[-1]

    def dictionary(self, role: Role, layer: int | None) -> Tensor:
        """The `[dim, atoms]` dictionary of `role` for `layer` (None: the only group)."""
        table = self.keys if role == "key" else self.values
        if layer is None:
            if len(self.groups) != 1:
                raise ValueError(f"this dictionary set has {len(self.groups)} layer groups: the layer must be given "
                                 "(GearCache passes it)")
            return table[0]
        if layer not in self._group_of:
            raise ValueError(f"no dictionary for layer {layer}; this set covers layers {sorted(self._group_of)}")
        return table[self._group_of[layer]]

    def nbytes(self, role: Role, layer: int | None) -> int:
        """Bytes of `role`'s dictionary for `layer`'s group divided by the layers of the group: the layer's
        share, so that summed over all layers each dictionary counts once."""
        group = self.groups[0] if layer is None else self.groups[self._group_of[layer]]
        atoms = self.dictionary(role, layer)
        total, k = atoms.numel() * atoms.element_size(), group.index(group[0] if layer is None else layer)
        return total * (k + 1) // len(group) - total * k // len(group)  # the shares sum to `total` exactly

    def check_model(self, config) -> None:
        """Raise `ValueError` unless the model of `config` is the kind this set was trained for."""
        want = {k: v for k, v in self.model.items() if k != "name"}
        have = model_signature(config)
        wrong = {k: (v, have.get(k)) for k, v in want.items() if have.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k}: trained for {a}, model has {b}" for k, (a, b) in wrong.items())
            raise ValueError(f"this dictionary was trained for {self.model.get('name', 'another model')} and does not fit "
                             f"this model ({detail})")
        covered = {i for g in self.groups for i in g}
        missing = sorted(set(range(have["num_hidden_layers"])) - covered)
        if missing:
            raise ValueError(f"the dictionary has no atoms for layers {missing} of this model")

    def metadata(self) -> dict:
        """The JSON-serialisable description saved beside the tensors."""
        return {"format": "gearkit.DictionarySet", "version": self.version, "model": self.model,
                "groups": [list(g) for g in self.groups], "key_chunks": self.key_chunks,
                "value_chunks": self.value_chunks, "atoms": self.atoms, "sparsity": list(self.sparsity),
                "key_space": "pre-rope" if self.rope is not None else "post-rope",
                "attention_scaling": None if self.rope is None else self.rope.attention_scaling}

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (fp16 atoms; metadata under the `gearkit` key), atomically. Returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"keys": self.keys.detach().half().contiguous(), "values": self.values.detach().half().contiguous()}
        if self.rope is not None:
            tensors["rope.inv_freq"] = self.rope.inv_freq.contiguous()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"gearkit": json.dumps(self.metadata())})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, config=None) -> DictionarySet:
        """Read a file written by `save`; with `config`, refuse (ValueError) a set that does not fit that model.

        Raises:
            FileNotFoundError: if there is no such file.
            ValueError: if it is not a gearkit dictionary file, has another format version, or does not fit.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no dictionary file {str(path)!r} (train one with: gearkit dict train)")
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("gearkit")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(raw) if raw else {}
        if meta.get("format") != "gearkit.DictionarySet":
            raise ValueError(f"{path} is not a gearkit dictionary file")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} has dictionary format version {meta.get('version')}; this gearkit reads "
                             f"version {FORMAT_VERSION}: train it again")
        rope = None
        if meta["key_space"] == "pre-rope":
            rope = Rotary(tensors["rope.inv_freq"], meta["attention_scaling"])
        out = cls(tensors["keys"], tensors["values"], tuple(tuple(g) for g in meta["groups"]), meta["key_chunks"],
                  meta["value_chunks"], rope, meta["model"], tuple(meta["sparsity"]), meta["version"])
        if config is not None:
            out.check_model(config)
        return out


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime: float) -> DictionarySet:
    return DictionarySet.load(path)


Source = DictionarySet | str | os.PathLike | Callable[[], "DictionarySet | str | os.PathLike"]


# -- the stage -------------------------------------------------------------------------------------------------
class SparseDictionary(Stage):
    """Code each vector (or each of `chunks` slices of it) as `sparsity` atoms of a learned dictionary.

    Storage per vector: `chunks * sparsity` int16 atom indices and as many coefficients, fp16 (`coef_bits=16`)
    or int8 with one fp16 scale per vector (`coef_bits=8`); with pre-RoPE keys also one int32 first position
    per batch entry. At head dim 64: `csr-8` keys (s=8, s_n=1) are 8 * 32 / 64 = 4 bits per element, and so are
    its values (s=4 per half); `csr-4` halves that (2 bits). The dictionary's own bytes are reported by the
    cache (`GearCache.memory_report()`, component `dictionary`), amortised over the layers that share it.

    Args:
        dictionary: a `DictionarySet`, a path to one, or a zero-argument callable returning either; read on
            first use (so recipes can name a dictionary that is trained or loaded only when needed).
        role: `"key"` or `"value"`: which of the set's dictionaries to use.
        sparsity: atoms per slice `s`.
        chunks: slices per vector `s_n` (None: the set's `key_chunks` / `value_chunks`).
        solver: `"mp"`, `"omp"`, or a callable `(x [n, dim], atoms [dim, A], s) -> (index [n, s], coef [n, s])`.
        coef_bits: 16 (fp16 coefficients) or 8 (int8 codes and an fp16 scale per vector).
        pre_rope: code keys before RoPE (undo the rotation from token positions, redo it after decoding). None:
            as the set's key dictionaries were trained. Needs a set trained on pre-RoPE keys; ignored for values.
    """

    needs_positions: ClassVar[bool] = True

    def __init__(self, dictionary: Source, role: Role, sparsity: int, chunks: int | None = None,
                 solver: str | Solver = "mp", coef_bits: int = 16, pre_rope: bool | None = None):
        super().__init__()
        if role not in ("key", "value"):
            raise ValueError(f"role must be 'key' or 'value', got {role!r}")
        if not isinstance(sparsity, int) or sparsity < 1:
            raise ValueError(f"sparsity must be a positive int, got {sparsity!r}")
        if chunks is not None and (not isinstance(chunks, int) or chunks < 1):
            raise ValueError(f"chunks must be a positive int, got {chunks!r}")
        if coef_bits not in (8, 16):
            raise ValueError(f"coef_bits must be 16 (fp16) or 8 (int8 + fp16 scale per vector), got {coef_bits!r}")
        if isinstance(solver, str) and solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)} (or pass a callable)")
        if not (isinstance(dictionary, (DictionarySet, str, os.PathLike)) or callable(dictionary)):
            raise TypeError(f"dictionary must be a DictionarySet, a path or a callable, got {type(dictionary).__name__}")
        self.source, self.role, self.sparsity, self._chunks = dictionary, role, sparsity, chunks
        self.solver, self.coef_bits, self._pre_rope = solver, coef_bits, pre_rope

    # -- the dictionary, read lazily ---------------------------------------------------------------------------
    @property
    def dictionaries(self) -> DictionarySet:
        """The `DictionarySet`, read (or produced by the source callable) on first access."""
        source = self.source
        if isinstance(source, DictionarySet):
            return source
        if callable(source) and not isinstance(source, (str, os.PathLike)):
            source = source()
            if isinstance(source, DictionarySet):
                self.source = source
                return source
        path = Path(source).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no dictionary file {str(path)!r} (train one with: gearkit dict train)")
        return _load_cached(str(path), path.stat().st_mtime)

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
            raise ValueError("pre-RoPE coding needs a dictionary set trained on pre-RoPE keys (it carries the rotary "
                             "parameters); this one was trained on post-RoPE keys")
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
            raise ValueError(f"the {self.role} dictionary has atoms of dim {atoms.shape[0]}; {self.chunks} slice(s) of a "
                             f"head_dim-{dim} vector need dim {dim / self.chunks:g}")
        return atoms

    def _solve(self, x: Tensor, atoms: Tensor) -> tuple[Tensor, Tensor]:
        solve = SOLVERS[self.solver] if isinstance(self.solver, str) else self.solver
        return solve(x, atoms, self.sparsity)

    # -- Stage API -------------------------------------------------------------------------------------------
    def encode(self, x: Tensor, exclude: Tensor | None = None, *, positions: Tensor | None = None,
               layer: int | None = None) -> DictionaryPart:
        """Code `x` `[batch, kv_heads, tokens, head_dim]`.

        Args:
            x: the vectors.
            exclude: bool like `x`; those entries are zeroed before coding (stored exactly elsewhere).
            positions: int `[batch]`, the sequence position of each entry's first token (entry `i`'s token `t` is
                at `positions[i] + t`); None: 0. Used for pre-RoPE keys.
            layer: the model layer, which picks the dictionary group (None: a set with one group).
        """
        b, h, t, d = x.shape
        atoms = self._atoms(layer, d, x.device)
        start = None
        if self.pre_rope:
            start = torch.zeros(b, dtype=torch.int32, device=x.device) if positions is None else positions.to(x.device, torch.int32)
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
            scale = check_storable((coef.abs().amax(-1, keepdim=True) / 127).half(), "coefficient scales")
            coef = torch.round(coef / scale.float().clamp_min(torch.finfo(torch.float16).tiny)).clamp(-127, 127).to(torch.int8)
        else:
            coef = check_storable(coef.half(), "coefficients")
        return DictionaryPart(index, coef, scale, start, layer, self.chunks)

    def decode(self, part: DictionaryPart) -> Tensor:
        b, h, t, _ = part.indices.shape
        d = self.dictionaries.dictionary(self.role, part.layer).shape[0] * part.chunks
        atoms = self._atoms(part.layer, d, part.indices.device)
        coef = part.coefficients.float()
        if part.scale is not None:
            coef = coef * part.scale.float()
        per_slice = part.indices.shape[-1] // part.chunks
        out = reconstruct(part.indices.reshape(b, h, t, part.chunks, per_slice),
                          coef.reshape(b, h, t, part.chunks, per_slice), atoms).reshape(b, h, t, d)
        if part.start is not None:
            positions = part.start[:, None].long() + torch.arange(t, device=out.device)
            out = self.dictionaries.rope.to(out.device).apply(out, positions)
        return out

    def extra_repr(self) -> str:
        source = self.source if isinstance(self.source, (str, os.PathLike)) else type(self.source).__name__
        solver = self.solver if isinstance(self.solver, str) else getattr(self.solver, "__name__", "custom")
        return (f"role={self.role}, sparsity={self.sparsity}, chunks={self._chunks}, solver={solver}, "
                f"coef_bits={self.coef_bits}, pre_rope={self._pre_rope}, dictionary={source}")
