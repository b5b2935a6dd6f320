"""Decode time per token of several caches measured in turn, step by step, in one process (the default model).

A shared or frequency-scaling CPU moves single runs by 25% or more; stepping every cache once per round, then
taking each one's median, exposes them to the same conditions, so their ratios hold even when the absolute
figures drift. Not a test.

Run: python benchmarks/decode_ab.py --context 4096 --steps 16 --caches DynamicCache,sink-3,hf-quanto-4
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


@torch.inference_mode()
def main() -> None:
    from transformers import DynamicCache

    from gearkit.integrations.hf import make_cache
    from gearkit.models import load_default_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--caches", default="DynamicCache,sink-3,hf-quanto-4", help="the first is the baseline")
    args = ap.parse_args()
    model, _ = load_default_model()
    ids = torch.randint(10, model.config.vocab_size - 10, (1, args.context), generator=torch.Generator().manual_seed(0))
    runs = {}
    for spec in args.caches.split(","):
        if spec == "DynamicCache":
            model.set_attn_implementation("sdpa")
            cache = DynamicCache(config=model.config)
        else:
            cache = make_cache(spec, model)
        token = model(ids, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        runs[spec] = [cache, token, model.config._attn_implementation, []]
    for _ in range(args.steps + 1):  # the first round warms up
        for run in runs.values():
            cache, token, attention, times = run
            model.set_attn_implementation(attention)
            start = time.perf_counter()
            run[1] = model(token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - start)
    base = statistics.median(next(iter(runs.values()))[3][1:])
    print(
        f"{platform.machine()} {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, context {args.context}, median of {args.steps} interleaved steps"
    )
    for spec, (*_, times) in runs.items():
        ms = statistics.median(times[1:])
        print(f"{spec}: {1000 * ms:.1f} ms per token, {ms / base:.2f}x {next(iter(runs))}")


if __name__ == "__main__":
    main()
