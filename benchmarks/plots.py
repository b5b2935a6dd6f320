"""The documentation's plots, as PNG files: perplexity increase against all-in bits per element (every recipe and
the Hugging Face baselines), the singular-value spectrum of the quantization residual on real keys, decode
attention time against context length on a GPU, and end-to-end decode time and step memory on a CPU.

Run: python benchmarks/plots.py --out docs/img [--synthetic]

The frontier and decode plots read the committed results (`benchmarks/results/ppl_frontier_idle-help*.csv`, one
protocol measured in several runs, `benchmarks/results/kernels_h200.csv`, `benchmarks/results/throughput_cpu_*.csv`);
the spectrum is computed here, from the default model's keys on held-out text (or from synthetic keys with
`--synthetic`, which needs no model). `benchmarks/results_page.py` runs these plots and writes `docs/results.md`.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

RESULTS = Path(__file__).resolve().parent / "results"
# every run of `benchmarks/ppl_frontier.py` on the same protocol (text, windows, lengths), merged by `frontier_rows`
FRONTIER_SOURCES = (
    "ppl_frontier_idle-help.csv",
    "ppl_frontier_idle-help_newer.csv",
    "ppl_frontier_idle-help_calibrated.csv",
)
FAMILIES = {  # name prefix -> (label, colour, marker); first match wins
    "gk": ("gk-* (gearkit calibrate, tuned on idle-help)", "#e41a1c", "*"),
    "turboquant": ("TurboQuant (gearkit stages)", "#377eb8", "h"),
    "kvquant": ("KVQuant (gearkit stages)", "#4daf4a", "p"),
    "zipcache": ("ZipCache", "#f781bf", "X"),
    "csr": ("CSR", "#a65628", "d"),
    "hf-quanto": ("HF QuantizedCache (quanto)", "#7f7f7f", "v"),
    "hf-hqq": ("HF QuantizedCache (HQQ)", "#bcbd22", "^"),
    "sinkrot": ("sinkrot (gearkit, calibration-free)", "#e7298a", "H"),
    "sink-gear": ("sink-gear (gearkit)", "#9467bd", "D"),
    "sink": ("sink (gearkit)", "#d62728", "o"),
    "kivi": ("KIVI", "#1f77b4", "s"),
    "gear-l": ("GEAR-L", "#ff7f0e", "<"),
    "gear": ("GEAR", "#2ca02c", ">"),
    "kcvt": ("GEAR on KCVT", "#17becf", "P"),
    "uniform": ("uniform per-token", "#8c564b", "x"),
    "fp16": ("fp16", "black", "*"),
}
OFFSETS = {
    "hf-quanto-2": (5, -10),
    "uniform-4": (6, 0),
    "gear-l-3": (-40, 4),
    "hf-quanto-4": (5, -11),
    "kivi-2": (4, 6),
    "sink-2": (-30, -10),
    "kcvt-4": (-10, -12),
    "kivi-3": (4, -10),
    "kvquant-2": (-22, 8),
    "turboquant-3.5": (-30, -12),
    "zipcache-gear": (-72, -3),
    "zipcache": (5, -10),
}  # label placement where points crowd
FLOOR = 0.05  # percent: increases at or below this (fp16, 8-bit: -0.01%..0%) are drawn on the floor


def family(name: str) -> str:
    return next(prefix for prefix in FAMILIES if name.startswith(prefix))


def frontier_rows(sources: tuple[str, ...] = FRONTIER_SOURCES) -> list[dict]:
    """Every cache's row from the frontier CSVs in `benchmarks/results/`, sorted by bits, with `frontier` recomputed
    over all of them (True when no other cache has both fewer or equal bits and a lower increase).

    Raises:
        ValueError: when the files were measured on different protocols (text, windows, tokens, baseline).
    """
    rows = [r for name in sources for r in csv.DictReader((RESULTS / name).open())]
    protocol = {(r["model"], r["text"], r["windows"], r["tokens"]) for r in rows}
    baselines = [float(r["baseline_ppl"]) for r in rows]
    # the same protocol on another CPU thread count moves the uncompressed perplexity by ~1e-5 (relative), no more
    if len(protocol) != 1 or max(baselines) > min(baselines) * (1 + 1e-4):
        raise ValueError(
            f"the frontier files were measured on different protocols: {sorted(protocol)}, uncompressed perplexity "
            f"{min(baselines):.6f} to {max(baselines):.6f}"
        )
    for r in rows:
        bits, increase = float(r["bits_per_element"]), float(r["ppl_increase_pct"])
        r["frontier"] = not any(
            float(o["bits_per_element"]) <= bits and float(o["ppl_increase_pct"]) < increase for o in rows
        )
    return sorted(rows, key=lambda r: (float(r["bits_per_element"]), r["recipe"]))


def plot_frontier(out: Path, rows: list[dict] | None = None) -> Path:
    """Perplexity increase against all-in bits for every cache of `rows` (default: `frontier_rows()`)."""
    rows = rows or frontier_rows()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    seen = set()
    for r in rows:
        fam = family(r["recipe"])
        label, colour, marker = FAMILIES[fam]
        x, y = float(r["bits_per_element"]), max(float(r["ppl_increase_pct"]), FLOOR)
        ax.scatter(x, y, color=colour, marker=marker, s=55, label=None if fam in seen else label, zorder=3)
        seen.add(fam)
        ax.annotate(
            r["recipe"],
            (x, y),
            textcoords="offset points",
            xytext=OFFSETS.get(r["recipe"], (5, 3)),
            fontsize=7,
            color=colour,
        )
    front = sorted(
        (float(r["bits_per_element"]), max(float(r["ppl_increase_pct"]), FLOOR)) for r in rows if r["frontier"]
    )
    ax.step(
        [p[0] for p in front],
        [p[1] for p in front],
        where="post",
        color="#d62728",
        alpha=0.35,
        lw=1.5,
        label="frontier (lowest increase at ≤ these bits)",
        zorder=2,
    )
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xticks([2, 3, 4, 5, 6, 8, 12, 16], labels=["2", "3", "4", "5", "6", "8", "12", "16"])
    ax.axhline(FLOOR, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("bits per element, all-in (codes + scales + outliers + low-rank + sinks; log scale)")
    ax.set_ylabel(f"perplexity increase over uncompressed, % (log; ≤ {FLOOR}% drawn at {FLOOR}%)")
    r0 = rows[0]
    ax.set_title(
        f"{r0['model']} on {r0['text']}: {r0['windows']} windows, {int(r0['tokens']) // int(r0['windows'])} "
        f"scored tokens each after a compressed past",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper right")
    path = out / "ppl_frontier.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def real_keys(tokens: int = 512, layer: int = 15):
    """Keys `[1, kv_heads, tokens, head_dim]` of one layer of the default model on held-out text."""
    from transformers import DynamicCache

    from gearkit.models import load_default_model, load_text

    model, tokenizer = load_default_model()
    ids = tokenizer(load_text("idle-help"), return_tensors="pt")["input_ids"][:, :tokens]
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    return cache.layers[layer].keys.float(), f"SmolLM2-135M-Instruct keys, layer {layer}, {tokens} tokens of idle-help"


def plot_spectrum(out: Path, synthetic: bool = False) -> Path:
    from gearkit import Pipeline, recipes
    from gearkit.eval import synthetic_kv

    if synthetic:
        keys, what = synthetic_kv((1, 3, 512, 64), heavy_channels=3, seed=0), "synthetic keys [1, 3, 512, 64]"
    else:
        keys, what = real_keys()
    chunk = 64

    def residual(pipeline: Pipeline):
        """Per 64-token chunk, the residual `[chunks, kv_heads, 64, head_dim]` of the pipeline's round trip."""
        parts = keys.split(chunk, dim=2)
        return torch.stack([(p - pipeline.decompress(pipeline.compress(p)).float())[0] for p in parts])

    def spectrum(x):  # singular values of each [64 tokens, head_dim] matrix, as a share of its energy, averaged
        s = torch.linalg.svdvals(x)
        return ((s**2) / (s**2).sum(-1, keepdim=True)).mean((0, 1))

    gear = recipes.get("gear-2").key.stages
    curves = {
        "keys themselves": spectrum(torch.stack(keys.split(chunk, dim=2))[:, 0]),
        "kivi-2 residual (2-bit, groups of 32)": spectrum(residual(recipes.get("kivi-2").key)),
        "gear-2 residual before its rank-2 term": spectrum(residual(Pipeline(list(gear[:2])))),
        "gear-2 residual after rank-2": spectrum(residual(recipes.get("gear-2").key)),
    }
    fig, ax = plt.subplots(figsize=(8, 5))
    for (label, s), style in zip(curves.items(), ["k-", "C0-o", "C2-s", "C2--"]):
        top2 = 100 * s[:2].sum().item()
        ax.plot(range(1, len(s) + 1), s.numpy(), style, ms=3, label=f"{label}: top 2 hold {top2:.0f}%")
    ax.set_yscale("log")
    ax.set_xlabel("singular value index (per 64-token chunk and KV head)")
    ax.set_ylabel("share of the matrix's energy, σᵢ² / Σσ²")
    ax.set_title(f"Spectrum of the key quantization residual\n{what}", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    path = out / "residual_spectrum.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_decode(out: Path, source: Path = RESULTS / "kernels_h200.csv") -> Path:
    rows = [r for r in csv.DictReader(source.open()) if r["op"] == "decode_attention"]
    batches = sorted({int(r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(10, 4.5), sharey=True)
    series = [
        ("triton", "kivi-2", "C0-o", "kivi-2, Triton (packed codes)"),
        ("triton", "gear-2", "C2-s", "gear-2, Triton (packed codes + outliers + rank 2)"),
        ("sdpa-fp16-uncompressed", "kivi-2", "k--", "fp16 SDPA on the uncompressed cache"),
        ("torch", "kivi-2", "C0:", "kivi-2, torch reference (decompress, then attend)"),
    ]
    for ax, batch in zip(axes, batches):
        for backend, recipe, style, label in series:
            pts = sorted(
                (int(r["context"]), float(r["ms"]))
                for r in rows
                if r["backend"] == backend and r["recipe"] == recipe and int(r["batch"]) == batch
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_title(f"batch {batch}", fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_ylabel("decode attention, ms per step (log)")
    axes[-1].legend(fontsize=8)
    fig.suptitle(
        f"One decode step's attention, {rows[0]['hardware']}: 32 query heads, 8 KV heads, head dim 128", fontsize=10
    )
    path = out / "decode_speed.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_throughput_cpu(out: Path, sources: tuple[str, ...] = ("1k", "4k", "8k")) -> Path:
    """Decode time per step and the largest tensor a step allocates, against context, on a CPU
    (`benchmarks/results/throughput_cpu_*.csv`, written by `benchmarks/throughput.py`)."""
    rows = [r for k in sources for r in csv.DictReader((RESULTS / f"throughput_cpu_{k}.csv").open())]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4.2))
    for cache, style in (
        ("DynamicCache", "k--o"),
        ("sink-3", "C3-o"),
        ("sink-3@sdpa", "C3:s"),
        ("kivi-2", "C0-^"),
        ("gear-2", "C2->"),
        ("hf-quanto-4", "C7-v"),
    ):
        pts = sorted(
            (int(r["context"]), float(r["decode_ms_per_step"]), int(r["step_largest_tensor_bytes"]))
            for r in rows
            if r["cache"] == cache
        )
        if not pts:
            continue
        label = {
            "sink-3": "sink-3 (reads the stored codes)",
            "sink-3@sdpa": "sink-3, SDPA over the decompressed past",
            "DynamicCache": "DynamicCache (fp32)",
        }.get(cache, cache)
        speed.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        memory.plot([p[0] for p in pts], [p[2] / 2**20 for p in pts], style, label=label)
    for ax, ylabel in ((speed, "decode ms per token"), (memory, "largest tensor one step allocates (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.25)
    speed.legend(fontsize=8)
    fig.suptitle(f"{rows[0]['model']}, batch 1, {rows[0]['hardware']}, torch {rows[0]['torch']}", fontsize=10)
    path = out / "decode_cpu.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/img", help="folder for the PNG files")
    ap.add_argument("--synthetic", action="store_true", help="residual spectrum from synthetic keys (no model)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in (plot_frontier(out), plot_spectrum(out, args.synthetic), plot_decode(out), plot_throughput_cpu(out)):
        print(path)


if __name__ == "__main__":
    main()
