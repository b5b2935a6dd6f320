"""The Lightning runner: evaluation tasks over many prompts with compressed KV caches, on one device or sharded
over several with `Trainer.predict(strategy="ddp")`.

Pieces:

- `PromptBatches` (`data`): a dataset whose items are *batches* of prompts, each carrying the prompts' indices.
  Batches are formed before sharding, so a prompt lands in the same batch (same companions, same left
  padding) whatever the number of devices.
- `CacheTask` (`task`): the `LightningModule` every task derives from: the caches, the model (loaded in
  `configure_model`, once per process), input checks, the cache factory and byte reports.
- One module per task: `GenerationTask` (`generation`: greedy new tokens), `PerplexityTask` (`perplexity`:
  per-sequence NLL with a compressed past, and `perplexity_results`) and `RetrievalTask` (`retrieval`: RULER-style
  haystacks and their questions, beside the uncompressed cache). A new task is one such module plus the
  line of the command line that builds it.
- `CompressionStatsLogger` and `JsonLinesWriter` (`callbacks`): per-batch bytes, bits and speed through the
  trainer's loggers; each rank's rows appended to its own part file and merged by rank 0 into one JSON-lines
  file in prompt order, duplicate rows dropped (`merge_rows`).
- `predict` (`run`): validates the task's input, then runs it with a `Trainer` (DDP when `devices > 1`).

What "the same results on any number of devices" means:

- The work is split the same way on any number of devices: batches are fixed by `batch_size` alone, each batch
  runs whole on one rank, rows carry their prompt's index and are merged in prompt order, and sums over prompts
  (`perplexity_results`) run in prompt order: only the arithmetic below can tell the device counts apart.
- Floating-point results are bitwise equal when every process runs the same kernels with the same thread count.
  On accelerators the model's arithmetic runs on the devices (one per rank, of one kind), not on CPU threads.
  On CPU, float32 matmuls are reduced in an order set by the number of intra-op threads, and Lightning gives
  each of N DDP processes cores // N threads (unless `OMP_NUM_THREADS` is set) while one process keeps torch's
  default. An uncompressed perplexity then moves by about 1e-6 (relative), and quantization amplifies that (a
  code rounds the other way) to about 1e-4 for a compressed recipe scored on a few short windows. Pass
  `threads` to `predict` (the command line's `--threads`; `gearkit.eval.threads.cpu_threads` around a loop of
  your own) to pin every process's thread count: then 1 and N devices give identical NLLs, perplexities and
  token ids; this is what the tests check.
- Generation is greedy. Padded positions are stored in the cache like any token, so a prompt's output depends on
  its batch; with `batch_size=1` it equals the output of the prompt generated on its own (same thread count).
- Perplexity is scored one sequence at a time, exactly as `gearkit.eval.perplexity.evaluate` does; batching only
  groups sequences, it never pads them.
"""

from gearkit.eval.runner.callbacks import CompressionStatsLogger, JsonLinesWriter, merge_rows
from gearkit.eval.runner.data import PromptBatches
from gearkit.eval.runner.generation import GenerationTask
from gearkit.eval.runner.perplexity import PerplexityTask, perplexity_results
from gearkit.eval.runner.retrieval import RetrievalTask
from gearkit.eval.runner.run import predict
from gearkit.eval.runner.task import BatchResult, BatchStats, CacheTask

__all__ = [
    "BatchResult",
    "BatchStats",
    "CacheTask",
    "CompressionStatsLogger",
    "GenerationTask",
    "JsonLinesWriter",
    "PerplexityTask",
    "PromptBatches",
    "RetrievalTask",
    "merge_rows",
    "perplexity_results",
    "predict",
]
