"""Real-model evaluation: perplexity with a compressed past, per-layer reconstruction error, greedy
generation agreement, bytes and speed.

Perplexity protocol: each window prefills `prefix` tokens into the cache under test, then scores the next
`continuation` tokens teacher-forced against that cache. The continuation is fed in steps that end exactly
where the cache's buffer fills, so every token sees what it would see while decoding one token at a time:
compressed chunks as compressed, the buffer (and its own step) in full precision. The uncompressed baseline
comes from the same run, on the same windows.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gearkit.accounting import MemoryReport, bits_per_element
from gearkit.integrations.hf import cache_name, cache_step, check_cache_name, make_cache, memory_report
from gearkit.models import token_windows
from gearkit.recipe import Recipe


@dataclasses.dataclass
class PerplexityResult:
    """Perplexity of one cache against the uncompressed baseline on the same windows (see `evaluate`)."""

    recipe: str
    model: str
    tokens: int
    windows: int
    prefix: int
    continuation: int
    baseline_ppl: float
    ppl: float
    ppl_increase_pct: float
    bits_per_element: float
    compression_ratio: float
    kv_bytes: int
    kv_bytes_fp16: int
    components: dict[str, int]
    prefill_tokens_per_s: float
    continuation_tokens_per_s: float

    @property
    def dictionary_bytes(self) -> int:
        """Bytes of the amortised dictionaries included in `kv_bytes` (CSR; 0 for other caches)."""
        return self.components.get("dictionary", 0)

    @property
    def bits_per_element_without_dictionary(self) -> float:
        """Bits per element of the cache's own bytes, without the amortised dictionaries."""
        return bits_per_element(self.kv_bytes - self.dictionary_bytes, self.kv_bytes_fp16 // 2)

    def summary(self) -> dict:
        """The fields `gearkit eval ppl --json` prints."""
        keys = (
            "recipe",
            "model",
            "tokens",
            "baseline_ppl",
            "ppl",
            "ppl_increase_pct",
            "bits_per_element",
            "compression_ratio",
            "kv_bytes",
            "kv_bytes_fp16",
        )
        return {k: getattr(self, k) for k in keys}


def _nll(logits: Tensor, targets: Tensor) -> float:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()


@torch.inference_mode()
def baseline_nll(model, window: Tensor, prefix: int) -> float:
    """Summed NLL of `window[prefix:]` with the full-precision model in one forward pass."""
    logits = model(window[None]).logits[0]
    return _nll(logits[prefix - 1 : -1], window[prefix:])


def _steps(cache, start: int, end: int):
    """The continuation's steps `(pos, n)`: each ends where `cache`'s buffer fills (read as the loop goes)."""
    pos = start
    while pos < end:
        n = min(cache_step(cache), end - pos)
        yield pos, n
        pos += n


@torch.inference_mode()
def cached_logits(
    model, window: Tensor, prefix: int, cache, progress: Callable | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """The logits of `window[prefix:]` with `cache` holding the past, one step at a time (lazily).

    Args:
        model (transformers.PreTrainedModel): a causal LM.
        window: int64 `[tokens]`.
        prefix: tokens prefilled into `cache` first.
        cache (transformers.Cache): the cache under test (all of `window` ends up in it).
        progress: optional wrapper of the continuation's steps (as in `evaluate`).

    Yields:
        `(logits, targets)`: float `[n, vocab]` and int64 `[n]`, first the prefill's last position (predicting
        `window[prefix]`), then each continuation step (steps end where the cache's buffer fills).
    """
    wrap = progress or (lambda it, **_: it)
    logits = model(window[None, :prefix], cache=cache, use_cache=True).logits[0, -1:]
    yield logits, window[prefix : prefix + 1]
    for pos, n in wrap(_steps(cache, prefix, window.numel()), total=None, desc="steps"):
        logits = model(window[None, pos : pos + n], cache=cache, use_cache=True).logits[0]
        targets = window[pos + 1 : pos + n + 1]  # the window's last token predicts nothing scored
        yield logits[: targets.numel()], targets


@torch.inference_mode()
def cached_nll(
    model, window: Tensor, prefix: int, cache, progress: Callable | None = None
) -> tuple[float, float, float]:
    """Summed NLL of `window[prefix:]` with `cache` holding the past; returns (nll, prefill s, continuation s).

    All of `window` ends up in the cache, so its memory report covers `prefix + continuation` tokens.
    `progress` (as in `evaluate`) wraps the continuation's steps, so a long window shows its progress.
    """
    steps = cached_logits(model, window, prefix, cache, progress)
    start = time.perf_counter()
    nll = _nll(*next(steps))
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for logits, targets in steps:
        nll += _nll(logits, targets)
    return nll, prefill_s, time.perf_counter() - start


def evaluate(
    model,
    tokenizer,
    names: Sequence[str | Recipe],
    text: str,
    prefix: int = 1024,
    continuation: int = 1024,
    windows: int | None = 4,
    progress: Callable | None = None,
    model_name: str = "",
    on_result: Callable[[PerplexityResult], None] | None = None,
    buffer_dtype: torch.dtype | None = torch.float16,
) -> list[PerplexityResult]:
    """Perplexity of each cache in `names` with a compressed past, beside the baseline from the same run.

    Args:
        model (transformers.PreTrainedModel): a causal LM (`transformers`).
        tokenizer (transformers.PreTrainedTokenizerBase): its tokenizer.
        names: recipes (names or `Recipe` objects) and/or HF baselines (`hf-quanto-2`, ...).
        text: the text to score.
        prefix: tokens prefilled into the cache per window.
        continuation: tokens scored per window.
        windows: at most this many windows (None: as many as the text holds).
        progress: optional wrapper for progress display, called as `progress(iterable, total=, desc=)`.
        model_name: name reported in the results.
        on_result: called with each result as soon as it is measured (long sweeps report as they go).
        buffer_dtype: storage dtype of the recipes' full-precision buffers; None keeps the model's dtype
            (`gearkit.integrations.hf.make_cache`).

    Returns:
        One `PerplexityResult` per name, in order.
    """
    specs = [n if isinstance(n, Recipe) else check_cache_name(n) for n in names]
    spans = token_windows(tokenizer, text, prefix, continuation, windows)
    wrap = progress or (lambda it, **_: it)
    base = sum(baseline_nll(model, w, prefix) for w in wrap(spans, total=len(spans), desc="baseline"))
    results = []
    for spec in specs:
        nll = prefill_s = cont_s = 0.0
        name = cache_name(spec)
        for window in wrap(spans, total=len(spans), desc=name):
            cache = make_cache(spec, model, buffer_dtype=buffer_dtype)
            n, p, c = cached_nll(model, window, prefix, cache, progress)
            nll, prefill_s, cont_s = nll + n, prefill_s + p, cont_s + c
        report = memory_report(cache, model.config)  # the last window's cache, holding prefix + continuation tokens
        results.append(
            perplexity_result(name, model_name, len(spans), prefix, continuation, base, nll, report, prefill_s, cont_s)
        )
        if on_result is not None:
            on_result(results[-1])
    return results


def perplexity_result(
    name: str,
    model_name: str,
    windows: int,
    prefix: int,
    continuation: int,
    base_nll: float,
    nll: float,
    report: MemoryReport,
    prefill_s: float,
    continuation_s: float,
) -> PerplexityResult:
    """A `PerplexityResult` from NLLs summed over `windows` windows (in window order) and the report of the
    last window's cache."""
    scored = windows * continuation
    baseline_ppl, ppl = math.exp(base_nll / scored), math.exp(nll / scored)
    return PerplexityResult(
        recipe=name,
        model=model_name,
        tokens=scored,
        windows=windows,
        prefix=prefix,
        continuation=continuation,
        baseline_ppl=baseline_ppl,
        ppl=ppl,
        ppl_increase_pct=100 * (ppl / baseline_ppl - 1),
        bits_per_element=report.bits_per_element,
        compression_ratio=report.compression_ratio,
        kv_bytes=report.nbytes,
        kv_bytes_fp16=report.fp16_nbytes,
        components=report.components,
        prefill_tokens_per_s=windows * prefix / prefill_s,
        continuation_tokens_per_s=scored / continuation_s,
    )
