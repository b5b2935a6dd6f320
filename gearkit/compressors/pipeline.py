"""Chain stages on residuals: each stage encodes what the earlier ones left over."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gearkit.compressors import fused
from gearkit.compressors.base import (
    NO_CONTEXT,
    Context,
    Stage,
    Wrapper,
    data_kind,
    distinct,
    make_context,
    register_stage,
)
from gearkit.compressors.checks import check_kv
from gearkit.kernels import ops
from gearkit.kernels.backend import may_use_triton, use_triton
from gearkit.kernels.layout import StorageLayout, layout_ints, layout_tensors
from gearkit.kernels.products import dense_scores, dense_weighted
from gearkit.parts import CompressedTensor, Part


class Pipeline(nn.Module):
    """A sequence of stages whose decoded parts sum to the reconstruction.

    Stage `k` encodes `x` minus the decoded parts of stages `1..k-1`. Entries that a stage stores exactly
    (sparse outliers) are excluded from every later stage: later stages ignore them when fitting and their
    output there is discarded, so those entries come back exactly. What a request supplies (saliency,
    positions, layer) goes to every stage in one `Context`; `requires` is what the stages need of it.

    Example:
        >>> gear = Pipeline([SparseOutlier(0.02), Quantizer(2, 64, "token"), LowRankResidual(2)])
        >>> c = gear.compress(x)              # x: [batch, kv_heads, tokens, head_dim]
        >>> x_hat = gear.decompress(c)        # same shape and dtype as x
        >>> c.bits_per_element, c.components()

    Args:
        stages: the stages, in order.
    """

    def __init__(self, stages: Sequence[Stage]):
        super().__init__()
        stages = list(stages)
        if not stages:
            raise ValueError("a Pipeline needs at least one stage")
        for s in stages:
            if not isinstance(s, Stage):
                raise TypeError(f"pipeline stages must be gearkit Stage modules, got {type(s).__name__}")
        self.stages = nn.ModuleList(stages)
        self._layouts: dict[tuple, tuple[StorageLayout | None, str | None]] = {}  # storage_layout's answers

    @property
    def requires(self) -> frozenset[str]:
        """Context fields some stage needs (`"saliency"`: the cache must score tokens from queries)."""
        return frozenset().union(*(s.requires for s in self.stages))

    def to_dict(self) -> dict[str, Any]:
        """The pipeline as JSON-ready data: `{"stages": [stage.to_dict(), ...]}`."""
        return {"stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, trusted: bool = False, where: str = "pipeline data") -> Pipeline:
        """Inverse of `to_dict`.

        Args:
            data: `{"stages": [stage data, ...]}`.
            trusted: resolve `"python:module.name"` references (see `Stage.from_dict`); without it they are refused.
            where: the data's place, named in errors.

        Raises:
            ValueError: for data that is not a pipeline's (the message names `where`), or as `Stage.from_dict`.
        """
        if not isinstance(data, dict) or set(data) != {"stages"} or not isinstance(data["stages"], list):
            raise ValueError(f"{where} must be an object holding only a list of 'stages', got {data_kind(data)}")
        stages = [
            Stage.from_dict(s, trusted=trusted, where=f"{where}.stages[{i}]") for i, s in enumerate(data["stages"])
        ]
        if not stages:
            raise ValueError(f"{where} has no stages; a pipeline needs at least one")
        return cls(stages)

    @staticmethod
    def _contribution(stage: Stage, part: Part, exact: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """A part's decoded contribution with entries stored exactly by earlier parts zeroed, and the
        updated mask of exact entries."""
        out = stage.decode(part)
        if exact is not None:
            out = out.masked_fill(exact, 0.0)
        mask = stage.exact_mask(part)
        if mask is not None:
            exact = mask if exact is None else exact | mask
        return out, exact

    def check_chunk(self, tokens: int, head_dim: int | None = None) -> None:
        """Raise `ValueError` if a stage cannot encode chunks of `tokens` tokens (a rank above the chunk size)."""
        for stage in self.stages:
            stage.check_chunk(tokens, head_dim)

    def check_model(self, config) -> None:
        """Raise `ValueError` if a stage cannot serve the model of `config` (a dictionary trained for another)."""
        for stage in self.stages:
            stage.check_model(config)

    def shared_nbytes(self, layer: int | None) -> int:
        """Bytes of shared artifacts (dictionaries) the stages read for `layer`, as this layer's share."""
        return sum(stage.shared_nbytes(layer) for stage in self.stages)

    def compress(
        self, x: Tensor, exclude: Tensor | None = None, ctx: Context | None = None, **context: Any
    ) -> CompressedTensor:
        """Compress `x` `KV` (fp32, fp16 or bf16, finite).

        Args:
            x: the tensor.
            exclude: optional bool tensor shaped like `x`: entries the caller stores exactly elsewhere. No
                stage spends precision on them and their reconstruction is unspecified (but finite).
            ctx: what the request supplies (`Context`), passed to every stage.
            **context: context fields as keywords, e.g. `saliency=` float `[batch, kv_heads, tokens]`,
                `positions=` int `[batch]` (each entry's first sequence position), `layer=` (the model layer).

        Returns:
            A `CompressedTensor` holding one part per stage.

        Raises:
            ValueError: if `x` is not 4-D, not floating point, or not finite, or the context lacks a field a
                stage requires.
        """
        ctx = make_context(ctx, context, self.requires)
        check_kv(x)
        if exclude is not None and exclude.shape != x.shape:
            raise ValueError(f"exclude must have the shape of x {tuple(x.shape)}, got {tuple(exclude.shape)}")
        residual, exact, parts = x.float(), exclude, []
        for i, stage in enumerate(self.stages):
            parts.append(stage.encode(residual, exact, ctx))
            if i + 1 < len(self.stages):  # the last stage's residual is never needed
                contribution, exact = self._contribution(stage, parts[-1], exact)
                residual = residual - contribution
        return CompressedTensor(tuple(parts), tuple(x.shape), x.dtype)

    def decompress(self, c: CompressedTensor) -> Tensor:
        """Reconstruct: tensor of `c.shape` `KV` and `c.dtype`."""
        if len(c.parts) != len(self.stages):
            raise ValueError(
                f"compressed tensor has {len(c.parts)} parts but the pipeline has {len(self.stages)} stages"
            )
        device = next(iter(c.tensors().values())).device
        if c.numel and may_use_triton(device):
            layout, unsupported = self.storage_layout(c.shape)
            if use_triton(device, unsupported or layout.triton_unsupported(c)):  # one fused pass over the stored bytes
                return ops.reconstruct(list(layout_tensors(c)), layout_ints(layout), c.shape[0], c.shape[1], c.dtype)
        total, exact = None, None
        for stage, part in zip(self.stages, c.parts):
            contribution, exact = self._contribution(stage, part, exact)
            total = contribution if total is None else total + contribution
        return total.to(c.dtype)

    def forward(self, x: Tensor, exclude: Tensor | None = None, ctx: Context | None = None, **context: Any) -> Tensor:
        """Round trip: `decompress(compress(x, exclude, ctx, **context))`, same shape and dtype as `x`."""
        return self.decompress(self.compress(x, exclude, ctx, **context))

    def storage_layout(self, shape: tuple[int, ...]) -> tuple[StorageLayout | None, str | None]:
        """How chunks of `shape` `[entries, kv_heads, T, head_dim]` are laid out, if in GEAR's fused layout (see
        `gearkit.compressors.fused`), which the Triton kernels and the outlier corrections of `scores` read.

        Returns:
            `(layout, None)` when the pipeline is in that layout, else `(None, reason)`.
        """
        # Asked at every decode step: worked out once per shape and stage list (stages are configured once).
        key = (tuple(shape[1:]), tuple(map(id, self.stages)))
        if key not in self._layouts:
            self._layouts[key] = fused.layout_of(self.stages, shape)
        return self._layouts[key]

    def scores(self, c: CompressedTensor, q: Tensor, chunks: int) -> Tensor:
        """Queries times the stored keys of a block of chunks, `q @ k^T`, read in their stored form: in the fused
        layout (`storage_layout`), else stage by stage (`Stage.scores`) where no stage stores entries exactly
        (those replace, not add), else from the decompressed block.

        Args:
            c: a block of chunks stacked chunk-major, `[(chunks batch), kv_heads, T, head_dim]`.
            q: float32 `[1, batch, kv_heads, rows, head_dim]`: each KV head's query rows.
            chunks: chunks in the block.

        Returns:
            float32 `[chunks, batch, kv_heads, rows, T]`.
        """
        layout, _ = self.storage_layout(c.shape)
        if layout is not None:
            return fused.scores(self.stages, c, q, chunks, layout)
        if self._additive(c):
            return sum(stage.scores(part, q, chunks) for stage, part in zip(self.stages, c.parts))
        return dense_scores(q, self.decompress(c).float(), chunks)

    def weighted(self, c: CompressedTensor, p: Tensor) -> Tensor:
        """Weights times the stored values of a block of chunks, `p @ v` summed over the chunks, read like `scores`.

        Args:
            c: a block of chunks stacked chunk-major, `[(chunks batch), kv_heads, T, head_dim]`.
            p: float32 `[chunks, batch, kv_heads, rows, T]`.

        Returns:
            float32 `[batch, kv_heads, rows, head_dim]`.
        """
        layout, _ = self.storage_layout(c.shape)
        if layout is not None:
            return fused.weighted(self.stages, c, p, layout)
        if self._additive(c):
            return sum(stage.weighted(part, p) for stage, part in zip(self.stages, c.parts))
        return dense_weighted(p, self.decompress(c).float())

    def _additive(self, c: CompressedTensor) -> bool:
        """Whether the parts' reconstructions simply add up (no part stores entries exactly)."""
        return len(self.stages) == 1 or all(s.exact_mask(part) is None for s, part in zip(self.stages, c.parts))


@register_stage
class Chain(Wrapper):
    """A pipeline of stages as one stage: its part is the pipeline's `CompressedTensor`, so it can sit wherever one
    stage goes (a `PerLayer` or `PerHead` entry of several stages, such as a low-rank term and a code of its rest).

    Args:
        stages: the stages, in order (each encodes the residual of those before it, as in a `Pipeline`).
    """

    def __init__(self, stages: Sequence[Stage]):
        super().__init__()
        self.pipeline = Pipeline(stages)

    def held(self) -> list[Stage]:
        return distinct(self.pipeline.stages)

    def config(self) -> dict[str, Any]:
        return {"stages": list(self.pipeline.stages)}

    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> CompressedTensor:
        """Encode `x` `KV` with the stages in turn."""
        return self.pipeline.compress(x, exclude, ctx)

    def decode(self, part: CompressedTensor) -> Tensor:
        """The stages' summed reconstruction: float32 `KV`."""
        return self.pipeline.decompress(part).float()

    def scores(self, part: CompressedTensor, q: Tensor, chunks: int) -> Tensor:
        """The pipeline's `scores` (see `Stage.scores`): `[chunks, batch, kv_heads, rows, T]`."""
        return self.pipeline.scores(part, q, chunks)

    def weighted(self, part: CompressedTensor, p: Tensor) -> Tensor:
        """The pipeline's `weighted` (see `Stage.weighted`): `[batch, kv_heads, rows, head_dim]`."""
        return self.pipeline.weighted(part, p)

    def exact_mask(self, part: CompressedTensor) -> Tensor | None:
        """Entries some stage stores exactly, bool `KV`, or None."""
        masks = [m for stage, p in zip(self.pipeline.stages, part.parts) if (m := stage.exact_mask(p)) is not None]
        return functools.reduce(torch.logical_or, masks) if masks else None

    def extra_repr(self) -> str:
        return f"stages={len(self.pipeline.stages)}"
