"""Run-time measurements shared by tests and benchmarks: the largest tensor a piece of work allocates."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _tensors(x) -> Iterator[torch.Tensor]:
    """The tensors in an op's (nested) arguments."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


class _Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in _tensors((args, kwargs))}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # views allocate nothing
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def largest_tensor(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run `fn()` and return its result and the bytes of the largest tensor any op allocated while it ran (views of
    existing tensors, such as a reshaped block of stored codes, allocate nothing and are not counted).

    A decode step that rebuilds the whole past in full precision creates a tensor that grows with the context;
    one that reads the compressed storage block by block does not.
    """
    with _Largest() as counter:
        out = fn()
    return out, counter.largest
