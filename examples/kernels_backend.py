"""Kernel backends and `torch.compile` on a CPU: which implementation runs, Triton's interpreter when
`TRITON_INTERPRET=1`, and a compiled pipeline (fullgraph) against eager.

Run: python examples/kernels_backend.py                      # reference backend, compiled vs eager
     TRITON_INTERPRET=1 python examples/kernels_backend.py   # also the Triton kernels, interpreted on the CPU
"""

import os
import time

import torch

from gearkit import recipes
from gearkit.eval import synthetic_kv
from gearkit.kernels.backend import get_backend, use_backend

keys = synthetic_kv((1, 2, 128, 64), heavy_channels=2, seed=0)  # [batch, kv_heads, tokens, head_dim]
pipeline = recipes.get("gear-2").key  # [SparseOutlier, Quantizer(2, 64, "channel"), LowRankResidual(2)]


def same_bytes(a, b) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# 1. The backend in force: "auto" unless set in code or by $GEARKIT_BACKEND. On a CPU tensor "auto" runs the
#    pure-torch reference; Triton runs on CUDA tensors (or here, interpreted, when asked for explicitly).
print(f"backend: {get_backend()}")
with use_backend("torch"):
    reference = pipeline.compress(keys)
print(f"reference: {reference.bits_per_element:.3f} bits/element, {reference.components()}")

with use_backend("triton"):
    try:
        interpreted = pipeline.compress(keys)
    except RuntimeError as e:  # "triton" never falls back silently
        print(f"triton on this CPU without TRITON_INTERPRET=1: {type(e).__name__}: {e}")
    else:
        restored = pipeline.decompress(interpreted)
        print(
            f"triton (interpreter, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}): stored bytes identical "
            f"to the reference: {same_bytes(reference, interpreted)}; reconstruction max |diff| vs reference "
            f"{(restored - pipeline.decompress(reference)).abs().max().item():.2e}"
        )

# 2. torch.compile: the stages are torch.library custom ops with fake implementations, so the whole compress
#    path compiles as one graph (fullgraph=True raises on any graph break) and stores the same bytes as eager.
with use_backend("torch"):
    compiled = torch.compile(pipeline.compress, fullgraph=True)
    start = time.perf_counter()
    first = compiled(keys)
    compile_s = time.perf_counter() - start
    timings = {}
    for label, fn in (("eager", pipeline.compress), ("compiled", compiled)):
        start = time.perf_counter()
        for _ in range(20):
            fn(keys)
        timings[label] = (time.perf_counter() - start) / 20 * 1e3
print(
    f"compiled (fullgraph): first call {compile_s:.1f} s including compilation; stored bytes identical to eager: "
    f"{same_bytes(reference, first)}"
)
print(f"per call on {tuple(keys.shape)}: eager {timings['eager']:.2f} ms, compiled {timings['compiled']:.2f} ms")
