"""The CPU thread count of a run, pinned: float32 results on CPU depend on it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from gearkit.compressors.checks import check_int


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` intra-op CPU threads in this process and in every process it launches.

    Sets `torch.set_num_threads(threads)` here and `OMP_NUM_THREADS` in the environment; both are restored
    afterwards. Processes started inside the block inherit the variable (torch reads it at start, up to the core
    count), and Lightning's DDP launcher then leaves the thread count alone instead of giving each of N processes
    cores // N threads. The DDP ranks Lightning launches re-run the calling script, so the same block pins them
    exactly. Float32 sums on CPU are ordered by the thread count: two runs give bitwise-equal results only with
    equal counts.

    Args:
        threads: threads per process; None changes nothing.

    Raises:
        ValueError: for a non-positive `threads`.
    """
    if threads is None:
        yield
        return
    check_int(threads, "threads")
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if env is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = env
