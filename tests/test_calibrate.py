"""Per-model calibration: sensitivities measured by replaying one recorded prefill, an exact knapsack, recipe files
that carry the model's identity. A tiny random model, seconds."""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama

from gearkit import Recipe
from gearkit.calibrate import (
    ROLES,
    SINKS,
    TOKENS,
    Sensitivity,
    Window,
    allocate,
    allocated_recipe,
    compressed_layers,
    ladder,
    measure_layer,
    sensitivity,
    tuning_window,
    write,
)
from gearkit.cli import main
from gearkit.integrations.hf import GearCache, make_cache
from gearkit.models import model_identity


@pytest.fixture(scope="module")
def measured():
    torch.set_grad_enabled(False)
    model = tiny_llama("gqa", 2)
    windows = [
        tuning_window(model, torch.randint(2, 97, (160,), generator=torch.Generator().manual_seed(s)), 128, 32)
        for s in range(2)
    ]
    stages = ladder(16)
    layers = compressed_layers(model.config)
    per_layer = [measure_layer(model, windows, i, stages) for i in layers]
    kls = {r: {n: [m[r][n] for m in per_layer] for n in stages[r]} for r in ROLES}
    yield model, sensitivity(model, "tiny", layers, kls, {"windows": 2})
    torch.set_grad_enabled(True)


def test_scored_pieces_are_whole_chunks_spread_over_the_continuation():
    window = Window([], torch.zeros(1, 128 + 520, dtype=torch.long), 128, 150, torch.empty(0))
    assert window.pieces() == [
        (128, 192),
        (384, 448),
        (640, 648),
    ]  # ceil(150 / 64) pieces; the last one ends with the window
    window.scored = 10_000
    assert [start for start, _ in window.pieces()] == list(range(128, 648, 64))  # every chunk, none twice


def test_sensitivities_are_kl_divergences_that_fall_with_the_width(measured):
    _, sens = measured
    assert sens.layers == [0, 1] and sens.model == model_identity(measured[0].config, "tiny")
    for role in ROLES:
        for values in sens.kl[role].values():
            assert all(v >= 0 for v in values)
    for i in range(2):  # more bits never cost more here (8-bit codes are nearly exact)
        assert sens.kl["key"]["ch8"][i] <= sens.kl["key"]["ch2"][i]
        assert sens.kl["value"]["rot-lm8"][i] <= sens.kl["value"]["rot-lm1"][i]
    assert sens.bits["key"]["ch2"] < sens.bits["key"]["ch3"] < sens.bits["key"]["ch8"]


def test_the_allocation_is_the_exact_optimum_within_the_budget(measured):
    _, sens = measured
    for budget in (2.5, 3.0, 4.5):
        widths = allocate(sens, budget)
        bits = sum(sens.bits[r][w] for r in ROLES for w in widths[r]) / 4 + 16 * SINKS / TOKENS
        loss = sum(sens.kl[r][w][i] for r in ROLES for i, w in enumerate(widths[r]))
        assert bits <= budget + 1e-9
        # brute force over every choice of the 4 items
        options = [[(sens.bits[r][n], sens.kl[r][n][i]) for n in sens.bits[r]] for r in ROLES for i in range(2)]
        feasible = [
            sum(k for _, k in c)
            for c in itertools.product(*options)
            if sum(b for b, _ in c) / 4 + 16 * SINKS / TOKENS <= budget + 1e-9
        ]
        assert loss == pytest.approx(min(feasible), rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate(sens, 1.2)


def test_calibrated_recipes_are_files_for_their_model_only(measured, tmp_path, monkeypatch):
    monkeypatch.setenv("GEARKIT_CACHE_DIR", str(tmp_path / "cache"))
    model, sens = measured
    files = write(sens, [2.5, 3.0], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gk-2.5.json", "gk-3.json", "measurements"]
    assert Sensitivity.load(tmp_path / "out" / "measurements" / "sensitivity.json") == sens
    recipe = Recipe.load(files[1])
    assert recipe.name == "gk-3" and recipe.model == sens.model and recipe.model_bound
    assert json.loads(files[1].read_text())["model"]["config_hash"] == sens.model["config_hash"]
    # it serves its model, through a cache that reads the storage
    cache = make_cache(recipe, model)
    model(torch.randint(2, 97, (1, 150), generator=torch.Generator().manual_seed(9)), cache=cache)
    assert cache.memory_report().bits_per_element < 16
    # and refuses another
    other = tiny_llama("gqa", 3)
    with pytest.raises(ValueError, match="calibrated for tiny .*gearkit calibrate"):
        GearCache(recipe, other.config)
    assert allocated_recipe(sens, 3.0).to_dict() == recipe.to_dict()


def test_the_command_writes_recipes_that_every_command_takes_by_file_and_by_name(tiny_checkpoint, tmp_path):
    env = {**os.environ, "GEARKIT_CACHE_DIR": str(tmp_path / "cache")}

    def gearkit(*args):
        return subprocess.run(
            [sys.executable, "-m", "gearkit.cli", *args], capture_output=True, text=True, timeout=600, env=env
        )

    out, model = tmp_path / "out", str(tiny_checkpoint)
    protocol = ("--prefix", "64", "--continuation", "16", "--windows", "1")
    run = gearkit(
        "calibrate", "--model", model, "--text", "idle-help", "--budget", "3", "4.5", *protocol, "--out", str(out)
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["recipe"] for r in rows] == ["gk-3", "gk-4.5"] and all(r["model"] == "tiny-llama" for r in rows)
    assert sorted(p.name for p in out.iterdir()) == ["gk-3.json", "gk-4.5.json", "measurements"]
    # `gk-3` on this model is the calibrated file, found in the cache dir by the model's identity
    by_name = gearkit("eval", "ppl", "--model", model, "--recipe", "gk-3", *protocol, "--json")
    assert by_name.returncode == 0, by_name.stderr[-3000:]
    assert json.loads(by_name.stdout)["bits_per_element"] < 16
    with pytest.raises(ValueError, match="calibrated for tiny-llama .*gearkit calibrate"):
        GearCache(Recipe.load(out / "gk-3.json"), tiny_llama("gqa", 2).config)
    assert main(["calibrate", "--budget", "0.5"]) == 2  # refused before anything loads
