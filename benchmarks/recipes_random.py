"""Relative error and all-in bits per element of every registered recipe on synthetic KV tensors.

Keys are Gaussian with a few large-magnitude, offset channels (the shape of real keys); values are plain
Gaussian. Each recipe compresses in chunks of its buffer size, as its cache would. Not a test.

Run: python benchmarks/recipes_random.py [--tokens 1024] [--heavy 3]
"""

import argparse
import platform
import time

import torch

import gearkit
from gearkit.eval import compare_recipes, format_table, synthetic_kv
from gearkit.eval.tensors import needs_a_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--heavy", type=int, default=3, help="large-magnitude key channels")
    args = ap.parse_args()

    shape = (1, args.heads, args.tokens, args.head_dim)
    keys = synthetic_kv(shape, args.heavy, seed=0)
    values = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    print(
        f"gearkit {gearkit.__version__}, torch {torch.__version__}, {platform.machine()} "
        f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads; shape {list(shape)}"
    )
    results, millis = [], []
    for name in gearkit.recipes.names():
        if needs_a_model(gearkit.recipes.get(name)):  # its queries, layers or RoPE
            continue
        start = time.perf_counter()
        results += compare_recipes(keys, values, [name])
        millis.append(1e3 * (time.perf_counter() - start))
    components = sorted({c for r in results for c in r.components})
    numel = 2 * keys.numel()
    print(
        format_table(
            [
                {
                    "recipe": r.recipe,
                    "bits/elt": r.bits_per_element,
                    "ratio": r.compression_ratio,
                    "key rel err": r.key_error,
                    "value rel err": r.value_error,
                    "round trip ms": ms,
                    **{f"{c} bits": 8 * r.components.get(c, 0) / numel for c in components},
                }
                for r, ms in zip(results, millis)
            ]
        )
    )


if __name__ == "__main__":
    main()
