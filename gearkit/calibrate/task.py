"""Sensitivity measurement as a runner task, so `gearkit calibrate --devices N` shards the layers over processes."""

from __future__ import annotations

import torch

from gearkit.calibrate import EXACT, ROLES, Window, ladder, measure_layer, tuning_windows
from gearkit.compressors import Pipeline
from gearkit.eval.runner.task import BatchResult, CacheTask
from gearkit.models import head_dim
from gearkit.recipe import Recipe


class SensitivityTask(CacheTask):
    """Each item is a layer (a one-element int tensor); its rows are the KL of every width of both roles there.

    Every process records the tuning windows once (on its first batch), so the rows do not depend on how the layers
    are sharded.

    Args:
        text: the tuning text.
        prefix: prefilled tokens per window.
        continuation: tokens after the prefix per window (the scored pieces are spread over them).
        scored: scored tokens per window.
        windows: tuning windows.
        **kwargs: `model`, `tokenizer`, `dtype` (see `CacheTask`).
    """

    def __init__(self, text: str, prefix: int, continuation: int, scored: int, windows: int, **kwargs: object):
        super().__init__(Recipe("exact", Pipeline([EXACT]), Pipeline([EXACT])), **kwargs)
        self.text, self.prefix, self.continuation, self.scored, self.windows = (
            text,
            prefix,
            continuation,
            scored,
            windows,
        )
        self._recorded: list[Window] | None = None

    @staticmethod
    def items(layers: list[int]) -> list[torch.Tensor]:
        """The task's items for `layers`."""
        return [torch.tensor([layer]) for layer in layers]

    def predict_step(self, batch: dict, batch_idx: int = 0) -> BatchResult:
        """Rows `{"index", "recipe", "layer", "kl": {role: {width: KL}}}` for the batch's layers."""
        if self._recorded is None:
            self._recorded = tuning_windows(
                self.model, self.tokenizer, self.text, self.prefix, self.continuation, self.scored, self.windows
            )
        stages = ladder(head_dim(self.model.config))
        rows = []
        for index, item in zip(batch["index"], batch["items"]):
            layer = int(item[0])
            kls = measure_layer(self.model, self._recorded, layer, stages)
            rows.append({"index": index, "recipe": "sensitivity", "layer": layer, "kl": {r: kls[r] for r in ROLES}})
        return BatchResult(batch["batch"], rows, {})
