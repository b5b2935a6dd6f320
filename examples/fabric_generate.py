"""Your own inference loop with Lightning Fabric: shard prompts over processes, generate greedily with a
compressed KV cache, gather and merge the rows on rank 0.

Run: python examples/fabric_generate.py [--devices 2]
"""

import argparse
import json

import torch
import torch.distributed as dist
from lightning.fabric import Fabric

from gearkit.eval.runner import GenerationTask, PromptBatches, merge_rows

PROMPTS = [
    "In two sentences: the lighthouse keeper climbed the spiral stairs at dusk, trimmed the wick, polished the lens "
    "and watched the beam sweep the dark water until dawn. What did he do all night?",  # fills a 64-token chunk
    "What is the capital of France?",
    "Give one word that rhymes with cat.",
]

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--recipe", default="sink-3")
args = parser.parse_args()

# Check everything before Fabric starts other processes (each process runs this script and loads the model).
batches = PromptBatches(PROMPTS, batch_size=2)
module = GenerationTask(args.recipe, max_new_tokens=16)  # unknown recipe: ValueError here
module.check(batches.items)  # loads the default model; refuses prompts longer than its context

fabric = Fabric(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto")
fabric.launch()
module = fabric.to_device(module)
loader = fabric.setup_dataloaders(batches.loader())  # a DistributedSampler: may repeat a batch to even shards

rows = []
with torch.inference_mode():
    for batch in loader:
        result = module.predict_step(batch)
        rows += result.rows
        report = result.stats[args.recipe].report
        print(
            f"[rank {fabric.global_rank}] batch {result.batch}: {report.nbytes} KV bytes, "
            f"{report.bits_per_element:.2f} bits/element, {report.compression_ratio:.2f}x smaller than fp16"
        )

if fabric.world_size > 1:
    gathered = [None] * fabric.world_size
    dist.all_gather_object(gathered, rows)  # Python objects over gloo / nccl
    rows = [row for part in gathered for row in part]
if fabric.global_rank == 0:
    for row in merge_rows(rows):  # repeated rows dropped, prompt order restored
        print(json.dumps({"index": row["index"], "recipe": row["recipe"], "text": row["text"]}))
