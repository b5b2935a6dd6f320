"""The stage interface: `encode(x, exclude, ctx) -> part`, `decode(part) -> tensor`, a declared `requires` set,
and `config()` / `to_dict()` / `Stage.from_dict()` so stages (and so recipes) can be written down as plain data.

Reading data builds only registered stage classes (`register_stage`: gearkit's own, and user stages registered
by name) and never imports or calls code: a `"python:module.name"` reference in the data (a custom CSR solver or
dictionary source) is refused unless the caller passes `trusted=True`.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import inspect
import os
import sys
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from gearkit.compressors.checks import check_float_dtype, check_kv, check_storable
from gearkit.kernels.products import dense_scores, dense_weighted
from gearkit.parts import DensePart, Part

CONTEXT_FIELDS = ("saliency", "positions", "layer")


@dataclasses.dataclass(frozen=True)
class Context:
    """What one request supplies to the stages of a pipeline (stages themselves hold configuration only).

    Attributes:
        saliency: float `[batch, kv_heads, tokens]` per-token saliency (ZipCache's `MixedPrecision`).
        positions: int `[batch]`: the sequence position of each batch entry's first token (pre-RoPE coding).
        layer: the model layer (stages with per-layer artifacts, such as CSR dictionaries).
    """

    saliency: Tensor | None = None
    positions: Tensor | None = None
    layer: int | None = None

    def given(self) -> set[str]:
        """Names of the fields that are set."""
        return {name for name in CONTEXT_FIELDS if getattr(self, name) is not None}


NO_CONTEXT = Context()


def text_config(config):
    """The text decoder's part of a `transformers` config (`get_text_config(decoder=True)`), or `config` itself
    when it has no such method (a plain config, or a stand-in in tests)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


CODE = "python:"  # recipe data that names code by its import path (resolved only from trusted data)


def to_data(value: Any) -> Any:
    """A stage argument as JSON-ready data: dtypes as `"torch.float16"`, stages as their `to_dict()`, paths as
    strings, a module-level function as `"python:module.name"`.

    Raises:
        TypeError: for a value that is none of these (a lambda, a dictionary set held in memory).
    """
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, Stage):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [to_data(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    module, name = getattr(value, "__module__", None), getattr(value, "__qualname__", "")
    if callable(value) and name.isidentifier() and getattr(sys.modules.get(module), name, None) is value:
        return f"{CODE}{module}.{name}"
    raise TypeError(
        f"cannot write {type(value).__name__} {value!r} as recipe data: give a path, a module-level function or "
        "another JSON value"
    )


def from_data(value: Any, *, trusted: bool = False, where: str = "recipe data") -> Any:
    """Inverse of `to_data`: never imports or calls anything unless `trusted`.

    Args:
        value: JSON-ready data.
        trusted: resolve `"python:module.name"` references by importing the module (only for data from a source
            you trust: importing runs the module's code).
        where: the value's place in the data, named in errors (e.g. `"key.stages[0].solver"`).

    Raises:
        ValueError: for a code reference without `trusted`, an unknown dtype or stage, or a value that is not
            recipe data; the message names `where`.
    """
    if isinstance(value, str) and value.startswith(CODE):
        return _resolve_code(value, trusted, where)
    if isinstance(value, str) and value.startswith("torch."):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{where}: unknown dtype {value!r}")
        return dtype
    if isinstance(value, dict):
        return Stage.from_dict(value, trusted=trusted, where=where)
    if isinstance(value, (list, tuple)):
        return [from_data(v, trusted=trusted, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"{where} is a {type(value).__name__}, which recipe data cannot hold")


def data_kind(value: Any) -> str:
    """What a piece of recipe data is, for error messages: an object's keys, or its type's name."""
    return f"an object with keys {sorted(map(str, value))}" if isinstance(value, dict) else type(value).__name__


def _resolve_code(reference: str, trusted: bool, where: str) -> Any:
    """The object a `"python:module.name"` reference names, imported only when the data is `trusted`."""
    if not trusted:
        raise ValueError(
            f"{where} names code ({reference!r}), and reading recipe data never imports or runs code; if you trust "
            "this data, load it with trusted=True (e.g. Recipe.from_dict(data, trusted=True))"
        )
    module, _, name = reference.removeprefix(CODE).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{where}: cannot import {reference!r} ({e})") from None


_STAGES: dict[str, type[Stage]] = {}  # the stage classes recipe data may name, by name
T = TypeVar("T", bound="Stage")


def register_stage(cls: type[T]) -> type[T]:
    """Let recipe data name the stage class `cls` (use as a class decorator): `Stage.from_dict` builds registered
    classes only, looked up by class name.

    gearkit registers its own stages. A name belongs to one class, so a class that merely shares a registered
    stage's name (a user's `Quantizer`) never changes what recipe data builds; defining the same class again (the
    same module and qualified name: a re-run notebook cell, a reloaded module) replaces it.

    Args:
        cls: a concrete `Stage` subclass.

    Returns:
        `cls`.

    Raises:
        TypeError: if `cls` is not a concrete `Stage` subclass.
        ValueError: if another class is registered under its name.
    """
    if not (isinstance(cls, type) and issubclass(cls, Stage)) or inspect.isabstract(cls):
        raise TypeError(f"register_stage takes a concrete gearkit Stage subclass, got {cls!r}")
    held = _STAGES.get(cls.__name__)
    if held is not None and (held.__module__, held.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(
            f"a stage named {cls.__name__!r} is already registered ({held.__module__}.{held.__qualname__}); recipe "
            f"data names stages by class name, so give {cls.__module__}.{cls.__qualname__} another name"
        )
    _STAGES[cls.__name__] = cls
    return cls


class Stage(nn.Module, abc.ABC):
    """One compression stage: `encode(x, exclude, ctx) -> part`, `decode(part) -> tensor`.

    Stages hold configuration only, never per-request state. Inside a `Pipeline` a stage encodes the
    residual the earlier stages left; `exclude` marks entries an earlier stage already stores exactly, which
    the stage should not spend precision on (the pipeline discards its output there). What a request supplies
    (saliency, positions, layer) comes in one `Context`; `requires` names the fields a stage cannot do without,
    and a `Pipeline` checks them once before any stage runs.

    `config()` returns a stage's constructor arguments, so `Stage.from_dict(stage.to_dict())` rebuilds an equal
    stage (its class found by name among the registered ones, see `register_stage`).
    """

    REQUIRES: ClassVar[frozenset[str]] = frozenset()

    @staticmethod
    def known() -> dict[str, type[Stage]]:
        """The stage classes recipe data may name (gearkit's and those given to `register_stage`), by name."""
        return dict(_STAGES)

    @property
    def requires(self) -> frozenset[str]:
        """Context fields this stage needs (composite stages add their children's)."""
        return self.REQUIRES

    @abc.abstractmethod
    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> Part:
        """Compress `x`.

        Args:
            x: float tensor `KV`, finite.
            exclude: optional bool tensor shaped like `x`; True entries are stored exactly elsewhere.
            ctx: what the request supplies (see `Context`).

        Returns:
            The stored part.
        """

    @abc.abstractmethod
    def decode(self, part: Part) -> Tensor:
        """Reconstruct from a part: float32 `KV`."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this stage (`type(self)(**config())`)."""

    def to_dict(self) -> dict[str, Any]:
        """The stage as JSON-ready data: `{"stage": class name, **config()}`.

        Raises:
            TypeError: for a stage class that is not registered (`register_stage`), or an argument that is not data.
        """
        name = type(self).__name__
        if _STAGES.get(name) is not type(self):
            raise TypeError(
                f"{type(self).__module__}.{type(self).__qualname__} is not a registered stage, so recipe data cannot "
                "name it; register it with gearkit.register_stage"
            )
        return {"stage": name, **{k: to_data(v) for k, v in self.config().items()}}

    @staticmethod
    def from_dict(data: dict[str, Any], *, trusted: bool = False, where: str = "stage data") -> Stage:
        """Rebuild a stage from `to_dict()` data, building only registered stage classes.

        Args:
            data: `{"stage": name, **constructor arguments}`.
            trusted: resolve `"python:module.name"` references (see `from_data`); without it they are refused.
            where: the data's place, named in errors.

        Raises:
            ValueError: for an unknown stage name, missing or unknown arguments, a code reference without
                `trusted`, or settings the stage refuses; the message names `where`.
            TypeError: for an argument of the wrong kind (as the stage's constructor raises it), naming `where`.
        """
        if not isinstance(data, dict) or "stage" not in data:
            raise ValueError(
                f"{where} must be a stage: an object with a 'stage' name and its arguments, got {data_kind(data)}"
            )
        data = dict(data)
        name = data.pop("stage")
        cls = _STAGES.get(name) if isinstance(name, str) else None
        if cls is None:
            raise ValueError(
                f"unknown stage {name!r} ({where}); known stages: {', '.join(sorted(_STAGES))} (a stage of your "
                "own must be registered with gearkit.register_stage)"
            )
        args = {k: from_data(v, trusted=trusted, where=f"{where}.{k}") for k, v in data.items()}
        try:
            inspect.signature(cls).bind(**args)
        except TypeError as e:
            raise ValueError(f"{where} ({name}): {e}") from None
        try:
            return cls(**args)
        except (TypeError, ValueError) as e:
            raise (TypeError if isinstance(e, TypeError) else ValueError)(f"{where} ({name}): {e}") from None

    def exact_mask(self, part: Part) -> Tensor | None:
        """Bool `KV` of entries this part stores exactly, or None."""
        return None

    # Decode attention reads a block of stored chunks through these two products (`Pipeline.scores`). The defaults
    # decode the part; stages that can multiply by their stored form directly override them.
    def scores(self, part: Part, q: Tensor, chunks: int) -> Tensor:
        """Queries times the stored vectors, `q @ x^T`, for a block of chunks.

        Args:
            part: this stage's part of `x` `[(chunks batch), kv_heads, T, head_dim]` (chunks stacked chunk-major).
            q: float32 `[1, batch, kv_heads, rows, head_dim]`: each KV head's query rows.
            chunks: chunks in the block.

        Returns:
            float32 `[chunks, batch, kv_heads, rows, T]`.
        """
        return dense_scores(q, self.decode(part), chunks)

    def weighted(self, part: Part, p: Tensor) -> Tensor:
        """Weights times the stored vectors, `p @ x`, summed over a block's chunks.

        Args:
            part: this stage's part of `x` `[(chunks batch), kv_heads, T, head_dim]` (chunks stacked chunk-major).
            p: float32 `[chunks, batch, kv_heads, rows, T]`.

        Returns:
            float32 `[batch, kv_heads, rows, head_dim]`.
        """
        return dense_weighted(p, self.decode(part))

    def check_chunk(self, tokens: int, head_dim: int | None = None) -> None:
        """Raise `ValueError` if this stage cannot encode chunks of `tokens` tokens (default: it can)."""

    def check_model(self, config) -> None:
        """Raise `ValueError` if this stage cannot serve the model of `config` (default: every model fits)."""

    def shared_nbytes(self, layer: int | None) -> int:
        """Bytes of shared artifacts this stage reads for `layer` (a dictionary), as this layer's share; 0 here."""
        return 0

    def forward(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT, **context: Any) -> Tensor:
        """Round trip `x` `KV` through this stage alone; returns `x`'s shape and
        dtype. Context fields may be given as a `Context` or as keywords (`saliency=...`)."""
        check_kv(x)
        return self.decode(self.encode(x.float(), exclude, make_context(ctx, context, self.requires))).to(x.dtype)


def make_context(ctx: Context | None, fields: dict[str, Any], requires: frozenset[str]) -> Context:
    """`ctx` with `fields` set, checked to hold every field in `requires`.

    Raises:
        ValueError: for an unknown field or a missing required one.
    """
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown context field(s) {sorted(unknown)}; stages take {', '.join(CONTEXT_FIELDS)}")
    ctx = dataclasses.replace(ctx or NO_CONTEXT, **fields) if fields else (ctx or NO_CONTEXT)
    missing = requires - ctx.given()
    if "saliency" in missing:
        raise ValueError(
            "this pipeline needs per-token saliency scores [batch, kv_heads, tokens] (a ZipCache cache "
            "computes them from probe queries; pass saliency=...)"
        )
    if missing:
        raise ValueError(f"this pipeline needs context field(s) {sorted(missing)}")
    return ctx


class Wrapper(Stage):
    """A stage that holds stages. Every hook reaches the children by default, so a wrapper states only what differs.

    By default a wrapper has one child, `self.inner`, whose part is the wrapper's part (`route`): decoding, exact
    entries and the stored-form reads (`scores`, `weighted`) are the child's. `requires`, `check_chunk`,
    `check_model` and `shared_nbytes` always reach every child (a child held in several slots counts once). A
    wrapper whose part holds another form (a tagged part, several children's parts) overrides `route` or the hooks
    that combine its children, and `held` when it holds more than `inner`.
    """

    inner: Stage

    def held(self) -> list[Stage]:
        """The child stages (each once)."""
        return [self.inner]

    def route(self, part: Part) -> tuple[Stage, Part]:
        """The child that reads `part`, and its own part of it."""
        return self.inner, part

    @property
    def requires(self) -> frozenset[str]:
        return self.REQUIRES.union(*(s.requires for s in self.held()))

    def check_chunk(self, tokens: int, head_dim: int | None = None) -> None:
        for stage in self.held():
            stage.check_chunk(tokens, head_dim)

    def check_model(self, config) -> None:
        for stage in self.held():
            stage.check_model(config)

    def shared_nbytes(self, layer: int | None) -> int:
        return sum(s.shared_nbytes(layer) for s in self.held())

    def decode(self, part: Part) -> Tensor:
        stage, inner = self.route(part)
        return stage.decode(inner)

    def exact_mask(self, part: Part) -> Tensor | None:
        stage, inner = self.route(part)
        return stage.exact_mask(inner)

    def scores(self, part: Part, q: Tensor, chunks: int) -> Tensor:
        stage, inner = self.route(part)
        return stage.scores(inner, q, chunks)

    def weighted(self, part: Part, p: Tensor) -> Tensor:
        stage, inner = self.route(part)
        return stage.weighted(inner, p)


def distinct(stages) -> list[Stage]:
    """`stages` without repeats of the same object (None entries dropped), in order."""
    return list({id(s): s for s in stages if s is not None}.values())


@register_stage
class FullPrecision(Stage):
    """Store the tensor as it is in `dtype` (the fp16/bf16 baseline).

    Args:
        dtype: storage dtype.
    """

    def __init__(self, dtype: torch.dtype = torch.float16):
        super().__init__()
        self.dtype = check_float_dtype(dtype, "FullPrecision dtype")

    def config(self) -> dict[str, Any]:
        return {"dtype": self.dtype}

    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> DensePart:
        data = x.to(self.dtype, memory_format=torch.contiguous_format, copy=True)
        return DensePart(check_storable(data, "values", "FullPrecision dtype"))

    def decode(self, part: DensePart) -> Tensor:
        return part.data.float()

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}"
