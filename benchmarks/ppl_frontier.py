"""Perplexity increase against all-in bits per element for every recipe and the HF baselines, in one run.

Default: the held-out text (`idle-help`, the IDLE manual shipped with Python; not the default text), prefix
1024 + continuation 1024 tokens per window, 4 windows, SmolLM2-135M-Instruct in fp32 on this CPU. A recipe
is on the frontier when no other cache has both fewer bits per element and a lower perplexity increase.
Writes a markdown table to stdout and, with --out, a CSV row per cache. Not a test.

Run: python benchmarks/ppl_frontier.py [--text idle-help] [--windows 4] [--out benchmarks/results/ppl.csv]
"""

import argparse
import csv
import datetime
import json
import platform
import sys
import time

import torch

import gearkit
from gearkit.cli import progress_bar
from gearkit.eval.perplexity import evaluate
from gearkit.integrations.hf import HF_BASELINES, available_baselines
from gearkit.models import DEFAULT_MODEL, load_default_model, load_text


def definition(name: str) -> str:
    """The cache's definition as JSON: the recipe's data, or the HF baseline's backend and bits."""
    if name in HF_BASELINES:
        backend, bits = HF_BASELINES[name]
        return json.dumps({"hf_quantized_cache": backend, "nbits": bits})
    return json.dumps(gearkit.recipes.get(name).to_dict())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default="idle-help")
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--recipes", nargs="*", default=None, help="default: every registered recipe and HF baseline")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    names = args.recipes or gearkit.recipes.names() + available_baselines()
    model, tokenizer = load_default_model()
    start = time.time()
    results = evaluate(
        model,
        tokenizer,
        names,
        load_text(args.text),
        args.prefix,
        args.continuation,
        args.windows,
        progress=progress_bar(),
        model_name=DEFAULT_MODEL,
    )
    threads = torch.get_num_threads()
    hardware = f"{platform.machine()} {platform.processor() or 'cpu'}, {threads} threads, torch {torch.__version__}"
    print(
        f"{DEFAULT_MODEL} fp32, text {args.text}, {results[0].windows} windows of {args.prefix}+{args.continuation} "
        f"tokens, baseline ppl {results[0].baseline_ppl:.4f}; {hardware}; {time.time() - start:.0f} s"
    )
    print("\n| cache | bits/elt | ratio | ppl | ppl increase | frontier | components (bits/elt) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for r in sorted(results, key=lambda r: r.bits_per_element):
        frontier = not any(
            o.bits_per_element <= r.bits_per_element and o.ppl_increase_pct < r.ppl_increase_pct and o is not r
            for o in results
        )
        parts = ", ".join(
            f"{k} {gearkit.accounting.bits_per_element(v, r.kv_bytes_fp16 // 2):.2f}"
            for k, v in sorted(r.components.items())
            if v
        )
        print(
            f"| {r.recipe} | {r.bits_per_element:.3f} | {r.compression_ratio:.2f} | {r.ppl:.3f} | "
            f"{r.ppl_increase_pct:+.2f}% | {'yes' if frontier else ''} | {parts} |"
        )
        rows.append(
            {
                **r.summary(),
                "frontier": frontier,
                "text": args.text,
                "windows": r.windows,
                "prefill_tok_s": round(r.prefill_tokens_per_s, 1),
                "hardware": hardware,
                "date": datetime.date.today().isoformat(),
                "gearkit": gearkit.__version__,
                "definition": definition(r.recipe),
            }
        )
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
