"""Writes the documentation's Results page, `docs/results.md`, and its plots from the committed results, in one run.

Measuring takes hours on a CPU, so the page reads result files; each file's command, date and hardware are in
`SOURCES` below and on the page. Run after adding or re-measuring a result:

    python benchmarks/results_page.py [--synthetic]

`--synthetic` computes the residual spectrum from synthetic keys (no model); the other plots only read files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from plots import (  # benchmarks/plots.py (run as `python benchmarks/<script>.py`)
    FRONTIER_SOURCES,
    RESULTS,
    family,
    frontier_rows,
    plot_decode,
    plot_frontier,
    plot_spectrum,
    plot_throughput_cpu,
)

import gearkit
from gearkit.integrations.hf import HF_BASELINES

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {
    "ppl_frontier_idle-help.csv": (
        "python benchmarks/ppl_frontier.py --out benchmarks/results/ppl_frontier_idle-help.csv",
        "2026-11-27",
        "x86_64, 2 CPU threads, torch 2.13.0+cpu",
    ),
    "ppl_frontier_idle-help_newer.csv": (
        "OMP_NUM_THREADS=1 python benchmarks/ppl_frontier.py --recipes zipcache zipcache-gear turboquant-2.5 "
        "turboquant-3.5 kvquant-2 kvquant-3 gk-2.5 gk-3 gk-3.5 gk-4.5 "
        "--out benchmarks/results/ppl_frontier_idle-help_newer.csv",
        "2026-12-04",
        "x86_64, 1 CPU thread (2 cores shared with other jobs), torch 2.13.0+cpu; gk-* as of commit 82e40c6",
    ),
    "ppl_frontier_idle-help_calibrated.csv": (
        "OMP_NUM_THREADS=1 python benchmarks/ppl_frontier.py --recipes gk-2.5 gk-3 gk-3.5 gk-4.5 sinkrot-2.5 "
        "sinkrot-3 sinkrot-3.5 sinkrot-4 --out benchmarks/results/ppl_frontier_idle-help_calibrated.csv",
        "2026-12-04",
        "x86_64, 1 CPU thread (2 cores shared with the test suite), torch 2.13.0+cpu; gk-* by gearkit calibrate",
    ),
    "retrieval_idle-help.jsonl": (
        "OMP_NUM_THREADS=1 gearkit eval retrieval --recipe kivi-2 --recipe gk-3 --text idle-help --json",
        "2026-12-04",
        "x86_64, 1 CPU thread (2 cores shared with other jobs), torch 2.13.0+cpu; gk-3 as of commit 82e40c6",
    ),
    "retrieval_idle-help_calibrated.jsonl": (
        "gearkit eval retrieval --recipe kivi-2 --recipe gk-3 --text idle-help --json",
        "2026-12-04",
        "x86_64, 2 CPU threads, idle, 4 min 36 s; gk-3 written by gearkit calibrate",
    ),
}
RETRIEVAL_SOURCES = [name for name in SOURCES if name.startswith("retrieval_")]
NOT_MEASURED = {  # registered families the frontier files lack, and why
    "csr": "CSR reads a trained dictionary (`gearkit dict train --default`), which the machine that "
    "measured the frontier did not have; its own run (2 windows of the same text) is in "
    "`benchmarks/results/csr_idle-help.md`",
}


def source_line(name: str) -> str:
    """How a committed result file was made: its path, command, date and hardware."""
    command, date, hardware = SOURCES[name]
    return f"`benchmarks/results/{name}`: `{command}` ({date}; {hardware})"


def frontier_section(rows: list[dict]) -> str:
    """The frontier plot, its table and the registered recipes it lacks."""
    first = rows[0]
    measured = {r["recipe"] for r in rows}
    missing = [n for n in gearkit.recipes.names() + list(HF_BASELINES) if n not in measured]
    lines = [
        "## Perplexity against all-in bits",
        "",
        f"{first['model']} in fp32 on `{first['text']}` (the IDLE manual, English prose shipped with Python), "
        f"{first['windows']} windows of 1024 prefilled + {int(first['tokens']) // int(first['windows'])} scored "
        f"tokens, uncompressed perplexity {float(first['baseline_ppl']):.3f}. Bits per element are all-in, from the "
        "bytes each cache holds at 2048 tokens. A cache is on the frontier when no other has both fewer or equal "
        "bits and a lower increase. The `gk-*` recipes were calibrated on this text (`gearkit calibrate`), so their "
        "figures here are in-sample; held out they are in [Calibration](concepts/calibration.md). Sources, "
        "one protocol measured in three runs:",
        "",
        *(f"- {source_line(name)}" for name in FRONTIER_SOURCES),
        "",
        "![Perplexity increase against bits per element](img/ppl_frontier.png)",
        "",
        "| cache | family | bits/elt | ppl | ppl increase | frontier |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['recipe']}` | {family(r['recipe'])} | {float(r['bits_per_element']):.3f} | {float(r['ppl']):.3f} "
            f"| {float(r['ppl_increase_pct']):+.2f}% | {'yes' if r['frontier'] else ''} |"
        )
    lines.append("")
    for fam in sorted({family(n) for n in missing}):
        names = ", ".join(f"`{n}`" for n in missing if family(n) == fam)
        why = NOT_MEASURED.get(fam, "not measured on this protocol yet")
        lines.append(f"Registered but not in the plot: {names} ({fam}): {why}.")
    return "\n".join(lines)


def retrieval_section() -> str:
    """The retrieval tables: accuracy per cache, task and length, from each committed run."""
    lines = [
        "## Retrieval: multi-key, multi-value, variable tracking",
        "",
        "`gearkit eval retrieval` ([the task definitions](concepts/retrieval.md)): RULER-style haystacks built from a "
        "filler text, the uncompressed cache in the same run. Right answers / questions per task and length; the "
        "mean over all questions, and its difference from the uncompressed cache's, in points; bits per element "
        "all-in, at 2048 tokens.",
    ]
    for name in RETRIEVAL_SOURCES:
        rows = [json.loads(line) for line in (RESULTS / name).read_text().splitlines() if line.strip()]
        cells = sorted({(r["task"], r["length"]) for r in rows}, key=lambda c: (c[0], c[1]))
        recipes = list(dict.fromkeys(r["recipe"] for r in rows))
        by = {(r["recipe"], r["task"], r["length"]): r for r in rows}
        means = {
            c: sum(by[c, t, n]["correct"] for t, n in cells) / sum(by[c, t, n]["trials"] for t, n in cells)
            for c in recipes
        }
        lines += [
            "",
            f"Filler `{name.removesuffix('.jsonl').split('_')[1]}`; {source_line(name)}.",
            "",
            "| cache | bits/elt | "
            + " | ".join(f"{t} {n // 1024}k" for t, n in cells)
            + " | mean % | vs uncompressed |",
            "|---|---|" + "---|" * len(cells) + "---|---|",
        ]
        for c in recipes:
            bits = by[(c, *cells[-1])]["bits_per_element"]
            accuracy = " | ".join(f"{by[c, t, n]['correct']}/{by[c, t, n]['trials']}" for t, n in cells)
            delta = 100 * (means[c] - means[recipes[0]])
            lines.append(
                f"| `{c}` | {'–' if bits is None else f'{bits:.2f}'} | {accuracy} | {100 * means[c]:.2f} | "
                f"{'' if c == recipes[0] else f'{delta:+.2f}'} |"
            )
    return "\n".join(lines)


STATIC = """## Error spectrum of the quantization residual

Singular values of the residual keys minus their reconstruction, per 64-token chunk and KV head, on the default
model's keys (layer 15, 512 tokens of held-out text), as a share of the residual's energy. The keys themselves
are nearly low-rank (the top two directions hold most of their energy); the 2-bit quantization residual is not,
so a rank-2 correction removes little of it. See [GEAR](concepts/gear.md).

![Residual spectrum](img/residual_spectrum.png)

## Decode attention against context length

`BENCH_ARGS="--contexts 1024,32768,65536 --batches 1,16" bash benchmarks/gpu_check.sh` on an NVIDIA H200 (data:
`benchmarks/results/kernels_h200.csv`): one decode step's attention over a compressed cache with the Triton
kernel (reading packed codes), against fp16 SDPA on the uncompressed cache and the torch reference
(decompress, then attend). The fused kernel beats the reference by 20-40× but does not yet beat fp16 SDPA; at
batch 1 host-side work around the launch dominates. Details in [kernels](tutorials/05-kernels.md).

![Decode attention time](img/decode_speed.png)

## End-to-end decode on a CPU

`python benchmarks/throughput.py --context 4096 --new-tokens 8` (and 1k / 8k) with the default model in fp32,
batch 1, on 2 CPU threads (table: `benchmarks/results/throughput_cpu.md`): with gearkit's attention function (what
`make_cache` selects), a decode step multiplies the stored codes as they are (a small compiled C kernel unpacks eight
codes into a vector register at a time), so the largest tensor a step allocates stays at 0.20 MB (the model's logits)
at every context, where the compatibility path (`@sdpa`, SDPA over the decompressed past) and `DynamicCache` grow
linearly. Time per token, with the caches stepped in turn (`benchmarks/decode_ab.py`): `sink-3` 1.05x
`DynamicCache`'s at 4k (1.24x at 1k, 1.08x at 8k), `kivi-2` 1.10x, `gear-2` 2.15x, Hugging Face's quanto-4 1.45x.
The frontier recipes read their stored form too (codebooks, rotations, per-layer and per-head stages): at 4k
`gk-3` 1.47x, `gk-3.5` 1.40x, `turboquant-3.5` 1.31x, `sink-gear-2` 1.62x, against 3.3-3.4x when they
decompressed every block (same command, one session later).

![Decode time and step memory on a CPU](img/decode_cpu.png)
"""


def page(rows: list[dict]) -> str:
    """The Results page's markdown."""
    head = """# Results

What gearkit's recipes cost and keep on the default model today: retrieval accuracy against the uncompressed
cache, perplexity against all-in bits for every registered recipe and Hugging Face's own quantized caches, and
decode speed and memory. This page is generated from the committed result files by one command (each section
names the command and machine behind its file):

```bash
python benchmarks/results_page.py     # --synthetic: residual spectrum from synthetic keys, no model
```
"""
    return "\n\n".join([head.strip(), retrieval_section(), frontier_section(rows), STATIC.strip()]) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", action="store_true", help="residual spectrum from synthetic keys (no model)")
    args = ap.parse_args(argv)
    rows = frontier_rows()
    img = ROOT / "docs" / "img"
    for path in (
        plot_frontier(img, rows),
        plot_spectrum(img, args.synthetic),
        plot_decode(img),
        plot_throughput_cpu(img),
    ):
        print(path)
    (ROOT / "docs" / "results.md").write_text(page(rows), encoding="utf-8")
    print(ROOT / "docs" / "results.md")


if __name__ == "__main__":
    main()
