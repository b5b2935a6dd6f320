"""The 3-bit frontier sweep (issue 15): every key/value composition tried, scored on a tuning text, one run.

Each candidate is a recipe built from gearkit stages (rotation + Lloyd-Max codebooks, pre-RoPE keys, GEAR's
outliers and low-rank term, KIVI-style groups); all keep 4 fp16 sink tokens and a 64-token buffer unless named
otherwise. Perplexity with a compressed past (prefix 1024 + 1024 scored tokens per window), SmolLM2-135M fp32,
bits all-in from the cache's own byte report. The widths on the ladder of `gearkit calibrate` (the `gk-*`
recipes) come from this run on `idle-help` (the tuning text); `--only` also takes registered recipes and recipe files
(`--only DIR/gk-3.json`). Held-out figures come from `gearkit eval ppl` on another text, never from here.

Run: OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/frontier_sweep.py --text idle-help --windows 1 \
         --out benchmarks/results/frontier_sweep_idle-help.md [--only NAME ...]
(rounds: `CANDIDATES`, then `--only` the `SECOND` list, then the `THIRD`; results in
benchmarks/results/frontier_sweep{,2,3}_idle-help.md)
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
from report import publish  # benchmarks/report.py (run as `python benchmarks/<script>.py`)

from gearkit import (
    CodebookQuantizer,
    HadamardRotation,
    LowRankResidual,
    Pipeline,
    PreRoPE,
    Quantizer,
    Recipe,
    SignSketch,
    SparseOutlier,
)
from gearkit.cli import progress_bar
from gearkit.eval.perplexity import evaluate
from gearkit.models import DEFAULT_MODEL, load_default_model, load_text


def keys(kind: str, bits: int):
    """Key stages by short name (all per chunk of 64 tokens)."""
    return {
        "ch": [Quantizer(bits, 64, "channel")],  # KIVI-style per-channel, post-RoPE
        "ch128-": [Quantizer(bits, 128, "channel")],  # the same over 128-token chunks (buffer 128)
        "pre-ch": [PreRoPE(Quantizer(bits, 64, "channel"))],  # per-channel, before RoPE
        "pre-lm-ch": [PreRoPE(CodebookQuantizer(bits, 64, "channel", centered=True))],
        "had-lm": [HadamardRotation(CodebookQuantizer(bits))],  # TurboQuant-style
        "pre-had-lm": [PreRoPE(HadamardRotation(CodebookQuantizer(bits)))],
        # TurboQuant's inner-product variant: the MSE code, then QJL's 1-bit sketch of its residual (1.25 bits more)
        "had-lm-qjl": [HadamardRotation(CodebookQuantizer(bits)), SignSketch()],
        # GEAR's low-rank term first, on pre-RoPE keys (rank 1 per 64-token chunk: 0.5 bit), the rest quantized
        "pre-lr1-ch": [PreRoPE(LowRankResidual(1)), PreRoPE(Quantizer(bits, 64, "channel"))],
        # GEAR's order: quantize, then rank 1 of the residual
        "pre-ch-lr1": [PreRoPE(Quantizer(bits, 64, "channel")), LowRankResidual(1)],
        # KVQuant: 1% dense-and-sparse outliers per token (across heads), then a non-uniform per-channel code
        "pre-out-lm-ch": [
            PreRoPE(SparseOutlier(0.01, "token", across_heads=True)),
            PreRoPE(CodebookQuantizer(bits, 64, "channel", centered=True)),
        ],
    }[kind]


def values(kind: str, bits: int):
    """Value stages by short name."""
    return {
        "tok": [Quantizer(bits, 64, "token")],  # KIVI-style per-token groups of 64
        "had-lm": [HadamardRotation(CodebookQuantizer(bits))],
        "had-lm-32": [HadamardRotation(CodebookQuantizer(bits, 32))],
        "out-had-lm": [SparseOutlier(0.01, "token", across_heads=True), HadamardRotation(CodebookQuantizer(bits))],
    }[kind]


def candidate(key: str, kb: int, value: str, vb: int, sinks: int = 4, buffer: int = 64) -> Recipe:
    name = f"K:{key}{kb}/V:{value}{vb}" + ("" if sinks == 4 else f"/s{sinks}") + ("" if buffer == 64 else f"/b{buffer}")
    return Recipe(name, Pipeline(keys(key, kb)), Pipeline(values(value, vb)), buffer, sink_tokens=sinks)


CANDIDATES = [  # first round
    # ~2.5 bits
    candidate("pre-ch", 2, "had-lm", 2),
    candidate("pre-lm-ch", 2, "had-lm", 2),
    candidate("had-lm", 2, "had-lm", 2),
    candidate("pre-lr1-ch", 2, "had-lm", 2),
    # ~3 bits
    candidate("pre-ch", 3, "had-lm", 2),
    candidate("ch", 3, "had-lm", 2),
    candidate("pre-lm-ch", 3, "had-lm", 2),
    candidate("pre-ch", 2, "had-lm", 3),
    candidate("pre-lr1-ch", 2, "had-lm", 3),
]
SECOND = [  # after the first round: post-RoPE per-channel keys won at 3 bits, so the higher widths use them
    candidate("ch", 2, "had-lm", 2),
    candidate("had-lm", 3, "had-lm", 2),
    candidate("ch", 3, "had-lm", 3),
    candidate("ch", 4, "had-lm", 3),
    candidate("ch", 4, "had-lm", 4),
    candidate("ch", 3, "had-lm-32", 2),
]
THIRD = [  # under 3 bits: longer key groups pay for finer value scales
    candidate("ch128-", 3, "had-lm-32", 2, buffer=128),
    candidate("ch128-", 3, "had-lm", 2, buffer=128),
]


QJL = [  # unbiased scores (QJL) against the same bits spent on a finer MSE code
    candidate("had-lm-qjl", 2, "had-lm", 2),
    candidate("had-lm", 2, "had-lm", 2),
    candidate("had-lm", 3, "had-lm", 2),
    candidate("had-lm", 4, "had-lm", 2),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default="idle-help")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=1024)
    ap.add_argument(
        "--only", nargs="*", default=None, help="candidate or registered recipe names (default: every candidate)"
    )
    ap.add_argument("--out", default=None, help="markdown file for the table")
    args = ap.parse_args()
    by_name = {r.name: r for r in CANDIDATES + SECOND + THIRD + QJL}
    # a candidate by name, else a registered recipe or a recipe file (`gearkit calibrate` writes them)
    chosen = [by_name.get(n, n) for n in args.only] if args.only else CANDIDATES + SECOND + THIRD
    model, tokenizer = load_default_model()
    start = time.time()
    results = evaluate(
        model,
        tokenizer,
        chosen,
        load_text(args.text),
        args.prefix,
        args.continuation,
        args.windows,
        progress=progress_bar(),
        model_name=DEFAULT_MODEL,
        on_result=lambda r: print(
            f"{r.recipe}: {r.bits_per_element:.3f} bits, {r.ppl_increase_pct:+.2f}%", file=sys.stderr, flush=True
        ),
    )
    lines = [
        f"{DEFAULT_MODEL} fp32, text {args.text}, {results[0].windows} windows of {args.prefix}+{args.continuation} "
        f"tokens, baseline ppl {results[0].baseline_ppl:.4f}; {platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}; {time.time() - start:.0f} s",
        "",
        "| candidate | bits/elt | ppl | ppl increase |",
        "|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: r.bits_per_element):
        lines.append(f"| `{r.recipe}` | {r.bits_per_element:.3f} | {r.ppl:.3f} | {r.ppl_increase_pct:+.2f}% |")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
