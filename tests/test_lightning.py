"""The Lightning runner: its tasks, the stats callback, the JSON-lines writer and DDP over two CPU processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import Logger

from gearkit.eval.generation import greedy
from gearkit.eval.perplexity import evaluate
from gearkit.eval.runner import (
    CacheTask,
    CompressionStatsLogger,
    GenerationTask,
    PerplexityTask,
    PromptBatches,
    merge_rows,
    predict,
)
from gearkit.eval.threads import cpu_threads
from gearkit.integrations.hf import GearCache
from gearkit.models import load_text

ROOT = Path(__file__).resolve().parent.parent
# Long enough that, with the chat template, each prompt fills sink-3's 64-token buffer: a chunk is compressed.
PROMPTS = [
    "Summarise in one sentence: the lighthouse keeper climbed the spiral stairs every evening at dusk, trimmed the "
    "wick, polished the great lens and watched the beam sweep across the dark water until dawn.",
    "Name a colour.",
    "Explain briefly why bread rises when it is baked, mentioning yeast, sugar, carbon dioxide, gluten and heat, "
    "and say what happens if the oven is too cold or the dough has been left to rise for far too long.",
]


def gearkit(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the processes DDP starts import this checkout too
    return subprocess.run(
        [sys.executable, "-m", "gearkit.cli", *args], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env
    )


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


class Captured(Logger):
    """A Lightning logger that keeps what it is given."""

    def __init__(self):
        super().__init__()
        self.metrics = []

    name, version = "captured", 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


# -- bad input: clear errors before any process is spawned ----------------------------------------------


def test_bad_input_is_refused_before_anything_runs(smol):
    model, tok = smol
    with pytest.raises(ValueError, match="prompt list is empty"):
        predict(GenerationTask("kivi-2"), [], devices=2)  # nothing loaded yet
    with pytest.raises(ValueError, match="unknown recipe 'gear-9'; known recipes: fp16"):
        GenerationTask("gear-9")
    with pytest.raises(
        ValueError, match=r"prompt 1 has \d+ tokens \+ 8 new tokens, longer than the model's context of 8192"
    ):
        predict(
            GenerationTask("kivi-2", max_new_tokens=8, model=model, tokenizer=tok), ["Hi", "word " * 8200], devices=2
        )
    with pytest.raises(ValueError, match="scoring after a prefix of 64 needs at least 65"):
        predict(PerplexityTask("kivi-2", prefix=64, model=model, tokenizer=tok), [torch.arange(10)], devices=2)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        PromptBatches(["Hi"], 0)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        predict(GenerationTask("kivi-2"), ["Hi"], devices=2, threads=0)
    with pytest.raises(ValueError, match="a loaded model with its tokenizer, or a model spec"):
        GenerationTask("kivi-2", model="default", tokenizer=tok)
    with pytest.raises(ValueError, match="a loaded model with its tokenizer, or a model spec"):
        GenerationTask("kivi-2", model=model)
    with pytest.raises(FileNotFoundError, match="no model at /no/such/model"):
        GenerationTask("kivi-2", model="/no/such/model")
    with pytest.raises(ValueError, match="dtype must be one of"):
        GenerationTask("kivi-2", dtype="int8")
    with pytest.raises(NotImplementedError, match="CacheTask does not implement predict_step"):
        CacheTask("kivi-2").predict_step(PromptBatches(["Hi"])[0])
    assert not torch.distributed.is_initialized()


def test_cpu_threads_pins_this_process_and_the_ones_it_launches(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        child = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True, text=True
        )
        assert child.stdout.strip() == "1"
    assert torch.get_num_threads() == before and "OMP_NUM_THREADS" not in os.environ
    with cpu_threads(None):
        assert torch.get_num_threads() == before


def test_cli_bad_input_fails_before_spawning():
    run = gearkit("generate", "--recipe", "gear-9", "--prompt", "Hi", "--devices", "2")
    assert run.returncode == 2 and "unknown recipe 'gear-9'" in run.stderr and "distributed" not in run.stderr
    run = gearkit("eval", "ppl", "--recipe", "kivi-2", "--devices", "0")
    assert run.returncode == 2 and "must be at least 1" in run.stderr


# -- one process ------------------------------------------------------------------------------------------


def test_callback_logs_the_bytes_the_cache_reports(smol, tmp_path):
    model, tok = smol
    stats, logger = CompressionStatsLogger(), Captured()
    rows = predict(
        GenerationTask("sink-3", max_new_tokens=6, model=model, tokenizer=tok),
        PROMPTS[:2],
        tmp_path / "rows.jsonl",
        batch_size=2,
        accelerator="cpu",
        callbacks=[stats],
        logger=logger,
    )
    assert [r["index"] for r in rows] == [0, 1] and rows == [json.loads(x) for x in (tmp_path / "rows.jsonl").open()]
    ((step, logged),) = logger.metrics
    assert step == 0 and logged == stats.history[0]
    # the same batch by hand: left-padded chat prompts, one GearCache
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in PROMPTS[:2]
    ]
    inputs = tok(texts, return_tensors="pt", padding=True)
    cache = GearCache("sink-3", model.config)
    out = model.generate(**inputs, cache=cache, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert cache.layers[0].store.chunks >= 1
    report = cache.memory_report()
    assert logged["predict/sink-3/kv_bytes"] == report.nbytes
    assert logged["predict/sink-3/kv_bytes_fp16"] == report.fp16_nbytes
    assert {k.rsplit("/", 1)[1]: v for k, v in logged.items() if "/kv_bytes/" in k} == report.components
    assert logged["predict/sink-3/compression_ratio"] == report.compression_ratio
    assert logged["predict/sink-3/tokens_per_s"] > 0 and logged["predict/sink-3/peak_memory_bytes"] > 0
    assert [r["token_ids"] for r in rows] == [
        _until_eos(t, tok) for t in out[:, inputs["input_ids"].shape[1] :].tolist()
    ]


def _until_eos(tokens, tok):
    return tokens[: tokens.index(tok.eos_token_id) + 1] if tok.eos_token_id in tokens else tokens


def test_batch_of_one_equals_the_prompt_alone(smol, tmp_path):
    model, tok = smol
    task = GenerationTask("sink-3", max_new_tokens=8, model=model, tokenizer=tok)
    rows = predict(task, PROMPTS[1:2], tmp_path / "r.jsonl", accelerator="cpu")
    alone, _ = greedy(model, tok, PROMPTS[1], 8, GearCache("sink-3", model.config))
    assert rows[0]["token_ids"] == alone.tolist()


def test_merge_drops_repeated_rows_and_restores_prompt_order():
    rows = [
        {"index": 2, "recipe": "a"},
        {"index": 0, "recipe": "a"},
        {"index": 0, "recipe": "b"},
        {"index": 2, "recipe": "a", "dup": True},
        {"index": 1, "recipe": "a"},
    ]
    assert merge_rows(rows) == [
        {"index": 0, "recipe": "a"},
        {"index": 0, "recipe": "b"},
        {"index": 1, "recipe": "a"},
        {"index": 2, "recipe": "a"},
    ]
    batches = PromptBatches(["a", "b", "c"], 2)
    assert len(batches) == 2 and batches[1] == {"batch": 1, "index": [2], "items": ["c"]}


# -- two processes (DDP, gloo) against one ----------------------------------------------------------------
# Both sides run at 2 threads per process. Without --threads Lightning would give each of the 2 ranks
# cores // 2 threads (1 here), float32 sums would be ordered differently, and the numbers would differ in
# their last digits: pinning the count is what makes the equality exact.


def test_two_processes_generate_what_one_does(smol, tmp_path):
    model, tok = smol
    task = GenerationTask("sink-3", max_new_tokens=12, model=model, tokenizer=tok)
    assert all(task.encode(p).numel() > 64 for p in (PROMPTS[0], PROMPTS[2]))  # a chunk gets compressed
    args = [a for p in PROMPTS for a in ("--prompt", p)]
    run = gearkit(
        "generate",
        "--recipe",
        "sink-3",
        *args,
        "--max-new-tokens",
        "12",
        "--batch-size",
        "2",
        "--devices",
        "2",
        "--threads",
        "2",
        "--json",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Starting with 2 processes" in run.stderr
    two = json_lines(run.stdout)
    one = predict(task, PROMPTS, tmp_path / "one.jsonl", batch_size=2, threads=2, accelerator="cpu")
    assert [r["index"] for r in two] == [0, 1, 2]
    assert two == [{**r, "model": "SmolLM2-135M-Instruct"} for r in one]  # token ids and texts, exactly


def test_eval_ppl_on_two_processes_equals_one(smol):
    model, tok = smol
    names = ["sink-3", "kivi-2"]
    run = gearkit(
        "eval",
        "ppl",
        "--recipe",
        names[0],
        "--recipe",
        names[1],
        "--text",
        "idle-help",
        "--prefix",
        "64",
        "--continuation",
        "16",
        "--windows",
        "3",
        "--json",
        "--devices",
        "2",
        "--threads",
        "2",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with cpu_threads(2):
        one = evaluate(model, tok, names, load_text("idle-help"), 64, 16, 3, model_name="SmolLM2-135M-Instruct")
    # the same windows (two on rank 0, one on rank 1), the same per-window NLLs summed in the same order: exact
    assert json_lines(run.stdout) == [r.summary() for r in one]
    assert one[0].kv_bytes < one[0].kv_bytes_fp16  # sink-3 compressed chunks


def test_every_rank_loads_the_model_spec_and_dtype_named(tiny_checkpoint, tmp_path):
    task = GenerationTask("sink-3", max_new_tokens=4, model=tiny_checkpoint, dtype="bfloat16", buffer_dtype=None)
    task.configure_model()
    assert task.model.dtype == torch.bfloat16 and task.model.config.vocab_size == len(task.tokenizer)
    one = predict(task, PROMPTS, tmp_path / "one.jsonl", threads=1, accelerator="cpu")
    assert task.make_cache("sink-3").buffer_dtype is None
    model = ["--model", str(tiny_checkpoint), "--dtype", "bfloat16", "--buffer-dtype", "model"]
    args = [a for p in PROMPTS for a in ("--prompt", p)]
    run = gearkit(
        "generate",
        "--recipe",
        "sink-3",
        *args,
        *model,
        "--max-new-tokens",
        "4",
        "--devices",
        "2",
        "--threads",
        "1",
        "--json",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Starting with 2 processes" in run.stderr
    assert json_lines(run.stdout) == [{**r, "model": "tiny-llama"} for r in one]
