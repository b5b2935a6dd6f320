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
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gearkit import recipes
from gearkit.integrations.hf import GearCache, MemoryReport

HF_BASELINES = {"hf-quanto-2": ("quanto", 2), "hf-quanto-4": ("quanto", 4), "hf-hqq-2": ("hqq", 2), "hf-hqq-4": ("hqq", 4)}
HF_STEP = 64  # feed steps for QuantizedCache: within its 128-token full-precision residual


def available_baselines() -> list[str]:
    """The Hugging Face `QuantizedCache` baselines whose backend package is installed."""
    import importlib.util

    have = {"quanto": importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None,
            "hqq": importlib.util.find_spec("hqq") is not None}
    return [name for name, (backend, _) in HF_BASELINES.items() if have[backend]]


def check_cache_name(name: str) -> str:
    """Return `name` if it is a recipe or an installed HF baseline, else raise `ValueError` listing both."""
    if name in HF_BASELINES:
        if name not in available_baselines():
            raise ValueError(f"{name} needs its backend package: pip install {'optimum-quanto' if 'quanto' in name else 'hqq'}")
        return name
    try:
        recipes.get(name)
    except ValueError as e:
        raise ValueError(f"{e}; Hugging Face baselines: {', '.join(HF_BASELINES)}") from None
    return name


def make_cache(name: str, model):
    """A fresh cache for `name`: a gearkit recipe (`GearCache`) or an HF baseline (`QuantizedCache`).

    A recipe that needs token saliency (ZipCache) switches `model` to gearkit's attention function, which
    passes the queries to the cache; for every other cache that function gives SDPA's result.
    """
    if name in HF_BASELINES:
        from transformers import QuantizedCache

        backend, bits = HF_BASELINES[check_cache_name(name)]
        return QuantizedCache(backend=backend, config=model.config, nbits=bits)
    recipe = recipes.get(check_cache_name(name))
    if recipe.needs_saliency:
        from gearkit.integrations.attention import register

        model.set_attn_implementation(register())
    return GearCache(recipe, model.config)


def cache_step(cache) -> int:
    """Tokens to feed next: up to where `cache` compresses its next chunk, so compression happens between steps."""
    if isinstance(cache, GearCache):
        return cache.layers[0].tokens_to_next_chunk() if cache.layers else cache.recipe.buffer_size
    return HF_STEP


def head_dim(config) -> int:
    """Head dimension of a (text) model config."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def memory_report(cache, config, batch: int = 1) -> MemoryReport:
    """Bytes held by a cache of a model with `config`, holding `batch` sequences.

    For an HF `QuantizedCache` the quantized part is nominal (codes at `nbits`, an fp16 scale and zero per
    group) and its full-precision residual is counted at fp16, as for an fp16 model.
    """
    if isinstance(cache, GearCache):
        return cache.memory_report()
    text = config.get_text_config(decoder=True)
    row = batch * text.num_key_value_heads * head_dim(text) * 2  # key + value elements per token
    total = MemoryReport({}, 0, 0)
    for layer in cache.layers:
        length = layer.get_seq_length()
        residual = layer.keys.shape[-2] if layer.keys is not None and layer.keys.dim() == 4 else 0
        quantized = row * (length - residual)
        total = total + MemoryReport(
            {"codes": quantized * layer.nbits // 8, "scales": math.ceil(quantized / layer.q_group_size) * 2 * 2,
             "buffer": row * residual * 2},
            length, row * length,
        )
    return total


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
        return 8 * (self.kv_bytes - self.dictionary_bytes) / (self.kv_bytes_fp16 / 2) if self.kv_bytes_fp16 else 0.0

    def summary(self) -> dict:
        """The fields `gearkit eval ppl --json` prints."""
        keys = ("recipe", "model", "tokens", "baseline_ppl", "ppl", "ppl_increase_pct", "bits_per_element",
                "compression_ratio", "kv_bytes", "kv_bytes_fp16")
        return {k: getattr(self, k) for k in keys}


def token_windows(tokenizer, text: str, prefix: int, continuation: int, windows: int | None = 4) -> list[Tensor]:
    """Consecutive, non-overlapping windows of `prefix + continuation` tokens of `text`.

    Returns:
        Up to `windows` int64 tensors `[prefix + continuation]`.

    Raises:
        ValueError: if the text is shorter than one window (the message says how long it must be).
    """
    if prefix < 1 or continuation < 1:
        raise ValueError(f"prefix and continuation must be at least 1 token, got {prefix} and {continuation}")
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    size = prefix + continuation
    available = ids.numel() // size
    if available == 0:
        raise ValueError(f"the text has {ids.numel()} tokens; prefix {prefix} + continuation {continuation} needs at "
                         f"least {size} tokens")
    return [ids[i * size : (i + 1) * size] for i in range(min(available, windows or available))]


def _nll(logits: Tensor, targets: Tensor) -> float:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()


@torch.inference_mode()
def baseline_nll(model, window: Tensor, prefix: int) -> float:
    """Summed NLL of `window[prefix:]` with the full-precision model in one forward pass."""
    logits = model(window[None]).logits[0]
    return _nll(logits[prefix - 1 : -1], window[prefix:])


@torch.inference_mode()
def cached_nll(model, window: Tensor, prefix: int, cache) -> tuple[float, float, float]:
    """Summed NLL of `window[prefix:]` with `cache` holding the past; returns (nll, prefill s, continuation s).

    All of `window` ends up in the cache, so its memory report covers `prefix + continuation` tokens.
    """
    start = time.perf_counter()
    logits = model(window[None, :prefix], cache=cache, use_cache=True).logits[0, -1:]
    prefill_s = time.perf_counter() - start
    nll, pos, end = _nll(logits, window[prefix : prefix + 1]), prefix, window.numel()
    start = time.perf_counter()
    while pos < end:
        n = min(cache_step(cache), end - pos)  # end each step where the buffer fills
        logits = model(window[None, pos : pos + n], cache=cache, use_cache=True).logits[0]
        targets = window[pos + 1 : pos + n + 1]  # the window's last token predicts nothing scored
        nll += _nll(logits[: targets.numel()], targets)
        pos += n
    return nll, prefill_s, time.perf_counter() - start


def evaluate(model, tokenizer, names: Sequence[str], text: str, prefix: int = 1024, continuation: int = 1024,
             windows: int | None = 4, progress: Callable | None = None, model_name: str = "") -> list[PerplexityResult]:
    """Perplexity of each cache in `names` with a compressed past, beside the baseline from the same run.

    Args:
        model (transformers.PreTrainedModel): a causal LM (`transformers`).
        tokenizer (transformers.PreTrainedTokenizerBase): its tokenizer.
        names: recipe names and/or HF baselines (`hf-quanto-2`, ...).
        text: the text to score.
        prefix: tokens prefilled into the cache per window.
        continuation: tokens scored per window.
        windows: at most this many windows (None: as many as the text holds).
        progress: optional wrapper for progress display, called as `progress(iterable, total=, desc=)`.
        model_name: name reported in the results.

    Returns:
        One `PerplexityResult` per name, in order.
    """
    names = [check_cache_name(n) for n in names]
    spans = token_windows(tokenizer, text, prefix, continuation, windows)
    wrap = progress or (lambda it, **_: it)
    base = sum(baseline_nll(model, w, prefix) for w in wrap(spans, total=len(spans), desc="baseline"))
    results = []
    for name in names:
        nll = prefill_s = cont_s = 0.0
        for window in wrap(spans, total=len(spans), desc=name):
            cache = make_cache(name, model)
            n, p, c = cached_nll(model, window, prefix, cache)
            nll, prefill_s, cont_s = nll + n, prefill_s + p, cont_s + c
        report = memory_report(cache, model.config)  # the last window's cache, holding prefix + continuation tokens
        results.append(perplexity_result(name, model_name, len(spans), prefix, continuation, base, nll, report,
                                         prefill_s, cont_s))
    return results


def perplexity_result(name: str, model_name: str, windows: int, prefix: int, continuation: int, base_nll: float,
                      nll: float, report: MemoryReport, prefill_s: float, continuation_s: float) -> PerplexityResult:
    """A `PerplexityResult` from NLLs summed over `windows` windows (in window order) and the report of the
    last window's cache."""
    scored = windows * continuation
    baseline_ppl, ppl = math.exp(base_nll / scored), math.exp(nll / scored)
    return PerplexityResult(
        recipe=name, model=model_name, tokens=scored, windows=windows, prefix=prefix, continuation=continuation,
        baseline_ppl=baseline_ppl, ppl=ppl, ppl_increase_pct=100 * (ppl / baseline_ppl - 1),
        bits_per_element=report.bits_per_element, compression_ratio=report.compression_ratio,
        kv_bytes=report.nbytes, kv_bytes_fp16=report.fp16_nbytes, components=report.components,
        prefill_tokens_per_s=windows * prefix / prefill_s, continuation_tokens_per_s=scored / continuation_s,
    )
