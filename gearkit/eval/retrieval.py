"""Retrieval tasks in the style of RULER, built offline from a filler text and scored exactly.

Each trial is a haystack: a stretch of filler text (a seeded start in a built-in text or a file) with needles
inserted at depths; it is prefilled into a cache once, and each of its questions is answered greedily from a copy
of that cache, so every question reads the same compressed past. Three tasks:

- `multi-key`: several needles `The special magic number for <key> is <number>.`, with distinct keys; every key
  is asked for in turn, the others acting as distractors. Right when the answer names that key's number and no
  other number.
- `multi-value`: several keys, each with one needle listing several numbers; every key is asked for, and the
  answer must name exactly its numbers (in any order).
- `variable-tracking`: chains of assignments written as COBOL's `MOVE 12345 TO apple.` then
  `MOVE apple TO tiger.` (the value moves from variable to variable); asked which variables hold the value, the
  model follows the chain one assignment at a time: `MOVE 12345 TO` is completed, then `MOVE <its answer> TO`,
  and so on. Right when the variables named are exactly the chain's.

The uncompressed cache is scored in the same run (recipe `uncompressed`). Everything is seeded: the same
arguments give the same prompts and, at a fixed thread count, the same answers.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import re
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from gearkit.accounting import MemoryReport
from gearkit.compressors.checks import check_int
from gearkit.eval.passkey import BASELINE, PasskeyResult, haystack
from gearkit.integrations.hf import cache_name, check_cache_name, make_cache, memory_report
from gearkit.models import pad_token_id
from gearkit.recipe import Recipe

TASKS = ("multi-key", "multi-value", "variable-tracking")
# keys of the multi-key and multi-value needles and variable-tracking's variable names: common nouns, whole words
# (the default model copies these exactly; random capital-letter names, as in RULER, it garbles)
KEY_WORDS = (
    "apple",
    "anchor",
    "basket",
    "cactus",
    "candle",
    "dragon",
    "engine",
    "falcon",
    "forest",
    "garden",
    "guitar",
    "hammer",
    "harbor",
    "island",
    "jacket",
    "jungle",
    "kettle",
    "lemon",
    "mirror",
    "needle",
    "orange",
    "pencil",
    "rabbit",
    "river",
    "saddle",
    "tiger",
    "velvet",
    "wagon",
    "yellow",
)
KEY_NEEDLE = "\nThe special magic number for {key} is {value}.\n"
KEY_QUESTION = "\nWhat is the special magic number for {key}? The special magic number for {key} is"
VALUES_NEEDLE = "\nThe special magic numbers for {key} are {values}.\n"
VALUES_QUESTION = "\nWhat are the special magic numbers for {key}? The special magic numbers for {key} are"
MOVE_NEEDLE = "\nMOVE {source} TO {target}.\n"
MOVE_QUESTION = "\nMOVE {source} TO"
NUMBER = r"\d+"
VARIABLE = r"\b(?:" + "|".join(KEY_WORDS) + r")\b"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each task's haystacks are.

    Attributes:
        trials: questions per task and prompt length; a task's haystacks are as many as it takes to ask them
            (the last one may ask fewer than it could).
        keys: multi-key needles per haystack (each key is asked for once).
        value_keys: multi-value keys per haystack (each asked for once).
        values: numbers per multi-value key.
        chains: variable-tracking chains per haystack (each asked for once).
        hops: variable-tracking assignments per chain after the first (`MOVE <value> TO <variable>.`); the chain
            has `hops + 1` variables.
        digits: digits of the numbers of the multi-key and multi-value needles.
        value_digits: digits of the value a variable-tracking chain starts from.
    """

    trials: int = 8
    keys: int = 4
    value_keys: int = 2
    values: int = 2
    chains: int = 1
    hops: int = 1
    digits: int = 7
    value_digits: int = 5

    def __post_init__(self):
        for field in dataclasses.fields(self):
            check_int(getattr(self, field.name), field.name)
        names = {"keys": self.keys, "value_keys": self.value_keys, "chains * (hops + 1)": self.chains * (self.hops + 1)}
        for name, count in names.items():
            if count > len(KEY_WORDS):
                raise ValueError(f"{name} is {count}, more than the {len(KEY_WORDS)} names a haystack can hold")


@dataclasses.dataclass(frozen=True)
class Question:
    """One question about a haystack, answered in `steps` greedy generations.

    Attributes:
        cue: the text appended to the haystack; `{source}` in it is `start` at the first step and the previous
            step's first answer item after it (a chain is followed one assignment at a time).
        start: what `{source}` is at the first step.
        pattern: regular expression of one answer item (a number, a variable name).
        expected: the items a right answer names (compared as a multiset over all steps).
        steps: generations; one per chain link for variable tracking, else 1.
    """

    cue: str
    start: str
    pattern: str
    expected: tuple[str, ...]
    steps: int = 1


@dataclasses.dataclass(frozen=True)
class Trial:
    """A haystack and its questions.

    Attributes:
        task: one of `TASKS`.
        length: haystack tokens.
        context: the haystack's token ids, int64 `[length]`.
        questions: what is asked about it.
    """

    task: str
    length: int
    context: Tensor
    questions: tuple[Question, ...]


def _number(rng: random.Random, digits: int, taken: set[str]) -> str:
    """A fresh `digits`-digit number (no leading zero) not in `taken`, which it joins."""
    while (n := str(rng.randrange(10 ** (digits - 1), 10**digits))) in taken:
        pass
    taken.add(n)
    return n


def _listing(values: Sequence[str]) -> str:
    """`a, b and c`."""
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} and {values[-1]}"


def _multi_key(rng: random.Random, sizes: Sizes) -> tuple[list[str], list[Question]]:
    taken: set[str] = set()
    pairs = [(key, _number(rng, sizes.digits, taken)) for key in rng.sample(KEY_WORDS, sizes.keys)]
    needles = [KEY_NEEDLE.format(key=k, value=v) for k, v in pairs]
    return needles, [Question(KEY_QUESTION.format(key=k), "", NUMBER, (v,)) for k, v in pairs]


def _multi_value(rng: random.Random, sizes: Sizes) -> tuple[list[str], list[Question]]:
    taken: set[str] = set()
    groups = [
        (key, [_number(rng, sizes.digits, taken) for _ in range(sizes.values)])
        for key in rng.sample(KEY_WORDS, sizes.value_keys)
    ]
    needles = [VALUES_NEEDLE.format(key=k, values=_listing(vs)) for k, vs in groups]
    return needles, [Question(VALUES_QUESTION.format(key=k), "", NUMBER, tuple(vs)) for k, vs in groups]


def _variable_tracking(rng: random.Random, sizes: Sizes) -> tuple[list[list[str]], list[Question]]:
    numbers: set[str] = set()
    names = iter(rng.sample(KEY_WORDS, sizes.chains * (sizes.hops + 1)))
    chains, questions = [], []
    for _ in range(sizes.chains):
        value = _number(rng, sizes.value_digits, numbers)
        variables = [next(names) for _ in range(sizes.hops + 1)]
        chains.append([MOVE_NEEDLE.format(source=s, target=t) for s, t in zip([value, *variables], variables)])
        questions.append(Question(MOVE_QUESTION, value, VARIABLE, tuple(variables), steps=len(variables)))
    return chains, questions


def _depths(rng: random.Random, count: int, depths: Sequence[float] | None) -> list[float]:
    """`count` needle depths: drawn uniformly from [0, 1], or `depths` cycled in a seeded order."""
    if depths is None:
        return [rng.random() for _ in range(count)]
    cycled = [depths[i % len(depths)] for i in range(count)]
    rng.shuffle(cycled)
    return cycled


def build_trials(
    tokenizer,
    filler: str,
    tasks: Sequence[str] = TASKS,
    lengths: Sequence[int] = (1024, 2048),
    sizes: Sizes = Sizes(),
    depths: Sequence[float] | None = None,
    seed: int = 0,
) -> list[Trial]:
    """The haystacks of every task at every length, in that order, asking `sizes.trials` questions each; seeded.

    Each haystack starts at a seeded token of `filler` and holds its needles at `depths` (uniform random depths
    when None); a variable-tracking chain's assignments are placed in order, so each variable is assigned before
    it is read. A (task, length) pair draws from its own seed, so adding a task or a length leaves the others'
    haystacks as they were.

    Args:
        tokenizer (transformers.PreTrainedTokenizerBase): the model's tokenizer.
        filler: the filler text (e.g. a built-in text).
        tasks: names from `TASKS`.
        lengths: haystack lengths in tokens.
        sizes: needle counts and questions per (task, length).
        depths: needle depths, fractions of the filler in [0, 1]; None draws them uniformly.
        seed: the seed every draw derives from.

    Returns:
        One `Trial` per haystack, by task, then length.

    Raises:
        ValueError: for an unknown task, a depth outside [0, 1], or a length too short for the needles or too long
            for the filler.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks must be among {', '.join(TASKS)}, got {list(tasks)}")
    if depths is not None and not depths:
        raise ValueError("depths is empty: give at least one depth, or None for uniform random depths")
    for length in lengths:
        check_int(length, "length")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    text = encode(filler)
    trials = []
    for task in tasks:
        for length in lengths:
            rng, asked = random.Random(f"{seed}:{task}:{length}"), 0
            while asked < sizes.trials:
                if task == "variable-tracking":
                    chains, questions = _variable_tracking(rng, sizes)
                    needles = [
                        (depth, encode(needle))
                        for chain in chains
                        for depth, needle in zip(sorted(_depths(rng, len(chain), depths)), chain)
                    ]
                else:
                    texts, questions = (_multi_key if task == "multi-key" else _multi_value)(rng, sizes)
                    needles = [(d, encode(n)) for d, n in zip(_depths(rng, len(texts), depths), texts)]
                room = len(text) - (length - sum(len(n) for _, n in needles))
                start = rng.randrange(room + 1) if room > 0 else 0
                ids = haystack(text[start:], needles, length)
                questions = tuple(questions[: sizes.trials - asked])
                trials.append(Trial(task, length, torch.tensor(ids, dtype=torch.long), questions))
                asked += len(questions)
    return trials


class StopAtNewline(StoppingCriteria):
    """Stops each row of a greedy generation once its new tokens contain a newline (answers are one line).

    Args:
        tokenizer (transformers.PreTrainedTokenizerBase): decodes the new tokens.
        start: where the new tokens begin in `input_ids`.
    """

    def __init__(self, tokenizer, start: int):
        self.tokenizer, self.start = tokenizer, start

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        """Whether each row `[batch, tokens]` is done: bool `[batch]`."""
        done = ["\n" in self.tokenizer.decode(row[self.start :].tolist()) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def answer_line(model, tokenizer, context: Tensor, cache, cue: str, max_new_tokens: int) -> str:
    """The first line of the greedy answer to `cue` after `context`, from a copy of `cache` (which holds exactly
    `context`, so it stays as it is for the next question).

    Args:
        model (transformers.PreTrainedModel): the model `cache` was filled by.
        tokenizer (transformers.PreTrainedTokenizerBase): its tokenizer.
        context: the haystack, int64 `[tokens]`.
        cache (transformers.Cache): a cache holding `context`.
        cue: the question text.
        max_new_tokens: the answer's length limit.

    Returns:
        The decoded answer up to its first newline.
    """
    cue_ids = torch.tensor(tokenizer(cue, add_special_tokens=False)["input_ids"], dtype=torch.long)
    ids = torch.cat([context, cue_ids.to(context.device)])[None]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        cache=copy.deepcopy(cache),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        stopping_criteria=StoppingCriteriaList([StopAtNewline(tokenizer, ids.shape[1])]),
        pad_token_id=pad_token_id(tokenizer),
    )
    return tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True).split("\n")[0]


def answer_budget(tokenizer, question: Question) -> int:
    """New tokens one step of `question` may take: its expected items listed, a full stop and 4 tokens of slack."""
    return len(tokenizer(" " + _listing(question.expected) + ".", add_special_tokens=False)["input_ids"]) + 4


def ask(model, tokenizer, context: Tensor, cache, question: Question) -> bool:
    """Whether the model answers `question` right, step by step from `cache`, which holds `context` `[tokens]`.

    The answer items of every step are collected; a step whose answer names no item ends the question (a chain
    cannot go on). Right when the items, as a multiset, equal `question.expected`.
    """
    budget, items, source = answer_budget(tokenizer, question), [], question.start
    for _ in range(question.steps):
        line = answer_line(model, tokenizer, context, cache, question.cue.format(source=source), budget)
        found = re.findall(question.pattern, line)
        if not found:
            break
        items += found
        source = found[0]
    return sorted(items) == sorted(question.expected)


@torch.inference_mode()
def trial_row(
    model,
    tokenizer,
    trial: Trial,
    index: int,
    spec: str | Recipe | None,
    buffer_dtype: torch.dtype | None = torch.float16,
) -> tuple[dict, MemoryReport | None]:
    """Prefill `trial`'s haystack into a fresh cache for `spec` (None: the model's own uncompressed cache) and ask
    its questions.

    Args:
        model (transformers.PreTrainedModel): a causal LM.
        tokenizer (transformers.PreTrainedTokenizerBase): its tokenizer.
        trial: the haystack and its questions.
        index: the trial's position in the trial list (the row's `index`).
        spec: a recipe (name or `Recipe`) or HF baseline, or None for the uncompressed cache.
        buffer_dtype: storage dtype of the recipe's full-precision buffers (`gearkit.integrations.hf.make_cache`).

    Returns:
        The row `{"index", "recipe", "task", "length", "correct", "questions", "bits_per_element", "seconds"}`
        (bits all-in, of the cache holding the haystack; None for the uncompressed cache) and that cache's
        `MemoryReport` (None for the uncompressed cache).
    """
    start = time.perf_counter()
    cache = DynamicCache(config=model.config) if spec is None else make_cache(spec, model, buffer_dtype=buffer_dtype)
    context = trial.context.to(model.device)
    model(context[None], cache=cache, logits_to_keep=1)
    report = None if spec is None else memory_report(cache, model.config)
    correct = sum(ask(model, tokenizer, context, cache, q) for q in trial.questions)
    row = {
        "index": index,
        "recipe": BASELINE if spec is None else cache_name(spec),
        "task": trial.task,
        "length": trial.length,
        "correct": correct,
        "questions": len(trial.questions),
        "bits_per_element": None if report is None else report.bits_per_element,
        "seconds": time.perf_counter() - start,
    }
    return row, report


@dataclasses.dataclass
class RetrievalResult(PasskeyResult):
    """Accuracy of one cache on one task at one haystack length: a `PasskeyResult` (`length`: haystack tokens;
    `correct` of `trials` questions; bits of the last haystack's cache) with its task.

    Attributes:
        task: one of `TASKS`.
    """

    task: str

    def summary(self) -> dict:
        """The result as a JSON-ready dict (the task after the model)."""
        out = super().summary()
        return {"recipe": out.pop("recipe"), "model": out.pop("model"), "task": self.task, **out}


def retrieval_results(rows: Sequence[dict], model_name: str) -> list[RetrievalResult]:
    """One `RetrievalResult` per (recipe, task, length) from `trial_row` rows, in the rows' first-seen order of
    recipes, then of (task, length); bits come from the last haystack in row order."""
    groups: dict[str, dict[tuple[str, int], list[dict]]] = {}
    for row in rows:
        groups.setdefault(row["recipe"], {}).setdefault((row["task"], row["length"]), []).append(row)
    return [
        RetrievalResult(
            recipe,
            model_name,
            length,
            sum(r["correct"] for r in group),
            sum(r["questions"] for r in group),
            group[-1]["bits_per_element"],
            task,
        )
        for recipe, by_task in groups.items()
        for (task, length), group in by_task.items()
    ]


def retrieval(
    model,
    tokenizer,
    names: Sequence[str | Recipe],
    trials: Sequence[Trial],
    model_name: str = "",
    progress: Callable | None = None,
    buffer_dtype: torch.dtype | None = torch.float16,
) -> list[RetrievalResult]:
    """Accuracy of the uncompressed cache and of each cache in `names` on every trial, per (task, length).

    Args:
        model (transformers.PreTrainedModel): a causal LM.
        tokenizer (transformers.PreTrainedTokenizerBase): its tokenizer.
        names: recipes (names or `Recipe` objects) and/or HF baselines.
        trials: from `build_trials`.
        model_name: name reported in the results.
        progress: optional wrapper for progress display, called as `progress(iterable, total=, desc=)`.
        buffer_dtype: storage dtype of the recipes' full-precision buffers; None keeps the model's dtype (see
            `gearkit.integrations.hf.make_cache`).

    Returns:
        One `RetrievalResult` per (cache, task, length), the uncompressed cache first.
    """
    specs = [n if isinstance(n, Recipe) else check_cache_name(n) for n in names]
    wrap = progress or (lambda it, **_: it)
    rows = []
    for spec in [None, *specs]:
        name = BASELINE if spec is None else cache_name(spec)
        rows += [
            trial_row(model, tokenizer, trial, i, spec, buffer_dtype)[0]
            for i, trial in wrap(enumerate(trials), total=len(trials), desc=name)
        ]
    return retrieval_results(rows, model_name)
