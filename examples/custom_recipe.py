"""Build a compression recipe from stages, then measure it against `gear-2`: reconstruction error and all-in
bits on synthetic keys/values, and perplexity with a compressed past on one short window of real text.

Run: python examples/custom_recipe.py [--prefix 1024] [--continuation 1024]  (defaults: 128 and 128)
"""

import argparse

import torch

from gearkit import LowRankResidual, Pipeline, Quantizer, Recipe, SparseOutlier, recipes
from gearkit.eval import compare_recipes, format_table, synthetic_kv

parser = argparse.ArgumentParser()
parser.add_argument("--prefix", type=int, default=128, help="tokens prefilled into the cache")
parser.add_argument("--continuation", type=int, default=128, help="tokens scored after the compressed past")
args = parser.parse_args()

# --8<-- [start:pipeline]
# 1. One pipeline on one tensor. Stages run in order, each on what the earlier ones left:
#    2% outliers per token (1 per side of 64 channels) stored exactly, 3-bit per-token groups of 64 channels,
#    then a rank-2 correction of what is left.
values = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # [batch, kv_heads, tokens, head_dim]
pipeline = Pipeline([SparseOutlier(0.02, "token"), Quantizer(3, 64, "token"), LowRankResidual(2)])
c = pipeline.compress(values)
error = ((pipeline.decompress(c) - values).norm() / values.norm()).item()
print(
    f"one chunk: {c.bits_per_element:.3f} bits/element, relative error {error:.4f}, bytes by component {c.components()}"
)
# --8<-- [end:pipeline]

# --8<-- [start:recipe]
# 2. A recipe: a key pipeline, a value pipeline, a streaming buffer and 4 attention-sink tokens kept in fp16.
#    Keys have a few large channels, so they are quantized per channel (groups of 64 tokens).
mine = Recipe(
    "my-3",
    key=Pipeline([SparseOutlier(0.02, "channel"), Quantizer(3, 64, "channel")]),
    value=Pipeline([SparseOutlier(0.02, "token"), Quantizer(3, 64, "token"), LowRankResidual(2)]),
    buffer_size=64,
    sink_tokens=4,
    description="2% outliers + 3-bit groups of 64 (keys per channel, values per token), rank-2 values, 4 sinks",
)
recipes.register(mine, replace=True)  # now every gearkit tool knows "my-3"
# --8<-- [end:recipe]

# --8<-- [start:measure]
# 3. Against gear-2 (and its neighbours) on synthetic tensors shaped like real keys: a few heavy channels.
keys = synthetic_kv((1, 3, 512, 64), heavy_channels=3, seed=0)
values = torch.randn(1, 3, 512, 64, generator=torch.Generator().manual_seed(1))
names = ["gear-2", "sink-3", "my-3"]
rows = [
    {"recipe": r.recipe, "bits/elt": r.bits_per_element, "key rel err": r.key_error, "value rel err": r.value_error}
    for r in compare_recipes(keys, values, names)
]
print("\nsynthetic [1, 3, 512, 64] keys and values, compressed in chunks of each recipe's buffer size:")
print(format_table(rows))

# 4. Perplexity with a compressed past on the real model: one window of held-out text (the IDLE manual).
from gearkit.eval.perplexity import evaluate  # noqa: E402  (imports transformers)
from gearkit.models import DEFAULT_MODEL, load_default_model, load_text  # noqa: E402

model, tokenizer = load_default_model()
results = evaluate(
    model, tokenizer, names, load_text("idle-help"), args.prefix, args.continuation, windows=1, model_name=DEFAULT_MODEL
)
print(
    f"\n{DEFAULT_MODEL}, idle-help, 1 window of {args.prefix} prefilled + {args.continuation} scored tokens, "
    f"uncompressed ppl {results[0].baseline_ppl:.3f}:"
)
print(
    format_table(
        [
            {
                "cache": r.recipe,
                "ppl": r.ppl,
                "ppl change": f"{r.ppl_increase_pct:+.2f}%",
                "bits/elt": r.bits_per_element,
                "ratio": r.compression_ratio,
            }
            for r in results
        ]
    )
)
# --8<-- [end:measure]
