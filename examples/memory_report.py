"""Read a compressed cache's memory report: bytes by component, all-in bits per element, and how the numbers
move as the streaming buffer fills and is compressed. A tiny random Llama is enough: bytes do not depend on
the weights.

Run: python examples/memory_report.py
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gearkit.accounting import tensor_nbytes
from gearkit.integrations.hf import make_cache

torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=97,
    hidden_size=256,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=1,
)
model = LlamaForCausalLM(config).eval()  # head_dim 64, 2 KV heads, 2 layers


def bits(report) -> str:
    """Each component in bits per element, so they add up to the all-in figure."""
    return ", ".join(f"{k} {v:.2f}" for k, v in report.component_bits().items())


ids = torch.randint(2, 97, (1, 260), generator=torch.Generator().manual_seed(0))
for name in ("fp16", "kivi-2", "gear-2", "sink-3"):
    cache = make_cache(name, model)
    print(f"--- {name}: {cache.recipe.description}")
    with torch.no_grad():
        model(ids[:, :250], cache=cache, use_cache=True)  # prefill 250 tokens
        for step in [250, 255, 256, 260]:  # then feed tokens one at a time, reporting at a few lengths
            while cache.get_seq_length() < step:
                t = cache.get_seq_length()
                model(ids[:, t : t + 1], cache=cache, use_cache=True)
            r = cache.memory_report()
            print(
                f"{r.tokens:4d} tokens: {r.nbytes:7d} bytes = {r.bits_per_element:5.2f} bits/element "
                f"({r.compression_ratio:.2f}x smaller than fp16 {r.fp16_nbytes} bytes): {bits(r)}"
            )
    # The report is the storage of the tensors the cache holds, nothing estimated:
    held = sum(tensor_nbytes(t) for t in cache.held_tensors())
    print(f"bytes of the tensors held: {held} (report: {r.nbytes})")
    # Per layer: cache.layers[i].memory_report(); the cache's report is their sum.
    print("layer 0:", cache.layers[0].memory_report().nbytes, "bytes")
