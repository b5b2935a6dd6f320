"""The runner's callbacks: compression stats through the trainer's loggers, and the JSON-lines writer that
merges every rank's rows into one file in prompt order."""

from __future__ import annotations

import json
import os
import resource
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback

from gearkit.eval.runner.task import BatchResult


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
        """Reset the CUDA peak-memory counter, so that the peak logged is the batch's own."""
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_predict_batch_end(
        self, trainer, pl_module, outputs: BatchResult, batch, batch_idx, dataloader_idx=0
    ) -> None:
        """Log the batch's stats, per cache, to `history` and to every logger of the trainer."""
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
    one index keep their order (the task's recipe order).

    Args:
        rows: rows of a task's `predict_step`, from any ranks, in any order.

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
        """Start this rank's part file empty."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        part_path(self.path, trainer.global_rank).write_text("", encoding="utf-8")

    def write_on_batch_end(
        self, trainer, pl_module, prediction: BatchResult, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        """Append the batch's rows to this rank's part file."""
        with part_path(self.path, trainer.global_rank).open("a", encoding="utf-8") as f:
            for row in prediction.rows:
                f.write(json.dumps(row) + "\n")

    def on_predict_end(self, trainer, pl_module) -> None:
        """Merge every rank's part into `path` on rank 0, between two barriers."""
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
