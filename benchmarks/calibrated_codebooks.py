"""Calibrated (k-means) codebooks against the data-oblivious Lloyd-Max one (issue 15, KVQuant's non-uniform types).

Keys and values of every layer are taken from the tuning text (`idle-help`, two windows of 2048 tokens, the
model's own cache, float32); per layer and role a codebook is fit by k-means (`kmeans_levels`) on the
first window's RMS-normalised entries, as each coding scheme normalises them, and the relative squared error
of the real stage (64-token chunks) is measured on the second window, with the Gaussian levels and with the
calibrated ones, at equal bytes (levels are recipe data, not stored per chunk).

Run: OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/calibrated_codebooks.py \
    --out benchmarks/results/calibrated_codebooks_idle-help.md
"""

from __future__ import annotations

import argparse
import sys

import torch
from report import publish  # benchmarks/report.py (run as `python benchmarks/<script>.py`)

from gearkit import CodebookQuantizer, HadamardRotation, Pipeline
from gearkit.compressors.codebook import kmeans_levels
from gearkit.compressors.rope import RoPE
from gearkit.models import DEFAULT_MODEL, load_default_model, load_text, model_family, token_windows

CHUNK = 64


def chunks(x: torch.Tensor) -> torch.Tensor:
    """`[1, heads, T, d]` as 64-token chunks `[T / 64, heads, 64, d]` (what a cache codes)."""
    b, h, t, d = x.shape
    return x.reshape(b, h, t // CHUNK, CHUNK, d).permute(2, 0, 1, 3, 4).reshape(-1, h, CHUNK, d)


def per_vector(x: torch.Tensor) -> torch.Tensor:
    """Entries divided by their vector's RMS (a codebook over whole head vectors)."""
    return x / x.square().mean(-1, keepdim=True).sqrt().clamp(min=1e-30)


def per_channel(x: torch.Tensor) -> torch.Tensor:
    """Entries minus their channel group's mean, divided by its RMS (centered per-channel groups of 64 tokens)."""
    g = chunks(x)
    g = g - g.mean(2, keepdim=True)
    return g / g.square().mean(2, keepdim=True).sqrt().clamp(min=1e-30)


def pre_rope(x: torch.Tensor, rope: RoPE) -> torch.Tensor:
    return rope.undo(x, torch.arange(x.shape[2])[None])


ROTATE = HadamardRotation(CodebookQuantizer(2))
# scheme: (role, transform of the raw tensor, normalisation the stage applies, stage from levels)
SCHEMES = {
    "values, Hadamard, per vector (gk, TurboQuant)": (
        "value",
        lambda x, rope: x,
        lambda x: per_vector(ROTATE.rotate(x)),
        lambda b, lv: HadamardRotation(CodebookQuantizer(b, levels=lv)),
    ),
    "keys, Hadamard, per vector (gk-2.5)": (
        "key",
        lambda x, rope: x,
        lambda x: per_vector(ROTATE.rotate(x)),
        lambda b, lv: HadamardRotation(CodebookQuantizer(b, levels=lv)),
    ),
    "keys, pre-RoPE, per channel centered (KVQuant)": (
        "key",
        pre_rope,
        per_channel,
        lambda b, lv: CodebookQuantizer(b, CHUNK, "channel", True, levels=lv),
    ),
    "values, per vector, no rotation (KVQuant)": (
        "value",
        lambda x, rope: x,
        per_vector,
        lambda b, lv: CodebookQuantizer(b, levels=lv),
    ),
}


def rel_error(stage, x: torch.Tensor) -> float:
    xc = chunks(x)
    return ((Pipeline([stage])(xc) - xc).square().sum() / xc.square().sum()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default="idle-help")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, tokenizer = load_default_model()
    rope = model_family(model.config).layers[0].rope  # every layer of the default model turns keys alike
    train, test = token_windows(tokenizer, load_text(args.text), 1024, 1024, 2)
    with torch.inference_mode():
        kv = [
            [
                (layer.keys.float().clone(), layer.values.float().clone())
                for layer in model(w[None], use_cache=True).past_key_values.layers
            ]
            for w in (train, test)
        ]
    lines = [
        f"{DEFAULT_MODEL}, text {args.text}: codebooks fit on window 1, error on window 2 (relative squared "
        f"error, mean over {len(kv[0])} layers)",
        "",
        "| scheme | bits | Lloyd-Max | calibrated | change |",
        "|---|---|---|---|---|",
    ]
    for name, (role, transform, normalise, make) in SCHEMES.items():
        for bits in args.bits:
            errors = torch.zeros(2)
            for (k_tr, v_tr), (k_te, v_te) in zip(*kv):
                x_tr, x_te = (k_tr, k_te) if role == "key" else (v_tr, v_te)
                x_tr, x_te = transform(x_tr, rope), transform(x_te, rope)
                levels = kmeans_levels(normalise(x_tr), bits).tolist()
                errors += torch.tensor([rel_error(make(bits, None), x_te), rel_error(make(bits, levels), x_te)])
            lm, cal = (errors / len(kv[0])).tolist()
            lines.append(f"| {name} | {bits} | {lm:.4f} | {cal:.4f} | {100 * (cal / lm - 1):+.1f}% |")
            print(lines[-1], file=sys.stderr, flush=True)
    publish(lines, args.out)


if __name__ == "__main__":
    main()
