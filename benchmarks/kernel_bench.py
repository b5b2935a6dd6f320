"""Kernel timings, one CSV row per measurement, with the hardware, date and gearkit version on every row.

On a GPU: Triton quantize-and-pack and fused reconstruction (achieved GB/s against the card's peak) and
decode attention over the compressed cache against the torch reference and against fp16 SDPA on the
uncompressed cache, over context lengths and batch sizes. On a CPU: decode attention (SDPA over the
uncompressed fp32 cache; the stored path with the compiled CPU kernel, with the same products in torch, and the
block-wise reference) and the compiled pipeline against eager.

    python benchmarks/kernel_bench.py --out benchmarks/results/kernels_cpu.csv
    python benchmarks/kernel_bench.py --contexts 1024,4096,16384 --skip-compiled \
        --out benchmarks/results/kernels_cpu_decode.csv
    python benchmarks/kernel_bench.py --contexts 1024,4096,16384,32768,65536 --batches 1,4,16 --out kernels_h200.csv

Shapes follow a Llama-3-8B-like layer: 32 query heads, 8 KV heads, head dim 128 (CPU: 2 KV heads, head dim 64).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import os
import platform
import statistics
import time

import torch
from einops import rearrange

import gearkit
from gearkit import decode_attention, recipes
from gearkit.compressors.rope import RoPE
from gearkit.eval import synthetic_kv
from gearkit.kernels.backend import use_backend

PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}  # datasheet HBM bandwidth of the SXM parts


def hardware(device: torch.device) -> tuple[str, float | None]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, next((v for k, v in PEAK_GBPS.items() if k in name), None)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads", None


def bench_ms(fn, device: torch.device) -> float:
    """Median time of `fn()` in milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=50, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def attend_ms(backend: str, q, recipe, block: tuple, bias, scale: float, device) -> float:
    """Milliseconds of one decode-attention call over one stored block `(keys, values)` under `backend`."""
    with use_backend(backend):
        return bench_ms(lambda: decode_attention.attend(q, recipe.key, recipe.value, [block], bias, scale), device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default=None, help="comma-separated context lengths")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument(
        "--recipes",
        default=None,
        help="comma-separated; default kivi-2,gear-2,sink-3 (GPU: also the codebook, rotated and per-layer reads "
        "turboquant-2.5,turboquant-3.5,sinkrot-3,gk-3)",
    )
    parser.add_argument(
        "--layer",
        type=int,
        default=3,
        help="the model layer a per-layer recipe (gk-*) is read at; gk-3's layer 3 has per-channel keys and "
        "Hadamard-rotated codebook values, both read by the Triton kernels (its PerHead layers are not)",
    )
    parser.add_argument(
        "--skip-compiled", action="store_true", help="CPU: only decode attention, no torch.compile runs"
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    contexts = [int(c) for c in (args.contexts or ("1024,4096,16384,32768,65536" if gpu else "1024,4096")).split(",")]
    batches = [int(b) for b in (args.batches or ("1,4,16" if gpu else "1,4")).split(",")]
    names = (
        args.recipes or ("kivi-2,gear-2,sink-3" + (",turboquant-2.5,turboquant-3.5,sinkrot-3,gk-3" if gpu else ""))
    ).split(",")
    for recipe in map(recipes.get, names):
        if uneven := [c for c in contexts if c % recipe.buffer_size]:
            parser.error(
                f"contexts must be multiples of {recipe.name}'s {recipe.buffer_size}-token chunks, got {uneven}"
            )
    heads, kv_heads, head_dim = (32, 8, 128) if gpu else (8, 2, 64)
    name, peak = hardware(device)
    common = dict(hardware=name, date=datetime.date.today().isoformat(), gearkit=gearkit.__version__)
    rows = []

    def record(**row):
        if row.get("gbps") and peak:
            row["pct_peak"] = round(100 * row["gbps"] / peak, 1)
        rows.append({**common, **row})
        print(rows[-1], flush=True)

    for batch in batches:
        for context in contexts:
            for recipe in map(recipes.get, names):
                chunk = recipe.buffer_size
                # a per-layer recipe codes (and is read at) one layer; where another of its layers codes keys before
                # RoPE, the context also carries Llama-3's rotary embedding and the chunks' positions
                layer = {"layer": args.layer} if "layer" in recipe.key.requires | recipe.value.requires else {}
                rope = {}
                if "rope" in recipe.key.requires:
                    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2) / head_dim)
                    positions = torch.arange(context // chunk).repeat_interleave(batch) * chunk
                    rope = dict(rope=RoPE(inv_freq), positions=positions.to(device))
                compress_keys = functools.partial(recipe.key.compress, **layer, **rope)
                shape = (batch, kv_heads, context, head_dim)
                k = synthetic_kv(shape, 4, 0).to(device, torch.float16)
                v = synthetic_kv(shape, 0, 1).to(device, torch.float16)
                ck, cv = (rearrange(t, "b h (n c) d -> (n b) h c d", c=chunk) for t in (k, v))
                key = dict(recipe=recipe.name, batch=batch, context=context, kv_heads=kv_heads, head_dim=head_dim)
                if gpu:
                    # quantize + pack: the key quantizer alone (reads fp16, writes codes and parameters)
                    # (uniform codes only: codebooks are coded by torch)
                    quant = next((s for s in recipe.key.stages if type(s).__name__ == "Quantizer"), None)
                    part = None if quant is None else quant.encode(ck)
                    for backend in ("triton", "torch") if quant else ():
                        with use_backend(backend):
                            ms = bench_ms(lambda: quant.encode(ck), device)
                        moved = ck.numel() * 2 + part.nbytes
                        record(
                            op="quantize_pack", backend=backend, ms=round(ms, 4), gbps=round(moved / ms / 1e6, 1), **key
                        )
                    # reconstruction of the whole key pipeline (codes + outliers + low rank -> fp16)
                    stored = compress_keys(ck)
                    moved = stored.nbytes + ck.numel() * 2
                    for backend in ("triton", "torch"):
                        with use_backend(backend):
                            ms = bench_ms(lambda: recipe.key.decompress(stored), device)
                        record(
                            op="reconstruct", backend=backend, ms=round(ms, 4), gbps=round(moved / ms / 1e6, 1), **key
                        )
                    # decode attention, one query token
                    sk, sv = compress_keys(ck), recipe.value.compress(cv, **layer)
                    q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=torch.float16)
                    bias = torch.zeros(batch, context, device=device)
                    scale = head_dim**-0.5
                    sdpa = bench_ms(
                        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True),
                        device,
                    )
                    record(
                        op="decode_attention",
                        backend="sdpa-fp16-uncompressed",
                        ms=round(sdpa, 4),
                        gbps=round(2 * k.numel() * 2 / sdpa / 1e6, 1),
                        **key,
                    )
                    for backend in ("triton", "torch"):
                        ms = attend_ms(backend, q, recipe, (sk, sv), bias, scale, device)
                        record(
                            op="decode_attention",
                            backend=backend,
                            ms=round(ms, 4),
                            speedup_vs_sdpa_fp16=round(sdpa / ms, 2),
                            bytes_read=sk.nbytes + sv.nbytes,
                            **key,
                        )
                    del sk, sv, stored
                else:
                    # decode attention, one query token: SDPA over the uncompressed fp32 cache against the stored
                    # path (compiled kernel, or the same products in torch) and the block-wise reference
                    sk, sv = compress_keys(ck), recipe.value.compress(cv, **layer)
                    q = torch.randn(batch, heads, 1, head_dim)
                    bias = torch.zeros(batch, context)
                    kf, vf, scale = k.float(), v.float(), head_dim**-0.5
                    sdpa = bench_ms(
                        lambda: torch.nn.functional.scaled_dot_product_attention(
                            q, kf, vf, scale=scale, enable_gqa=True
                        ),
                        device,
                    )
                    record(op="decode_attention", backend="sdpa-fp32-uncompressed", ms=round(sdpa, 4), **key)
                    for backend, label, kernel in (
                        ("auto", "stored-c-kernel", "1"),
                        ("auto", "stored-torch", "0"),
                        ("torch", "reference", "1"),
                    ):
                        os.environ["GEARKIT_CPU_KERNEL"] = kernel
                        ms = attend_ms(backend, q, recipe, (sk, sv), bias, scale, device)
                        record(
                            op="decode_attention",
                            backend=label,
                            ms=round(ms, 4),
                            speedup_vs_sdpa_fp32=round(sdpa / ms, 2),
                            **key,
                        )
                    os.environ.pop("GEARKIT_CPU_KERNEL")
                    for op, fn in (
                        ()
                        if args.skip_compiled or layer
                        else (("compress", recipe.key.compress), ("round_trip", recipe.key))
                    ):
                        eager = bench_ms(lambda: fn(ck), device)
                        compiled_fn = torch.compile(fn, fullgraph=True)
                        compiled = bench_ms(lambda: compiled_fn(ck), device)
                        record(op=op, backend="torch-eager", ms=round(eager, 3), **key)
                        record(
                            op=op,
                            backend="torch-compiled",
                            ms=round(compiled, 3),
                            speedup_vs_eager=round(eager / compiled, 2),
                            **key,
                        )
                k = v = ck = cv = None  # free before the next shape is built
                if gpu:
                    torch.cuda.empty_cache()
    fields = list(dict.fromkeys(f for r in rows for f in r))
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
