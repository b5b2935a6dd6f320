"""`predict`: validate a task and its prompts in the calling process, then run it with a Lightning `Trainer`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from gearkit.compressors.checks import check_int
from gearkit.eval.runner.callbacks import JsonLinesWriter, read_jsonl
from gearkit.eval.runner.data import Item, PromptBatches
from gearkit.eval.runner.task import CacheTask
from gearkit.eval.threads import cpu_threads

OUTPUT_ENV = "GEARKIT_PREDICT_OUTPUT"


def predict(
    task: CacheTask,
    items: Sequence[Item],
    output: str | os.PathLike | None = None,
    *,
    devices: int = 1,
    batch_size: int = 1,
    threads: int | None = None,
    accelerator: str = "auto",
    callbacks: Sequence[Callback] = (),
    logger=False,
) -> list[dict] | None:
    """Validate the prompts, then run `task` over them with `Trainer.predict` on `devices` devices.

    The task checked its caches when it was built; here the prompts are checked (empty list, prompts the task
    refuses, such as longer than the context) before the trainer starts, so bad input fails in the calling
    process before any other process is spawned. With `devices > 1` the strategy is DDP (gloo on CPU);
    Lightning starts the other ranks by re-running the calling script (or `python -m` module) with the same
    arguments, so call this from a script's main code path.

    Args:
        task: what to run (`GenerationTask`, `PerplexityTask`, ...).
        items: prompts (strings) or int64 token tensors `[tokens]`.
        output: the merged JSON-lines file (`JsonLinesWriter`). None: a temporary file, deleted after reading;
            its path goes to the environment variable `GEARKIT_PREDICT_OUTPUT`, which the ranks Lightning
            launches inherit, so that all ranks write to the same place.
        devices: processes/devices; results do not depend on it (at a fixed thread count on CPU: `threads`).
        batch_size: prompts per batch (see `gearkit.eval.runner` for how batching affects results).
        threads: intra-op CPU threads of every process (`cpu_threads`); None: Lightning's choice (torch's
            default on one device, cores // devices per process on several, unless `OMP_NUM_THREADS` is set).
        accelerator: Lightning accelerator (`"cpu"`, `"gpu"`, `"auto"`).
        callbacks: extra callbacks (e.g. `CompressionStatsLogger()`).
        logger (lightning.pytorch.loggers.Logger | list | bool): Lightning logger(s), or False.

    Returns:
        On global rank 0, the merged rows (see the task's `predict_step`); None on the other ranks.

    Raises:
        ValueError: for bad input, before anything is launched.
    """
    check_int(devices, "devices")
    dataset = PromptBatches(items, batch_size)
    with cpu_threads(threads):
        task.check(dataset.items)
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
        trainer.predict(task, dataset.loader(), return_predictions=False)
    if trainer.global_rank != 0:
        return None
    rows = read_jsonl(output)
    if temporary:  # the (empty) directory and the variable stay: later calls in this process tree reuse them
        Path(output).unlink()
    return rows
