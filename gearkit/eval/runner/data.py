"""The runner's data: prompts grouped into fixed batches before any sharding, and their collate."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from gearkit.compressors.checks import check_int

Item = str | Tensor  # a prompt / text, or token ids `[tokens]` (int64)


def unwrap(batch: list[dict]) -> dict:
    """Collate for `PromptBatches` loaded with `batch_size=1`: its items are already batches."""
    return batch[0]


class PromptBatches(Dataset):
    """Prompts grouped into fixed batches, each carrying its prompts' indices.

    Item `k` is `{"batch": k, "index": [k*B, ...], "items": [...]}` with up to `batch_size` prompts (strings,
    or int64 token tensors `[tokens]`). Load it with `loader()` (one batch per step). The batches are formed
    before Lightning shards them over ranks, so a prompt has the same companions on any number of devices.

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
        return DataLoader(self, batch_size=1, shuffle=False, collate_fn=unwrap)
