"""Passkey retrieval: a number hidden at some depth of a long filler text, asked for at the end.

The filler is a built-in text (nothing is downloaded); the uncompressed cache is scored in the same run, so a
recipe's accuracy is read against the lengths where the model itself retrieves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gearkit.integrations.hf import cache_name, check_cache_name, make_cache, memory_report
from gearkit.models import pad_token_id
from gearkit.recipe import Recipe

BASELINE = "uncompressed"
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclasses.dataclass
class PasskeyResult:
    """Retrieval accuracy of one cache at one prompt length, over every depth and key tried.

    Attributes:
        recipe: cache name (`uncompressed` for the model's own cache).
        model: the model's name.
        length: prompt tokens.
        correct: trials whose greedy answer contains the key.
        trials: depths x keys tried.
        bits_per_element: all-in bits of the last trial's cache, or None for the model's own (uncompressed) cache.
    """

    recipe: str
    model: str
    length: int
    correct: int
    trials: int
    bits_per_element: float | None

    @property
    def accuracy(self) -> float:
        """Fraction of trials retrieved."""
        return self.correct / self.trials if self.trials else 0.0

    def summary(self) -> dict:
        """The result as a JSON-ready dict."""
        return {
            "recipe": self.recipe,
            "model": self.model,
            "length": self.length,
            "accuracy": round(self.accuracy, 4),
            "correct": self.correct,
            "trials": self.trials,
            "bits_per_element": None if self.bits_per_element is None else round(self.bits_per_element, 4),
        }


def haystack(
    filler: Sequence[int], needles: Sequence[tuple[float, Sequence[int]]], length: int, tail: Sequence[int] = ()
) -> list[int]:
    """`length` token ids: the first filler tokens, with each needle inserted whole at its depth of the filler, then
    `tail` (a question, say).

    Args:
        filler: token ids to take the filler from (its first tokens).
        needles: `(depth, token ids)` pairs; depth is a fraction of the filler (0 = start, 1 = end). Needles at
            the same depth keep their order.
        length: tokens of the result, needles and tail included.
        tail: token ids that end the result.

    Returns:
        The token ids, `length` of them.

    Raises:
        ValueError: for a depth outside [0, 1], or a length too short for the needles or too long for the filler.
    """
    for depth, _ in needles:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be within [0, 1], got {depth}")
    budget = length - len(tail) - sum(len(ids) for _, ids in needles)
    if budget < 1:
        raise ValueError(f"a prompt with these needles needs more than {length - budget} tokens, got {length}")
    if len(filler) < budget:
        raise ValueError(f"the filler text has {len(filler)} tokens; a {length}-token prompt needs {budget}")
    out, at = [], 0
    for depth, ids in sorted(needles, key=lambda n: n[0]):
        cut = round(depth * budget)
        out += [*filler[at:cut], *ids]
        at = cut
    return [*out, *filler[at:budget], *tail]


def passkey_ids(tokenizer, filler: str | Sequence[int], length: int, depth: float, key: int) -> Tensor:
    """A prompt of exactly `length` tokens: filler, the needle naming `key` at `depth`, more filler, the question.

    Args:
        tokenizer (transformers.PreTrainedTokenizerBase): the model's tokenizer.
        filler: text to take the filler from (its first tokens), or that text's token ids.
        length: prompt tokens.
        depth: where the needle goes, as a fraction of the filler (0 = start, 1 = just before the question).
        key: the number to hide.

    Returns:
        int64 `[length]`.

    Raises:
        ValueError: for a depth outside [0, 1], or a length too short for the needle or too long for the filler.
    """
    needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    text = tokenizer(filler, add_special_tokens=False)["input_ids"] if isinstance(filler, str) else list(filler)
    return torch.tensor(haystack(text, [(depth, needle)], length, question), dtype=torch.long)


def passkey_keys(count: int, seed: int = 0) -> list[int]:
    """`count` seeded five-digit keys."""
    return torch.randint(10000, 100000, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def retrieves(model, tokenizer, ids: Tensor, key: int, cache=None, max_new_tokens: int = 8) -> tuple[bool, object]:
    """Whether greedy decoding after `ids` `[tokens]` names `key`, and the cache it used."""
    out = model.generate(
        ids[None],
        attention_mask=torch.ones_like(ids)[None],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        cache=cache,
        pad_token_id=pad_token_id(tokenizer),
    )
    return str(key) in tokenizer.decode(out[0, ids.numel() :], skip_special_tokens=True), cache


def passkey_prompts(
    tokenizer, filler: str, lengths: Sequence[int], depths: Sequence[float], keys: int
) -> dict[int, list[tuple[Tensor, int]]]:
    """Every prompt a passkey run asks, built (and so checked) before any model runs; the filler is tokenized once.

    Args:
        tokenizer (transformers.PreTrainedTokenizerBase): the model's tokenizer.
        filler: the filler text.
        lengths: prompt lengths in tokens.
        depths: needle depths in [0, 1].
        keys: keys tried per depth (seeded).

    Returns:
        Per length, the `(ids, key)` trials: int64 `ids` `[length]`, depths in order, keys within each depth.

    Raises:
        ValueError: as `passkey_ids`.
    """
    text = tokenizer(filler, add_special_tokens=False)["input_ids"]
    trials = [(d, k) for d in depths for k in passkey_keys(keys)]
    return {n: [(passkey_ids(tokenizer, text, n, d, k), k) for d, k in trials] for n in lengths}


def passkey(
    model,
    tokenizer,
    names: Sequence[str | Recipe],
    filler: str,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    keys: int = 2,
    progress: Callable | None = None,
    model_name: str = "",
    buffer_dtype: torch.dtype | None = torch.float16,
) -> list[PasskeyResult]:
    """Passkey accuracy of the uncompressed cache and of each cache in `names`, per prompt length.

    Args:
        model (transformers.PreTrainedModel): a causal LM.
        tokenizer (transformers.PreTrainedTokenizerBase): its tokenizer.
        names: recipes (names or `Recipe` objects) and/or HF baselines.
        filler: the filler text (e.g. a built-in text).
        lengths: prompt lengths in tokens.
        depths: needle depths, fractions of the filler.
        keys: keys tried per depth (seeded).
        progress: optional wrapper for progress display, called as `progress(iterable, total=, desc=)`.
        model_name: name reported in the results.
        buffer_dtype: storage dtype of the recipes' full-precision buffers; None keeps the model's dtype
            (`gearkit.integrations.hf.make_cache`).

    Returns:
        One `PasskeyResult` per (cache, length), the uncompressed cache first.
    """
    specs = [n if isinstance(n, Recipe) else check_cache_name(n) for n in names]
    prompts = passkey_prompts(tokenizer, filler, lengths, depths, keys)
    wrap = progress or (lambda it, **_: it)
    results = []
    for spec in [None, *specs]:
        name = BASELINE if spec is None else cache_name(spec)
        for n, trials in prompts.items():
            correct, bits = 0, None
            for ids, key in wrap(trials, total=len(trials), desc=f"{name} @ {n}"):
                cache = None if spec is None else make_cache(spec, model, buffer_dtype=buffer_dtype)
                hit, cache = retrieves(model, tokenizer, ids, key, cache)
                correct += hit
                if cache is not None:
                    bits = memory_report(cache, model.config).bits_per_element
            results.append(PasskeyResult(name, model_name, n, correct, len(trials), bits))
    return results
