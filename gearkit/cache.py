"""The framework-free chunk store: one layer's compressed KV cache, without any model framework.

A `ChunkStore` holds a recipe's compressed chunks plus a small full-precision buffer of the newest tokens. New
tokens enter the buffer; when it holds `recipe.buffer_size` tokens they are compressed as one chunk and
appended to the compressed storage, where they stay as compressed bytes and are never re-compressed.
Attention of the current step sees the compressed past, the buffer and the new tokens (the buffer is
compressed after the step, so a token never sees a compressed copy of the step it belongs to).

A recipe may keep the first `sink_tokens` tokens of each sequence (attention sinks) as an exact copy: the
chunk that holds them is compressed with those positions excluded (they do not widen any quantization
range), and reads take them from the copy. The chunk grid is unchanged.

Recipes whose stages need token saliency (ZipCache) add a `SaliencyScores` component: the buffered tokens'
running probe attention, fed by `ChunkStore.observe_queries`; their chunks are compressed only then.

Held tensors are never written in place, so a `StepView` (what one step attends to) stays valid after the
store moves on. `gearkit.integrations.hf.GearLayer` adapts a store to `transformers`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor

from gearkit.accounting import MemoryReport, add_counts, tensor_nbytes
from gearkit.compressors.base import Context
from gearkit.compressors.checks import check_kv, check_storable
from gearkit.compressors.pipeline import Pipeline
from gearkit.compressors.probes import Probes, normalized_saliency, probe_attention
from gearkit.kernels.decode import compressed_attention
from gearkit.kernels.reference import attention_reference
from gearkit.parts import CompressedTensor, cat_batch, select_batch, slice_batch
from gearkit.recipe import Recipe


class ChunkList:
    """One role's compressed chunks, kept as the compressed tensors that produced them (one per compression:
    a prefill's chunks, then each chunk the buffer fills), stacked chunk-major along the batch:
    `[(chunks batch), kv_heads, chunk, head_dim]`.

    Appending adds a reference, so it costs nothing whatever is held: nothing held is copied, re-allocated or
    re-compressed, and no capacity is held beyond the chunks themselves. An object is a snapshot (editing
    returns a new one), so a step's view stays valid. `blocks` cuts the chunks into blocks of at most `per_block`
    chunks for decode attention: views of large groups, short groups joined (a copy of at most one block).

    Args:
        per_block: chunks decode attention reads at once.
        groups: the compressed tensors, in sequence order.
        batch: sequences.
    """

    def __init__(self, per_block: int, groups: tuple[CompressedTensor, ...] = (), batch: int = 0):
        self.per_block, self.groups, self.batch = per_block, groups, batch
        self.chunks = sum(g.shape[0] for g in groups) // batch if batch else 0

    def append(self, new: CompressedTensor, batch: int) -> ChunkList:
        """These chunks plus `new` chunks `[(n batch), kv_heads, chunk, head_dim]` (chunk-major)."""
        if self.chunks and batch != self.batch:
            raise ValueError(f"appending chunks of batch {batch} to storage of batch {self.batch}")
        return ChunkList(self.per_block, (*self.groups, new), batch)

    @functools.cached_property
    def _blocks(self) -> list[tuple[int, CompressedTensor]]:
        out, pending, first, b = [], [], 0, self.batch
        for group in self.groups:
            n = group.shape[0] // b
            if n >= self.per_block:  # a large group: cut it into blocks (views)
                for start in range(0, n, self.per_block):
                    stop = min(n, start + self.per_block)
                    out.append((first + start, slice_batch(group, start * b, stop * b)))
            else:
                pending.append((first, group))
            if pending and (n >= self.per_block or sum(g.shape[0] for _, g in pending) // b >= self.per_block):
                out.append((pending[0][0], cat_batch([g for _, g in pending])))
                pending = []
            first += n
        if pending:
            out.append((pending[0][0], cat_batch([g for _, g in pending])))
        return sorted(out, key=lambda block: block[0])

    def blocks(self) -> list[tuple[int, CompressedTensor]]:
        """`(first chunk index, chunks [(n batch), kv_heads, chunk, head_dim])` in sequence order, `n <= per_block`
        except for joined short groups (fewer than `2 * per_block`)."""
        return self._blocks

    def joined(self) -> CompressedTensor | None:
        """All chunks as one compressed tensor (a copy; for inspection)."""
        return cat_batch(list(self.groups)) if self.groups else None

    def select(self, index: Tensor) -> ChunkList:
        """Keep batch entries `index` (reorder, repeat, drop) of every chunk."""
        groups = []
        for group in self.groups:
            n = group.shape[0] // self.batch
            rows = (torch.arange(n, device=index.device)[:, None] * self.batch + index).flatten()
            groups.append(select_batch(group, rows))
        return ChunkList(self.per_block, tuple(groups), index.numel())

    def truncate(self, chunks: int) -> ChunkList:
        """The first `chunks` chunks (the group holding the boundary is kept as a view of its first chunks)."""
        kept, covered = [], 0
        for group in self.groups:
            n = group.shape[0] // self.batch
            if covered + n > chunks:
                if chunks > covered:
                    rows = torch.arange((chunks - covered) * self.batch)
                    kept.append(select_batch(group, rows))  # a copy: the removed chunks' bytes are let go
                break
            kept.append(group)
            covered += n
        return ChunkList(self.per_block, tuple(kept), self.batch)

    def tensors(self) -> list[Tensor]:
        """Every tensor held."""
        return [t for group in self.groups for t in group.tensors().values()]

    def components(self) -> dict[str, int]:
        """Bytes held, by component."""
        return add_counts(*(group.components() for group in self.groups))


def chunk_attention(
    query: Tensor,
    key_pipeline: Pipeline,
    value_pipeline: Pipeline,
    blocks: Sequence[tuple[CompressedTensor, CompressedTensor]],
    bias: Tensor,
    scaling: float,
    exact: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of a few queries over stored chunks, read in their stored form: by Triton on a GPU where the
    pipelines' layouts allow (`Pipeline.storage_layout`), else by torch as the pipelines say (`Pipeline.scores`,
    `Pipeline.weighted`); under the torch backend decompressed block by block (the reference).

    Args:
        query: `[batch, heads, queries, head_dim]`.
        key_pipeline: the pipeline that compressed the keys.
        value_pipeline: the pipeline that compressed the values.
        blocks: consecutive `(keys, values)` blocks of chunks, each stacked chunk-major along the batch,
            `[(chunks batch), kv_heads, T, head_dim]`.
        bias: `[batch, total chunks * T]`: additive float (`-inf` masks a position) or boolean (True = attend).
        scaling: softmax scale.
        exact: optional full-precision keys and values `[batch, kv_heads, F, head_dim]` with their bias
            `[batch, queries, F]`, attended to with the chunks.

    Returns:
        `(out, lse)`: float32 `[batch, heads, queries, head_dim]` and `[batch, heads, queries]`.
    """

    def rebuild(keys: CompressedTensor, values: CompressedTensor) -> tuple[Tensor, Tensor]:
        n = keys.shape[0] // query.shape[0]
        return (
            rearrange(key_pipeline.decompress(keys).float(), "(n b) h c d -> b h (n c) d", n=n),
            rearrange(value_pipeline.decompress(values).float(), "(n b) h c d -> b h (n c) d", n=n),
        )

    keys, values = blocks[0]
    return compressed_attention(
        query,
        blocks,
        key_pipeline.storage_layout(keys.shape),
        value_pipeline.storage_layout(values.shape),
        bias,
        scaling,
        (key_pipeline.scores, value_pipeline.weighted),
        rebuild,
        exact,
    )


class StepShared:
    """The last result of a computation every layer of a model step repeats with the same inputs (the step's
    biases), so only the first layer pays for it. Tensor inputs are compared by identity (they are
    held here, so an identity is never reused while it is), the others by value."""

    def __init__(self):
        self._key: tuple | None = None
        self._value = None

    def __call__(self, key: tuple, compute):
        """`compute()`, or its last result if `key` is the same as last time's."""
        last = self._key
        if (
            last is None
            or len(key) != len(last)
            or not all(a is b if isinstance(a, Tensor) or isinstance(b, Tensor) else a == b for a, b in zip(key, last))
        ):
            self._value, self._key = compute(), key
        return self._value


_shared_biases = StepShared()


def padding(position_ids: Tensor | None, states: Tensor) -> Tensor | None:
    """Each row's left padding `[batch]` (long), read from a first step's position ids `[batch or 1, new]` and
    its states `[batch, kv_heads, new, head_dim]`, or None when no row is padded (or the ids do not say).

    `transformers` numbers a left-padded row's real tokens from 0, so its last token sits at `new - 1 - padding`.
    """
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] not in (1, states.shape[0]):
        return None
    new = states.shape[-2]
    pad = (new - 1 - position_ids[:, -1].to(states.device, torch.long)).clamp(0, new - 1).expand(states.shape[0])
    return pad.contiguous() if bool(pad.any()) else None


class SaliencyScores:
    """The buffered tokens' running saliency evidence (ZipCache), a component of a `ChunkStore`.

    `received` `[batch, kv_heads, buffered]` is the attention the probes gave each buffered token and `seen`
    `[batch, buffered]` how many probes saw it; a chunk is compressed with saliency `received / seen` (see
    `gearkit.compressors.probes`). Both are bytes held, reported as the `probe_scores` component.

    Args:
        probes: which queries serve as probes.
    """

    def __init__(self, probes: Probes):
        self.probes = probes
        self.received: Tensor | None = None
        self.seen: Tensor | None = None

    def extend(self, like: Tensor, buffered: int) -> None:
        """Add zero scores for the tokens that joined a buffer `like` `[batch, kv_heads, buffered, head_dim]`."""
        new = buffered - (0 if self.received is None else self.received.shape[-1])
        received = like.new_zeros(*like.shape[:2], new, dtype=torch.float32)
        seen = like.new_zeros(like.shape[0], new, dtype=torch.float32)
        self.received = received if self.received is None else torch.cat([self.received, received], -1)
        self.seen = seen if self.seen is None else torch.cat([self.seen, seen], -1)

    def observed(
        self, query: Tensor, keys: Tensor, attention_mask: Tensor | None, scaling: float | None, buffered: int
    ) -> tuple[Tensor, Tensor]:
        """The scores after this step's probes (nothing changes yet): `(received, seen)` of the last `buffered`
        keys. Args as `probe_attention`."""
        received, seen = probe_attention(query, keys, attention_mask, scaling, self.probes)
        return self.received + received[..., -buffered:], self.seen + seen[..., -buffered:]

    def keep(self, received: Tensor, seen: Tensor, start: int) -> None:
        """Keep the scores of tokens `start:` (the ones still buffered)."""
        self.received, self.seen = received[..., start:].clone(), seen[..., start:].clone()

    def select(self, index: Tensor) -> None:
        """Keep batch entries `index`."""
        if self.received is not None:
            index = index.to(self.received.device)
            self.received, self.seen = self.received.index_select(0, index), self.seen.index_select(0, index)

    def crop(self, kept: int, from_buffer: bool) -> None:
        """`kept` tokens stay buffered: the first `kept` scores if only buffered tokens were removed, else zeros
        (tokens back from a compressed chunk start with no saliency)."""
        if self.received is None:
            return
        if from_buffer:
            self.keep(self.received[..., :kept], self.seen[..., :kept], 0)
        else:
            self.received = self.received.new_zeros(*self.received.shape[:2], kept)
            self.seen = self.seen.new_zeros(self.seen.shape[0], kept)

    def tensors(self) -> list[Tensor]:
        """The tensors held."""
        return [] if self.received is None else [self.received, self.seen]


@dataclasses.dataclass(frozen=True)
class StepView:
    """What one step attends to: the store as it was before the step compressed anything, plus the step's
    tokens. Nothing here is written in place later, so the view stays valid after the store moves on.

    Attributes:
        store: the store (for its recipe, chunk grid and compute dtype).
        keys: buffer and the step's new keys `[batch, kv_heads, buffered + new, head_dim]` (buffer dtype).
        values: like `keys`.
        sink_keys: the sink copy `[batch, kv_heads, sink, head_dim]` including the step's sink tokens.
        sink_values: like `sink_keys`.
        key_chunks: the compressed key chunks held before the step.
        value_chunks: the compressed value chunks.
        starts: each row's first real token `[batch]` (left padding) or None (every row starts at 0).
    """

    store: ChunkStore
    keys: Tensor
    values: Tensor
    sink_keys: Tensor
    sink_values: Tensor
    key_chunks: ChunkList
    value_chunks: ChunkList
    starts: Tensor | None = None

    def sink_positions(self) -> Tensor:
        """Sequence position of each sink-copy slot, `[batch, slots]`: slot `j` of a row holds its token
        `starts + j` (a slot past the row's tokens so far holds zeros)."""
        slots = torch.arange(self.sink_keys.shape[-2], device=self.sink_keys.device)
        return slots if self.starts is None else self.starts[:, None] + slots

    def _sink_slots(self, tokens: int) -> tuple[Tensor, Tensor]:
        """For positions `0:tokens`: the sink-copy slot of each `[batch, tokens]` and whether it has one."""
        batch, slots = self.sink_keys.shape[0], self.sink_keys.shape[-2]
        slot = torch.arange(tokens, device=self.sink_keys.device) - (0 if self.starts is None else self.starts[:, None])
        covered = ((slot >= 0) & (slot < slots)).expand(batch, tokens)
        return slot.clamp(0, max(slots - 1, 0)).expand(batch, tokens), covered

    @property
    def chunks(self) -> int:
        """Compressed chunks per sequence."""
        return self.key_chunks.chunks

    def _unchunk(self, chunks: ChunkList, pipeline, like: Tensor) -> Tensor:
        """The compressed chunks decompressed into `[batch, kv_heads, chunks * chunk, head_dim]`."""
        blocks = [
            rearrange(pipeline.decompress(view).to(self.store.dtype), "(n b) h c d -> b h (n c) d", b=chunks.batch)
            for _, view in chunks.blocks()
        ]
        return (
            torch.cat(blocks, -2)
            if blocks
            else like.new_zeros(*like.shape[:2], 0, like.shape[-1], dtype=self.store.dtype)
        )

    def _assemble(self, sink: Tensor, chunks: ChunkList, pipeline, buffer: Tensor) -> Tensor:
        held = torch.cat([self._unchunk(chunks, pipeline, buffer), buffer.to(self.store.dtype)], -2)
        if not sink.shape[-2]:
            return held
        slot, covered = self._sink_slots(held.shape[-2])
        laid = sink.to(held.dtype).gather(2, slot[:, None, :, None].expand(*held.shape))
        return torch.where(covered[:, None, :, None], laid, held)

    def dense(self) -> tuple[Tensor, Tensor]:
        """Every token decompressed, sink copy in front: keys and values `[batch, kv_heads, tokens, head_dim]` in
        the compute dtype."""
        recipe = self.store.recipe
        return (
            self._assemble(self.sink_keys, self.key_chunks, recipe.key, self.keys),
            self._assemble(self.sink_values, self.value_chunks, recipe.value, self.values),
        )

    def fresh(self) -> tuple[Tensor, Tensor]:
        """The buffer and the step's tokens only, in the compute dtype (a step that reads the storage)."""
        return self.keys.to(self.store.dtype), self.values.to(self.store.dtype)

    def _biases(
        self, attention_mask: Tensor | None, b: int, nq: int, held: int, fresh: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """What the step attends to: over the compressed chunks, boolean `[batch, held]` (True = attend; the same
        for every query; sink positions hidden, the copy holds them), and over the exact tokens, the sink copy then
        `fresh` buffered and new tokens, an additive float `[batch, queries, slots + fresh]` (`-inf` hides).

        Every layer of a step asks with the same mask, row starts and token counts: the first one computes them."""
        starts = None if self.starts is None else tuple(self.starts.tolist())  # each layer holds its own copy
        key = (attention_mask, starts, b, nq, held, fresh, self.sink_keys.shape[-2], device)
        return _shared_biases(key, lambda: self._compute_biases(attention_mask, b, nq, held, fresh, device))

    def _compute_biases(
        self, attention_mask: Tensor | None, b: int, nq: int, held: int, fresh: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        if attention_mask is None:  # causal: the whole past is visible, the fresh tokens causally
            past = torch.ones(b, 1, held, dtype=torch.bool, device=device)
            recent = torch.ones(nq, fresh, dtype=torch.bool, device=device).tril(fresh - nq).expand(b, nq, fresh)
        else:
            visible = attention_mask[:, 0].to(torch.bool)
            past, recent = visible[:, :, :held], visible[:, :, held:]
            if not (past == past[:, :1]).all():
                raise ValueError(
                    "attention over the compressed storage needs every query to see the same compressed past"
                )
        # sink tokens inside the compressed chunks are read from the exact copy (later ones are in the buffer)
        sink_at = self.sink_positions().expand(b, -1)
        sink_visible = (
            past.expand(b, nq, held).gather(2, sink_at.clamp(max=max(held - 1, 0))[:, None].expand(-1, nq, -1))
            & (sink_at < held)[:, None]
        )
        chunks = past[:, 0].clone()  # a byte per past token, as the model's own mask
        window = min(held, self.store.sink_until)  # every row's sink positions lie before it
        if window:
            chunks[:, :window] &= ~self._sink_slots(window)[1]
        return chunks, torch.where(torch.cat([sink_visible, recent], -1), 0.0, float("-inf"))

    def attend(
        self, query: Tensor, keys: Tensor, values: Tensor, attention_mask: Tensor | None, scaling: float | None
    ) -> Tensor:
        """The step's attention read from the storage: the compressed chunks block by block through
        `chunk_attention` (Triton or torch read the packed codes, the reference decompresses; one block at a time, so
        the working set is one block whatever the context), together with the exact tokens (the sink copy and
        `keys`/`values`) in the same softmax.

        Args:
            query: `[batch, heads, queries, head_dim]`.
            keys: `fresh()`'s keys `[batch, kv_heads, buffered + queries, head_dim]`.
            values: like `keys`.
            attention_mask: boolean `[batch, 1, queries, held + queries]` (True = attend) or None (causal).
            scaling: softmax scale (default `head_dim ** -0.5`).

        Returns:
            `[batch, queries, heads, head_dim]` in the query's dtype.

        Raises:
            ValueError: if queries of one sequence see different compressed pasts.
        """
        store = self.store
        b, _, nq, d = query.shape
        size = store.buffer_size
        held, fresh = self.chunks * size, keys.shape[-2]
        scaling = d**-0.5 if scaling is None else scaling
        bias, exact_bias = self._biases(attention_mask, b, nq, held, fresh, query.device)
        exact = (
            torch.cat([self.sink_keys.to(keys.dtype), keys], -2),
            torch.cat([self.sink_values.to(values.dtype), values], -2),
            exact_bias,
        )
        if self.chunks:  # one block of chunks read at a time
            blocks = [(kv, vv) for (_, kv), (_, vv) in zip(self.key_chunks.blocks(), self.value_chunks.blocks())]
            out, _ = chunk_attention(query, store.recipe.key, store.recipe.value, blocks, bias, scaling, exact)
        else:
            out, _ = attention_reference(query, *exact, scaling)
        return out.to(query.dtype).transpose(1, 2)


class ChunkStore:
    """One layer's compressed chunks, sink copy and full-precision buffer.

    `keys`/`values` hold the buffer `[batch, kv_heads, buffered, head_dim]` in `buffer_dtype`, and
    `sink_keys`/`sink_values` a copy of each row's first `recipe.sink_tokens` tokens, also in `buffer_dtype`.
    In a left-padded batch a row's first token is its first real one: `starts` `[batch]` holds where each row's
    real tokens start (None when no row is padded), read from the position ids of the first append; stages
    that code keys before RoPE get the rows' own positions. The compressed chunks live in
    `key_chunks`/`value_chunks` (`ChunkList`s: appending a chunk adds a reference), so every compressed chunk
    stays its own bytes and is never copied or re-compressed. Decode attention reads them in blocks of about
    `BLOCK_TOKENS` tokens.

    Args:
        recipe: the key/value pipelines, the buffer size (= chunk size) and the sink tokens.
        buffer_dtype: storage dtype of the buffer and the sink copy; None keeps the incoming dtype.
        layer: the model layer this store serves (stages with per-layer dictionaries need it).
    """

    BLOCK_TOKENS = 4096  # tokens of compressed chunks decode attention reads at once: its working set

    def __init__(self, recipe: Recipe, buffer_dtype: torch.dtype | None = torch.float16, layer: int | None = None):
        self.recipe, self.buffer_dtype, self.layer = recipe, buffer_dtype, layer
        self.saliency = SaliencyScores(recipe.probes) if recipe.needs_saliency else None
        self.reset()

    def reset(self) -> None:
        """Forget every token."""
        self.keys = self.values = self.sink_keys = self.sink_values = None
        self.starts: Tensor | None = None  # each row's first real token [batch]; None: every row starts at 0
        self.sink_until = self.recipe.sink_tokens
        per_block = max(1, self.BLOCK_TOKENS // self.buffer_size)
        self.key_chunks, self.value_chunks = ChunkList(per_block), ChunkList(per_block)
        self.length = 0
        self.dtype: torch.dtype | None = None  # the compute dtype: that of the incoming states
        if self.saliency is not None:
            self.saliency = SaliencyScores(self.recipe.probes)

    @property
    def buffer_size(self) -> int:
        """Tokens per compressed chunk (the buffer compresses when it holds this many)."""
        return self.recipe.buffer_size

    @property
    def is_initialized(self) -> bool:
        """Whether a first update has set the batch, heads and dtypes."""
        return self.keys is not None

    @property
    def chunks(self) -> int:
        """Compressed chunks per sequence."""
        return self.key_chunks.chunks

    @property
    def compressed_keys(self) -> CompressedTensor | None:
        """Every compressed key chunk, joined chunk-major `[(chunks batch), kv_heads, chunk, head_dim]` (a copy, for
        inspection; the store reads its `ChunkList`)."""
        return self.key_chunks.joined()

    @property
    def compressed_values(self) -> CompressedTensor | None:
        """Like `compressed_keys`, for values."""
        return self.value_chunks.joined()

    @property
    def buffered(self) -> int:
        """Tokens in the full-precision buffer."""
        return self.keys.shape[-2] if self.is_initialized else 0

    def tokens_to_next_chunk(self) -> int:
        """How many more tokens fill the buffer, so that the next chunk is compressed."""
        return self.buffer_size - self.buffered

    def view(self) -> StepView:
        """Everything held, as a `StepView` with no new tokens."""
        return StepView(
            self,
            self.keys,
            self.values,
            self.sink_keys,
            self.sink_values,
            self.key_chunks,
            self.value_chunks,
            self.starts,
        )

    def snapshot(self) -> dict:
        """The store's state, for `restore`: held tensors are never written in place, so a shallow copy of the
        attributes (and of the saliency scores' attributes) is the whole state."""
        state = dict(vars(self))
        if self.saliency is not None:
            state["saliency"] = copy.copy(self.saliency)
        return state

    def restore(self, snapshot: dict) -> None:
        """Go back to the state `snapshot()` returned (it stays valid for another restore)."""
        vars(self).clear()
        vars(self).update(snapshot)
        if self.saliency is not None:
            self.saliency = copy.copy(self.saliency)

    def dequantized(self) -> tuple[Tensor, Tensor]:
        """Everything held, decompressed: keys and values `[batch, kv_heads, tokens, head_dim]`."""
        return self.view().dense()

    # -- writing -------------------------------------------------------------------------------------------
    def _stored(self, states: Tensor, name: str) -> Tensor:
        """`states` in the buffer dtype, checked in one pass over the cast (a NaN or Inf in `states` survives it)."""
        check_kv(states, name, finite=False)
        stored = states.to(self.buffer_dtype or states.dtype)
        if stored.numel() and not torch.isfinite(stored).all():  # say which: the input, or the cast's overflow
            check_kv(states, name)
            check_storable(stored, name, "buffer_dtype of the cache (buffer_dtype=None keeps the model's dtype)")
        return stored

    def append(self, key_states: Tensor, value_states: Tensor, position_ids: Tensor | None = None) -> StepView:
        """Add new tokens `[batch, kv_heads, new, head_dim]`; compress the buffer's whole chunks (unless the
        recipe waits for saliency). Everything is computed before any state changes, so a failure leaves the
        store as it was.

        Args:
            key_states: `[batch, kv_heads, new, head_dim]`.
            value_states: like `key_states`.
            position_ids: the tokens' positions `[batch or 1, new]` (as `transformers` computes them from the
                attention mask). Read on the first append only: a left-padded row's last token sits at position
                `new - 1 - padding`, which is where the row's sink tokens start.

        Returns:
            What this step attends to: the store before it compressed anything, plus the new tokens.

        Raises:
            ValueError: for non-finite or malformed states, or states that overflow the buffer dtype.
        """
        new_keys, new_values = self._stored(key_states, "key_states"), self._stored(value_states, "value_states")
        starts = self.starts
        if not self.is_initialized:
            self.keys, self.sink_keys = (
                new_keys.new_zeros(*new_keys.shape[:2], 0, new_keys.shape[-1]) for _ in range(2)
            )
            self.values, self.sink_values = (
                new_values.new_zeros(*new_values.shape[:2], 0, new_values.shape[-1]) for _ in range(2)
            )
            self.dtype = key_states.dtype
            starts = padding(position_ids, key_states)
            # the position after every row's sink tokens (a Python int: no device sync on later steps)
            self.sink_until = self.recipe.sink_tokens + (0 if starts is None else int(starts.max()))
        step = StepView(
            self,
            torch.cat([self.keys, new_keys], -2),
            torch.cat([self.values, new_values], -2),
            *self._sinks(new_keys, new_values, starts),
            self.key_chunks,
            self.value_chunks,
            starts,
        )
        compressed = None if self.saliency is not None else self._compress_buffer(step.keys, step.values, starts=starts)
        self.keys, self.values, self.sink_keys, self.sink_values = (
            step.keys,
            step.values,
            step.sink_keys,
            step.sink_values,
        )
        self.starts = starts
        self._commit(compressed)
        self.length += key_states.shape[-2]
        if self.saliency is not None:
            self.saliency.extend(self.keys, self.buffered)
        return step

    def _sinks(self, new_keys: Tensor, new_values: Tensor, starts: Tensor | None) -> tuple[Tensor, Tensor]:
        """The sink copy with this step's tokens `[batch, kv_heads, new, head_dim]` added: slot `j` of a row holds
        its token `starts + j`; a slot whose token has not arrived holds zeros (nothing reads it)."""
        sink, length, new = self.recipe.sink_tokens, self.length, new_keys.shape[-2]
        if starts is None:  # the common case: the first tokens of every row
            take = max(min(sink - length, new), 0)
            if not take:
                return self.sink_keys, self.sink_values
            return torch.cat([self.sink_keys, new_keys[:, :, :take]], -2), torch.cat(
                [self.sink_values, new_values[:, :, :take]], -2
            )
        if length >= self.sink_until:
            return self.sink_keys, self.sink_values
        slots = int((length + new - starts).clamp(0, sink).max())
        position = starts[:, None] + torch.arange(slots, device=starts.device)  # [batch, slots]
        arrives = ((position >= length) & (position < length + new))[:, None, :, None]
        index = (position - length).clamp(0, new - 1)[:, None, :, None]
        out = []
        for held, fresh in ((self.sink_keys, new_keys), (self.sink_values, new_values)):
            held = torch.cat([held, held.new_zeros(*held.shape[:2], slots - held.shape[-2], held.shape[-1])], -2)
            out.append(
                torch.where(arrives, fresh.gather(2, index.expand(*fresh.shape[:2], slots, fresh.shape[-1])), held)
            )
        return out[0], out[1]

    def observe_queries(
        self, query: Tensor, keys: Tensor, attention_mask: Tensor | None, scaling: float | None
    ) -> None:
        """Add the step's probe attention to the buffered tokens' saliency, then compress the buffer's whole
        chunks (saliency-driven recipes; a no-op otherwise).

        Args:
            query: `[batch, heads, queries, head_dim]`, the step's queries.
            keys: `[batch, kv_heads, kv_len, head_dim]`, every key the step attends to (the buffer is its end).
            attention_mask: the step's mask (see `gearkit.compressors.probes.visible_keys`).
            scaling: softmax scale.
        """
        if self.saliency is None or not self.buffered:
            return
        received, seen = self.saliency.observed(query, keys, attention_mask, scaling, self.buffered)
        compressed = None
        if self.buffered >= self.buffer_size:
            compressed = self._compress_buffer(self.keys, self.values, normalized_saliency(received, seen))
        self._commit(compressed)
        self.saliency.keep(received, seen, compressed[-1] * self.buffer_size if compressed else 0)

    def _compress_chunks(
        self, buffer: Tensor, pipeline, held: ChunkList, saliency: Tensor | None, starts: Tensor | None
    ) -> tuple[ChunkList, Tensor]:
        """Compress the buffer's whole chunks (with per-token `saliency` `[batch, kv_heads, buffered]` where the
        pipeline needs it, and rows starting at `starts` `[batch]`); returns (the chunks held with them, remaining
        buffer)."""
        size = self.buffer_size
        full = buffer.shape[-2] // size * size
        if not full:
            return held, buffer
        chunks = rearrange(buffer[:, :, :full], "b h (n c) d -> (n b) h c d", c=size)
        if saliency is not None:
            saliency = rearrange(saliency[:, :, :full], "b h (n c) -> (n b) h c", c=size)
        first = self.chunks * size  # cache index of the buffer's first token
        batch = buffer.shape[0]
        offset = torch.zeros(batch, dtype=torch.long, device=buffer.device) if starts is None else starts
        exclude = None
        if first < self.sink_until:  # sink positions are stored exactly in the sink copy
            position = first + torch.arange(full, device=buffer.device) - offset[:, None]  # [batch, full]
            exclude = rearrange(
                (position >= 0) & (position < self.recipe.sink_tokens), "b (n c) -> (n b) 1 c 1", c=size
            )
            exclude = exclude.expand(chunks.shape)
        # each entry's first token position (chunk-major; a row's real tokens start at 0), for stages that code
        # keys before RoPE
        positions = rearrange(
            first + size * torch.arange(full // size, device=buffer.device)[:, None] - offset, "n b -> (n b)"
        )
        new = pipeline.compress(chunks, exclude, Context(saliency, positions, self.layer))
        return held.append(new, buffer.shape[0]), buffer[:, :, full:].clone()  # clone: the buffer owns its bytes

    def _compress_buffer(
        self, keys: Tensor, values: Tensor, saliency: Tensor | None = None, starts: Tensor | None = None
    ):
        """Compress the whole chunks of the given buffers (nothing changes yet); the result goes to `_commit`.
        `starts`: the rows' first real tokens (default: the store's)."""
        starts = self.starts if starts is None else starts
        kc, kb = self._compress_chunks(keys, self.recipe.key, self.key_chunks, saliency, starts)
        vc, vb = self._compress_chunks(values, self.recipe.value, self.value_chunks, saliency, starts)
        return kc, vc, kb, vb, (keys.shape[-2] - kb.shape[-2]) // self.buffer_size

    def _commit(self, compressed) -> None:
        """Take over what `_compress_buffer` returned (None: nothing was compressed)."""
        if compressed is not None:
            if not self.chunks and compressed[-1]:  # the first chunk: say so if the recipe enlarges the cache
                bits = max(compressed[0].groups[-1].bits_per_element, compressed[1].groups[-1].bits_per_element)
                if bits > 16:
                    warnings.warn(
                        f"recipe {self.recipe.name!r} stores more bits per element than fp16 (16) on this "
                        "data: it enlarges the cache instead of compressing it",
                        stacklevel=2,
                    )
            self.key_chunks, self.value_chunks, self.keys, self.values, _ = compressed

    # -- batch and length edits ----------------------------------------------------------------------------
    def select(self, index: Tensor) -> None:
        """Keep batch entries `index` (reorder, repeat, drop) in the buffer, the sink copy and every chunk."""
        if not self.is_initialized:
            return
        index = index.to(self.keys.device)
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        self.sink_keys, self.sink_values = (
            self.sink_keys.index_select(0, index),
            self.sink_values.index_select(0, index),
        )
        if self.starts is not None:
            self.starts = self.starts.index_select(0, index)
        self.key_chunks, self.value_chunks = self.key_chunks.select(index), self.value_chunks.select(index)
        if self.saliency is not None:
            self.saliency.select(index)

    def crop(self, remove: int) -> None:
        """Remove the last `remove` tokens.

        Tokens of a partly removed chunk that survive go back to the buffer as their decompressed values (and
        are compressed again when the buffer fills): the one case where compressed tokens are re-encoded.
        """
        remove = min(remove, self.length)
        if not remove or not self.is_initialized:
            return
        from_buffer = remove <= self.buffered
        keep = self.length - remove
        # the slots whose tokens survive
        sink = max(min(keep - (0 if self.starts is None else int(self.starts.min())), self.sink_keys.shape[-2]), 0)
        self.sink_keys, self.sink_values = self.sink_keys[:, :, :sink].clone(), self.sink_values[:, :, :sink].clone()
        if from_buffer:
            end = self.buffered - remove
            self.keys, self.values = self.keys[:, :, :end].clone(), self.values[:, :, :end].clone()
        else:
            keys, values = self.dequantized()
            whole, store = keep // self.buffer_size, self.keys.dtype
            self.keys = keys[:, :, whole * self.buffer_size : keep].to(store).clone()
            self.values = values[:, :, whole * self.buffer_size : keep].to(store).clone()
            self.key_chunks, self.value_chunks = self.key_chunks.truncate(whole), self.value_chunks.truncate(whole)
        self.length = keep
        if self.saliency is not None:
            self.saliency.crop(self.buffered, from_buffer)

    # -- accounting ----------------------------------------------------------------------------------------
    def held_tensors(self) -> list[Tensor]:
        """Every tensor this store holds (compressed parts, buffer, sink copy, saliency scores)."""
        if not self.is_initialized:
            return []
        out = [self.keys, self.values, self.sink_keys, self.sink_values] + (
            [] if self.starts is None else [self.starts]
        )
        out += [*self.key_chunks.tensors(), *self.value_chunks.tensors()]
        return out + (self.saliency.tensors() if self.saliency is not None else [])

    def memory_report(self) -> MemoryReport:
        """Bytes held, by component (`buffer`, `sink`, the parts' components, `dictionary` shares, `probe_scores`)."""
        if not self.is_initialized:
            return MemoryReport({}, 0, 0)
        own = {"buffer": tensor_nbytes(self.keys) + tensor_nbytes(self.values)}
        if self.recipe.sink_tokens:
            own["sink"] = tensor_nbytes(self.sink_keys) + tensor_nbytes(self.sink_values)
        if self.starts is not None:
            own["row_starts"] = tensor_nbytes(self.starts)
        shared = self.recipe.key.shared_nbytes(self.layer) + self.recipe.value.shared_nbytes(self.layer)
        if shared:  # this layer's share of the dictionaries; not a tensor the store holds
            own["dictionary"] = shared
        if self.saliency is not None and self.saliency.received is not None:
            own["probe_scores"] = sum(tensor_nbytes(t) for t in self.saliency.tensors())
        stored = [self.key_chunks.components(), self.value_chunks.components()]
        batch, heads = self.keys.shape[:2]
        elements = batch * heads * self.length * (self.keys.shape[-1] + self.values.shape[-1])
        return MemoryReport(add_counts(own, *stored), self.length, elements)
