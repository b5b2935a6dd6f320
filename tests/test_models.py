"""Loading models: `gearkit.models.load_model` on checkpoint directories, GGUF files, model ids in the local Hugging
Face cache and the embedded default, its refusals, and the same through the command line's `--model`."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from gearkit import cli
from gearkit.integrations.hf import make_cache
from gearkit.models import DEFAULT_MODEL, gguf_path, load_model, load_tokenizer, loading, resolve_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("gearkit opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_a_checkpoint_directory_loads_by_path(tiny_checkpoint, offline):
    model, tokenizer, name = load_model(tiny_checkpoint)
    assert name == "tiny-llama" and not model.training and model.config._attn_implementation == "sdpa"
    assert model.dtype == torch.float32 and model.config.vocab_size == len(tokenizer)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    for dtype in ("bfloat16", torch.float16):
        assert load_model(str(tiny_checkpoint), dtype).model.dtype == getattr(torch, str(dtype).split(".")[-1])
    assert len(load_tokenizer(tiny_checkpoint)) == len(tokenizer)


def _copy(checkpoint, tmp_path, name, drop=(), config=None):
    target = tmp_path / name
    shutil.copytree(checkpoint, target)
    for file in drop:
        (target / file).unlink()
    if config is not None:
        settings = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**settings, **config}))
    return target


def test_bad_models_are_refused_in_one_sentence(tiny_checkpoint, tmp_path, offline):
    from transformers import LlavaConfig, T5Config

    (tmp_path / "empty").mkdir()
    (tmp_path / "malformed").mkdir()
    (tmp_path / "malformed" / "config.json").write_text("{not json")
    T5Config(num_layers=1, d_model=8, d_kv=4, d_ff=8, num_heads=2).save_pretrained(tmp_path / "t5")
    LlavaConfig().save_pretrained(tmp_path / "llava")
    refusals = [
        (tmp_path / "nowhere", FileNotFoundError, "the path does not exist"),
        ("./nowhere", FileNotFoundError, "the path does not exist"),
        ("model.gguf", FileNotFoundError, "the path does not exist"),
        (tmp_path / "empty", ValueError, "not a Hugging Face checkpoint directory: it has no config.json"),
        (tiny_checkpoint / "config.json", ValueError, "pass the directory that holds it"),
        (tmp_path / "malformed", ValueError, "config.json is not a config transformers can read"),
        (tmp_path / "t5", ValueError, r"encoder-decoder model \(t5\); gearkit compresses decoder-only causal LMs"),
        (tmp_path / "llava", ValueError, r"multimodal model \(llava\) with no causal-LM text decoder"),
        (_copy(tiny_checkpoint, tmp_path, "no-weights", ["model.safetensors"]), ValueError, "has a config but no"),
        (
            _copy(tiny_checkpoint, tmp_path, "no-tokenizer", ["tokenizer.json", "tokenizer_config.json"]),
            ValueError,
            "has no tokenizer",
        ),
        (
            _copy(tiny_checkpoint, tmp_path, "three-layers", config={"num_hidden_layers": 3}),
            ValueError,
            r"do not match its config: \d+ parameter\(s\) missing",
        ),
        ("", ValueError, "the model is an empty string"),
    ]
    for spec, error, message in refusals:
        with pytest.raises(error, match=message):
            load_model(spec)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        load_model(tiny_checkpoint, torch.int8)


def test_a_model_id_is_read_from_the_local_cache_only(tiny_checkpoint, tmp_path, monkeypatch, offline):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as missing:
        load_model("gearkit-tests/tiny-llama")
    assert time.perf_counter() - start < 1
    message = str(missing.value)
    assert str(hub) in message and "HF_HOME" in message and "HF_HUB_CACHE" in message
    assert "gearkit never downloads" in message
    # the layout the Hugging Face hub writes: refs/main names the snapshot
    repo = hub / "models--gearkit-tests--tiny-llama"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    model, _, name = load_model("gearkit-tests/tiny-llama")
    assert name == "gearkit-tests/tiny-llama" and model.config.num_hidden_layers == 2
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a valid model id"):
        load_model("not a model id")


def _tiny_gguf(path: Path) -> None:
    """A two-layer Llama GGUF file (F32, random weights) whose tokenizer is the default's first 512 tokens."""
    import gguf
    import numpy as np

    from gearkit.models import load_default_tokenizer

    tokenizer = load_default_tokenizer()
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)[:512]
    known = set(tokens)
    merges = [" ".join(m) for m in bpe["merges"] if {*m, "".join(m)} <= known]
    hidden, layers, heads, kv_heads, ffn = 32, 2, 4, 2, 64
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in [
        (writer.add_context_length, 512),
        (writer.add_embedding_length, hidden),
        (writer.add_block_count, layers),
        (writer.add_feed_forward_length, ffn),
        (writer.add_head_count, heads),
        (writer.add_head_count_kv, kv_heads),
        (writer.add_rope_freq_base, 10000.0),
        (writer.add_layer_norm_rms_eps, 1e-5),
        (writer.add_vocab_size, len(tokens)),
        (writer.add_rope_dimension_count, hidden // heads),
        (writer.add_tokenizer_model, "gpt2"),
        (writer.add_tokenizer_pre, "smollm"),
        (writer.add_token_list, tokens),
        (writer.add_token_types, [3 if i < 17 else 1 for i in range(len(tokens))]),
        (writer.add_token_merges, merges),
        (writer.add_bos_token_id, 1),
        (writer.add_eos_token_id, 2),
        (writer.add_unk_token_id, 0),
        (writer.add_pad_token_id, 2),
    ]:
        add(value)
    rng = np.random.default_rng(0)
    head_dim = hidden // heads
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (hidden,),
            f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (hidden, hidden),
            f"blk.{i}.attn_k.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_v.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden),
            f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        }
    for name, shape in shapes.items():
        weight = np.ones(shape) if len(shape) == 1 else rng.standard_normal(shape) * 0.02
        writer.add_tensor(name, weight.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_file_is_converted_once_and_cached(tmp_path, monkeypatch, offline):
    path = tmp_path / "tiny-q.gguf"
    _tiny_gguf(path)
    monkeypatch.setenv("GEARKIT_CACHE_DIR", str(tmp_path / "cache"))  # after: the default's tokenizer stays cached
    model, tokenizer, name = load_model(path)
    assert name == "tiny-q" and model.config.num_hidden_layers == 2 and len(tokenizer) == 512
    (converted,) = (tmp_path / "cache" / "gguf").iterdir()
    assert converted.name.startswith(f"tiny-q-{path.stat().st_size}-")

    def convert(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(loading, "_convert", convert)
    again = load_model(path, "bfloat16").model
    assert again.dtype == torch.bfloat16 and again.config.hidden_size == 32
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a changed file converts anew
    with pytest.raises(AssertionError, match="converted again"):
        load_model(path)
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="cannot be loaded as a GGUF causal LM"):
        load_model(tmp_path / "broken.gguf")


def test_the_default_model_by_name_and_by_its_gguf_path():
    for spec in (None, "default", DEFAULT_MODEL, gguf_path(), str(gguf_path())):
        source = resolve_model(spec)
        assert source.kind == "default" and source.name == DEFAULT_MODEL
    model, _, name = load_model(gguf_path(), "bfloat16")
    assert name == DEFAULT_MODEL and model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 30


def test_a_bf16_model_whose_keys_overflow_fp16_can_keep_a_wider_buffer():
    model = tiny_llama("gqa").to(torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(1e5)  # keys far beyond fp16's 65504
    ids = torch.randint(2, 97, (1, 20))
    with pytest.raises(ValueError, match="key_states overflow torch.float16.*--buffer-dtype float32.*buffer_dtype="):
        model(ids, cache=make_cache("sink-3", model), use_cache=True)
    for buffer_dtype in (None, torch.bfloat16):
        cache = make_cache("sink-3", model, buffer_dtype=buffer_dtype)
        assert torch.isfinite(model(ids, cache=cache, use_cache=True).logits).all()
        assert cache.layers[0].store.buffer_dtype == buffer_dtype


# -- the command line ---------------------------------------------------------------------------------------


def test_cli_eval_ppl_runs_a_checkpoint_by_path(tiny_checkpoint):
    argv = ["--model", str(tiny_checkpoint), "--recipe", "sink-3", "--prefix", "64", "--continuation", "16"]
    run = subprocess.run(
        [sys.executable, "-m", "gearkit.cli", "eval", "ppl", *argv, "--windows", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = [json.loads(line) for line in run.stdout.splitlines()]
    assert result["model"] == "tiny-llama" and result["recipe"] == "sink-3" and result["tokens"] == 16
    assert result["kv_bytes_fp16"] == 2 * 2 * 80 * 2 * 8 * 2  # 2 layers, keys and values, 80 tokens, 2 heads x 8


def test_every_command_runs_the_model_named(tiny_checkpoint, capsys):
    model = ["--model", str(tiny_checkpoint), "--dtype", "bfloat16", "--buffer-dtype", "model"]
    commands = [
        ["generate", "--recipe", "sink-3", "--prompt", "Hi", "--max-new-tokens", "3", "--json"],
        [
            "generate",
            "--recipe",
            "sink-3",
            "--prompt",
            "Hi",
            "--prompt",
            "Yo",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "3",
            "--json",
        ],
        ["eval", "passkey", "--recipe", "sink-3", "--length", "80", "--depth", "0.5", "--keys", "1", "--json"],
        ["eval", "generation", "--recipe", "sink-3", "--prompt", "Hi", "--max-new-tokens", "3", "--json"],
    ]
    for argv in commands:
        assert cli.main([*argv, *model]) == 0, argv
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert rows and all(row["model"] == "tiny-llama" for row in rows), argv
    assert cli.main(["eval", "layers", "--recipe", "sink-3", "--tokens", "130", *model]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny-llama, text pydoc-topics") and len(out.splitlines()) == 2 + 2 + 1  # 2 layers
