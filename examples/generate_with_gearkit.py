"""Generate with a compressed KV cache in `transformers`: greedy, sampling, beam search and a left-padded batch,
each with a fresh `GearCache`, and read the cache's memory report.

Run: python examples/generate_with_gearkit.py [--max-new-tokens 32]
"""

import argparse

import torch

from gearkit.integrations.hf import GearCache, make_cache
from gearkit.models import load_default_model, pad_token_id

parser = argparse.ArgumentParser()
parser.add_argument("--max-new-tokens", type=int, default=32)
args = parser.parse_args()
new = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)  # long enough to compress a chunk

# --8<-- [start:setup]
model, tokenizer = load_default_model()  # SmolLM2-135M-Instruct, converted once and cached
pad = pad_token_id(tokenizer)


def chat(*prompts: str) -> dict:
    """Token ids and attention mask of the prompts as user messages, left-padded to one length."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    tokenizer.padding_side = "left"  # decoder-only models continue from the right end
    return tokenizer(texts, return_tensors="pt", padding=True)


# --8<-- [end:setup]


def show(label: str, cache: GearCache, out: torch.Tensor, inputs: dict) -> None:
    report = cache.memory_report()
    print(
        f"--- {label}: {report.bits_per_element:.2f} bits/element, {report.compression_ratio:.2f}x smaller than fp16, "
        f"{report.nbytes} bytes {report.components}"
    )
    for row in out[:, inputs["input_ids"].shape[1] :]:
        print("   ", tokenizer.decode(row, skip_special_tokens=True).strip().replace("\n", " "))


inputs = chat("Explain in a few sentences how a lighthouse works.")

# --8<-- [start:modes]
# Greedy: the uncompressed fp16 cache and gearkit's sink-3 (3-bit codes, 4 fp16 attention-sink tokens).
for name in ("fp16", "sink-3"):
    cache = make_cache(name, model)
    out = model.generate(**inputs, do_sample=False, cache=cache, pad_token_id=pad, **new)
    show(f"greedy, {name}", cache, out, inputs)

# Sampling: seed torch's generator for a repeatable draw.
torch.manual_seed(0)
cache = make_cache("sink-3", model)
out = model.generate(**inputs, do_sample=True, temperature=0.7, top_k=50, cache=cache, pad_token_id=pad, **new)
show("sampling (temperature 0.7, top-k 50), sink-3", cache, out, inputs)

# Beam search: the cache holds num_beams rows; transformers reorders them through the cache's reorder_cache.
cache = make_cache("sink-3", model)
out = model.generate(**inputs, do_sample=False, num_beams=2, cache=cache, pad_token_id=pad, **new)
show("beam search (2 beams), sink-3", cache, out, inputs)

# A batch of prompts of different lengths, left-padded; the attention mask keeps padding out of attention.
batch = chat("Name a colour.", "Explain in a few sentences how a lighthouse works.")
cache = make_cache("sink-3", model)
out = model.generate(**batch, do_sample=False, cache=cache, pad_token_id=pad, **new)
show("batch of 2 with left padding, sink-3", cache, out, batch)
# --8<-- [end:modes]
