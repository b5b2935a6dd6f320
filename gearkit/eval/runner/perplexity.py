"""Perplexity with a compressed past over many sequences: the runner's `ppl` task, and its results."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gearkit.accounting import MemoryReport
from gearkit.compressors.checks import check_int
from gearkit.eval.perplexity import PerplexityResult, baseline_nll, cached_nll, perplexity_result
from gearkit.eval.runner.task import BatchResult, BatchStats, CacheTask
from gearkit.integrations.hf import cache_name
from gearkit.recipe import Recipe


class PerplexityTask(CacheTask):
    """Summed NLL of each sequence after a compressed past of `prefix` tokens, with each cache.

    Sequences are scored one at a time, exactly as `gearkit.eval.perplexity.evaluate` does (prefill `prefix`
    tokens into the cache, then the rest teacher-forced in steps that end where the buffer fills); a batch only
    groups sequences, it never pads them.

    Args:
        recipes: one cache or several (see `CacheTask`).
        prefix: tokens prefilled into the cache before scoring.
        baseline: also score each sequence with the uncompressed model; rows get `baseline_nll` (else None).
        model (transformers.PreTrainedModel | str | os.PathLike | None): a loaded model or a model spec (see
            `CacheTask`).
        tokenizer (transformers.PreTrainedTokenizerBase | None): a loaded model's tokenizer (see `CacheTask`).
        dtype: parameter dtype a model spec is loaded in (see `CacheTask`).
        buffer_dtype: storage dtype of the recipes' full-precision buffers (see `CacheTask`).

    Raises:
        ValueError: as `CacheTask`, or for a non-positive `prefix`.
    """

    def __init__(
        self,
        recipes: str | Recipe | Sequence[str | Recipe],
        *,
        prefix: int = 64,
        baseline: bool = True,
        model=None,
        tokenizer=None,
        dtype: torch.dtype | str = torch.float32,
        buffer_dtype: torch.dtype | None = torch.float16,
    ):
        super().__init__(recipes, model=model, tokenizer=tokenizer, dtype=dtype, buffer_dtype=buffer_dtype)
        check_int(prefix, "prefix")
        self.prefix, self.baseline = prefix, baseline

    def check_item(self, index: int, tokens: int, limit: int) -> None:
        """Refuse a sequence longer than the model's context or not longer than `prefix`.

        Raises:
            ValueError: naming the sequence's index and its length.
        """
        super().check_item(index, tokens, limit)
        if tokens <= self.prefix:
            raise ValueError(
                f"prompt {index} has {tokens} tokens; scoring after a prefix of {self.prefix} needs at least "
                f"{self.prefix + 1}"
            )

    def predict_step(self, batch: dict, batch_idx: int = 0) -> BatchResult:
        """Score each sequence of one batch with each cache.

        Args:
            batch: `{"batch": int, "index": list[int], "items": list[str | Tensor]}` from `PromptBatches`.
            batch_idx: Lightning's per-rank batch counter (unused: rows carry the global `index`).

        Returns:
            A `BatchResult` whose rows have `index`, `recipe`, `tokens` (scored), `nll` (summed), `baseline_nll`,
            `kv_bytes`, `kv_bytes_fp16`, `bits_per_element`, `components`, `prefill_s` and `continuation_s`;
            stats sum the sequences' reports and count the tokens fed to the model.
        """
        windows = [self.encode(item).to(self.device) for item in batch["items"]]
        base = [baseline_nll(self.model, w, self.prefix) if self.baseline else None for w in windows]
        rows, stats = [], {}
        for spec in self.specs:
            name, total = cache_name(spec), BatchStats(MemoryReport({}, 0, 0), 0, 0.0)
            for index, window, b in zip(batch["index"], windows, base):
                cache = self.make_cache(spec)
                nll, prefill_s, cont_s = cached_nll(self.model, window, self.prefix, cache)
                report = self.report(cache)
                total = BatchStats(
                    total.report + report, total.tokens + window.numel(), total.seconds + prefill_s + cont_s
                )
                rows.append(
                    {
                        "index": index,
                        "recipe": name,
                        "tokens": window.numel() - self.prefix,
                        "nll": nll,
                        "baseline_nll": b,
                        "kv_bytes": report.nbytes,
                        "kv_bytes_fp16": report.fp16_nbytes,
                        "bits_per_element": report.bits_per_element,
                        "components": report.components,
                        "prefill_s": prefill_s,
                        "continuation_s": cont_s,
                    }
                )
            stats[name] = total
        return BatchResult(batch["batch"], rows, stats)


def perplexity_results(rows: Sequence[dict], model_name: str, prefix: int) -> list[PerplexityResult]:
    """One `PerplexityResult` per recipe from merged ppl rows, as `evaluate` computes it from the same windows.

    NLLs are summed in window order and bytes come from the last window's cache, so the perplexities, bits and
    bytes equal `evaluate`'s exactly (at the same thread count: see `gearkit.eval.runner`); speeds are summed over
    windows as `evaluate` sums them.

    Args:
        rows: merged rows of `PerplexityTask(baseline=True)`, one per (window, recipe), all windows of equal length.
        model_name: name reported in the results.
        prefix: the prefix the windows were scored after.
    """
    by_recipe: dict[str, list[dict]] = {}
    for row in rows:
        by_recipe.setdefault(row["recipe"], []).append(row)
    results = []
    for name, group in by_recipe.items():
        last = group[-1]
        report = MemoryReport(last["components"], prefix + last["tokens"], last["kv_bytes_fp16"] // 2)
        results.append(
            perplexity_result(
                name,
                model_name,
                len(group),
                prefix,
                last["tokens"],
                sum(r["baseline_nll"] for r in group),
                sum(r["nll"] for r in group),
                report,
                sum(r["prefill_s"] for r in group),
                sum(r["continuation_s"] for r in group),
            )
        )
    return results
