"""Chain stages on residuals: each stage encodes what the earlier ones left over."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from gearkit.compressed import CompressedTensor, Part
from gearkit.compressors.base import Stage, check_kv
from gearkit.kernels import ops
from gearkit.kernels.backend import use_triton
from gearkit.kernels.layout import layout_ints, layout_tensors, storage_layout


class Pipeline(nn.Module):
    """A sequence of stages whose decoded parts sum to the reconstruction.

    Stage `k` encodes `x` minus the decoded parts of stages `1..k-1`. Entries that a stage stores exactly
    (sparse outliers) are excluded from every later stage: later stages ignore them when fitting and their
    output there is discarded, so those entries come back exactly.

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

    @property
    def needs_saliency(self) -> bool:
        """Whether a stage needs per-token saliency scores (then `compress` must get `saliency`)."""
        return any(s.needs_saliency for s in self.stages)

    def check_model(self, config) -> None:
        """Raise `ValueError` if a stage cannot serve the model of `config` (a dictionary trained for another)."""
        for stage in self.stages:
            stage.check_model(config)

    def shared_nbytes(self, layer: int | None) -> int:
        """Bytes of shared artifacts (dictionaries) the stages read for `layer`, as this layer's share."""
        return sum(stage.shared_nbytes(layer) for stage in self.stages)

    def compress(self, x: Tensor, exclude: Tensor | None = None, saliency: Tensor | None = None,
                 positions: Tensor | None = None, layer: int | None = None) -> CompressedTensor:
        """Compress `x` `[batch, kv_heads, tokens, head_dim]` (fp32, fp16 or bf16, finite).

        Args:
            x: the tensor.
            exclude: optional bool tensor shaped like `x`: entries the caller stores exactly elsewhere. No
                stage spends precision on them and their reconstruction is unspecified (but finite).
            saliency: optional float `[batch, kv_heads, tokens]` per-token saliency, passed to the stages that
                need it (`needs_saliency`); ignored by the others.
            positions: optional int `[batch]`: the sequence position of each entry's first token, and
            layer: the model layer; both passed to the stages that need them (`needs_positions`).

        Returns:
            A `CompressedTensor` holding one part per stage.

        Raises:
            ValueError: if `x` is not 4-D, not floating point, or not finite.
        """
        check_kv(x)
        if exclude is not None and exclude.shape != x.shape:
            raise ValueError(f"exclude must have the shape of x {tuple(x.shape)}, got {tuple(exclude.shape)}")
        residual, exact, parts = x.float(), exclude, []
        for i, stage in enumerate(self.stages):
            extra = {"saliency": saliency} if stage.needs_saliency else {}
            if stage.needs_positions:
                extra.update(positions=positions, layer=layer)
            parts.append(stage.encode(residual, exact, **extra))
            if i + 1 < len(self.stages):  # the last stage's residual is never needed
                contribution, exact = self._contribution(stage, parts[-1], exact)
                residual = residual - contribution
        return CompressedTensor(tuple(parts), tuple(x.shape), x.dtype)

    def decompress(self, c: CompressedTensor) -> Tensor:
        """Reconstruct: tensor of `c.shape` `[batch, kv_heads, tokens, head_dim]` and `c.dtype`."""
        if len(c.parts) != len(self.stages):
            raise ValueError(f"compressed tensor has {len(c.parts)} parts but the pipeline has {len(self.stages)} stages")
        layout, unsupported = storage_layout(self, c.shape)
        device = next(iter(c.tensors().values())).device
        if c.numel and use_triton(device, unsupported):  # one fused pass over the stored bytes
            return ops.reconstruct(list(layout_tensors(c)), layout_ints(layout), c.shape[0], c.shape[1], c.dtype)
        total, exact = None, None
        for stage, part in zip(self.stages, c.parts):
            contribution, exact = self._contribution(stage, part, exact)
            total = contribution if total is None else total + contribution
        return total.to(c.dtype)

    def forward(self, x: Tensor, saliency: Tensor | None = None) -> Tensor:
        """Round trip: `decompress(compress(x, saliency=saliency))`, same shape and dtype as `x`."""
        return self.decompress(self.compress(x, saliency=saliency))
