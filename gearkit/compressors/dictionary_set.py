"""Dictionaries as artifacts: a `DictionarySet` (key and value atoms per group of layers, with the model they
fit), saved as safetensors with JSON metadata and read back, refused for a model it does not fit.

NeuralDict (`gearkit.neuraldict`) trains them; reading one needs no training code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Literal

from torch import Tensor

from gearkit.compressors.base import text_config
from gearkit.compressors.rope import RoPE

FORMAT_VERSION = 1
MAX_ATOMS = 2**15  # indices are stored as int16
Role = Literal["key", "value"]


def rope_parameters(config) -> tuple[float | None, str]:
    """`(rope_theta, rope_type)` of a `transformers` config (older configs: `rope_theta` and `rope_scaling`)."""
    text = text_config(config)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    rope = rope if isinstance(rope, dict) else {}
    theta = rope.get("rope_theta", getattr(text, "rope_theta", None))
    kind = rope.get("rope_type", rope.get("type", "default"))
    return (None if theta is None else float(theta)), kind


def model_signature(config) -> dict:
    """What a dictionary must agree with to fit a model: `{model_type, num_hidden_layers, hidden_size,
    num_key_value_heads, head_dim, rope_theta}` from a `transformers` config."""
    text = text_config(config)
    theta, _ = rope_parameters(text)
    return {
        "model_type": getattr(text, "model_type", None),
        "num_hidden_layers": text.num_hidden_layers,
        "hidden_size": text.hidden_size,
        "num_key_value_heads": getattr(text, "num_key_value_heads", text.num_attention_heads),
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        "rope_theta": theta,
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
    rope: RoPE | None = None
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
                raise ValueError(
                    f"this dictionary set has {len(self.groups)} layer groups: the layer must be given "
                    "(GearCache passes it)"
                )
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
            raise ValueError(
                f"this dictionary was trained for {self.model.get('name', 'another model')} and does not fit "
                f"this model ({detail})"
            )
        covered = {i for g in self.groups for i in g}
        missing = sorted(set(range(have["num_hidden_layers"])) - covered)
        if missing:
            raise ValueError(f"the dictionary has no atoms for layers {missing} of this model")

    def metadata(self) -> dict:
        """The JSON-serialisable description saved beside the tensors."""
        return {
            "format": "gearkit.DictionarySet",
            "version": self.version,
            "model": self.model,
            "groups": [list(g) for g in self.groups],
            "key_chunks": self.key_chunks,
            "value_chunks": self.value_chunks,
            "atoms": self.atoms,
            "sparsity": list(self.sparsity),
            "key_space": "pre-rope" if self.rope is not None else "post-rope",
            "attention_scaling": None if self.rope is None else self.rope.attention_scaling,
        }

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
        try:
            with safe_open(str(path), "pt") as f:
                raw = (f.metadata() or {}).get("gearkit")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors file is not a dict)
        except Exception as e:  # safetensors raises its own error type for a damaged file
            raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
        meta = json.loads(raw) if raw else {}
        if meta.get("format") != "gearkit.DictionarySet":
            raise ValueError(f"{path} is not a gearkit dictionary file")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has dictionary format version {meta.get('version')}; this gearkit reads "
                f"version {FORMAT_VERSION}: train it again"
            )
        rope = None
        if meta["key_space"] == "pre-rope":
            rope = RoPE(tensors["rope.inv_freq"], meta["attention_scaling"])
        out = cls(
            tensors["keys"],
            tensors["values"],
            tuple(tuple(g) for g in meta["groups"]),
            meta["key_chunks"],
            meta["value_chunks"],
            rope,
            meta["model"],
            tuple(meta["sparsity"]),
            meta["version"],
        )
        if config is not None:
            out.check_model(config)
        return out


@functools.lru_cache(maxsize=8)
def load_cached(path: str, mtime: float) -> DictionarySet:
    """`DictionarySet.load(path)`, cached by path and modification time (stages share one copy)."""
    return DictionarySet.load(path)
