"""Per-model bit allocation: measure how much each layer's keys and values can lose, then spend a budget of bits.

1. **Sensitivity** (`measure`): for every compressed layer, role (keys, values) and width on the role's ladder
   (`ladder`), the model runs with only that layer's role coded by that width (every other layer and the other role
   exact) and the KL divergence of its next-token distributions from the exact cache's is measured, per scored token.
   One prefill of each tuning window is recorded once and replayed into each candidate's cache (only the coded
   layer's chunks are compressed anew), and chunks spread over the continuation are scored teacher-forced, each over
   the compressed past before it and itself exact as a cache's newest tokens are: a few short forwards per candidate
   instead of a streamed evaluation.
2. **Allocation** (`allocate`): the widths that minimise the summed KL (an additive model of the layers' losses) with
   the mean stored bits within the budget: an exact multiple-choice knapsack over quarter bits. Bits are all-in:
   each width's own byte count (codes, scales, norms) plus the fp16 sink tokens' copy at `TOKENS` tokens.
3. **Recipes** (`calibrate`): one recipe per budget (`PerLayer` stages, the first `SINKS` tokens kept in fp16,
   64-token chunks), recording the model's identity, written as recipe files (`Recipe.save`) and into gearkit's
   cache dir, where `gk-*` names find them for that model (`gearkit.allocations.calibrated`).

The ladder holds only widths decode reads from their stored form (per-channel codes; a rotation with Lloyd-Max
codes), each per layer, so no block is rebuilt per decode step. Layers that attend to a sliding window are not coded
by the recipe (the cache keeps their window), so the budget counts the layers the recipe compresses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import DynamicCache

from gearkit.allocations import calibrated_dir
from gearkit.cache import ChunkStore
from gearkit.compressors import (
    CodebookQuantizer,
    FullPrecision,
    HadamardRotation,
    PerLayer,
    Pipeline,
    Quantizer,
    Rotation,
    Stage,
)
from gearkit.models import head_dim, model_identity, token_windows
from gearkit.recipe import Recipe

SINKS, CHUNK, TOKENS = 4, 64, 2048  # sink tokens and chunk of the recipes; bits are counted at TOKENS tokens
ROLES = ("key", "value")
EXACT = FullPrecision(torch.float32)


def ladder(dim: int) -> dict[str, dict[str, Stage]]:
    """Each role's widths: keys per-channel codes in groups of 64 tokens (`chB`) or rotated Lloyd-Max codes with a
    norm per vector (`rot-lmB`), values rotated Lloyd-Max codes. The rotation is a randomized Hadamard transform for
    power-of-two head dims, else a seeded dense one.

    Args:
        dim: the head dim.

    Returns:
        role -> width name -> stage.
    """

    def rotated(bits: int) -> Stage:
        code = CodebookQuantizer(bits)
        return HadamardRotation(code) if dim & (dim - 1) == 0 else Rotation(code)

    return {
        "key": {
            **{f"ch{b}": Quantizer(b, CHUNK, "channel") for b in (2, 3, 4, 8)},
            "rot-lm2": rotated(2),
            "rot-lm3": rotated(3),
        },
        "value": {f"rot-lm{b}": rotated(b) for b in (1, 2, 3, 4, 8)},
    }


def stage_bits(stage: Stage, kv_heads: int, dim: int) -> float:
    """Stored bits per element of `stage` on one chunk (its own byte count, not a formula)."""
    x = torch.randn(1, kv_heads, CHUNK, dim, generator=torch.Generator().manual_seed(0))
    return Pipeline([stage]).compress(x, layer=0, positions=torch.zeros(1, dtype=torch.long)).bits_per_element


def compressed_layers(config) -> list[int]:
    """The layers a recipe compresses: those that attend to the whole past (sliding-window layers keep a window)."""
    from gearkit.compressors.base import text_config

    text = text_config(config)
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    if getattr(text, "layer_types", None) is None and getattr(text, "sliding_window", None) is not None:
        types = ["sliding_attention"] * text.num_hidden_layers  # one window for every layer (Mistral-style)
    return [i for i, kind in enumerate(types) if kind == "full_attention"]


class _Recorder(DynamicCache):
    """A `DynamicCache` that also keeps the keys and values each layer receives (one prefill: every layer once)."""

    def __init__(self, config):
        super().__init__(config=config)
        self.states: list[tuple[Tensor, Tensor]] = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.states.append((key_states, value_states))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@dataclasses.dataclass
class Window:
    """One tuning window of `prefix + continuation` tokens: every layer's keys and values `KV` (batch 1) of a prefill
    up to its last scored piece, the token ids `[1, prefix + continuation]`, the scored tokens per window, and the
    exact model's log-probabilities of the scored tokens `[scored, vocab]`."""

    states: list[tuple[Tensor, Tensor]]
    ids: Tensor
    prefix: int
    scored: int
    reference: Tensor

    def pieces(self) -> list[tuple[int, int]]:
        """The scored pieces `(start, end)`: up to `CHUNK` tokens each (the newest tokens a cache holds exactly while
        everything before them is coded), spread evenly over the continuation so the scored tokens see pasts of
        every length a streamed evaluation of the window sees."""
        end = self.ids.shape[-1]
        starts = list(range(self.prefix, end, CHUNK))
        count = min(len(starts), math.ceil(self.scored / CHUNK))
        picked = [starts[round(i * (len(starts) - 1) / max(count - 1, 1))] for i in range(count)]
        return [(start, min(start + CHUNK, end)) for start in picked]


def candidate(layer: int, role: str, stage: Stage) -> Recipe:
    """The recipe of one measurement: `role` coded by `stage`, the other role kept exactly (fp32)."""
    coded, exact = Pipeline([stage]), Pipeline([EXACT])
    key, value = (coded, exact) if role == "key" else (exact, coded)
    return Recipe(f"L{layer}-{role}", key, value, CHUNK, SINKS)


@torch.inference_mode()
def continuation_logits(model, window: Window, layer: int, recipes: Sequence[Recipe]) -> Tensor:
    """The continuation's logits with layer `layer`'s past coded by each recipe in `recipes` (what a `ChunkStore` of
    the recipe holds of the recorded prefill, decompressed), every other layer exact. Each piece of the continuation
    (`Window.pieces`) is scored teacher-forced over the coded past before it, itself exact, as a cache holds it
    while it streams; the candidates run as one batch.

    Returns:
        `[len(recipes), scored tokens, vocab]` in the model's dtype.
    """
    batch = len(recipes)
    held = [_held(recipe, *window.states[layer], layer) for recipe in recipes]
    coded = tuple(torch.cat(t) for t in zip(*held))
    logits = []
    for start, end in window.pieces():
        cache = DynamicCache(config=model.config)  # the model's own layer kinds (sliding windows included)
        for i, (keys, values) in enumerate(window.states):
            keys, values = coded if i == layer else (k.expand(batch, *k.shape[1:]) for k in (keys, values))
            cache.update(keys[:, :, :start], values[:, :, :start], i)
        logits.append(model(window.ids[:, start:end].expand(batch, -1), cache=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1)


def _held(recipe: Recipe, keys: Tensor, values: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    """What a cache of `recipe` holds of `keys`/`values` `KV` (compressed, sink tokens exact), decompressed."""
    store = ChunkStore(recipe, None, layer)
    with warnings.catch_warnings():  # the exact role's fp32 copy "enlarges the cache": known, and not measured here
        warnings.filterwarnings("ignore", message=".*enlarges the cache")
        store.append(keys, values)
    return store.dequantized()


@torch.inference_mode()
def tuning_window(model, ids: Tensor, prefix: int, scored: int) -> Window:
    """Record the prefill of `ids` up to its last scored piece and the exact log-probabilities of the scored tokens,
    for one window.

    Args:
        model (transformers.PreTrainedModel): the model.
        ids: int64 `[prefix + continuation]` token ids.
        prefix: tokens before the continuation (a multiple of the chunk, so the pieces start on chunk bounds).
        scored: tokens scored, in pieces spread over the continuation (`Window.pieces`).
    """
    window = Window([], ids[None], prefix, scored, torch.empty(0))
    pieces = window.pieces()
    recorder = _Recorder(model.config)
    model(window.ids[:, : pieces[-1][0]], cache=recorder, use_cache=True)
    window.states = recorder.states
    exact = model(window.ids, use_cache=False).logits[0]
    window.reference = torch.cat([exact[start:end] for start, end in pieces]).float().log_softmax(-1)
    return window


def kls(model, windows: Sequence[Window], layer: int, recipes: Sequence[Recipe]) -> list[float]:
    """Mean KL(exact || each recipe on layer `layer`) per scored token over `windows`."""
    total = [0.0] * len(recipes)
    for w in windows:
        for i, logits in enumerate(continuation_logits(model, w, layer, recipes)):  # one candidate's vocab at a time
            total[i] += F.kl_div(logits.float().log_softmax(-1), w.reference, log_target=True, reduction="sum").item()
    return [t / sum(w.reference.shape[0] for w in windows) for t in total]


@dataclasses.dataclass
class Sensitivity:
    """Measured sensitivities of one model.

    Attributes:
        model: the model's identity (`gearkit.models.model_identity`).
        layers: the layers measured (the ones a recipe compresses).
        kl: role -> width -> KL per scored token of each measured layer, in `layers` order.
        bits: role -> width -> stored bits per element.
        ladder: role -> width -> `Stage.to_dict()` data.
        protocol: text, windows, prefix, continuation, seconds.
    """

    model: dict
    layers: list[int]
    kl: dict[str, dict[str, list[float]]]
    bits: dict[str, dict[str, float]]
    ladder: dict[str, dict[str, dict]]
    protocol: dict

    def save(self, path: Path) -> Path:
        """Write as JSON; returns the path."""
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> Sensitivity:
        """Read a file written by `save`."""
        return cls(**json.loads(Path(path).read_text()))


def measure_layer(model, windows: Sequence[Window], layer: int, stages: dict[str, dict[str, Stage]]) -> dict:
    """KL per scored token of every width of both roles of one layer: role -> width -> KL. The 8-bit widths are not
    measured: a code's error variance falls 4x per bit and a small KL follows it, so theirs is the 4-bit one's / 4**4
    (both are far below what a budget trades)."""
    out = {}
    for role, ladder_ in stages.items():
        measured = [n for n in ladder_ if n[-1] != "8"]
        losses = kls(model, windows, layer, [candidate(layer, role, ladder_[n]) for n in measured])
        out[role] = dict(zip(measured, losses))
        out[role].update({n: out[role][n[:-1] + "4"] / 4**4 for n in ladder_ if n[-1] == "8"})
    return out


def tuning_windows(
    model,
    tokenizer,
    text: str,
    prefix: int,
    continuation: int,
    scored: int,
    windows: int,
    progress: Callable | None = None,
) -> list[Window]:
    """The recorded tuning windows of `text` (see `tuning_window`); `prefix` is rounded down to whole chunks."""
    wrap = progress or (lambda it, **_: it)
    prefix = max(CHUNK, prefix // CHUNK * CHUNK)
    spans = token_windows(tokenizer, text, prefix, continuation, windows)
    return [tuning_window(model, ids, prefix, scored) for ids in wrap(spans, total=len(spans), desc="windows")]


def sensitivity(model, name: str, layers: Sequence[int], kls: dict, protocol: dict) -> Sensitivity:
    """Measured KLs (role -> width -> one per layer of `layers`) with the ladder's bits and the model's identity."""
    text = model.config.get_text_config(decoder=True)
    dim, kv_heads = head_dim(text), getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    stages = ladder(dim)
    return Sensitivity(
        model=model_identity(model.config, name),
        layers=list(layers),
        kl=kls,
        bits={role: {n: stage_bits(s, kv_heads, dim) for n, s in stages[role].items()} for role in ROLES},
        ladder={role: {n: s.to_dict() for n, s in stages[role].items()} for role in ROLES},
        protocol=protocol,
    )


def measure(
    model,
    tokenizer,
    name: str,
    text: str,
    prefix: int = 1024,
    continuation: int = 1024,
    scored: int = 256,
    windows: int = 2,
    progress: Callable | None = None,
) -> Sensitivity:
    """Measure every compressed layer's sensitivity to every width (see the module docstring), in this process.

    Args:
        model (transformers.PreTrainedModel): the model, in eval mode.
        tokenizer (transformers.PreTrainedTokenizerBase): its tokenizer.
        name: the model's name, recorded in its identity.
        text: the tuning text.
        prefix: tokens before the continuation per window (rounded down to whole chunks).
        continuation: tokens after the prefix per window, over which the scored pieces are spread.
        scored: scored tokens per window.
        windows: tuning windows.
        progress: optional wrapper for progress display, called as `progress(iterable, total=, desc=)`.

    Returns:
        The sensitivities.
    """
    start = time.perf_counter()
    wrap = progress or (lambda it, **_: it)
    recorded = tuning_windows(model, tokenizer, text, prefix, continuation, scored, windows, progress)
    stages = ladder(head_dim(model.config))
    layers = compressed_layers(model.config)
    measured = [measure_layer(model, recorded, i, stages) for i in wrap(layers, total=len(layers), desc="layers")]
    kls = {role: {n: [m[role][n] for m in measured] for n in stages[role]} for role in ROLES}
    protocol = {
        "windows": len(recorded),
        "prefix": recorded[0].prefix,
        "continuation": continuation,
        "scored": scored,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return sensitivity(model, name, layers, kls, protocol)


def allocate(sensitivity: Sensitivity, budget: float) -> dict[str, list[str]]:
    """The width of each measured layer and role that minimises the summed KL with all-in bits within `budget`.

    All-in bits at `TOKENS` tokens are the mean stored bits of the widths plus the fp16 sink tokens' copy; widths
    are counted in quarter bits for the knapsack, then the exact bits of the result must be within the budget.

    Returns:
        role -> width name per measured layer (in `sensitivity.layers` order).

    Raises:
        ValueError: for a budget below the cheapest widths.
    """
    items = [(role, i) for role in ROLES for i in range(len(sensitivity.layers))]
    limit = (budget - 16 * SINKS / TOKENS) * len(items)  # summed stored bits of all items
    unit = 4  # cost units per bit
    capacity = int(unit * limit + 1e-9)
    best: dict[int, tuple[float, float, list[str]]] = {0: (0.0, 0.0, [])}  # units -> (summed KL, bits, choices)
    for role, i in items:
        choices = [
            (math.ceil(unit * b - 1e-9), b, sensitivity.kl[role][n][i], n) for n, b in sensitivity.bits[role].items()
        ]
        nxt: dict[int, tuple[float, float, list[str]]] = {}
        for spent, (total, exact, picked) in best.items():
            for units, bits, loss, width in choices:
                key, value = spent + units, total + loss
                if key <= capacity and (key not in nxt or value < nxt[key][0]):
                    nxt[key] = (value, exact + bits, [*picked, width])
        best = nxt
    fits = [v for v in best.values() if v[1] <= limit + 1e-9]
    if not fits:
        cheapest = sum(min(b.values()) for b in sensitivity.bits.values()) / 2 + 16 * SINKS / TOKENS
        raise ValueError(f"budget {budget} is below the cheapest widths ({cheapest:.2f} bits per element)")
    picked = min(fits, key=lambda v: v[0])[2]
    count = len(sensitivity.layers)
    return {role: picked[r * count : (r + 1) * count] for r, role in enumerate(ROLES)}


def recipe_name(budget: float) -> str:
    """`gk-<budget>`: `gk-3` for 3.0, `gk-2.5` for 2.5."""
    return f"gk-{budget:g}"


def allocated_recipe(sensitivity: Sensitivity, budget: float, name: str | None = None) -> Recipe:
    """The recipe of `allocate(sensitivity, budget)`: each compressed layer's keys and values at their widths."""
    widths = allocate(sensitivity, budget)
    stages = {role: {n: Stage.from_dict(d) for n, d in sensitivity.ladder[role].items()} for role in ROLES}
    pipelines = {
        role: Pipeline([PerLayer({layer: stages[role][w] for layer, w in zip(sensitivity.layers, widths[role])})])
        for role in ROLES
    }
    bits = sum(sensitivity.bits[r][w] for r in ROLES for w in widths[r]) / (2 * len(sensitivity.layers))
    kl_sum = sum(sensitivity.kl[r][w][i] for r in ROLES for i, w in enumerate(widths[r]))
    counts = {r: ", ".join(f"{widths[r].count(w)} {w}" for w in dict.fromkeys(widths[r])) for r in ROLES}
    description = (
        f"calibrated for {sensitivity.model['name']}: {bits + 16 * SINKS / TOKENS:.2f} all-in bits (budget {budget:g}; "
        f"keys {counts['key']}; values {counts['value']}; {SINKS} fp16 sink tokens; predicted KL {kl_sum:.4f})"
    )
    return Recipe(
        name or recipe_name(budget),
        pipelines["key"],
        pipelines["value"],
        CHUNK,
        SINKS,
        description,
        model=sensitivity.model,
    )


def write(sensitivity: Sensitivity, budgets: Sequence[float], out: Path | None) -> list[Path]:
    """Write one recipe file per budget into `out` (measurements in `out/measurements/`) and into gearkit's cache
    dir for this model (where `gk-*` names find them); returns the recipe files in `out` (or in the cache dir)."""
    recipes = [allocated_recipe(sensitivity, b) for b in budgets]
    cached = calibrated_dir(sensitivity.model)
    cached.mkdir(parents=True, exist_ok=True)
    written = []
    for target in ([out] if out is not None else []) + [cached]:
        target.mkdir(parents=True, exist_ok=True)
        (target / "measurements").mkdir(exist_ok=True)
        sensitivity.save(target / "measurements" / "sensitivity.json")
        written.append([r.save(target / f"{r.name}.json") for r in recipes])
    return written[0]


def calibrate(
    model,
    tokenizer,
    name: str,
    text: str,
    budgets: Sequence[float],
    out: Path | None = None,
    progress: Callable | None = None,
    **protocol: int,
) -> list[Path]:
    """Measure, allocate and write the calibrated recipes of one model (see the module docstring).

    Args:
        model (transformers.PreTrainedModel): the model, in eval mode.
        tokenizer (transformers.PreTrainedTokenizerBase): its tokenizer.
        name: the model's name (recorded in the recipes).
        text: the tuning text.
        budgets: all-in bits per element, one recipe each.
        out: folder for the recipe files (None: gearkit's cache dir only).
        progress: optional progress wrapper (see `measure`).
        **protocol: `prefix`, `continuation`, `scored`, `windows` (see `measure`).

    Returns:
        The recipe files written.
    """
    sensitivity = measure(model, tokenizer, name, text, progress=progress, **protocol)
    print(f"sensitivities measured in {sensitivity.protocol['seconds']:.0f} s", file=sys.stderr)
    return write(sensitivity, budgets, out)
