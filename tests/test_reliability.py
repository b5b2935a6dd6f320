"""Probes a new user would run (issue 13): exact recipes against `DynamicCache`, padded batches, streaming,
failed steps, pickling, crop, refused models, bad input, the CLI's counts and honest reports; recipe files as
untrusted input and the compiled kernel's build (issue 23). Tiny random models (`tiny_llama`), seconds each."""

import copy
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import kv_like, tiny_llama
from transformers import DynamicCache, Gemma2Config, MistralConfig, Qwen2Config

import gearkit
from gearkit import (
    FullPrecision,
    LowRankResidual,
    Pipeline,
    PreRoPE,
    Quantizer,
    Recipe,
    SignSketch,
    SparseOutlier,
    Stage,
    recipes,
    register_stage,
)
from gearkit.cache import ChunkStore
from gearkit.compressors.base import NO_CONTEXT
from gearkit.integrations.attention import register
from gearkit.integrations.baselines import check_build_lock
from gearkit.integrations.hf import HF_BASELINES, GearCache, compressed_tokens, make_cache

ROOT = Path(__file__).resolve().parent.parent
EXACT = Recipe(
    "exact-fp32", Pipeline([FullPrecision(torch.float32)]), Pipeline([FullPrecision(torch.float32)]), buffer_size=16
)
NO_DICTIONARY = [n for n in recipes.names() if not recipes.get(n).model_bound]  # CSR, allocations: one model's
GREEDY = dict(do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def model():
    torch.set_grad_enabled(False)
    # the default model's RoPE base, which the pre-RoPE recipes (kvquant-*) name
    yield tiny_llama("gqa", 2, max_position_embeddings=1100, rope_theta=100000.0)
    torch.set_grad_enabled(True)


def held_bytes(cache: GearCache) -> int:
    return sum(t.untyped_storage().nbytes() for t in cache.held_tensors())


@pytest.mark.parametrize("attention", ["sdpa", "gearkit"])
def test_exact_recipe_equals_dynamic_cache_over_300_greedy_tokens(model, attention):
    model.set_attn_implementation(register() if attention == "gearkit" else "sdpa")
    ids = torch.randint(2, 97, (1, 21), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=300, min_new_tokens=300, do_sample=False, pad_token_id=0)
    reference = model.generate(ids, cache=DynamicCache(config=model.config), **kw)
    cache = GearCache(EXACT, model.config, buffer_dtype=None)
    assert torch.equal(model.generate(ids, cache=cache, **kw), reference)
    assert cache.layers[0].store.chunks == (21 + 299) // 16  # the storage was really read


@pytest.mark.parametrize("attention", ["sdpa", "gearkit"])
@pytest.mark.parametrize("name", NO_DICTIONARY)
def test_padded_row_equals_the_prompt_alone(model, name, attention):
    """Left padding of one whole chunk: the padded row's logits equal the prompt's alone (sinks included), with
    the decompressed past (SDPA) and with decode steps read from the storage (gearkit's attention)."""
    model.set_attn_implementation(register() if attention == "gearkit" else "sdpa")  # ZipCache switches to gearkit
    size = recipes.get(name).buffer_size
    gen = torch.Generator().manual_seed(3)
    long, short = (
        torch.randint(2, 97, (1, 2 * size + 20), generator=gen),
        torch.randint(2, 97, (1, size + 20), generator=gen),
    )
    ids = torch.cat([long, torch.cat([torch.zeros(1, size, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :size] = 0
    both = model.generate(ids, attention_mask=mask, cache=make_cache(name, model), max_new_tokens=6, **GREEDY)
    alone = model.generate(short, cache=make_cache(name, model), max_new_tokens=6, **GREEDY)
    assert torch.equal(both.sequences[1, -6:], alone.sequences[0, -6:])
    assert (torch.stack(both.scores)[:, 1] - torch.stack(alone.scores)[:, 0]).abs().max() < 1e-4


def test_padded_rows_keep_their_own_first_tokens_as_sinks():
    sink = recipes.get("sink-2")
    store = ChunkStore(sink, None)
    keys, values = kv_like(0, (2, 2, 100, 16)), kv_like(1, (2, 2, 100, 16))
    positions = torch.stack([torch.arange(100), (torch.arange(100) - 64).clamp_min(1)])  # row 1: 64 pads
    positions[1, 64] = 0
    store.append(keys, values, positions)
    assert store.sink.starts.tolist() == [0, 64]
    assert torch.equal(store.sink.keys[1], keys[1, :, 64:68]) and torch.equal(store.sink.keys[0], keys[0, :, :4])
    held, _ = store.dequantized()
    assert torch.equal(held[1, :, 64:68], keys[1, :, 64:68]) and torch.equal(held[0, :, :4], keys[0, :, :4])
    assert store.memory_report().nbytes == sum(t.untyped_storage().nbytes() for t in store.held_tensors())


def test_padded_rows_give_stages_their_own_positions():
    seen = []

    class Recording(FullPrecision):
        def encode(self, x, exclude=None, ctx=NO_CONTEXT):
            seen.append(ctx.positions.tolist())
            return super().encode(x, exclude, ctx)

    store = ChunkStore(Recipe("recording", Pipeline([Recording()]), Pipeline([FullPrecision()]), 16))
    positions = torch.stack([torch.arange(40), (torch.arange(40) - 16).clamp_min(1)])  # row 1: 16 pads
    positions[1, 16] = 0
    store.append(kv_like(0, (2, 1, 40, 8)), kv_like(1, (2, 1, 40, 8)), positions)
    assert seen == [[0, -16, 16, 0]]  # chunk-major: chunk 0 of rows 0 and 1, then chunk 1 (RoPE positions)
    assert store.memory_report().components["row_starts"] == 2 * 8


def test_1000_token_stream_compresses_each_chunk_once_and_reports_the_bytes_held(model):
    calls = []

    class Counting(Quantizer):
        def encode(self, x, exclude=None, ctx=NO_CONTEXT):
            calls.append(x.shape[0] * x.shape[2])  # chunks arrive stacked along the batch
            return super().encode(x, exclude, ctx)

    recipe = Recipe("counting-4", Pipeline([Counting(4, 64, "channel")]), Pipeline([Quantizer(4, 64, "token")]), 64)
    cache = GearCache(recipe, model.config)
    ids = torch.randint(2, 97, (1, 1000), generator=torch.Generator().manual_seed(5))
    model(ids[:, :100], cache=cache, use_cache=True)
    for start in range(100, 1000, 50):
        model(ids[:, start : start + 50], cache=cache, use_cache=True)
        assert cache.memory_report().nbytes == held_bytes(cache)
    assert [layer.get_seq_length() for layer in cache.layers] == [1000, 1000]
    assert sum(calls) == 2 * 15 * 64  # 2 layers x 15 chunks of 64 tokens, each compressed exactly once


def test_a_nan_in_a_later_layer_leaves_every_layer_as_before(model):
    ids = torch.randint(2, 97, (1, 72), generator=torch.Generator().manual_seed(6))
    for config in (model.config, None):
        cache, clean = GearCache("kivi-2", config), GearCache("kivi-2", config)
        model(ids[:, :71], cache=cache, use_cache=True)
        model(ids[:, :71], cache=clean, use_cache=True)
        hook = model.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, i, out: out * float("nan"))
        with pytest.raises(ValueError, match="NaN"):
            model(ids[:, 71:], cache=cache, use_cache=True)
        hook.remove()
        assert [layer.get_seq_length() for layer in cache.layers] == [71, 71]
        after = model(ids[:, 71:], cache=cache, use_cache=True).logits
        assert torch.equal(after, model(ids[:, 71:], cache=clean, use_cache=True).logits)


def test_a_step_abandoned_between_layers_is_undone_at_the_next(model):
    ids = torch.randint(2, 97, (1, 40), generator=torch.Generator().manual_seed(7))
    cache, clean = GearCache(EXACT, model.config), GearCache(EXACT, model.config)
    model(ids[:, :30], cache=cache, use_cache=True)
    model(ids[:, :30], cache=clean, use_cache=True)

    def fail(module, args):
        raise KeyboardInterrupt  # an interrupt in the model's own code, between layer 0's and layer 1's updates

    hook = model.model.layers[1].register_forward_pre_hook(fail)
    with pytest.raises(KeyboardInterrupt):
        model(ids[:, 30:35], cache=cache, use_cache=True)
    hook.remove()
    assert [layer.get_seq_length() for layer in cache.layers] == [35, 30]  # out of step, until the next step
    with pytest.raises(RuntimeError, match="run this step again"):
        model(ids[:, 30:], cache=cache, use_cache=True)
    assert [layer.get_seq_length() for layer in cache.layers] == [30, 30]
    assert torch.equal(
        model(ids[:, 30:], cache=cache, use_cache=True).logits, model(ids[:, 30:], cache=clean, use_cache=True).logits
    )
    hook = model.model.layers[1].register_forward_pre_hook(fail)
    with pytest.raises(KeyboardInterrupt):
        model(ids[:, :1], cache=cache, use_cache=True)
    hook.remove()
    cache.crop(-5)  # crop first undoes the abandoned step
    assert [layer.get_seq_length() for layer in cache.layers] == [35, 35]


@pytest.mark.parametrize("with_config", [True, False])
def test_pickle_and_deepcopy_continue_identically(model, with_config):
    ids = torch.randint(2, 97, (1, 90), generator=torch.Generator().manual_seed(8))
    cache = GearCache("gear-2", model.config if with_config else None)
    model(ids[:, :80], cache=cache, use_cache=True)
    expected = model(ids[:, 80:], cache=copy.deepcopy(cache), use_cache=True).logits
    for twin in (pickle.loads(pickle.dumps(cache)), copy.deepcopy(cache)):
        assert torch.equal(model(ids[:, 80:], cache=twin, use_cache=True).logits, expected)
    assert pickle.loads(pickle.dumps(GearCache("gear-2"))).recipe.name == "gear-2"  # empty, no config


def test_crop_into_a_chunk_then_continue_equals_dynamic_cache(model):
    ids = torch.randint(2, 97, (1, 80), generator=torch.Generator().manual_seed(9))
    cache, reference = GearCache(EXACT, model.config, buffer_dtype=None), DynamicCache(config=model.config)
    for c in (cache, reference):
        model(ids[:, :70], cache=c, use_cache=True)
        c.crop(-33)  # remove 33: 37 stay, inside the third 16-token chunk
    assert cache.get_seq_length() == 37 and cache.layers[0].store.chunks == 2
    out = model(ids[:, 37:60], cache=cache, use_cache=True).logits
    assert torch.allclose(out, model(ids[:, 37:60], cache=reference, use_cache=True).logits, atol=1e-5)


def test_sliding_window_and_hybrid_models_are_refused():
    heads = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    with pytest.raises(ValueError, match="sliding_window"):
        GearCache("kivi-2", MistralConfig(sliding_window=8, **heads))
    with pytest.raises(ValueError, match="sliding_attention"):
        GearCache("kivi-2", Gemma2Config(sliding_window=8, **heads))
    GearCache("kivi-2", MistralConfig(sliding_window=None, **heads))  # full attention: accepted
    GearCache("kivi-2", Qwen2Config(use_sliding_window=False, sliding_window=8, **heads))  # window switched off


def test_late_and_unclear_errors_come_early_and_name_the_fix(tmp_path):
    gear = recipes.get("gear-2")
    with pytest.raises(ValueError, match="rank 2 exceeds"):
        Recipe("g", gear.key, gear.value, buffer_size=1)
    with pytest.raises(ValueError, match="buffer_size must be a positive int, got True"):
        Recipe("g", gear.key, gear.value, buffer_size=True)
    huge = kv_like(0, (1, 2, 128, 16))  # one kivi-2 chunk
    huge[..., 0, 0], huge[..., 1, 0] = 1e9, -1e9
    with pytest.raises(ValueError, match="buffer_dtype"):
        ChunkStore(recipes.get("kivi-2")).append(huge, huge)
    with pytest.raises(ValueError, match="param_dtype"):
        ChunkStore(recipes.get("kivi-2"), None).append(huge, huge)
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"\x00\xff\xfe\x80")
    from gearkit.models import load_text

    with pytest.raises(ValueError, match=re.escape(str(binary))):
        load_text(binary)


def test_a_recipe_that_enlarges_the_cache_warns():
    wide = Recipe("wide", Pipeline([SparseOutlier(0.6), Quantizer(2)]), Pipeline([Quantizer(2)]))
    with pytest.warns(UserWarning, match="more bits per element than fp16"):
        ChunkStore(wide).append(kv_like(0, (1, 2, 64, 16)), kv_like(1, (1, 2, 64, 16)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ChunkStore(recipes.get("kivi-2")).append(kv_like(0, (1, 2, 128, 16)), kv_like(1, (1, 2, 128, 16)))


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "ppl", "--recipe", "kivi-2", "--windows", "0"],
        ["eval", "ppl", "--recipe", "kivi-2", "--windows", "-1"],
        ["eval", "layers", "--recipe", "kivi-2", "--tokens", "0"],
        ["eval", "layers", "--recipe", "kivi-2", "--tokens", "-5"],
        ["demo", "--context", "0"],
    ],
)
def test_cli_counts_are_checked_by_the_parser(argv, capsys):
    from gearkit.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()[-1:]) == 1


def test_cli_text_too_short_fails_before_the_model_loads(capsys):
    from gearkit.cli import main

    assert main(["eval", "layers", "--recipe", "kivi-2", "--text", "idle-help", "--tokens", "1000000"]) == 2
    err = capsys.readouterr().err
    assert "tokens; 1000000 are needed" in err and "loading" not in err
    assert main(["eval", "ppl", "--recipe", "kivi-2", "--text", "idle-help", "--prefix", "600000"]) == 2
    err = capsys.readouterr().err
    assert "needs at least" in err and "loading" not in err


def test_reports_are_honest(model):
    from gearkit.cli import _ppl_rows, versus_fp16
    from gearkit.eval.perplexity import evaluate

    assert versus_fp16(4.0) == "4.00x smaller than fp16" and versus_fp16(0.89) == "1.12x larger than fp16"
    cache = GearCache("kivi-2", model.config)
    model(torch.randint(2, 97, (1, 300)), cache=cache, use_cache=True)
    assert compressed_tokens(cache) == (256, 300)

    class Tokenizer:
        def __call__(self, text):
            return {"input_ids": [int(t) for t in text.split()]}

    text = " ".join(str(i % 95 + 2) for i in range(200))
    seen = []
    progress = lambda it, total=None, desc=None: (seen.append(desc), it)[1]
    rows = _ppl_rows(evaluate(model, Tokenizer(), ["kivi-2"], text, 40, 100, 1, progress=progress))
    assert re.fullmatch(r"[+-]\d+\.\d\d%", rows[0]["ppl change"])
    assert "steps" in seen  # progress within a window, not only per window


def test_readme_docs_and_registry_agree_on_recipe_names():
    known = set(recipes.names()) | set(HF_BASELINES)
    readme = (ROOT / "README.md").read_text()
    listing = readme[readme.index("Recipes (`gearkit recipes`)") :].split("\n\n")[0]
    listed = set()
    for name in re.findall(r"`([a-z0-9.{},-]+)`", listing):
        head, _, tail = name.partition("{")
        listed |= {head + x + tail.split("}")[1] for x in tail.split("}")[0].split(",")} if tail else {name}
    assert listed == known
    family = re.compile(
        r"\b(?:uniform|kivi|gear-l|gear|kcvt|sink-gear|sink|csr|hf-quanto|hf-hqq|turboquant|kvquant|gk)"
        r"-\d+(?:\.\d+)?\b"
    )
    for page in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        named = set(family.findall(page.read_text())) - known
        assert not named, f"{page.relative_to(ROOT)} names recipes that do not exist: {sorted(named)}"


def test_a_stale_build_lock_is_named(tmp_path):
    check_build_lock(tmp_path, "quanto_cpp")  # no lock
    lock = tmp_path / "lock"
    lock.touch()
    check_build_lock(tmp_path, "quanto_cpp")  # a fresh lock: maybe a build in progress
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with pytest.raises(FileExistsError, match=re.escape(f"delete {lock}")):
        check_build_lock(tmp_path, "quanto_cpp")
    lock.touch()
    (tmp_path / "quanto_cpp.so").touch()  # built, yet locked: stale however young
    with pytest.raises(FileExistsError, match="stale build lock"):
        check_build_lock(tmp_path, "quanto_cpp")


def test_the_baselines_old_home_names_the_new_one():
    import gearkit.integrations.hf as hf

    with pytest.warns(
        DeprecationWarning, match=r"goes in gearkit 0\.2: use gearkit\.integrations\.baselines\.check_build"
    ):
        assert hf.check_build_lock is check_build_lock


# -- recipe files are untrusted input (issue 23) --------------------------------------------------------------------
def custom_solver(x, atoms, sparsity):
    """A module-level CSR solver (Matching Pursuit under another name), as a user would write one."""
    from gearkit.compressors.solvers import matching_pursuit

    return matching_pursuit(x, atoms, sparsity)


def test_reading_recipe_data_never_imports_or_calls_code_unless_trusted(tmp_path, monkeypatch):
    (tmp_path / "gk_planted.py").write_text(
        "import os\nos.environ['GK_PLANTED'] = 'ran'\ndef source():\n    return 'x'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("GK_PLANTED", raising=False)
    data = recipes.csr(8, "/nowhere/d.safetensors", name="csr-probe").to_dict()
    for reference in ("python:gk_planted.source", "python:os.getcwd"):
        data["key"]["stages"][0]["dictionary"] = reference
        with pytest.raises(ValueError, match=r"key\.stages\[0\]\.dictionary names code .*trusted=True"):
            Recipe.from_dict(json.loads(json.dumps(data)))
    assert "gk_planted" not in sys.modules and "GK_PLANTED" not in os.environ  # nothing imported, nothing ran
    data["key"]["stages"][0]["dictionary"] = "python:gk_planted.source"
    trusted = Recipe.from_dict(data, trusted=True)  # the caller's explicit choice
    assert trusted.key.stages[0].source is sys.modules["gk_planted"].source and os.environ["GK_PLANTED"] == "ran"
    with pytest.raises(ValueError, match="trusted recipe data"):
        gearkit.SparseDictionary("python:os.getcwd", "key", 8)  # a constructor never resolves code either
    # the default CSR dictionary is a name gearkit resolves itself: a csr-8 file loads without trust
    default = recipes.get("csr-8").to_dict()
    assert default["key"]["stages"][0]["dictionary"] == "gearkit:default"
    assert Recipe.from_dict(json.loads(json.dumps(default))) == recipes.get("csr-8")


def test_a_csr_recipe_with_a_custom_solver_round_trips_when_trusted():
    recipe = recipes.csr(4, solver=custom_solver, name="csr-custom")
    data = json.loads(json.dumps(recipe.to_dict()))
    assert data["value"]["stages"][0]["solver"] == "python:test_reliability.custom_solver"
    again = Recipe.from_dict(data, trusted=True)
    assert again == recipe and again.key.stages[0].solver is custom_solver
    with pytest.raises(ValueError, match=r"key\.stages\[0\]\.solver names code .*trusted=True"):
        Recipe.from_dict(data)


def test_a_user_class_named_like_a_stage_never_changes_what_data_builds():
    class Quantizer(FullPrecision):  # a user's class that happens to share a built-in's name
        pass

    again = Recipe.from_dict(recipes.get("kivi-2").to_dict())
    assert type(again.key.stages[0]) is gearkit.Quantizer and type(again.value.stages[0]) is gearkit.Quantizer
    with pytest.raises(ValueError, match="a stage named 'Quantizer' is already registered"):
        register_stage(Quantizer)
    with pytest.raises(TypeError, match="not a registered stage"):
        Quantizer().to_dict()  # it would be read back as gearkit's
    assert Stage.known()["Quantizer"] is gearkit.Quantizer

    @register_stage
    class ReliabilityHalfPrecision(FullPrecision):  # a user stage, registered under its own name
        pass

    stage = ReliabilityHalfPrecision(torch.bfloat16)
    assert type(Stage.from_dict(stage.to_dict())) is ReliabilityHalfPrecision
    with pytest.raises(ValueError, match="unknown stage 'Unregistered'.*register_stage"):
        Stage.from_dict({"stage": "Unregistered"})


PROBE = Recipe(
    "probe",
    Pipeline([PreRoPE(Quantizer(2, 32, "channel"), 10000.0), LowRankResidual(2)]),
    Pipeline([Quantizer(2, 32, "token"), SignSketch(64)]),
    buffer_size=64,
)


@pytest.mark.parametrize(
    "path, value, error",
    [
        (("value", "stages", 0, "group_size"), 10**9, r"value\.stages\[0\] \(Quantizer\): group_size must be at most"),
        (("value", "stages", 1, "size"), 10**7, "SignSketch size must be at most 65536"),
        (("key", "stages", 1, "rank"), 10**6, "rank must be at most 4096"),
        (("key", "stages", 0, "rope_theta"), float("inf"), "rope_theta must be a finite number > 1"),
        (
            ("key", "stages", 0, "inner", "bits"),
            3.0,
            r"key\.stages\[0\]\.inner \(Quantizer\): unsupported bit width 3\.0",
        ),
        (("value", "stages", 1, "seed"), 2**70, "seed must be at most"),
        (("buffer_size",), 10**9, "buffer_size must be at most"),
        (("sink_tokens",), 10**9, "sink_tokens must be at most"),
        (("name",), 5, "name must be a non-empty string"),
        (("name",), "", "name must be a non-empty string"),
        (("description",), None, "description must be a string"),
        (("key",), [], r"key must be an object holding only a list of 'stages', got list"),
        (("key", "stages", 0), ["PreRoPE"], r"key\.stages\[0\] must be a stage"),
        (("value", "stages", 0, "bogus"), 1, r"value\.stages\[0\] \(Quantizer\): got an unexpected keyword"),
        (("probes",), [0.1], "probes must be an object"),
    ],
)
def test_recipe_data_out_of_bounds_or_misshapen_is_refused_in_one_sentence(path, value, error):
    data = json.loads(json.dumps(PROBE.to_dict()))
    *parents, last = path
    target = data
    for key in parents:
        target = target[key]
    target[last] = value
    with pytest.raises((ValueError, TypeError), match=error):
        Recipe.from_dict(data)


def test_missing_keys_and_wrong_containers_name_the_key():
    data = PROBE.to_dict()
    del data["buffer_size"]
    with pytest.raises(ValueError, match="recipe data lacks 'buffer_size'"):
        Recipe.from_dict(data)
    with pytest.raises(ValueError, match="recipe data must be an object"):
        Recipe.from_dict([PROBE.to_dict()])
    missing = PROBE.to_dict()
    del missing["value"]["stages"][0]["bits"]
    with pytest.raises(ValueError, match=r"value\.stages\[0\] \(Quantizer\): missing a required argument: 'bits'"):
        Recipe.from_dict(missing)
    with pytest.raises(TypeError, match="GearCache takes a Recipe or a registered recipe name, got NoneType"):
        GearCache(None)
    with pytest.raises(ValueError, match="unsupported bit width 3.0"):
        Quantizer(3.0)  # the same bounds hold in Python


@pytest.mark.parametrize("name", recipes.names())
def test_recipes_equal_themselves_read_back_from_data(name):
    recipe = recipes.get(name)
    again = Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert again == recipe and hash(again) == hash(recipe) and again is not recipe
    other = dict(recipe.to_dict(), buffer_size=recipe.buffer_size + 1)
    assert Recipe.from_dict(other) != recipe


def test_the_cpu_kernel_build_fails_loudly_takes_a_cc_command_and_leaves_nothing_behind(tmp_path, monkeypatch):
    from gearkit.kernels import cpu

    def fresh():
        cpu._library.cache_clear()
        cpu._warn_once.cache_clear()

    monkeypatch.setenv("GEARKIT_CACHE_DIR", str(tmp_path / "cache"))
    try:
        if Path("/bin/false").exists():
            monkeypatch.setenv("CC", "/bin/false")  # exits 1 and writes nothing: a failed build
            fresh()
            with pytest.warns(RuntimeWarning, match="could not build"):
                assert "could not build cpu_kernels.c" in cpu.unavailable()
        if shutil.which("gcc") and shutil.which("sh"):
            # a command with arguments, split like a shell would: gcc with gearkit's flags, then -O0 for a quick build
            monkeypatch.setenv("CC", """sh -c 'exec gcc "$@" -O0' sh""")
            fresh()
            assert cpu.unavailable() is None and len(list((tmp_path / "cache" / "kernels").glob("*.so"))) == 1
            (tmp_path / "a-file").touch()  # a cache "directory" that cannot hold anything
            monkeypatch.setenv("GEARKIT_CACHE_DIR", str(tmp_path / "a-file"))
            (tmp_path / "tmp").mkdir()
            monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
            fresh()
            with pytest.warns(RuntimeWarning, match="temporary folder, removed once loaded"):
                assert cpu.unavailable() is None
            assert not list((tmp_path / "tmp").iterdir())  # built, loaded, and removed
        for off in ("0", "false", "No", "OFF"):
            monkeypatch.setenv("GEARKIT_CPU_KERNEL", off)
            assert cpu.unavailable() == f"turned off by GEARKIT_CPU_KERNEL={off}"
        monkeypatch.setenv("GEARKIT_CPU_KERNEL", "maybe")
        with pytest.raises(ValueError, match="GEARKIT_CPU_KERNEL='maybe' is not a switch"):
            cpu.unavailable()
    finally:
        fresh()
