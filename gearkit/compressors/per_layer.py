"""Bit allocation across layers and KV heads: each layer's (or head's) tensors go through the stage chosen for it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from gearkit.compressors.base import NO_CONTEXT, Context, Stage, Wrapper, distinct, register_stage, text_config
from gearkit.compressors.checks import MAX_LAYER
from gearkit.parts import HeadsPart, LayerPart, Part


@register_stage
class PerLayer(Wrapper):
    """Pick the inner stage by the model layer (`Context.layer`): per-layer bit widths, KVTuner style.

    Layers differ in how much a coding error costs downstream, so a global bits budget is best spent unevenly
    (`benchmarks/bit_allocation.py` chooses the widths on calibration text). The allocation is data: `config()`
    lists every layer's stage, so a recipe that uses it round-trips through `to_dict`/`from_dict`. The part is
    the chosen stage's, tagged with the layer (static metadata, no bytes), so the stored bytes are exactly the
    child's and `decode` needs no context.

    Args:
        stages: the stage of each layer: a sequence indexed by layer (`None` entries use `default`), or a mapping
            `{layer: stage}`.
        default: the stage of every layer `stages` does not name; `None` refuses such layers.

    Raises:
        TypeError: for an entry that is not a gearkit `Stage`.
        ValueError: for a negative layer or no stage at all.
    """

    REQUIRES = frozenset({"layer"})

    def __init__(self, stages: Sequence[Stage | None] | Mapping[int, Stage], default: Stage | None = None):
        super().__init__()
        if isinstance(stages, Mapping):
            if any(isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LAYER for k in stages):
                raise ValueError(
                    f"PerLayer layers must be ints >= 0 and <= {MAX_LAYER}, got {sorted(map(repr, stages))}"
                )
            stages = [stages.get(i) for i in range(max(stages, default=-1) + 1)]
        if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence):
            raise TypeError(f"PerLayer stages must be a list of stages or a mapping, got {type(stages).__name__}")
        stages = list(stages)
        for i, s in enumerate([*stages, default]):
            if s is not None and not isinstance(s, Stage):
                raise TypeError(
                    f"PerLayer stages must be gearkit Stages or None, got {type(s).__name__} "
                    f"({'default' if i == len(stages) else f'layer {i}'})"
                )
        if default is None and not any(s is not None for s in stages):
            raise ValueError("PerLayer needs a stage for some layer (or a default)")
        self.stages, self.default = stages, default
        # registered as submodules, so .to(device) and state_dict see them
        for i, s in enumerate(stages):
            if s is not None:
                self.add_module(f"layer{i}", s)

    def stage_for(self, layer: int | None) -> Stage:
        """The stage that codes `layer`.

        Raises:
            ValueError: when the layer is not given, or no stage is set for it and there is no default.
        """
        if layer is None:
            raise ValueError("PerLayer picks its stage by the model layer; pass layer=... (a cache supplies it)")
        stage = self.stages[layer] if 0 <= layer < len(self.stages) else None
        if stage is None:
            stage = self.default
        if stage is None:
            named = [i for i, s in enumerate(self.stages) if s is not None]
            raise ValueError(f"PerLayer has no stage for layer {layer} and no default (layers with a stage: {named})")
        return stage

    def held(self) -> list[Stage]:
        return distinct([*self.stages, self.default])

    def config(self) -> dict:
        return {"stages": list(self.stages), "default": self.default}

    def check_model(self, config) -> None:
        """Raise `ValueError` if some layer of the model has no stage, or a layer's stage cannot serve it."""
        layers = getattr(text_config(config), "num_hidden_layers", None)
        if layers is not None:
            for layer in range(layers):
                self.stage_for(layer)
            if len(self.stages) > layers:
                raise ValueError(f"PerLayer names stages for {len(self.stages)} layers; the model has {layers}")
        super().check_model(config)

    def shared_nbytes(self, layer: int | None) -> int:
        return 0 if layer is None else self.stage_for(layer).shared_nbytes(layer)

    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> LayerPart:
        """Encode `x` `KV` with the stage of `ctx.layer`."""
        return LayerPart(self.stage_for(ctx.layer).encode(x, exclude, ctx), ctx.layer)

    def route(self, part: LayerPart) -> tuple[Stage, Part]:
        """The layer's stage, and its part."""
        return self.stage_for(part.layer), part.inner

    def extra_repr(self) -> str:
        return f"layers={len(self.stages)}, default={self.default is not None}"


@register_stage
class PerHead(Wrapper):
    """A stage per KV head: bit allocation finer than `PerLayer` (KVTuner's per-head widths).

    Within a layer the heads are not equally fragile either, so an allocation can give one head of a layer more
    bits than the others (inside a `PerLayer`, a different split per layer). Head `h` of `x` is coded by
    `stages[h]` as a one-head tensor `[batch, 1, tokens, head_dim]` (saliency sliced to that head), so the
    stored bytes are exactly the sum of the heads' stages' bytes on their heads.

    Args:
        stages: one stage per KV head, in head order.

    Raises:
        TypeError: for an entry that is not a gearkit `Stage`.
        ValueError: for no stages.
    """

    def __init__(self, stages: Sequence[Stage]):
        super().__init__()
        if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence):
            raise TypeError(f"PerHead stages must be a list of stages, got {type(stages).__name__}")
        stages = list(stages)
        if not stages:
            raise ValueError("PerHead needs one stage per KV head, got none")
        for i, s in enumerate(stages):
            if not isinstance(s, Stage):
                raise TypeError(f"PerHead stages must be gearkit Stages, got {type(s).__name__} (head {i})")
        self.stages = stages
        for i, s in enumerate(stages):  # submodules, so .to(device) and state_dict see them
            self.add_module(f"head{i}", s)

    def config(self) -> dict:
        return {"stages": list(self.stages)}

    def check_model(self, config) -> None:
        """Raise `ValueError` if the model has another number of KV heads, or a head's stage cannot serve it."""
        text = text_config(config)
        heads = getattr(text, "num_key_value_heads", None) or getattr(text, "num_attention_heads", None)
        if heads is not None and heads != len(self.stages):
            raise ValueError(f"PerHead has stages for {len(self.stages)} KV heads; the model has {heads}")
        super().check_model(config)

    def held(self) -> list[Stage]:
        return distinct(self.stages)

    def _check_heads(self, heads: int) -> None:
        if heads != len(self.stages):
            raise ValueError(f"PerHead has stages for {len(self.stages)} KV heads, got a tensor with {heads}")

    def encode(self, x: Tensor, exclude: Tensor | None = None, ctx: Context = NO_CONTEXT) -> HeadsPart:
        """Encode `x` `KV`, head `h` with `stages[h]`.

        Raises:
            ValueError: when `x` has another number of KV heads than there are stages.
        """
        self._check_heads(x.shape[1])
        parts = []
        for h, stage in enumerate(self.stages):
            one = slice(h, h + 1)
            head_ctx = ctx if ctx.saliency is None else dataclasses.replace(ctx, saliency=ctx.saliency[:, one])
            parts.append(stage.encode(x[:, one], None if exclude is None else exclude[:, one], head_ctx))
        return HeadsPart(tuple(parts))

    def decode(self, part: HeadsPart) -> Tensor:
        """The heads' reconstructions side by side: float32 `KV`."""
        self._check_heads(len(part.heads))
        return torch.cat([s.decode(p) for s, p in zip(self.stages, part.heads)], dim=1)

    def scores(self, part: HeadsPart, q: Tensor, chunks: int) -> Tensor:
        """Each head's stage on its head's queries (see `Stage.scores`): `[chunks, batch, kv_heads, rows, T]`."""
        self._check_heads(len(part.heads))
        return torch.cat(
            [s.scores(x, q[:, :, h : h + 1], chunks) for h, (s, x) in enumerate(zip(self.stages, part.heads))], dim=2
        )

    def weighted(self, part: HeadsPart, p: Tensor) -> Tensor:
        """Each head's stage on its head's weights (see `Stage.weighted`): `[batch, kv_heads, rows, head_dim]`."""
        self._check_heads(len(part.heads))
        return torch.cat(
            [s.weighted(x, p[:, :, h : h + 1]) for h, (s, x) in enumerate(zip(self.stages, part.heads))], dim=1
        )

    def exact_mask(self, part: HeadsPart) -> Tensor | None:
        """Entries the heads' stages store exactly, bool `KV`, or None."""
        masks = [s.exact_mask(p) for s, p in zip(self.stages, part.heads)]
        some = next((m for m in masks if m is not None), None)
        if some is None:
            return None
        return torch.cat([torch.zeros_like(some) if m is None else m for m in masks], dim=1)

    def extra_repr(self) -> str:
        return f"heads={len(self.stages)}"
