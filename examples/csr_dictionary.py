"""Train a (tiny) NeuralDict dictionary with Lightning, save it, and use it in a CSR cache.

A real dictionary is trained with `gearkit dict train` (minutes); this one is tiny so the script runs in
seconds: 64 atoms, one calibration window of 192 tokens, one epoch.
"""

import tempfile
from pathlib import Path

import torch

from gearkit import DictionarySet, recipes
from gearkit.integrations.hf import make_cache
from gearkit.models import DEFAULT_MODEL, load_default_model, load_text
from gearkit.neuraldict import dictionary_mib, train_dictionaries

model, tokenizer = load_default_model()

# 1. Train: keys (pre-RoPE) and value halves of every layer group, k-means init + NeuralDict on Lightning.
dictionaries, stats = train_dictionaries(
    model,
    tokenizer,
    load_text("pydoc-topics"),
    DEFAULT_MODEL,
    atoms=64,
    sparsity=8,
    group_layers=10,
    vectors=512,
    epochs=1,
    tokens=192,
    windows=1,
    progress=False,
)
print(
    f"trained {len(dictionaries.groups)} groups x (keys, values) of {dictionaries.atoms} atoms in "
    f"{stats['seconds']:.1f} s; held-out relative MSE keys {stats['keys']['mse_trained']:.3f}, "
    f"values {stats['values']['mse_trained']:.3f}; {dictionary_mib(dictionaries):.2f} MiB"
)

# 2. Save and load back (metadata: model, layer groups, s_n, atoms, version); a wrong model is refused.
path = dictionaries.save(Path(tempfile.mkdtemp()) / "tiny.safetensors")
loaded = DictionarySet.load(path, model.config)
print("saved", path.name, loaded.metadata()["key_space"], "keys,", len(loaded.groups), "layer groups")

# 3. A CSR-8 recipe that reads this file (keys 8 atoms, values 4 per half), used as a transformers cache.
recipe = recipes.csr(8, path, name="csr-8-tiny")
cache = make_cache(recipe, model)
ids = tokenizer(load_text("idle-help"), return_tensors="pt")["input_ids"][:, :160]  # 2 chunks of 64 get compressed
with torch.inference_mode():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=8, do_sample=False)
report = cache.memory_report()
print("continuation:", tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).replace("\n", " "))
print(
    f"csr-8-tiny: {report.tokens} tokens, {report.bits_per_element:.2f} bits/elt with the dictionary, "
    f"{report.bits_per_element_excluding('dictionary'):.2f} without; components {sorted(report.components)}"
)
