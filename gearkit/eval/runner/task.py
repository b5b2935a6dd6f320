"""The base of every runner task: a `LightningModule` that runs compressed KV caches over `PromptBatches`.

A task is one module: a `CacheTask` subclass with its settings, its `predict_step` (one batch in, a
`BatchResult` out) and, where it needs more than "fits the model's context", its `check_item`. The base holds
what every task shares: the cache specs (checked when the task is built, so a bad name fails before any process
starts), the model (loaded in `configure_model`), tokenizing, the cache factory and byte reports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from transformers.cache_utils import Cache

from gearkit.accounting import MemoryReport
from gearkit.eval.runner.data import Item
from gearkit.integrations.hf import cache_name, check_cache_name, make_cache, memory_report
from gearkit.recipe import Recipe


@dataclasses.dataclass
class BatchStats:
    """What one cache held and how fast it ran on one batch.

    Attributes:
        report: bytes held by the batch's cache(s) at the end of the batch, by component (for several
            sequences run one at a time, the sum of their caches' reports).
        tokens: tokens processed (what a task counts: new tokens generated, or tokens fed to the model).
        seconds: wall time of the model calls.
    """

    report: MemoryReport
    tokens: int
    seconds: float


@dataclasses.dataclass
class BatchResult:
    """What a task's `predict_step` returns for one batch.

    Attributes:
        batch: the batch's number in `PromptBatches` (independent of rank).
        rows: one JSON-serialisable dict per (item, cache), each with `index` (the item's position in the
            prompt list) and `recipe`.
        stats: per cache name, the batch's `BatchStats`.
    """

    batch: int
    rows: list[dict]
    stats: dict[str, BatchStats]


class CacheTask(pl.LightningModule):
    """A task run with one or more compressed KV caches, as a `LightningModule` for `Trainer.predict`.

    Subclasses implement `predict_step`. The model is loaded in `configure_model` (once per process) when not
    given, so a pickled module stays small and every DDP process loads its own copy.

    Args:
        recipes: one cache or several: recipe names, `Recipe` objects or HF baselines (`hf-quanto-2`, ...).
        model (transformers.PreTrainedModel | None): a `transformers` causal LM; None loads one with `loader`.
        tokenizer (transformers.PreTrainedTokenizerBase | None): its tokenizer (required with `model`).
        loader: called as `loader()` to get `(model, tokenizer)`; default `gearkit.models.load_default_model`.

    Raises:
        ValueError: for no recipe (unless the task scores a baseline of its own), an unknown recipe, repeated cache
            names, or a model without its tokenizer.
    """

    new_tokens = 0  # tokens each prompt grows by during the task; `check_item` counts them against the context
    needs_recipe = True  # False for a task that scores a baseline of its own, so that no recipe is fine

    def __init__(
        self,
        recipes: str | Recipe | Sequence[str | Recipe],
        *,
        model=None,
        tokenizer=None,
        loader: Callable[[], tuple[Any, Any]] | None = None,
    ):
        super().__init__()
        specs = [recipes] if isinstance(recipes, (str, Recipe)) else list(recipes)
        if not specs and self.needs_recipe:
            raise ValueError("no recipe given")
        for spec in specs:
            if not isinstance(spec, Recipe):
                check_cache_name(spec)
        names = [cache_name(s) for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"recipe names must be distinct, got {names}")
        if (model is None) != (tokenizer is None):
            raise ValueError("pass model and tokenizer together, or neither (then `loader` loads them)")
        self.specs, self.loader = specs, loader
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
        """Token ids `[tokens]` (int64) of one prompt as the model will see it (a string is tokenized as is)."""
        if isinstance(item, Tensor):
            return item.long()
        return torch.tensor(self.tokenizer(item)["input_ids"], dtype=torch.long)

    def context_length(self) -> int:
        """The model's context length in tokens (`max_position_embeddings`)."""
        text = self.model.config.get_text_config(decoder=True)
        return int(text.max_position_embeddings)

    def check(self, items: Sequence[Item]) -> None:
        """Refuse prompts the task cannot run, before any work is sharded out.

        Loads the model (via `configure_model`) if needed, then calls `check_item` on each prompt.

        Raises:
            ValueError: for an empty list, or the first prompt `check_item` refuses.
        """
        if not items:
            raise ValueError("the prompt list is empty: nothing to predict")
        self.configure_model()
        limit = self.context_length()
        for i, item in enumerate(items):
            self.check_item(i, self.encode(item).numel(), limit)

    def check_item(self, index: int, tokens: int, limit: int) -> None:
        """Refuse one prompt: here, one that with its `new_tokens` exceeds the model's context.

        Args:
            index: the prompt's position in the list (named in the message).
            tokens: its length in tokens, as `encode` makes it.
            limit: the model's context length.

        Raises:
            ValueError: naming the prompt's index and its length.
        """
        if tokens + self.new_tokens > limit:
            more = f" + {self.new_tokens} new tokens" if self.new_tokens else ""
            raise ValueError(
                f"prompt {index} has {tokens} tokens{more}, longer than the model's context of {limit} tokens"
            )

    # -- caches --------------------------------------------------------------------------------------------
    def make_cache(self, spec: str | Recipe) -> Cache:
        """A fresh cache for `spec` on this task's model (`gearkit.integrations.hf.make_cache`)."""
        return make_cache(spec, self.model)

    def report(self, cache: Cache, batch: int = 1) -> MemoryReport:
        """Bytes `cache` holds for `batch` sequences of this task's model (`gearkit.integrations.hf.memory_report`)."""
        return memory_report(cache, self.model.config, batch)

    def predict_step(self, batch: dict, batch_idx: int = 0) -> BatchResult:
        """Run every cache on one batch from `PromptBatches`; each task implements it.

        Args:
            batch: `{"batch": int, "index": list[int], "items": list[str | Tensor]}`.
            batch_idx: Lightning's per-rank batch counter (unused: rows carry the global `index`).

        Returns:
            A `BatchResult` with one row per (item, cache).
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement predict_step")
