"""Evaluation: reconstruction error and bytes of recipes (tensors here; the real model in later modules)."""

from gearkit.eval.tensors import RecipeResult, compare_recipes, format_table, synthetic_kv

__all__ = ["RecipeResult", "compare_recipes", "format_table", "synthetic_kv"]
