"""PyTorch Lightning inference with a compressed KV cache: generation and perplexity over many prompts,
on one device or sharded over several with `Trainer.predict(strategy="ddp")`.

Pieces:

- `PromptBatches`: a dataset whose items are *batches* of prompts, each carrying the prompts' indices.
  Batches are formed before sharding, so a prompt lands in the same batch (same companions, same left
  padding) whatever the number of devices: per-prompt results do not depend on the device count.
- `GearInference`: a `LightningModule` whose `predict_step` generates greedily (task `"generate"`) or scores
  per-sequence NLL with a compressed past (task `"ppl"`) with one or more caches (recipes or HF baselines).
- `CompressionStatsLogger`: a callback that logs, per batch and cache, bytes by component, bits per element,
  ratio against fp16, tokens/s and peak memory through the trainer's loggers.
- `JsonLinesWriter`: a `BasePredictionWriter`; each rank appends its rows to its own part file and, at the
  end, rank 0 merges the parts into one JSON-lines file in prompt order, dropping duplicate rows.
- `predict`: validates everything, then runs the above with a `Trainer` (DDP when `devices > 1`).

Conventions (what "the same results on any number of devices" means):

- Generation is greedy. Prompts are batched with left padding; padded positions are stored in the cache
  like any token (they share compressed chunks with the real tokens unless the padding is a multiple of the
  chunk size), so a prompt's output depends on its batch. Sink tokens are each row's first real tokens. With
  `PromptBatches` the batch of a prompt is fixed by `batch_size` alone, so outputs are identical on 1 or N devices;
  with `batch_size=1` they equal the output of the prompt generated on its own.
- Perplexity is scored one sequence at a time, exactly as `gearkit.eval.perplexity.evaluate` does (prefill
  `prefix` tokens into the cache, then the rest teacher-forced in steps that end where the buffer fills);
  batching only groups sequences, it never pads them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from gearkit.accounting import MemoryReport
from gearkit.compressors.checks import check_int
from gearkit.eval.perplexity import PerplexityResult, baseline_nll, cached_nll, perplexity_result
from gearkit.integrations.hf import cache_name, check_cache_name, make_cache, memory_report
from gearkit.models import chat_ids, pad_token_id
from gearkit.recipe import Recipe

Item = str | Tensor  # a prompt / text, or token ids `[tokens]` (int64) for the ppl task


@dataclasses.dataclass
class BatchStats:
    """What one cache held and how fast it ran on one batch.

    Attributes:
        report: bytes held by the batch's cache(s) at the end of the batch, by component (for several
            sequences scored one at a time, the sum of their caches' reports).
        tokens: tokens processed: new tokens generated (all batch rows) or tokens fed to the model (ppl).
        seconds: wall time of the model calls.
    """

    report: MemoryReport
    tokens: int
    seconds: float


@dataclasses.dataclass
class BatchResult:
    """What `GearInference.predict_step` returns for one batch.

    Attributes:
        batch: the batch's number in `PromptBatches` (independent of rank).
        rows: one JSON-serialisable dict per (item, cache), each with `index` (the item's position in the
            prompt list) and `recipe`.
        stats: per cache name, the batch's `BatchStats`.
    """

    batch: int
    rows: list[dict]
    stats: dict[str, BatchStats]


def _unwrap(batch: list[dict]) -> dict:
    """Collate for `PromptBatches` loaded with `batch_size=1`: its items are already batches."""
    return batch[0]


class PromptBatches(Dataset):
    """Prompts grouped into fixed batches, each carrying its prompts' indices.

    Item `k` is `{"batch": k, "index": [k*B, ...], "items": [...]}` with up to `batch_size` prompts (strings,
    or int64 token tensors `[tokens]` for the ppl task). Load it with `loader()` (one batch per step).

    Args:
        items: the prompts, texts or token-id tensors.
        batch_size: prompts per batch.

    Raises:
        ValueError: for an empty list, a non-positive batch size, or an item that is neither a non-empty
            string nor a non-empty 1-D integer tensor.
    """

    def __init__(self, items: Sequence[Item], batch_size: int = 1):
        items = list(items)
        if not items:
            raise ValueError("the prompt list is empty: nothing to predict")
        check_int(batch_size, "batch_size")
        for i, item in enumerate(items):
            if isinstance(item, str):
                if not item:
                    raise ValueError(f"prompt {i} is an empty string")
            elif not (isinstance(item, Tensor) and item.dim() == 1 and item.numel() and not item.is_floating_point()):
                raise ValueError(f"prompt {i} must be a non-empty string or a 1-D integer tensor of token ids")
        self.items, self.batch_size = items, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def __getitem__(self, k: int) -> dict:
        if not 0 <= k < len(self):
            raise IndexError(k)
        index = list(range(k * self.batch_size, min((k + 1) * self.batch_size, len(self.items))))
        return {"batch": k, "index": index, "items": [self.items[i] for i in index]}

    def loader(self) -> DataLoader:
        """A `DataLoader` yielding one batch per step, in order (Lightning shards it over ranks)."""
        return DataLoader(self, batch_size=1, shuffle=False, collate_fn=_unwrap)


class GearInference(pl.LightningModule):
    """Generation or perplexity with compressed KV caches, as a `LightningModule` for `Trainer.predict`.

    The model is loaded in `configure_model` (once per process) when not given, so a pickled module stays
    small and every DDP process loads its own copy.

    Args:
        recipes: one cache or several: recipe names, `Recipe` objects or HF baselines (`hf-quanto-2`, ...).
        task: `"generate"` (greedy new tokens for each prompt) or `"ppl"` (NLL of each sequence after a
            compressed past of `prefix` tokens).
        max_new_tokens: new tokens per prompt (generate).
        prefix: tokens prefilled into the cache before scoring (ppl).
        baseline: also score each sequence with the uncompressed model (ppl); rows get `baseline_nll`.
        chat_template: wrap each prompt as a user message with the tokenizer's chat template (generate).
        model (transformers.PreTrainedModel | None): a `transformers` causal LM; None loads one with `loader`.
        tokenizer (transformers.PreTrainedTokenizerBase | None): its tokenizer (required with `model`).
        loader: called as `loader()` to get `(model, tokenizer)`; default `gearkit.models.load_default_model`.

    Raises:
        ValueError: for an unknown recipe, an unknown task, or settings that cannot work.
    """

    def __init__(
        self,
        recipes: str | Recipe | Sequence[str | Recipe],
        task: Literal["generate", "ppl"] = "generate",
        *,
        max_new_tokens: int = 32,
        prefix: int = 64,
        baseline: bool = True,
        chat_template: bool = True,
        model=None,
        tokenizer=None,
        loader: Callable[[], tuple[Any, Any]] | None = None,
    ):
        super().__init__()
        specs = [recipes] if isinstance(recipes, (str, Recipe)) else list(recipes)
        if not specs:
            raise ValueError("no recipe given")
        for spec in specs:
            if not isinstance(spec, Recipe):
                check_cache_name(spec)
        names = [cache_name(s) for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"recipe names must be distinct, got {names}")
        if task not in ("generate", "ppl"):
            raise ValueError(f"task must be 'generate' or 'ppl', got {task!r}")
        if task == "generate":
            check_int(max_new_tokens, "max_new_tokens")
        if task == "ppl":
            check_int(prefix, "prefix")
        if (model is None) != (tokenizer is None):
            raise ValueError("pass model and tokenizer together, or neither (then `loader` loads them)")
        self.specs, self.task, self.max_new_tokens, self.prefix = specs, task, max_new_tokens, prefix
        self.baseline, self.chat_template, self.loader = baseline, chat_template, loader
        self.model, self.tokenizer = model, tokenizer

    @property
    def names(self) -> list[str]:
        """The cache names, in the order rows are produced."""
        return [cache_name(s) for s in self.specs]

    def configure_model(self) -> None:
        """Load the model and tokenizer with `loader` if they were not given (called by Lightning)."""
        if self.model is None:
            if self.loader is None:
                from gearkit.models import load_default_model as loader
            else:
                loader = self.loader
            self.model, self.tokenizer = loader()
        self.model.eval()

    # -- inputs --------------------------------------------------------------------------------------------
    def encode(self, item: Item) -> Tensor:
        """Token ids `[tokens]` (int64) of one prompt as the model will see it."""
        if isinstance(item, Tensor):
            return item.long()
        if self.task == "generate" and self.chat_template:
            return chat_ids(self.tokenizer, item)["input_ids"][0]
        return torch.tensor(self.tokenizer(item)["input_ids"], dtype=torch.long)

    def context_length(self) -> int:
        """The model's context length in tokens (`max_position_embeddings`)."""
        text = self.model.config.get_text_config(decoder=True)
        return int(text.max_position_embeddings)

    def check(self, items: Sequence[Item]) -> None:
        """Refuse prompts the model cannot process, before any work is sharded out.

        Loads the model (via `configure_model`) if needed.

        Raises:
            ValueError: for a prompt that, with its new tokens, exceeds the model's context, or (ppl) a
                sequence not longer than `prefix`; the message names the prompt's index and its length.
        """
        if not items:
            raise ValueError("the prompt list is empty: nothing to predict")
        self.configure_model()
        limit = self.context_length()
        extra = self.max_new_tokens if self.task == "generate" else 0
        for i, item in enumerate(items):
            n = self.encode(item).numel()
            if n + extra > limit:
                more = f" + {extra} new tokens" if extra else ""
                raise ValueError(f"prompt {i} has {n} tokens{more}, longer than the model's context of {limit} tokens")
            if self.task == "ppl" and n <= self.prefix:
                raise ValueError(
                    f"prompt {i} has {n} tokens; scoring after a prefix of {self.prefix} needs at least "
                    f"{self.prefix + 1}"
                )

    # -- steps ---------------------------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int = 0) -> BatchResult:
        """Run every cache on one batch from `PromptBatches`.

        Args:
            batch: `{"batch": int, "index": list[int], "items": list[str | Tensor]}`.
            batch_idx: Lightning's per-rank batch counter (unused: rows carry the global `index`).

        Returns:
            A `BatchResult`. Generate rows: `index`, `recipe`, `prompt` (strings only), `token_ids`
            (new tokens up to and including the first end-of-sequence token), `text`. Ppl rows:
            `index`, `recipe`, `tokens` (scored), `nll` (summed), `baseline_nll`, `kv_bytes`,
            `kv_bytes_fp16`, `bits_per_element`, `components`, `prefill_s`, `continuation_s`.
        """
        step = self._generate if self.task == "generate" else self._score
        return step(batch)

    def _generate(self, batch: dict) -> BatchResult:
        ids = [self.encode(item) for item in batch["items"]]
        width = max(x.numel() for x in ids)
        pad = pad_token_id(self.tokenizer)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):  # left padding: every prompt ends at the last column
            input_ids[row, width - x.numel() :], mask[row, width - x.numel() :] = x, 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        rows, stats = [], {}
        for spec in self.specs:
            cache, start = make_cache(spec, self.model), time.perf_counter()
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                cache=cache,
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=pad,
            )
            seconds, new = time.perf_counter() - start, out[:, width:].cpu()
            name = cache_name(spec)
            stats[name] = BatchStats(memory_report(cache, self.model.config, len(ids)), new.numel(), seconds)
            for index, item, tokens in zip(batch["index"], batch["items"], new):
                tokens = tokens.tolist()
                if self.tokenizer.eos_token_id in tokens:
                    tokens = tokens[: tokens.index(self.tokenizer.eos_token_id) + 1]
                rows.append(
                    {
                        "index": index,
                        "recipe": name,
                        **({"prompt": item} if isinstance(item, str) else {}),
                        "token_ids": tokens,
                        "text": self.tokenizer.decode(tokens, skip_special_tokens=True),
                    }
                )
        return BatchResult(batch["batch"], rows, stats)

    def _score(self, batch: dict) -> BatchResult:
        windows = [self.encode(item).to(self.device) for item in batch["items"]]
        base = [baseline_nll(self.model, w, self.prefix) if self.baseline else None for w in windows]
        rows, stats = [], {}
        for spec in self.specs:
            name, total = cache_name(spec), BatchStats(MemoryReport({}, 0, 0), 0, 0.0)
            for index, window, b in zip(batch["index"], windows, base):
                cache = make_cache(spec, self.model)
                nll, prefill_s, cont_s = cached_nll(self.model, window, self.prefix, cache)
                report = memory_report(cache, self.model.config)
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


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA bytes allocated on `device` since the last reset, else the process's peak
    resident set size (Linux reports `ru_maxrss` in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class CompressionStatsLogger(Callback):
    """Logs per batch and cache: `kv_bytes`, `kv_bytes/<component>`, `kv_bytes_fp16`, `bits_per_element`,
    `compression_ratio`, `tokens_per_s`, and `peak_memory_bytes` (see `peak_memory_bytes`).

    Metrics go to every logger of the trainer as `<prefix><cache>/<metric>`, at step = the batch's number in
    `PromptBatches` (the same on any number of devices). Lightning's loggers record rank 0 only; the other
    ranks' batches are in the JSON-lines output. The numbers also stay in `history` (this process's batches).

    Args:
        prefix: prepended to every metric name.
    """

    def __init__(self, prefix: str = "predict/"):
        self.prefix = prefix
        self.history: list[dict[str, float]] = []

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_predict_batch_end(
        self, trainer, pl_module, outputs: BatchResult, batch, batch_idx, dataloader_idx=0
    ) -> None:
        peak = peak_memory_bytes(pl_module.device)
        metrics = {}
        for name, s in outputs.stats.items():
            key = f"{self.prefix}{name}/"
            metrics |= {
                f"{key}kv_bytes": s.report.nbytes,
                f"{key}kv_bytes_fp16": s.report.fp16_nbytes,
                f"{key}bits_per_element": s.report.bits_per_element,
                f"{key}compression_ratio": s.report.compression_ratio,
                f"{key}tokens_per_s": s.tokens / s.seconds if s.seconds else 0.0,
                f"{key}peak_memory_bytes": peak,
            }
            metrics |= {f"{key}kv_bytes/{c}": n for c, n in s.report.components.items()}
        self.history.append(metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=outputs.batch)


def merge_rows(rows: Sequence[dict]) -> list[dict]:
    """Rows from all ranks in prompt order, each (index, recipe) once.

    A distributed sampler may pad a shard with repeats of other batches; those rows are dropped. Rows of
    one index keep their order (the module's recipe order).

    Args:
        rows: rows of `GearInference.predict_step`, from any ranks, in any order.

    Returns:
        The first row of each `(index, recipe)`, sorted by `index` (stable).
    """
    seen, out = set(), []
    for row in rows:
        key = (row["index"], row["recipe"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return sorted(out, key=lambda r: r["index"])


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def part_path(path: str | os.PathLike, rank: int) -> Path:
    """Where rank `rank` writes its rows before the merge into `path`."""
    path = Path(path)
    return path.with_name(f"{path.name}.rank{rank}")


class JsonLinesWriter(BasePredictionWriter):
    """Writes prediction rows as JSON lines; with several ranks, merges them into one file in prompt order.

    Each rank appends its batches' rows to `<path>.rank<r>` as they finish; when prediction ends, all ranks
    wait for each other, rank 0 merges the parts with `merge_rows` into `path` and removes them, and all ranks
    wait again, so `path` is complete on every rank when `Trainer.predict` returns.

    Args:
        path: the merged JSON-lines file.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(write_interval="batch")
        self.path = Path(path)

    def on_predict_start(self, trainer, pl_module) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        part_path(self.path, trainer.global_rank).write_text("", encoding="utf-8")

    def write_on_batch_end(
        self, trainer, pl_module, prediction: BatchResult, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        with part_path(self.path, trainer.global_rank).open("a", encoding="utf-8") as f:
            for row in prediction.rows:
                f.write(json.dumps(row) + "\n")

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier("gearkit-writer-parts")
        if trainer.global_rank == 0:
            parts = [part_path(self.path, r) for r in range(trainer.world_size)]
            rows = merge_rows([row for p in parts for row in read_jsonl(p)])
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            tmp.replace(self.path)
            for p in parts:
                p.unlink()
        trainer.strategy.barrier("gearkit-writer-merged")


OUTPUT_ENV = "GEARKIT_PREDICT_OUTPUT"


def predict(
    items: Sequence[Item],
    recipes: str | Recipe | Sequence[str | Recipe],
    output: str | os.PathLike | None = None,
    *,
    task: Literal["generate", "ppl"] = "generate",
    devices: int = 1,
    batch_size: int = 1,
    accelerator: str = "auto",
    callbacks: Sequence[Callback] = (),
    logger=False,
    **module_kwargs,
) -> list[dict] | None:
    """Validate the inputs, then run `GearInference` with `Trainer.predict` on `devices` devices.

    All checks (empty list, unknown recipe, prompts longer than the context) run before the trainer starts,
    so bad input fails in the calling process before any other process is spawned. With `devices > 1` the
    strategy is DDP (gloo on CPU); Lightning starts the other ranks by re-running the calling script (or
    `python -m` module) with the same arguments, so call this from a script's main code path.

    Args:
        items: prompts (strings) or, for ppl, strings or int64 token tensors `[tokens]`.
        recipes: cache name(s) or `Recipe` object(s).
        output: the merged JSON-lines file (`JsonLinesWriter`). None: a temporary file, deleted after reading;
            its path goes to the environment variable `GEARKIT_PREDICT_OUTPUT`, which the ranks Lightning
            launches inherit, so that all ranks write to the same place.
        task: `"generate"` or `"ppl"` (see `GearInference`).
        devices: processes/devices; results do not depend on it.
        batch_size: prompts per batch (see the module docstring for how batching affects results).
        accelerator: Lightning accelerator (`"cpu"`, `"gpu"`, `"auto"`).
        callbacks: extra callbacks (e.g. `CompressionStatsLogger()`).
        logger (lightning.pytorch.loggers.Logger | list | bool): Lightning logger(s), or False.
        **module_kwargs (Any): passed to `GearInference` (`max_new_tokens`, `prefix`, `model`, `tokenizer`, ...).

    Returns:
        On global rank 0, the merged rows (see `GearInference.predict_step`); None on the other ranks.

    Raises:
        ValueError: for bad input, before anything is launched.
    """
    check_int(devices, "devices")
    dataset = PromptBatches(items, batch_size)
    module = GearInference(recipes, task, **module_kwargs)
    module.check(dataset.items)
    temporary = output is None
    if temporary:
        if OUTPUT_ENV not in os.environ:
            os.environ[OUTPUT_ENV] = str(Path(tempfile.mkdtemp(prefix="gearkit-predict-")) / "rows.jsonl")
        output = os.environ[OUTPUT_ENV]
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=logger,
        callbacks=[JsonLinesWriter(output), *callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.predict(module, dataset.loader(), return_predictions=False)
    if trainer.global_rank != 0:
        return None
    rows = read_jsonl(output)
    if temporary:  # the (empty) directory and the variable stay: later calls in this process tree reuse them
        Path(output).unlink()
    return rows


def perplexity_results(rows: Sequence[dict], model_name: str, prefix: int) -> list[PerplexityResult]:
    """One `PerplexityResult` per recipe from merged ppl rows, as `evaluate` computes it from the same windows.

    NLLs are summed in window order and bytes come from the last window's cache, so the perplexities, bits and
    bytes equal `evaluate`'s exactly; speeds are summed over windows as `evaluate` sums them.

    Args:
        rows: merged rows of `GearInference(task="ppl", baseline=True)`, one per (window, recipe), all windows
            of equal length.
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
