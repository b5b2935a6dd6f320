"""Generate with a compressed KV cache in `transformers` and read its memory report.

Run: python examples/generate_with_gearkit.py
"""

from gearkit.integrations.hf import GearCache
from gearkit.models import load_default_model

model, tokenizer = load_default_model()
messages = [{"role": "user", "content": "Explain in a few sentences how a lighthouse works."}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)

for name in ("fp16", "sink-3", "kivi-2"):
    cache = GearCache(name, model.config)
    out = model.generate(**inputs, max_new_tokens=120, do_sample=False, cache=cache)
    report = cache.memory_report()
    print(f"--- {name}: {report.bits_per_element:.2f} bits/element, {report.compression_ratio:.2f}x smaller than fp16, "
          f"{report.components}")
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
