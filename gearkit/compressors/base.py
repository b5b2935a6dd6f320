"""The stage interface: `encode(x, exclude, ctx) -> part`, `decode(part) -> tensor`, a declared `requires` set,
and `config()` / `Stage.from_config()` so stages (and so recipes) can be written down as plain data."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gearkit.compressors.checks import check_kv, check_storable
from gearkit.compressors.rope import RoPE
from gearkit.kernels.products import dense_scores, dense_weighted
from gearkit.parts import DensePart, Part

CONTEXT_FIELDS = ("saliency", "positions", "layer", "rope")


@dataclasses.dataclass(frozen=True)
class Context:
    """What one request supplies to the stages of a pipeline (stages themselves hold configuration only).

    Attributes:
        saliency: float `[batch, kv_heads, tokens]` per-token saliency (ZipCache's `MixedPrecision`).
        positions: int `[batch]`: the sequence position of each batch entry's first token (pre-RoPE coding).
        layer: the model layer (stages with per-layer artifacts, such as CSR dictionaries).
        rope: the layer's rotary embedding, read from the model's config (pre-RoPE coding).
    """

    saliency: Tensor | None = None
    positions: Tensor | None = None
    layer: int | None = None
    rope: RoPE | None = None

    def given(self) -> set[str]:
        """Names of the fields that are set."""
        return {name for name in CONTEXT_FIELDS if getattr(self, name) is not None}


NO_CONTEXT = Context()


def text_config(config):
    """The text decoder's part of a `transformers` config (`get_text_config(decoder=True)`), or `config` itself
    when it has no such method (a plain config, or a stand-in in tests)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def to_data(value: Any) -> Any:
    """A stage argument as JSON-ready data: dtypes as `"torch.float16"`, stages as their `to_dict()`."""
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, Stage):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [to_data(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as recipe data")


def from_data(value: Any) -> Any:
    """Inverse of `to_data`."""
    if isinstance(value, str) and value.startswith("torch."):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {value!r}")
        return dtype
    if isinstance(value, dict) and "stage" in value:
        return Stage.from_dict(value)
    if isinstance(value, list):
        return [from_data(v) for v in value]
    return value


class Stage(nn.Module, abc.ABC):
    """One compression stage: `encode(x, exclude, ctx) -> part`, `decode(part) -> tensor`.

    Stages hold configuration only, never per-request state. Inside a `Pipeline` a stage encodes the
    residual the earlier stages left; `exclude` marks entries an earlier stage already stores exactly, which
    the stage should not spend precision on (the pipeline discards its output there). What a request supplies
    (saliency, positions, layer, the rotary embedding) comes in one `Context`; `requires` names the fields a stage
    cannot do without, and a `Pipeline` checks them once before any stage runs.

    `config()` returns a stage's constructor arguments, so `Stage.from_dict(stage.to_dict())` rebuilds an equal
    stage (found by class name among the subclasses defined so far).
    """

    REQUIRES: ClassVar[frozenset[str]] = frozenset()

    @staticmethod
    def known() -> dict[str, type[Stage]]:
        """Every stage class defined so far (gearkit's and users'), by class name."""
        out, todo = {}, list(Stage.__subclasses__())
        while todo:
            cls = todo.pop()
            out[cls.__name__] = cls
            todo += cls.__subclasses__()
        return out

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
        """The stage as JSON-ready data: `{"stage": class name, **config()}`."""
        return {"stage": type(self).__name__, **{k: to_data(v) for k, v in self.config().items()}}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Stage:
        """Rebuild a stage from `to_dict()` data.

        Raises:
            ValueError: for an unknown stage name.
        """
        data = dict(data)
        name, known = data.pop("stage", None), Stage.known()
        if name not in known:
            raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(sorted(known))}")
        return known[name](**{k: from_data(v) for k, v in data.items()})

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
    if "rope" in missing:
        raise ValueError(
            "this pipeline codes keys before RoPE and needs the layer's rotary embedding (a GearCache built with "
            "the model's config supplies it; pass rope=gearkit.models.model_family(config).layers[i].rope)"
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


class FullPrecision(Stage):
    """Store the tensor as it is in `dtype` (the fp16/bf16 baseline).

    Args:
        dtype: storage dtype.
    """

    def __init__(self, dtype: torch.dtype = torch.float16):
        super().__init__()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"FullPrecision needs a floating dtype, got {dtype}")
        self.dtype = dtype

    def config(self) -> dict[str, Any]:
        return {"dtype": self.dtype}

    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> DensePart:
        data = x.to(self.dtype, memory_format=torch.contiguous_format, copy=True)
        return DensePart(check_storable(data, "values", "FullPrecision dtype"))

    def decode(self, part: DensePart) -> Tensor:
        return part.data.float()

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}"
