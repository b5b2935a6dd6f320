"""Greedy generation over many prompts with compressed KV caches: the runner's `generate` task."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor

from gearkit.compressors.checks import check_int
from gearkit.eval.runner.data import Item
from gearkit.eval.runner.task import BatchResult, BatchStats, CacheTask
from gearkit.integrations.hf import cache_name
from gearkit.models import chat_ids, pad_token_id
from gearkit.recipe import Recipe


class GenerationTask(CacheTask):
    """Greedy new tokens for each prompt of a batch, with each cache.

    Prompts of a batch are left-padded to one width and generated together; padded positions are stored in the
    cache like any token (they share compressed chunks with the real tokens unless the padding is a multiple of
    the chunk size), so a prompt's output depends on its batch, never on the number of devices. Sink tokens are
    each row's first real tokens.

    Args:
        recipes: one cache or several (see `CacheTask`).
        max_new_tokens: new tokens per prompt.
        chat_template: wrap each string prompt as a user message with the tokenizer's chat template.
        model (transformers.PreTrainedModel | str | os.PathLike | None): a loaded model or a model spec (see
            `CacheTask`).
        tokenizer (transformers.PreTrainedTokenizerBase | None): a loaded model's tokenizer (see `CacheTask`).
        dtype: parameter dtype a model spec is loaded in (see `CacheTask`).
        buffer_dtype: storage dtype of the recipes' full-precision buffers (see `CacheTask`).

    Raises:
        ValueError: as `CacheTask`, or for a non-positive `max_new_tokens`.
    """

    def __init__(
        self,
        recipes: str | Recipe | Sequence[str | Recipe],
        *,
        max_new_tokens: int = 32,
        chat_template: bool = True,
        model=None,
        tokenizer=None,
        dtype: torch.dtype | str = torch.float32,
        buffer_dtype: torch.dtype | None = torch.float16,
    ):
        super().__init__(recipes, model=model, tokenizer=tokenizer, dtype=dtype, buffer_dtype=buffer_dtype)
        check_int(max_new_tokens, "max_new_tokens")
        self.max_new_tokens, self.chat_template = max_new_tokens, chat_template

    @property
    def new_tokens(self) -> int:
        """Tokens each prompt grows by: `max_new_tokens`."""
        return self.max_new_tokens

    def encode(self, item: Item) -> Tensor:
        """Token ids `[tokens]` (int64) of one prompt: a string in the chat template when `chat_template`."""
        if isinstance(item, str) and self.chat_template:
            return chat_ids(self.tokenizer, item)["input_ids"][0]
        return super().encode(item)

    def predict_step(self, batch: dict, batch_idx: int = 0) -> BatchResult:
        """Generate greedily for one left-padded batch with each cache.

        Args:
            batch: `{"batch": int, "index": list[int], "items": list[str | Tensor]}` from `PromptBatches`.
            batch_idx: Lightning's per-rank batch counter (unused: rows carry the global `index`).

        Returns:
            A `BatchResult` whose rows have `index`, `recipe`, `prompt` (strings only), `token_ids` (new tokens up
            to and including the first end-of-sequence token) and `text`; stats count the new tokens of all rows.
        """
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
            cache, start = self.make_cache(spec), time.perf_counter()
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
            stats[name] = BatchStats(self.report(cache, len(ids)), new.numel(), seconds)
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
