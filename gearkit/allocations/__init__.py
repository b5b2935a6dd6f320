"""Per-layer bit allocations, stored as data beside this loader (`<model>.json`), and the recipes made from them.

A file holds a ladder of widths per role (ladder name -> `Stage.to_dict()` data) and, per budget of all-in bits,
each layer's width by ladder name, or a list of names (one per KV head). `benchmarks/bit_allocation.py` measures
each layer's sensitivity on tuning text and writes the file; docs/concepts/frontier.md describes the method.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from gearkit.compressors import PerHead, PerLayer, Pipeline, Stage
from gearkit.models import DEFAULT_MODEL
from gearkit.recipe import Recipe


def allocation_file(model: str = DEFAULT_MODEL) -> Path:
    """The allocation file stored for `model` (it may not exist)."""
    return Path(__file__).parent / f"{model}.json"


def allocation_stage(widths: list[str | list[str]], ladder: dict[str, dict]) -> PerLayer:
    """The `PerLayer` stage of one role's allocation: each layer's width by ladder name, or a list of names (one
    per KV head: a `PerHead` of them).

    Stages hold configuration only, so every layer and head that names the same width shares one stage object
    (and layers with the same split by head share one `PerHead`): a 30-layer allocation holds a handful of stages.

    Args:
        widths: per layer, a ladder name or a list of ladder names by KV head.
        ladder: ladder name -> `Stage.to_dict()` data.

    Raises:
        KeyError: for a name the ladder does not hold.
    """
    stages: dict[str, Stage] = {}
    splits: dict[tuple[str, ...], PerHead] = {}

    def stage(name: str) -> Stage:
        if name not in ladder:
            raise KeyError(f"allocation names width {name!r}; the ladder holds {', '.join(ladder)}")
        if name not in stages:
            stages[name] = Stage.from_dict(ladder[name])
        return stages[name]

    def split(names: tuple[str, ...]) -> PerHead:
        if names not in splits:
            splits[names] = PerHead([stage(n) for n in names])
        return splits[names]

    return PerLayer([split(tuple(w)) if isinstance(w, list) else stage(w) for w in widths])


def allocated(
    budget: str,
    name: str | None = None,
    model: str = DEFAULT_MODEL,
    path: Path | None = None,
    *,
    description: str | None = None,
) -> Recipe:
    """A recipe whose keys and values take each layer's width (or each KV head's) from a stored bit allocation
    (`PerLayer`, with `PerHead` where a layer's heads differ).

    The allocation is data, so the recipe (and `to_dict()` of it) names every layer's stage. It serves only a
    model with as many layers (and KV heads).

    Args:
        budget: the budget's key in the file, e.g. `"3.0"`.
        name: registry name (default `alloc-<budget>`).
        model: the model the allocation was measured on.
        path: the allocation file (default: `allocation_file(model)`).
        description: the recipe's one line (default: the model, the budget and how many layers take each width).

    Returns:
        The recipe (not registered).

    Raises:
        FileNotFoundError: when no allocation is stored for `model`.
        KeyError: for a budget the file does not hold.
    """
    path = Path(path) if path is not None else allocation_file(model)
    if not path.is_file():
        raise FileNotFoundError(f"no bit allocation stored for {model!r} ({path}); run benchmarks/bit_allocation.py")
    data = json.loads(path.read_text())
    if budget not in data["allocations"]:
        raise KeyError(f"no allocation for budget {budget!r} in {path}; stored: {', '.join(data['allocations'])}")
    chosen, ladder = data["allocations"][budget], data["ladder"]
    key, value = (Pipeline([allocation_stage(chosen[role], ladder[role])]) for role in ("key", "value"))
    if description is None:
        counts = {
            role: ", ".join(
                f"{c} {n}"
                for n, c in Counter(w if isinstance(w, str) else "split by KV head" for w in chosen[role]).most_common()
            )
            for role in ("key", "value")
        }
        description = (
            f"per-layer widths for {model}, {budget} all-in bits, tuned on {data['tuned_on']} (layers: "
            f"keys {counts['key']}; values {counts['value']}; {data['sink_tokens']} fp16 sink tokens)"
        )
    return Recipe(
        name or f"alloc-{budget}",
        key,
        value,
        data["buffer"],
        sink_tokens=data["sink_tokens"],
        description=description,
    )


__all__ = ["allocated", "allocation_file", "allocation_stage"]
