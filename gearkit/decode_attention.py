"""Decode attention over a cache's compressed chunks, read from their stored form.

The route only goes down: a cache step (`gearkit.cache.StepView.attend`) calls `attend` here, which chooses the
path once per call and then calls the pipelines directly:

- `"triton"`: the fused Triton kernel (`gearkit.kernels.attention`) where both pipelines are in GEAR's fused layout
  (uniform or codebook codes; also a layer's stage of a `PerLayer`, and inside a rotation: the query is turned
  before the kernel and the output back after it, `Pipeline.kernel_read`) and the kernel covers it (a GPU, or the
  `"triton"` backend; not for soft-capped scores);
- `"stored"`: torch, reading each block through `key_pipeline.scores` and `value_pipeline.weighted` (stages multiply
  by their packed codes, factors and rotations; `gearkit.kernels.products` runs the compiled CPU kernel where it
  can), with an online softmax over the exact tokens and then block by block;
- `"reference"`: under the `"torch"` backend, each block decompressed and attended to densely (the oracle).

No sequence-major copy of the past is made on the first two paths: what a call creates is bounded by one block.
Attention soft-capping (Gemma 2: scores become `cap * tanh(scores / cap)` before the mask) applies on every path
that runs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor

from gearkit.compressors.pipeline import Pipeline
from gearkit.kernels.attention import triton_block_attention
from gearkit.kernels.backend import get_backend, may_use_triton, use_triton
from gearkit.kernels.reference import attention_reference, merge_attention, soft_cap
from gearkit.parts import CompressedTensor

STORAGE_QUERIES = 16  # on CUDA, steps with at most this many new tokens read the storage (the kernel's query rows)

Blocks = Sequence[tuple[CompressedTensor, CompressedTensor]]  # (keys, values) blocks, each `[(chunks batch), ...]`
# Tokens held in full precision: keys and values `[batch, kv_heads, F, head_dim]` and their bias `[batch, queries, F]`.
Exact = tuple[Tensor, Tensor, Tensor]


def reads_storage(device: torch.device, new_tokens: int) -> bool:
    """Whether a step of `new_tokens` tokens on `device` attends by reading the storage (decode), rather than over
    the decompressed past (a long prefill on a GPU, where dense attention is faster)."""
    return device.type != "cuda" or new_tokens <= STORAGE_QUERIES


def block_bias(bias: Tensor, start: int, stop: int) -> Tensor:
    """Positions `start:stop` of a bias over the chunks as an additive float `[batch, stop - start]`: `bias` is
    additive already, or a boolean visibility (True = attend), which costs a byte per position instead of four
    until one block of it is needed."""
    part = bias[:, start:stop]
    return torch.where(part, 0.0, float("-inf")) if part.dtype == torch.bool else part.float()


def path(
    device: torch.device,
    key_pipeline: Pipeline,
    value_pipeline: Pipeline,
    keys: CompressedTensor,
    values: CompressedTensor,
    softcap: float | None = None,
) -> str:
    """Which path reads blocks like `keys`/`values` on `device`: `"triton"`, `"stored"` or `"reference"`.

    Raises:
        RuntimeError: under the `"triton"` backend when the kernel cannot read these pipelines or soft-cap scores.
    """
    if may_use_triton(device):
        (key_read, key_reason), (value_read, value_reason) = (
            key_pipeline.kernel_read(keys),
            value_pipeline.kernel_read(values),
        )
        capped = None if softcap is None else "the Triton attention kernel does not soft-cap scores"
        reason = capped or key_reason or value_reason or key_read.unsupported(keys) or value_read.unsupported(values)
        if use_triton(device, reason):
            return "triton"
    return "reference" if get_backend() == "torch" else "stored"


def attend(
    query: Tensor,
    key_pipeline: Pipeline,
    value_pipeline: Pipeline,
    blocks: Blocks,
    bias: Tensor,
    scaling: float,
    exact: Exact | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of a few queries over stored chunks (and optional exact tokens, in the same softmax).

    Args:
        query: `[batch, heads, queries, head_dim]`; query head `j` reads KV head `j // (heads / kv_heads)`.
        key_pipeline: the pipeline that compressed the keys.
        value_pipeline: the pipeline that compressed the values.
        blocks: consecutive `(keys, values)` blocks of chunks, each `[(chunks batch), kv_heads, T, head_dim]`.
        bias: `[batch, total chunks * T]`, the same for every query: additive float (`-inf` masks a position) or
            boolean (True = attend; see `block_bias`).
        scaling: softmax scale.
        exact: optional full-precision keys and values `[batch, kv_heads, F, head_dim]` and their bias
            `[batch, queries, F]`.
        softcap: the scores' soft cap (`cap * tanh(scores / cap)`, before the bias), or None.

    Returns:
        `(out, lse)`: float32 `[batch, heads, queries, head_dim]` (zeros for a query that sees nothing) and
        `[batch, heads, queries]` (`-inf` then).
    """
    keys, values = blocks[0]
    chosen = path(query.device, key_pipeline, value_pipeline, keys, values, softcap)
    if chosen == "stored":
        return _online(query, key_pipeline, value_pipeline, blocks, bias, scaling, exact, softcap)
    segments, first, t = [], 0, keys.shape[2]
    if exact is not None:
        segments.append(attention_reference(query, *exact, scaling, softcap))
    if chosen == "triton":  # the same reads for every block: one layer's chunks of one shape
        key_read, value_read = key_pipeline.kernel_read(keys)[0], value_pipeline.kernel_read(values)[0]
        turned = key_read.turn_query(query)
    for keys, values in blocks:
        n = keys.shape[0] // query.shape[0]
        part = block_bias(bias, first * t, (first + n) * t)
        if chosen == "triton":
            out, lse = triton_block_attention(
                turned,
                key_read.tensors(keys),
                key_read.layout,
                value_read.tensors(values),
                value_read.layout,
                n,
                part,
                scaling,
            )
            segments.append((value_read.turn_back(out), lse))
        else:
            k, v = (
                rearrange(pipeline.decompress(c).float(), "(n b) h c d -> b h (n c) d", n=n)
                for pipeline, c in ((key_pipeline, keys), (value_pipeline, values))
            )
            segments.append(attention_reference(query, k, v, part[:, None], scaling, softcap))
        first += n
    if len(segments) == 1:
        return segments[0]
    return merge_attention(segments), torch.stack([lse for _, lse in segments]).logsumexp(0)


def _online(
    query: Tensor,
    key_pipeline: Pipeline,
    value_pipeline: Pipeline,
    blocks: Blocks,
    bias: Tensor,
    scaling: float,
    exact: Exact | None,
    softcap: float | None,
) -> tuple[Tensor, Tensor]:
    """The `"stored"` path: an online softmax over the exact tokens, then block by block (arguments as `attend`)."""
    b, hq, nq, d = query.shape
    heads, t = blocks[0][0].shape[1], blocks[0][0].shape[2]
    rows = hq // heads * nq
    q = (query.float() * scaling).reshape(1, b, heads, rows, d)
    # the softmax's state per query row: reference (the running max, 0 while nothing is seen), sum, output
    if exact is None:
        top = total = q.new_zeros(b, heads, rows)
        out = q.new_zeros(b, heads, rows, d)
    else:
        keys, values, exact_bias = exact
        exact_bias = exact_bias.float()[:, None, None].expand(b, 1, hq // heads, nq, -1).reshape(b, 1, rows, -1)
        scores = soft_cap(q[0] @ keys.float().mT, softcap) + exact_bias  # [batch, heads, rows, F]
        top = scores.amax(-1)
        top = torch.where(torch.isfinite(top), top, 0.0)
        p = torch.exp(scores - top[..., None])
        total, out = p.sum(-1), p @ values.float()
    first = 0
    for keys, values in blocks:
        n = keys.shape[0] // b
        part = block_bias(bias, first * t, (first + n) * t).reshape(b, n, t).transpose(0, 1)[:, :, None, None]
        scores = soft_cap(key_pipeline.scores(keys, q, n), softcap) + part  # [chunks, batch, heads, rows, T]
        first += n
        seen = scores.amax((0, -1))
        new = torch.where(total > 0, torch.maximum(top, seen), torch.where(torch.isfinite(seen), seen, 0.0))
        rescale = torch.where(total > 0, torch.exp(top - new), 0.0)  # what was summed so far, at the new reference
        p = torch.exp(scores - new[..., None])
        total = total * rescale + p.sum((0, -1))
        out = out * rescale[..., None] + value_pipeline.weighted(values, p)
        top = new
    seen = total > 0
    out = out / torch.where(seen, total, 1.0)[..., None]
    lse = torch.where(seen, top + total.log(), float("-inf"))
    return out.reshape(b, hq, nq, d), lse.reshape(b, hq, nq)
