"""Calibrated recipes (per-layer bit allocations, `gearkit calibrate`), kept as recipe files (`Recipe.save`): the
ones shipped for the default model beside this loader (`<model>/gk-*.json`), and the ones `gearkit calibrate` writes
into gearkit's cache dir for any other model. Each file records the identity of its model (`Recipe.model`); a lookup
by name and model identity finds the file calibrated for the model in use.
"""

from __future__ import annotations

from pathlib import Path

from gearkit.models import DEFAULT_MODEL
from gearkit.paths import cache_dir
from gearkit.recipe import Recipe

SHIPPED = Path(__file__).parent  # one folder of recipe files per model


def calibrated_dir(identity: dict) -> Path:
    """Where `gearkit calibrate` keeps the recipes of the model of `identity` (`gearkit.models.model_identity`), so
    that `gk-*` names find them: `<gearkit cache dir>/calibrated/<config hash>/` (one model, however it is named or
    loaded)."""
    return cache_dir() / "calibrated" / identity["config_hash"]


def shipped(name: str, model: str = DEFAULT_MODEL) -> Recipe:
    """The calibrated recipe `name` shipped with gearkit for `model`.

    Raises:
        FileNotFoundError: when gearkit ships no such recipe.
    """
    return Recipe.load(SHIPPED / model / f"{name}.json")


def calibrated(name: str, identity: dict) -> Recipe | None:
    """The recipe `name` calibrated for the model of `identity`: shipped with gearkit, or written by `gearkit
    calibrate` into gearkit's cache dir; None when there is none."""
    folders = [p for p in SHIPPED.iterdir() if p.is_dir() and not p.name.startswith("_")] + [calibrated_dir(identity)]
    for folder in folders:
        path = folder / f"{name}.json"
        if path.is_file():
            recipe = Recipe.load(path)
            if recipe.serves(identity):
                return recipe
    return None


__all__ = ["SHIPPED", "calibrated", "calibrated_dir", "shipped"]
