"""Bit allocation across layers (issue 15, KVTuner style): measure each layer's sensitivity, then spend a budget.

1. Sensitivity (`measure`): for every layer `L`, role (keys, values) and width on the role's ladder, the cache
   codes only layer `L`'s keys (or values) with that width (a `PerLayer` stage; every other layer and the other
   role stay fp16) and the KL divergence of the next-token distribution from the uncompressed model's is
   measured on the scored tokens of the tuning text (`idle-help`), with the perplexity protocol (prefix, then
   64-token steps). KL is paired token by token, so unlike a perplexity difference it is never negative and
   small changes do not drown in noise.
2. Allocation (`allocate`): the widths that minimise the summed KL (the additive model) under a global budget
   of all-in bits per element (codes and scales from the stages' own byte counts, plus the fp16 sink tokens at
   2048 tokens), an exact multiple-choice knapsack over quarter bits.
3. The allocations are written as data (`gearkit/allocations/<model>.json`: each budget's stage per layer and
   role, as `Stage.to_dict()`), which the built-in `gk-*` recipes read; `--check` measures the additive model
   against the KL of a whole allocation.

`heads` measures the sensitivity of each KV head of each layer (one head coded, `PerHead`) for a few widths, and
`allocate --heads FILE ...` then lets a layer take a different width on each head (KVTuner's per-head widths).
`lowrank` compares GEAR's low-rank term first on pre-RoPE keys (then fewer bits) with plain keys, layer by layer.

Run: OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bit_allocation.py measure --text idle-help
     OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bit_allocation.py heads [--role value --widths ... --out ...]
     OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bit_allocation.py allocate --budgets 2.5 3.0 3.5 4.5 [--check] \
         [--heads FILE ... --heads-for BUDGET ...]
     OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bit_allocation.py lowrank --layers 0 3 6 ... 27
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from report import publish  # benchmarks/report.py (run as `python benchmarks/<script>.py`)

from gearkit import (
    Chain,
    CodebookQuantizer,
    FullPrecision,
    HadamardRotation,
    LowRankResidual,
    PerHead,
    PerLayer,
    Pipeline,
    PreRoPE,
    Quantizer,
    Recipe,
    Stage,
)
from gearkit.allocations import allocation_file, allocation_stage
from gearkit.compressors.rope import RoPE
from gearkit.eval.perplexity import cached_logits
from gearkit.integrations.hf import make_cache
from gearkit.models import DEFAULT_MODEL, load_default_model, load_text, token_windows

SINKS, BUFFER, TOKENS = 4, 64, 2048  # the frontier protocol's sink tokens and buffer; bits counted at 2048 tokens
RESULTS = Path("benchmarks/results")
ALLOCATION = allocation_file(DEFAULT_MODEL)

# each role's widths, from the stages frontier_sweep.py found best: keys per-channel groups of 64 tokens (`chB`,
# post-RoPE) or Hadamard + Lloyd-Max with a norm per vector (`had-lmB`); values Hadamard + Lloyd-Max. `/32`:
# groups of 32 tokens (keys) or channels (values), half a step up; 8 bits lets a fragile layer be near fp16.
# The first five key and five value entries were the first ladder (bit_allocation_ladder1.json); `measure`
# re-run after adding entries measures only the new ones.
LADDER = {
    "key": {
        "had-lm2": HadamardRotation(CodebookQuantizer(2)),
        "ch3": Quantizer(3, 64, "channel"),
        "ch4": Quantizer(4, 64, "channel"),
        "ch4/32": Quantizer(4, 32, "channel"),
        "ch8": Quantizer(8, 64, "channel"),
        "ch2": Quantizer(2, 64, "channel"),
        "had-lm3": HadamardRotation(CodebookQuantizer(3)),
        "ch3/32": Quantizer(3, 32, "channel"),
        # GEAR's low-rank term first (rank 1 per 64-token chunk on pre-RoPE keys, fp16 factors), then 2-bit
        # rotated codes of the rest: per layer (`lowrank`) it beat `ch2` and `had-lm3` on some layers
        "pre-lr1+had-lm2": Chain([PreRoPE(LowRankResidual(1)), HadamardRotation(CodebookQuantizer(2))]),
    },
    "value": {
        **{f"had-lm{b}": HadamardRotation(CodebookQuantizer(b)) for b in (1, 2, 3, 4)},
        "had-lm4/32": HadamardRotation(CodebookQuantizer(4, 32)),
        "had-lm2/32": HadamardRotation(CodebookQuantizer(2, 32)),
        "had-lm3/32": HadamardRotation(CodebookQuantizer(3, 32)),
    },
}


# GEAR's low-rank term *first* on pre-RoPE keys (rank r per 64-token chunk, fp16 factors), the rest quantized with
# fewer bits, against the ladder's keys at about the same bytes (`lowrank` subcommand)
LOWRANK = {
    "pre-ch2": [PreRoPE(Quantizer(2, 64, "channel"))],
    "pre-lr1+pre-ch2": [
        PreRoPE(LowRankResidual(1)),
        PreRoPE(Quantizer(2, 64, "channel")),
    ],
    "pre-lr2+pre-ch2": [
        PreRoPE(LowRankResidual(2)),
        PreRoPE(Quantizer(2, 64, "channel")),
    ],
    "pre-lr1+had-lm2": [PreRoPE(LowRankResidual(1)), HadamardRotation(CodebookQuantizer(2))],
    "ch3": [Quantizer(3, 64, "channel")],
}


def stage_bits(stages: Stage | list[Stage], heads: int, head_dim: int) -> float:
    """Stored bits per element of `stages` on one 64-token chunk (their own byte count, not a formula; the bytes do
    not depend on the rotation a pre-RoPE stage undoes)."""
    x = torch.randn(1, heads, BUFFER, head_dim)
    return (
        Pipeline(stages if isinstance(stages, list) else [stages])
        .compress(x, layer=0, positions=torch.zeros(1, dtype=torch.long), rope=RoPE([], head_dim=head_dim))
        .bits_per_element
    )


def only(layer: int, role: str, stages: Stage | list[Stage]) -> Recipe:
    """Layer `layer`'s `role` coded by `stages`, everything else fp16 (other layers' fp16 copy takes the first
    stage's place, and later stages store its near-zero remainder: bytes do not matter here, only the KL)."""
    fp16 = Pipeline([FullPrecision()])
    coded = Pipeline(
        [PerLayer({layer: s}, FullPrecision()) for s in (stages if isinstance(stages, list) else [stages])]
    )
    key, value = (coded, fp16) if role == "key" else (fp16, coded)
    return Recipe(f"L{layer}-{role}", key, value, BUFFER, sink_tokens=SINKS)


def kl_divergence(model, windows, baseline, recipe: Recipe) -> float:
    """Mean KL(baseline || cached) per scored token, over the windows."""
    total = count = 0
    for window, base in zip(windows, baseline):
        logits = torch.cat(
            [lg for lg, _ in cached_logits(model, window, window.numel() - base.shape[0], make_cache(recipe, model))]
        )
        total += F.kl_div(logits.float().log_softmax(-1), base, log_target=True, reduction="sum").item()
        count += base.shape[0]
    return total / count


def tuning_windows(tokenizer, args) -> list:
    """Windows `skip + 1 ...` of `skip + windows` consecutive ones of the tuning text (a later run can add windows
    that `allocate` averages with an earlier file's)."""
    return token_windows(tokenizer, load_text(args.text), args.prefix, args.continuation, args.skip + args.windows)[
        args.skip :
    ]


def weighted(values: list, weights: list[float]):
    """The weighted mean of equally nested lists of floats (one per file), element by element."""
    if isinstance(values[0], list):
        return [weighted(list(v), weights) for v in zip(*values)]
    return sum(v * w for v, w in zip(values, weights))


def average(files: list[Path]) -> dict:
    """Sensitivity files of one protocol measured on different windows, as one: KL averaged weighted by windows
    (every window scores as many tokens), widths measured in every file only."""
    runs = [json.loads(path.read_text()) for path in files]
    first, total = runs[0], sum(r["windows"] for r in runs)
    for path, r in zip(files, runs):
        if any(r.get(k) != first.get(k) for k in ("model", "text", "prefix", "continuation", "role")):
            raise ValueError(f"{path} was measured with another protocol than {files[0]}")
    weights = [r["windows"] / total for r in runs]
    kl = {
        role: {
            n: weighted([r["kl"][role][n] for r in runs], weights)
            for n in first["kl"][role]
            if all(n in r["kl"][role] for r in runs)
        }
        for role in first["kl"]
    }
    return {**first, "windows": total, "kl": kl, "files": [str(f) for f in files]}


@torch.inference_mode()
def baseline_logprobs(model, windows, prefix: int) -> list:
    return [model(w[None]).logits[0, prefix - 1 : -1].float().log_softmax(-1) for w in windows]


def measure(args) -> None:
    model, tokenizer = load_default_model()
    windows = tuning_windows(tokenizer, args)
    baseline = baseline_logprobs(model, windows, args.prefix)
    layers, cfg = model.config.num_hidden_layers, model.config
    out = {
        "model": DEFAULT_MODEL,
        "text": args.text,
        "prefix": args.prefix,
        "continuation": args.continuation,
        "windows": len(windows),
        "skip": args.skip,
        "sink_tokens": SINKS,
        "buffer": BUFFER,
        "command": " ".join(sys.argv),
        "ladder": {role: {name: s.to_dict() for name, s in ladder.items()} for role, ladder in LADDER.items()},
        "bits": {
            role: {name: stage_bits(s, cfg.num_key_value_heads, cfg.head_dim) for name, s in ladder.items()}
            for role, ladder in LADDER.items()
        },
        "kl": {role: {name: [None] * layers for name in ladder} for role, ladder in LADDER.items()},
    }
    if args.out.is_file():  # a ladder extended since: measure only the new entries
        old = json.loads(args.out.read_text())
        for role in out["kl"]:
            out["kl"][role].update({n: v for n, v in old["kl"][role].items() if n in out["kl"][role]})
        out["command"] = old["command"] + "; then " + out["command"]
    start = time.time()
    for layer in range(layers):
        for role, ladder in LADDER.items():
            for name, stage in ladder.items():
                if out["kl"][role][name][layer] is None:
                    out["kl"][role][name][layer] = kl_divergence(model, windows, baseline, only(layer, role, stage))
            print(
                f"layer {layer} {role}: " + ", ".join(f"{n} {out['kl'][role][n][layer]:.4f}" for n in ladder),
                f"({time.time() - start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        args.out.write_text(json.dumps(out, indent=1))  # as it goes: a long run can be read part-way


def measure_heads(args) -> None:
    """Per-KV-head sensitivity: as `measure`, but one head of one layer coded (`PerHead`, other heads fp16)."""
    model, tokenizer = load_default_model()
    windows = tuning_windows(tokenizer, args)
    baseline = baseline_logprobs(model, windows, args.prefix)
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    ladder = {name: LADDER[args.role][name] for name in args.widths}
    args.out = args.out or RESULTS / f"bit_allocation_heads_{args.role}s_{args.text}.json"
    out = {
        "model": DEFAULT_MODEL,
        "text": args.text,
        "prefix": args.prefix,
        "continuation": args.continuation,
        "windows": len(windows),
        "skip": args.skip,
        "sink_tokens": SINKS,
        "buffer": BUFFER,
        "command": " ".join(sys.argv),
        "role": args.role,
        "heads": heads,
        "kl": {args.role: {name: [] for name in ladder}},
    }
    if args.out.is_file():  # resume a stopped run: keep its layers of these widths
        old = json.loads(args.out.read_text())
        kept = min(len(old["kl"][args.role].get(name, [])) for name in ladder)
        out["kl"][args.role] = {name: old["kl"][args.role][name][:kept] for name in ladder}
        out["command"] = old["command"] + "; then " + out["command"]
    start = time.time()
    for layer in range(len(next(iter(out["kl"][args.role].values()))), layers):
        for name, stage in ladder.items():
            out["kl"][args.role][name].append(
                [
                    kl_divergence(
                        model,
                        windows,
                        baseline,
                        only(
                            layer, args.role, PerHead([stage if h == head else FullPrecision() for h in range(heads)])
                        ),
                    )
                    for head in range(heads)
                ]
            )
        print(
            f"layer {layer} {args.role}: "
            + ", ".join(f"{n} " + "/".join(f"{1e4 * v:.1f}" for v in out["kl"][args.role][n][layer]) for n in ladder),
            f"({time.time() - start:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        args.out.write_text(json.dumps(out, indent=1))  # as it goes: a long run can be read part-way


def head_kl(heads: dict | None, role: str, layer: int) -> dict:
    """Per-head sensitivities of one role (name -> [layer][head] KL), or {} where the layer was not measured."""
    per_head = heads.get(role, {}) if heads else {}
    return per_head if per_head and layer < len(next(iter(per_head.values()))) else {}


def options(kl: dict, bits: dict, role: str, layer: int, heads: dict | None) -> list[tuple[float, float, str | list]]:
    """(stored bits, predicted KL, width) of every choice for one layer's role: a ladder entry for the whole layer,
    or, where per-head sensitivities were measured (`heads`: name -> [layer][head] KL), a ladder entry per KV head
    from those widths (KL summed over the heads; a layer with one width on every head is that width)."""
    per_head = head_kl(heads, role, layer)
    out = [(bits[role][n], kl[role][n][layer], n) for n in kl[role] if n not in per_head]
    if per_head:
        count = len(next(iter(per_head.values()))[layer])
        for combo in itertools.product(per_head, repeat=count):
            width = combo[0] if len(set(combo)) == 1 else list(combo)
            out.append(
                (
                    sum(bits[role][n] for n in combo) / count,
                    sum(per_head[n][layer][h] for h, n in enumerate(combo)),
                    width,
                )
            )
    return out


def allocate_widths(
    kl: dict, bits: dict, budget: float, layers: int, heads: dict | None = None
) -> dict[str, list[str | list[str]]]:
    """The width per (role, layer) minimising the summed KL with mean stored bits <= the budget's share.

    All-in bits at `TOKENS` tokens are the mean stage bits plus the sink tokens' fp16 copy. Widths cost whole
    quarter bits per head, so with `heads` (per-KV-head KL, see `options`) a layer's cost is counted in twelfths
    (a quarter bit on one of 3 heads); a few bytes more (a stored position) count at the end, where the exact
    bits of the result must be within the budget.
    """
    items = [(role, layer) for role in kl for layer in range(layers)]
    limit = (budget - 16 * SINKS / TOKENS) * len(items)  # summed stored bits of all items
    unit = 12  # cost units per bit
    capacity = int(unit * limit + 1e-9)
    best = {0: (0.0, 0.0, [])}  # spent units -> (summed KL, exact summed bits, choices)
    for role, layer in items:
        nxt = {}
        choices = [(round(unit * b), b, k, w) for b, k, w in options(kl, bits, role, layer, heads)]
        for spent, (total, exact, choice) in best.items():
            for q, b, k, width in choices:
                key, value = spent + q, total + k
                if key <= capacity and (key not in nxt or value < nxt[key][0]):
                    nxt[key] = (value, exact + b, [*choice, width])
        best = nxt
    fits = [v for v in best.values() if v[1] <= limit + 1e-9]
    if not fits:
        raise ValueError(f"budget {budget} is below the cheapest widths")
    _, _, choice = min(fits, key=lambda v: v[0])
    return {role: choice[i * layers : (i + 1) * layers] for i, role in enumerate(kl)}


def width_bits(bits: dict, role: str, width: str | list[str]) -> float:
    return sum(bits[role][n] for n in width) / len(width) if isinstance(width, list) else bits[role][width]


def width_kl(kl: dict, heads: dict | None, role: str, layer: int, width: str | list[str]) -> float:
    """The predicted KL of one layer's width, as `options` counts it."""
    per_head = head_kl(heads, role, layer)
    if isinstance(width, list):
        return sum(per_head[n][layer][h] for h, n in enumerate(width))
    return sum(per_head[width][layer]) if width in per_head else kl[role][width][layer]


def recipe(allocation: dict, ladder: dict, name: str) -> Recipe:
    """A `PerLayer` recipe from an allocation (ladder names per role and layer, or per KV head)."""
    pipe = {role: Pipeline([allocation_stage(widths, ladder[role])]) for role, widths in allocation.items()}
    return Recipe(name, pipe["key"], pipe["value"], BUFFER, sink_tokens=SINKS)


def allocate(args) -> None:
    data = average(args.sensitivity)
    for role in data["kl"]:  # widths left out of the ladder (an ablation)
        data["kl"][role] = {n: v for n, v in data["kl"][role].items() if n not in args.without}
    layers = len(next(iter(data["kl"]["key"].values())))
    out = {
        "model": data["model"],
        "tuned_on": data["text"],
        "sink_tokens": SINKS,
        "buffer": BUFFER,
        "source": "benchmarks/bit_allocation.py allocate " + " ".join(sys.argv[2:]),
        "ladder": data["ladder"],
        "allocations": {},
    }
    by_role = {}  # per-head files by role, each role's averaged over its files' windows
    for path in args.heads:
        by_role.setdefault(json.loads(path.read_text())["role"], []).append(path)
    heads = {role: average(paths)["kl"][role] for role, paths in by_role.items()} or None
    if heads:
        out["heads"] = [str(path) for path in args.heads]
    for budget in args.budgets:
        split = heads if args.heads_for is None or budget in args.heads_for else None  # per-head widths here?
        widths = allocate_widths(data["kl"], data["bits"], budget, layers, split)
        predicted = sum(width_kl(data["kl"], split, r, i, w) for r, ws in widths.items() for i, w in enumerate(ws))
        mean = sum(width_bits(data["bits"], r, w) for r, ws in widths.items() for w in ws) / (2 * layers)
        out["allocations"][str(budget)] = {
            **widths,
            "predicted_kl": predicted,
            "all_in_bits": mean + 16 * SINKS / TOKENS,
        }
        print(f"budget {budget}: {mean + 16 * SINKS / TOKENS:.3f} bits, predicted KL {predicted:.4f}", file=sys.stderr)
        for role, ws in widths.items():
            print(f"  {role}: {' '.join(w if isinstance(w, str) else ','.join(w) for w in ws)}", file=sys.stderr)
    if args.check:  # the additive model against the KL of whole allocations, on the sensitivity protocol
        model, tokenizer = load_default_model()
        # the first windows of the text, as many as the files measured (they add up when each run skips the earlier's)
        windows = token_windows(
            tokenizer, load_text(data["text"]), data["prefix"], data["continuation"], data["windows"]
        )
        baseline = baseline_logprobs(model, windows, data["prefix"])
        for budget, a in out["allocations"].items():
            widths = {r: a[r] for r in ("key", "value")}
            a["measured_kl"] = kl_divergence(model, windows, baseline, recipe(widths, data["ladder"], budget))
            print(
                f"budget {budget}: predicted KL {a['predicted_kl']:.4f}, measured {a['measured_kl']:.4f}",
                file=sys.stderr,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


def lowrank(args) -> None:
    """Low-rank-first keys against plain quantized keys, layer by layer, on the sensitivity protocol."""
    model, tokenizer = load_default_model()
    windows = token_windows(tokenizer, load_text(args.text), args.prefix, args.continuation, args.windows)
    baseline = baseline_logprobs(model, windows, args.prefix)
    cfg = model.config
    bits = {n: stage_bits(s, cfg.num_key_value_heads, cfg.head_dim) for n, s in LOWRANK.items()}
    lines = [
        f"{DEFAULT_MODEL}, text {args.text}, {len(windows)} window(s) of {args.prefix}+{args.continuation} tokens: "
        "KL from the uncompressed model (per scored token, x1e-4) when only one layer's keys are coded so; "
        "values and other layers fp16.",
        "",
        "| layer | " + " | ".join(f"`{n}` ({bits[n]:.2f} b)" for n in LOWRANK) + " |",
        "|---" * (len(LOWRANK) + 1) + "|",
    ]
    for layer in args.layers:
        kl = [kl_divergence(model, windows, baseline, only(layer, "key", s)) for s in LOWRANK.values()]
        lines.append(f"| {layer} | " + " | ".join(f"{1e4 * v:.2f}" for v in kl) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    publish(lines, str(args.out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="per-layer sensitivity (KL) of every width on the ladder")
    m.add_argument("--text", default="idle-help")
    m.add_argument("--prefix", type=int, default=512)
    m.add_argument("--continuation", type=int, default=128)
    m.add_argument("--windows", type=int, default=1)
    m.add_argument("--skip", type=int, default=0, help="windows of the text to skip (measured by an earlier run)")
    m.add_argument("--out", type=Path, default=RESULTS / "bit_allocation_sensitivity_idle-help.json")
    a = sub.add_parser("allocate", help="widths per layer and role under each budget")
    a.add_argument(
        "--sensitivity",
        type=Path,
        nargs="+",
        default=[RESULTS / "bit_allocation_sensitivity_idle-help.json"],
        help="sensitivity files (`measure`) of different windows of one text: averaged",
    )
    a.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.5])
    a.add_argument("--check", action="store_true", help="measure each allocation's KL against the prediction")
    a.add_argument(
        "--heads",
        type=Path,
        nargs="*",
        default=[],
        help="per-KV-head sensitivities (`heads`) to split by; files of one role are averaged",
    )
    a.add_argument("--without", nargs="*", default=[], help="ladder widths to leave out")
    a.add_argument("--heads-for", type=float, nargs="*", default=None, help="budgets that use --heads (default: all)")
    a.add_argument("--out", type=Path, default=ALLOCATION)
    h = sub.add_parser("heads", help="per-KV-head sensitivity (KL) of some widths of one role")
    h.add_argument("--text", default="idle-help")
    h.add_argument("--prefix", type=int, default=512)
    h.add_argument("--continuation", type=int, default=128)
    h.add_argument("--windows", type=int, default=1)
    h.add_argument("--skip", type=int, default=0, help="windows of the text to skip (measured by an earlier run)")
    h.add_argument("--role", choices=["key", "value"], default="key")
    h.add_argument("--widths", nargs="+", default=["ch2", "ch3", "ch4"])
    h.add_argument("--out", type=Path, default=None, help="default: results/bit_allocation_heads_<role>s_<text>.json")
    lr = sub.add_parser("lowrank", help="low-rank-first keys against quantized keys, per layer")
    lr.add_argument("--text", default="idle-help")
    lr.add_argument("--prefix", type=int, default=512)
    lr.add_argument("--continuation", type=int, default=128)
    lr.add_argument("--windows", type=int, default=1)
    lr.add_argument("--layers", type=int, nargs="+", default=list(range(0, 30, 3)))
    lr.add_argument("--out", type=Path, default=RESULTS / "bit_allocation_lowrank_idle-help.md")
    args = ap.parse_args()
    {"measure": measure, "heads": measure_heads, "allocate": allocate, "lowrank": lowrank}[args.command](args)


if __name__ == "__main__":
    main()
