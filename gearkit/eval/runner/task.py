"""The base of every runner task: a `LightningModule` that runs compressed KV caches over `PromptBatches`.

A task is one module: a `CacheTask` subclass with its settings, its `predict_step` (one batch in, a
`BatchResult` out) and, where it needs more than "fits the model's context", its `check_item`. The base holds
what every task shares: the cache specs (checked when the task is built, so a bad name fails before any process
starts), the model (a model spec is loaded in `configure_model` by every process alike, with
`gearkit.models.load_model`), tokenizing, the cache factory and byte reports.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from transformers.cache_utils import Cache

from gearkit.accounting import MemoryReport
from gearkit.eval.runner.data import Item
from gearkit.integrations.hf import cache_name, check_cache_name, make_cache, memory_report
from gearkit.models import load_model, model_dtype, resolve_model
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

    Subclasses implement `predict_step`. Given a model spec rather than a model, every process loads that spec
    in `configure_model` (once per process) with `gearkit.models.load_model` and the same `dtype`, so a pickled
    module stays small and every DDP rank runs the same model.

    Args:
        recipes: one cache or several: recipe names, `Recipe` objects or HF baselines (`hf-quanto-2`, ...).
        model (transformers.PreTrainedModel | str | os.PathLike | None): a loaded `transformers` causal LM, or a
            model spec for `gearkit.models.load_model` (a checkpoint directory, a `.gguf` file, a model id in the
            local Hugging Face cache; None: the default model).
        tokenizer (transformers.PreTrainedTokenizerBase | None): the loaded model's tokenizer (required with a
            loaded model, not with a spec).
        dtype: parameter dtype a model spec is loaded in (`gearkit.models.DTYPES`).
        buffer_dtype: storage dtype of the recipes' full-precision buffers; None keeps the model's dtype (see
            `gearkit.integrations.hf.make_cache`).

    Raises:
        ValueError: for no recipe (unless the task scores a baseline of its own), an unknown recipe, repeated cache
            names, a loaded model without its tokenizer (or a tokenizer with a spec), an unsupported `dtype`, or a
            spec `gearkit.models.resolve_model` refuses.
        FileNotFoundError: for a spec naming a missing path, or a model id not in the local Hugging Face cache.
    """

    new_tokens = 0  # tokens each prompt grows by during the task; `check_item` counts them against the context
    needs_recipe = True  # False for a task that scores a baseline of its own, so that no recipe is fine

    def __init__(
        self,
        recipes: str | Recipe | Sequence[str | Recipe],
        *,
        model=None,
        tokenizer=None,
        dtype: torch.dtype | str = torch.float32,
        buffer_dtype: torch.dtype | None = torch.float16,
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
        loaded = not (model is None or isinstance(model, (str, os.PathLike)))
        if loaded != (tokenizer is not None):
            raise ValueError(
                "pass a loaded model with its tokenizer, or a model spec (or None) without one: the spec's own "
                "tokenizer loads with it"
            )
        if not loaded:
            resolve_model(model)  # a missing path or a model not in the local cache fails before any process starts
        self.specs, self.buffer_dtype = specs, buffer_dtype
        self.model_spec, self.spec_dtype = (None, None) if loaded else (model, model_dtype(dtype))
        self.model, self.tokenizer = (model, tokenizer) if loaded else (None, None)

    @property
    def names(self) -> list[str]:
        """The cache names, in the order rows are produced."""
        return [cache_name(s) for s in self.specs]

    def configure_model(self) -> None:
        """Load the model spec and its tokenizer if no loaded model was given (called by Lightning)."""
        if self.model is None:
            self.model, self.tokenizer, _ = load_model(self.model_spec, self.spec_dtype)
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
        return make_cache(spec, self.model, buffer_dtype=self.buffer_dtype)

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
