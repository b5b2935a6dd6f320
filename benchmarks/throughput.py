"""End-to-end decode throughput and memory against batch size, per cache, the way GEAR measures it.

For each cache (`DynamicCache`, Hugging Face `QuantizedCache` quanto-2/4, gearkit recipes) and batch size:
prefill `--context` tokens per sequence, then decode `--new-tokens` greedy tokens one at a time, and record the
decode time per step, tokens/s, the cache's bytes, and the memory: on a GPU the peak allocated (CUDA max
allocated, reset before the prefill); on a CPU the growth of the process's resident memory over the run and the
largest tensor one decode step creates (a dispatch-mode counter: it shows whether a step rebuilds the past).
A batch "fits" when its peak memory (GPU) or cache bytes plus the step's largest tensor (CPU) stay under
`--budget-gib`; the sweep stops at the first batch that does not fit. One CSV row per (cache, batch) with
hardware, date and versions. Not a test.

CPU, default model:
    python benchmarks/throughput.py --context 4096 --batches 1 --out benchmarks/results/throughput_cpu.csv
GPU, 8B shapes:
    python benchmarks/throughput.py --device cuda --model llama3-8b-shaped --layers 4 --context 32768 \
        --batches 1,2,4,8,16,32 --budget-gib 80 --out benchmarks/results/throughput_h200.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
import time

import torch

import gearkit
from gearkit.eval.speed import largest_tensor
from gearkit.integrations.hf import available_baselines, make_cache, memory_report


def rss_bytes() -> int:
    """Resident memory of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load(name: str, layers: int | None, device: str):
    """`(model, label, layer_scale)`: the default model, or a Llama-3-8B-shaped one with random weights (32 query
    heads, 8 KV heads, head dim 128, hidden 4096) with `layers` layers; per-layer figures scale by `32 / layers`."""
    if name == "default":
        from gearkit.models import DEFAULT_MODEL, load_default_model

        model, _ = load_default_model()
        return model.to(device), DEFAULT_MODEL, 1.0
    from transformers import LlamaConfig, LlamaForCausalLM

    n = layers or 32
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_hidden_layers=n,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float16 if device == "cuda" else torch.float32).eval()
    return model, f"llama3-8b-shaped ({n} layers, random weights)", 32 / n


@torch.inference_mode()
def run(model, spec: str, batch: int, context: int, new_tokens: int, device: str) -> dict:
    from transformers import DynamicCache

    ids = torch.randint(10, model.config.vocab_size - 10, (batch, context), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = rss_bytes()
    if spec == "DynamicCache":
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
    else:  # "sink-3@sdpa": the compatibility mode, SDPA over the decompressed past
        name, _, attention = spec.partition("@")
        cache = make_cache(name, model, attention=attention or "gearkit")
    logits = model(ids, cache=cache, use_cache=True).logits[:, -1]
    token = logits.argmax(-1, keepdim=True)
    step_largest = 0
    times = []
    for i in range(new_tokens):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if i == new_tokens - 1 and device != "cuda":  # count once, outside the timed steps' statistics
            step = lambda token=token: model(token, cache=cache, use_cache=True).logits[:, -1]
            logits, step_largest = largest_tensor(step)
        else:
            logits = model(token, cache=cache, use_cache=True).logits[:, -1]
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        token = logits.argmax(-1, keepdim=True)
    timed = times[1:-1] if len(times) > 2 else times  # drop the warm-up step and the counted one
    ms = 1000 * sorted(timed)[len(timed) // 2]
    report = memory_report(cache, model.config, batch)
    row = {
        "cache": spec,
        "batch": batch,
        "context": context,
        "new_tokens": new_tokens,
        "decode_ms_per_step": round(ms, 2),
        "decode_tokens_per_s": round(batch * 1000 / ms, 2),
        "kv_bytes": report.nbytes,
        "kv_bits_per_element": round(report.bits_per_element, 3),
    }
    if device == "cuda":
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    else:
        row["rss_growth_bytes"] = rss_bytes() - rss0
        row["step_largest_tensor_bytes"] = step_largest
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="default", choices=["default", "llama3-8b-shaped"])
    ap.add_argument("--layers", type=int, default=None, help="layers of the 8B-shaped model (figures scaled to 32)")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batches", default="1")
    ap.add_argument(
        "--caches",
        default=None,
        help="comma-separated; default DynamicCache, quanto, sink-3, kivi-2, gear-2; "
        "NAME@sdpa runs a recipe in the SDPA compatibility mode",
    )
    ap.add_argument("--budget-gib", type=float, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    specs = (
        args.caches.split(",")
        if args.caches
        else (
            ["DynamicCache"]
            + [n for n in ("hf-quanto-4", "hf-quanto-2") if n in available_baselines()]
            + ["sink-3", "kivi-2", "gear-2"]
        )
    )
    model, label, scale = load(args.model, args.layers, args.device)
    hardware = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.machine()} {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    )
    rows = []
    for spec in specs:
        for batch in [int(b) for b in args.batches.split(",")]:
            try:
                row = run(model, spec, batch, args.context, args.new_tokens, args.device)
            except torch.OutOfMemoryError:
                print(f"{spec} batch {batch}: out of memory", file=sys.stderr)
                break
            peak = row.get("peak_allocated_bytes", row["kv_bytes"] + row.get("step_largest_tensor_bytes", 0))
            row.update(
                model=label,
                layer_scale=scale,
                device=args.device,
                hardware=hardware,
                date=datetime.date.today().isoformat(),
                torch=torch.__version__,
                gearkit=gearkit.__version__,
                fits_budget=None if args.budget_gib is None else peak <= args.budget_gib * 2**30,
            )
            rows.append(row)
            print(
                {
                    k: row[k]
                    for k in ("cache", "batch", "decode_ms_per_step", "decode_tokens_per_s", "kv_bytes")
                    if k in row
                }
                | {
                    k: row[k]
                    for k in ("rss_growth_bytes", "step_largest_tensor_bytes", "peak_allocated_bytes")
                    if k in row
                },
                flush=True,
            )
            if row["fits_budget"] is False:
                break
    if args.out and rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
