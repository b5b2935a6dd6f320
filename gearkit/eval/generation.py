"""Greedy-generation agreement with the uncompressed cache, and per-layer reconstruction error of K and V."""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch import Tensor

from gearkit.integrations.hf import GearCache, cache_name, compressed_tokens, make_cache
from gearkit.models import chat_ids, first_tokens, pad_token_id


@dataclasses.dataclass
class Generation:
    """A greedy continuation with a cache, compared with the uncompressed one.

    Attributes:
        recipe: cache name.
        text: the generated continuation.
        match_rate: fraction of positions where the tokens equal the uncompressed cache's tokens.
        first_divergence: index of the first differing new token, or None if all match.
        tokens_per_s: new tokens per second of the whole `generate` call.
        compressed: tokens the cache held compressed at the end (the rest were in its full-precision buffer).
        held: tokens the cache held at the end (prompt and new tokens).
    """

    recipe: str
    text: str
    match_rate: float
    first_divergence: int | None
    tokens_per_s: float
    compressed: int = 0
    held: int = 0


@torch.inference_mode()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int, cache=None) -> tuple[Tensor, float]:
    """Greedy new tokens `[new]` for `prompt` (chat template applied) and the seconds `generate` took."""
    ids = chat_ids(tokenizer, prompt)
    start = time.perf_counter()
    out = model.generate(
        **ids, max_new_tokens=max_new_tokens, do_sample=False, cache=cache, pad_token_id=pad_token_id(tokenizer)
    )
    return out[0, ids["input_ids"].shape[-1] :], time.perf_counter() - start


def agreement(
    model, tokenizer, names, prompt: str, max_new_tokens: int = 64, buffer_dtype: torch.dtype | None = torch.float16
) -> list[Generation]:
    """Greedy generation with each cache in `names`, compared token by token with the uncompressed cache
    (`buffer_dtype`: the recipes' buffer storage, as `gearkit.integrations.hf.make_cache` takes it)."""
    reference, _ = greedy(model, tokenizer, prompt, max_new_tokens)
    results = []
    for spec in names:
        cache = make_cache(spec, model, buffer_dtype=buffer_dtype)
        tokens, seconds = greedy(model, tokenizer, prompt, max_new_tokens, cache)
        n = min(len(tokens), len(reference))
        same = (tokens[:n] == reference[:n]).tolist() + [False] * abs(len(tokens) - len(reference))
        first = next((i for i, s in enumerate(same) if not s), None)
        results.append(
            Generation(
                cache_name(spec),
                tokenizer.decode(tokens, skip_special_tokens=True),
                sum(same) / max(len(same), 1),
                first,
                len(tokens) / seconds,
                *compressed_tokens(cache),
            )
        )
    return results


@torch.inference_mode()
def layer_errors(
    model, tokenizer, name: str, text: str, tokens: int = 1024, buffer_dtype: torch.dtype | None = torch.float16
) -> list[dict]:
    """Relative Frobenius error and SQNR (dB) of the stored keys and values, per layer, after a prefill of
    the first `tokens` tokens of `text` (whole chunks compressed, the remainder in the buffer; `buffer_dtype` as
    `gearkit.integrations.hf.make_cache` takes it)."""
    from transformers import DynamicCache

    ids = first_tokens(tokenizer, text, tokens)
    reference, cache = DynamicCache(config=model.config), make_cache(name, model, buffer_dtype=buffer_dtype)
    if not isinstance(cache, GearCache):
        raise ValueError(f"layer errors need a gearkit recipe, not {name}")
    model(ids, cache=reference, use_cache=True)
    model(ids, cache=cache, use_cache=True)
    rows = []
    for i, (ref, held) in enumerate(zip(reference.layers, cache.layers)):
        keys, values = held.store.dequantized()
        row = {"layer": i}
        for kind, x, y in (("key", ref.keys, keys), ("value", ref.values, values)):
            err = (x.float() - y.float()).norm() / x.float().norm()
            row[f"{kind} rel err"] = err.item()
            row[f"{kind} SQNR dB"] = -20 * math.log10(max(err.item(), 1e-12))
        rows.append(row)
    return rows
