"""Run-time measurements shared by tests and benchmarks: the largest tensor a piece of work creates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def largest_tensor(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run `fn()` and return its result and the bytes of the largest tensor any op created while it ran.

    A decode step that rebuilds the whole past in full precision creates a tensor that grows with the context;
    one that reads the compressed storage block by block does not.
    """
    with _Largest() as counter:
        out = fn()
    return out, counter.largest
