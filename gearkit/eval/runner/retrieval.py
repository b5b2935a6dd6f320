"""RULER-style retrieval over many haystacks with compressed KV caches: the runner's `retrieval` task."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gearkit.accounting import MemoryReport
from gearkit.eval.retrieval import Trial, answer_budget, trial_row
from gearkit.eval.runner.task import BatchResult, BatchStats, CacheTask
from gearkit.integrations.hf import cache_name
from gearkit.recipe import Recipe


class RetrievalTask(CacheTask):
    """Each trial's haystack prefilled into a fresh cache and its questions answered, with the uncompressed cache
    and each recipe (`gearkit.eval.retrieval.trial_row`).

    The prompts are the trials' haystacks (`[t.context for t in trials]`); a prompt's index is its trial's, so the
    rows merge into the same results on any number of devices (`gearkit.eval.retrieval.retrieval_results`).

    Args:
        recipes: caches scored beside the uncompressed one: none, one or several (see `CacheTask`).
        trials: from `gearkit.eval.retrieval.build_trials`, in prompt order.
        model (transformers.PreTrainedModel | str | os.PathLike | None): a loaded model or a model spec (see
            `CacheTask`).
        tokenizer (transformers.PreTrainedTokenizerBase | None): a loaded model's tokenizer (see `CacheTask`).
        dtype: parameter dtype a model spec is loaded in (see `CacheTask`).
        buffer_dtype: storage dtype of the recipes' full-precision buffers (see `CacheTask`).

    Raises:
        ValueError: as `CacheTask`, or for an empty trial list.
    """

    needs_recipe = False  # the uncompressed cache is always scored

    def __init__(
        self,
        recipes: str | Recipe | Sequence[str | Recipe],
        trials: Sequence[Trial],
        *,
        model=None,
        tokenizer=None,
        dtype: torch.dtype | str = torch.float32,
        buffer_dtype: torch.dtype | None = torch.float16,
    ):
        super().__init__(recipes, model=model, tokenizer=tokenizer, dtype=dtype, buffer_dtype=buffer_dtype)
        if not trials:
            raise ValueError("the trial list is empty: nothing to score")
        self.trials = list(trials)

    def check_item(self, index: int, tokens: int, limit: int) -> None:
        """Refuse a haystack that with its longest question and answer exceeds the model's context.

        Raises:
            ValueError: naming the trial's index and its length.
        """
        extra = max(
            len(self.tokenizer(q.cue.format(source=q.start), add_special_tokens=False)["input_ids"])
            + answer_budget(self.tokenizer, q)
            for q in self.trials[index].questions
        )
        if tokens + extra > limit:
            raise ValueError(
                f"trial {index} has {tokens} tokens + {extra} for its longest question and answer, longer than the "
                f"model's context of {limit} tokens"
            )

    def predict_step(self, batch: dict, batch_idx: int = 0) -> BatchResult:
        """Score each trial of one batch with the uncompressed cache, then each recipe.

        Args:
            batch: `{"batch": int, "index": list[int], "items": list[Tensor]}` from `PromptBatches`.
            batch_idx: Lightning's per-rank batch counter (unused: rows carry the global `index`).

        Returns:
            A `BatchResult` whose rows are `trial_row`'s; stats sum, per recipe, the bytes of the caches holding
            the haystacks and count their tokens.
        """
        rows, stats = [], {}
        for spec in [None, *self.specs]:
            total = BatchStats(MemoryReport({}, 0, 0), 0, 0.0)
            for index in batch["index"]:
                row, report = trial_row(self.model, self.tokenizer, self.trials[index], index, spec, self.buffer_dtype)
                rows.append(row)
                if report is not None:
                    total = BatchStats(
                        total.report + report, total.tokens + row["length"], total.seconds + row["seconds"]
                    )
            if spec is not None:
                stats[cache_name(spec)] = total
        return BatchResult(batch["batch"], rows, stats)
