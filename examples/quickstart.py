"""Compress a synthetic key/value tensor with several recipes and print error and bytes.

Run: python examples/quickstart.py
"""

import torch

from gearkit.eval import compare_recipes, format_table, synthetic_kv

keys = synthetic_kv((1, 3, 512, 64), heavy_channels=3, seed=0)  # [batch, kv_heads, tokens, head_dim]
values = torch.randn(1, 3, 512, 64, generator=torch.Generator().manual_seed(1))

rows = [
    {
        "recipe": r.recipe,
        "bits/elt": r.bits_per_element,
        "ratio": r.compression_ratio,
        "key rel err": r.key_error,
        "value rel err": r.value_error,
    }
    for r in compare_recipes(
        keys, values, ["fp16", "uniform-4", "kivi-4", "gear-4", "uniform-2", "kivi-2", "gear-2", "gear-l-2"]
    )
]
print(format_table(rows))
