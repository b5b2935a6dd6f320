"""A streaming compressed KV cache for Hugging Face `transformers` models (`generate()` and plain forwards).

Each layer holds a recipe's compressed chunks plus a small full-precision buffer of the newest tokens. New
tokens enter the buffer; when it holds `recipe.buffer_size` tokens they are compressed as one chunk and
appended to the compressed storage, where they stay as compressed bytes and are never re-compressed.
Attention of the current step sees the compressed past, the buffer and the new tokens (the buffer is
compressed after the step, so a token never sees a compressed copy of the step it belongs to).

A recipe may keep the first `sink_tokens` tokens of each sequence (attention sinks) as an exact fp16 copy: the
chunk that holds them is compressed with those positions excluded (they do not widen any quantization
range), and reads take them from the copy. The chunk grid is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from einops import rearrange
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from gearkit import recipes
from gearkit.compressed import CompressedTensor, add_counts, cat_batch, select_batch, tensor_nbytes
from gearkit.compressors.base import check_kv, check_storable
from gearkit.compressors.saliency import normalized_saliency, probe_attention
from gearkit.integrations.attention import NAME as ATTENTION_NAME
from gearkit.integrations.attention import mark_updated
from gearkit.kernels.attention import compressed_attention
from gearkit.kernels.reference import attention_reference, merge_attention
from gearkit.recipes import Recipe


@dataclasses.dataclass
class MemoryReport:
    """Bytes a cache holds, by component, against an fp16 cache of the same tokens.

    Attributes:
        components: bytes by component (`codes`, `scales`, `outliers`, `lowrank`, `dense`, `buffer`, `sink`;
            CSR: `atom_indices`, `coefficients`, `positions`, and `dictionary`, the layers' shares of the shared
            dictionaries, counted once per cache: amortised over the tokens the cache holds).
        tokens: logical sequence length.
        elements: key and value elements of those tokens, over all layers, heads and batch entries.
    """

    components: dict[str, int]
    tokens: int
    elements: int

    @property
    def nbytes(self) -> int:
        """All bytes held."""
        return sum(self.components.values())

    @property
    def fp16_nbytes(self) -> int:
        """Bytes of an fp16 cache of the same tokens."""
        return 2 * self.elements

    @property
    def bits_per_element(self) -> float:
        """All-in bits per element (buffer included)."""
        return 8 * self.nbytes / self.elements if self.elements else 0.0

    def bits_per_element_excluding(self, *components: str) -> float:
        """Bits per element without the named components (e.g. `"dictionary"`: the per-token cost alone)."""
        kept = sum(n for name, n in self.components.items() if name not in components)
        return 8 * kept / self.elements if self.elements else 0.0

    @property
    def compression_ratio(self) -> float:
        """fp16 bytes over bytes held."""
        return self.fp16_nbytes / self.nbytes if self.nbytes else float("inf")

    def __add__(self, other: MemoryReport) -> MemoryReport:
        return MemoryReport(add_counts(self.components, other.components), max(self.tokens, other.tokens),
                            self.elements + other.elements)


class GearLayer(CacheLayerMixin):
    """One layer's compressed chunks and full-precision buffer.

    `keys`/`values` hold the buffer `[batch, kv_heads, buffered, head_dim]` in `buffer_dtype`, and
    `sink_keys`/`sink_values` a copy of the first `recipe.sink_tokens` tokens, also in `buffer_dtype`. The compressed chunks are stacked along the batch, chunk-major: `[(chunks batch), kv_heads, chunk, head_dim]`,
    so every compressed chunk stays its own bytes and decompression is one call.

    Args:
        recipe: the key/value pipelines and the buffer size (= chunk size).
        buffer_dtype: storage dtype of the buffer; None keeps the model's dtype.
        layer_idx: the model layer this cache layer serves (stages with per-layer dictionaries need it).
    """

    STORAGE_QUERIES = 16  # steps with at most this many new tokens read the storage directly
    is_compileable = False
    is_croppable = False  # cropping into a compressed chunk cannot restore its tokens exactly
    is_sliding = False
    compress_in_update = True  # False: whole chunks wait in the buffer until the layer compresses them itself

    def __init__(self, recipe: Recipe, buffer_dtype: torch.dtype | None = torch.float16, layer_idx: int | None = None):
        super().__init__()
        self.recipe = recipe
        self.layer_idx = layer_idx
        self.buffer_dtype = buffer_dtype
        self.compressed_keys: CompressedTensor | None = None
        self.compressed_values: CompressedTensor | None = None
        self.sink_keys: Tensor | None = None
        self.sink_values: Tensor | None = None
        self.chunks = 0
        self.cumulative_length = 0
        self.reads_storage = False  # set once gearkit's attention function calls `attend`
        self._storage_step = None

    @property
    def chunk_size(self) -> int:
        return self.recipe.buffer_size

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        store = self.buffer_dtype or key_states.dtype
        self.keys = key_states.new_zeros(*key_states.shape[:2], 0, key_states.shape[-1], dtype=store)
        self.values = value_states.new_zeros(*value_states.shape[:2], 0, value_states.shape[-1], dtype=store)
        self.sink_keys, self.sink_values = self.keys.clone(), self.values.clone()
        self.is_initialized = True

    # -- reading -------------------------------------------------------------------------------------------
    def _unchunk(self, c: CompressedTensor | None, pipeline, like: Tensor) -> Tensor:
        """The compressed chunks decompressed into `[batch, kv_heads, chunks * chunk, head_dim]`."""
        if c is None:
            return like.new_zeros(*like.shape[:2], 0, like.shape[-1], dtype=self.dtype)
        return rearrange(pipeline.decompress(c).to(self.dtype), "(n b) h c d -> b h (n c) d", n=self.chunks)

    def _assemble(self, sink: Tensor, c: CompressedTensor | None, pipeline, buffer: Tensor) -> Tensor:
        """Decompressed chunks and buffer in sequence order, the sink copy in front: `[batch, kv_heads, tokens, head_dim]`."""
        held = torch.cat([self._unchunk(c, pipeline, buffer), buffer.to(self.dtype)], -2)
        held[:, :, : sink.shape[-2]] = sink  # a fresh tensor: writing into it touches nothing held
        return held

    def dequantized(self) -> tuple[Tensor, Tensor]:
        """Everything held, decompressed: keys and values `[batch, kv_heads, tokens, head_dim]`."""
        return (self._assemble(self.sink_keys, self.compressed_keys, self.recipe.key, self.keys),
                self._assemble(self.sink_values, self.compressed_values, self.recipe.value, self.values))

    def tokens_to_next_chunk(self) -> int:
        """How many more tokens fill the buffer, so that the next chunk is compressed."""
        return self.chunk_size - (self.keys.shape[-2] if self.is_initialized else 0)

    # -- writing -------------------------------------------------------------------------------------------
    def _store(self, states: Tensor, name: str) -> Tensor:
        check_kv(states, name)
        return check_storable(states.to(self.buffer_dtype or states.dtype), name)

    def _compress_full_chunks(self, buffer: Tensor, pipeline, current: CompressedTensor | None,
                              saliency: Tensor | None = None):
        """Compress the buffer's whole chunks (with per-token `saliency` `[batch, kv_heads, buffered]` for
        pipelines that need it); returns (compressed storage, remaining buffer)."""
        full = buffer.shape[-2] // self.chunk_size * self.chunk_size
        if not full:
            return current, buffer
        chunks = rearrange(buffer[:, :, :full], "b h (n c) d -> (n b) h c d", c=self.chunk_size)
        if saliency is not None:
            saliency = rearrange(saliency[:, :, :full], "b h (n c) -> (n b) h c", c=self.chunk_size)
        first = self.chunks * self.chunk_size  # sequence position of the buffer's first token
        exclude = None
        if first < self.recipe.sink_tokens:  # sink positions are stored exactly in the sink copy
            position = first + torch.arange(full, device=buffer.device)
            exclude = rearrange(position < self.recipe.sink_tokens, "(n c) -> n 1 1 c 1", c=self.chunk_size)
            exclude = exclude.expand(-1, buffer.shape[0], *chunks.shape[1:]).reshape(chunks.shape)
        # each entry's first sequence position (chunk-major), for stages that code keys before RoPE
        starts = first + self.chunk_size * torch.arange(full // self.chunk_size, device=buffer.device)
        positions = starts.repeat_interleave(buffer.shape[0])
        new = pipeline.compress(chunks, exclude, saliency, positions, self.layer_idx)
        merged = new if current is None else cat_batch([current, new])
        return merged, buffer[:, :, full:].clone()  # clone: the buffer owns exactly its bytes

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Add new tokens `[batch, kv_heads, new, head_dim]`; return the keys and values attention reads.

        Normally that is every token held, decompressed, `[batch, kv_heads, tokens, head_dim]`. When the model
        runs gearkit's attention function and this is a decode step (at most `STORAGE_QUERIES` new tokens over
        compressed chunks), it is only the buffer and the new tokens: `attend` reads the chunks as stored.

        Raises:
            ValueError: for non-finite or malformed states; the layer is left unchanged.
        """
        new_keys, new_values = self._store(key_states, "key_states"), self._store(value_states, "value_states")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        to_sink = max(min(self.recipe.sink_tokens - self.cumulative_length, new_keys.shape[-2]), 0)
        sink_keys = torch.cat([self.sink_keys, new_keys[:, :, :to_sink]], -2)
        sink_values = torch.cat([self.sink_values, new_values[:, :, :to_sink]], -2)
        keys_buffer = torch.cat([self.keys, new_keys], -2)
        values_buffer = torch.cat([self.values, new_values], -2)
        from_storage = self.reads_storage and self.chunks > 0 and new_keys.shape[-2] <= self.STORAGE_QUERIES
        if from_storage:
            out = keys_buffer.to(self.dtype), values_buffer.to(self.dtype)
            step = (self.compressed_keys, self.compressed_values, self.chunks, sink_keys, sink_values)
        else:
            out = (self._assemble(sink_keys, self.compressed_keys, self.recipe.key, keys_buffer),
                   self._assemble(sink_values, self.compressed_values, self.recipe.value, values_buffer))
        # Everything is computed before any state changes, so a failure leaves the layer as it was.
        compressed = self._compress_buffer(keys_buffer, values_buffer) if self.compress_in_update else None
        self.keys, self.values = keys_buffer, values_buffer
        self._commit(compressed)
        self.sink_keys, self.sink_values = sink_keys, sink_values
        self.cumulative_length += key_states.shape[-2]
        # The storage as it was before this step's compression, for `attend` (dropped once it has run).
        self._storage_step = step if from_storage else None
        mark_updated(self, out[0])
        return out

    def _compress_buffer(self, keys_buffer: Tensor, values_buffer: Tensor, saliency: Tensor | None = None):
        """Compress the whole chunks of the given buffers (nothing changes yet); the result goes to `_commit`."""
        ck, kb = self._compress_full_chunks(keys_buffer, self.recipe.key, self.compressed_keys, saliency)
        cv, vb = self._compress_full_chunks(values_buffer, self.recipe.value, self.compressed_values, saliency)
        return ck, cv, kb, vb, (keys_buffer.shape[-2] - kb.shape[-2]) // self.chunk_size

    def _commit(self, compressed) -> None:
        """Take over what `_compress_buffer` returned (None: nothing was compressed)."""
        if compressed is not None:
            self.compressed_keys, self.compressed_values, self.keys, self.values, chunks = compressed
            self.chunks += chunks

    # -- gearkit's attention function (see gearkit.integrations.attention) -----------------------------------
    def observe_queries(self, query: Tensor, keys: Tensor, attention_mask: Tensor | None, scaling: float | None) -> None:
        """See the step's queries `[batch, heads, queries, head_dim]` and the keys `update` returned (no-op here;
        saliency-driven layers use it)."""

    def attend(self, query: Tensor, keys: Tensor, values: Tensor, attention_mask: Tensor | None,
               scaling: float | None, dropout: float = 0.0) -> Tensor | None:
        """The step's attention, read from the compressed storage, or None for the standard path.

        Called by gearkit's attention function right after `update`. The first call switches the layer to
        reading its storage on later decode steps (the function is known to be in use). On such a step, the
        compressed chunks go through `compressed_attention` (Triton reads the packed bytes; the reference
        decompresses), the sink copy and the buffer plus new tokens through exact attention, and the
        segments are merged by their log-sum-exp.

        Args:
            query: `[batch, heads, queries, head_dim]`.
            keys: what `update` returned, `[batch, kv_heads, buffered + queries, head_dim]` on a storage step.
            values: like `keys`.
            attention_mask: boolean `[batch, 1, queries, held + queries]` (True = attend) or None (causal).
            scaling: softmax scale (default `head_dim ** -0.5`).
            dropout: must be 0 on a storage step.

        Returns:
            `[batch, queries, heads, head_dim]` in the query's dtype, or None.
        """
        step, self._storage_step = self._storage_step, None
        self.reads_storage = True
        if step is None:
            return None
        if dropout:
            raise ValueError("attention over the compressed storage does not apply dropout; call model.eval()")
        ck, cv, chunks, sink_keys, sink_values = step
        b, _, nq, d = query.shape
        held, sink, fresh = chunks * self.chunk_size, sink_keys.shape[-2], keys.shape[-2]
        scaling = d**-0.5 if scaling is None else scaling
        if attention_mask is None:  # causal: the past is visible, the fresh tokens causally
            visible = torch.ones(b, nq, held + fresh, dtype=torch.bool, device=query.device)
            visible[:, :, held:] = torch.ones(nq, fresh, dtype=torch.bool, device=query.device).tril(fresh - nq)
        else:
            visible = attention_mask[:, 0].to(torch.bool)
        past = visible[:, :, :held]
        if not (past == past[:, :1]).all():
            raise ValueError("attention over the compressed storage needs every query to see the same compressed past")
        neg = torch.tensor(float("-inf"), device=query.device)
        bias = torch.where(past[:, 0], 0.0, neg)
        bias[:, :sink] = neg  # the sink positions are read from the exact copy
        compressed = compressed_attention(query, self.recipe.key, ck, self.recipe.value, cv, chunks, bias, scaling)
        exact_visible = torch.cat([visible[:, :, :sink], visible[:, :, held:]], -1)
        exact = attention_reference(query, torch.cat([sink_keys.to(keys.dtype), keys], -2),
                                    torch.cat([sink_values.to(values.dtype), values], -2),
                                    torch.where(exact_visible, 0.0, neg), scaling)
        return merge_attention([compressed, exact]).to(query.dtype).transpose(1, 2)

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.compressed_keys = self.compressed_values = self.sink_keys = self.sink_values = None
        self.chunks = self.cumulative_length = 0
        self.is_initialized, self._storage_step = False, None

    def _select(self, index: Tensor) -> None:
        """Keep batch entries `index` (reorder, repeat, drop) in the buffer and every compressed chunk."""
        if not self.is_initialized:
            return
        index = index.to(self.keys.device)
        batch = self.keys.shape[0]
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        self.sink_keys, self.sink_values = self.sink_keys.index_select(0, index), self.sink_values.index_select(0, index)
        if self.compressed_keys is not None:
            chunk_index = (torch.arange(self.chunks, device=index.device)[:, None] * batch + index).flatten()
            self.compressed_keys = select_batch(self.compressed_keys, chunk_index)
            self.compressed_values = select_batch(self.compressed_values, chunk_index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(torch.as_tensor(indices).flatten())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens (a negative count, as in `DynamicLayer.crop`).

        Tokens of a partly removed chunk that survive go back to the buffer as their decompressed values
        (and are compressed again when the buffer fills): the one case where compressed tokens are re-encoded.
        """
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove, as DynamicLayer.crop does")
        remove = min(-tokens_to_remove, self.cumulative_length)
        if not remove or not self.is_initialized:
            return
        keep = self.cumulative_length - remove
        sink = min(keep, self.sink_keys.shape[-2])
        self.sink_keys, self.sink_values = self.sink_keys[:, :, :sink].clone(), self.sink_values[:, :, :sink].clone()
        if remove <= self.keys.shape[-2]:
            end = self.keys.shape[-2] - remove
            self.keys, self.values = self.keys[:, :, :end].clone(), self.values[:, :, :end].clone()
        else:
            keys, values = self.dequantized()
            whole, store = keep // self.chunk_size, self.keys.dtype
            self.keys = keys[:, :, whole * self.chunk_size : keep].to(store).clone()
            self.values = values[:, :, whole * self.chunk_size : keep].to(store).clone()
            if whole:
                index = torch.arange(whole * self.keys.shape[0], device=self.keys.device)
                self.compressed_keys = select_batch(self.compressed_keys, index)
                self.compressed_values = select_batch(self.compressed_values, index)
            else:
                self.compressed_keys = self.compressed_values = None
            self.chunks = whole
        self.cumulative_length = keep

    # -- accounting ----------------------------------------------------------------------------------------
    def held_tensors(self) -> list[Tensor]:
        """Every tensor this layer holds (compressed parts and buffer)."""
        if not self.is_initialized:
            return []
        out = [self.keys, self.values, self.sink_keys, self.sink_values]
        for c in (self.compressed_keys, self.compressed_values):
            if c is not None:
                out += list(c.tensors().values())
        return out

    def memory_report(self) -> MemoryReport:
        """Bytes held by this layer, by component."""
        if not self.is_initialized:
            return MemoryReport({}, 0, 0)
        own = {"buffer": tensor_nbytes(self.keys) + tensor_nbytes(self.values)}
        if self.recipe.sink_tokens:
            own["sink"] = tensor_nbytes(self.sink_keys) + tensor_nbytes(self.sink_values)
        shared = self.recipe.key.shared_nbytes(self.layer_idx) + self.recipe.value.shared_nbytes(self.layer_idx)
        if shared:  # this layer's share of the dictionaries; not a tensor the layer holds
            own["dictionary"] = shared
        stored = [c.components() for c in (self.compressed_keys, self.compressed_values) if c is not None]
        components = add_counts(own, *stored)
        batch, heads = self.keys.shape[:2]
        elements = batch * heads * self.cumulative_length * (self.keys.shape[-1] + self.values.shape[-1])
        return MemoryReport(components, self.cumulative_length, elements)


NEEDS_QUERIES = ("recipe {name!r} picks salient tokens from the model's queries, which reach the cache only "
                 "through gearkit's attention function: call model.set_attn_implementation("
                 "gearkit.integrations.attention.register()) (or load the model with that attn_implementation)")


class SaliencyLayer(GearLayer):
    """A `GearLayer` for recipes whose stages need token saliency (ZipCache's `MixedPrecision`).

    Saliency comes from probe queries (`gearkit.compressors.saliency`): gearkit's attention function hands each
    step's queries to `observe_queries`, which adds the attention the probes give every buffered token to
    `received` `[batch, kv_heads, buffered]` and the number of probes that saw it to `seen` `[batch, buffered]`.

    Compression waits for the queries: `update` only appends to the buffer (the step attends to everything in
    full precision), and `observe_queries` then compresses the buffer's whole chunks with saliency
    `received / seen`. At prefill a chunk's saliency comes from the prefill's probes; a chunk filled while
    decoding gets it from every probe that has seen its tokens since they entered the buffer: the prefill's
    probes for tokens that were prefilled, and each later step's probes (a single decoded token is its step's
    probe). Without gearkit's attention function no queries arrive, and the next `update` raises rather than
    compress without saliency. The accumulators are bytes held: they count as the `probe_scores` component.
    """

    compress_in_update = False
    STORAGE_QUERIES = 0  # the probes need every key in full, so attention never reads the storage directly

    def __init__(self, recipe: Recipe, buffer_dtype: torch.dtype | None = torch.float16, layer_idx: int | None = None):
        super().__init__(recipe, buffer_dtype, layer_idx)
        self.received: Tensor | None = None
        self.seen: Tensor | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append new tokens `[batch, kv_heads, new, head_dim]` to the buffer; return all keys and values.

        Raises:
            RuntimeError: if whole chunks from the previous step still wait for queries (the model does not
                use gearkit's attention function).
        """
        if self.is_initialized and self.keys.shape[-2] >= self.chunk_size:
            raise RuntimeError(NEEDS_QUERIES.format(name=self.recipe.name))
        out = super().update(key_states, value_states, *args, **kwargs)
        new = self.keys.shape[-2] - (0 if self.received is None else self.received.shape[-1])
        batch, heads = self.keys.shape[:2]
        received = self.keys.new_zeros(batch, heads, new, dtype=torch.float32)
        seen = self.keys.new_zeros(batch, new, dtype=torch.float32)
        self.received = received if self.received is None else torch.cat([self.received, received], -1)
        self.seen = seen if self.seen is None else torch.cat([self.seen, seen], -1)
        return out

    def observe_queries(self, query: Tensor, keys: Tensor, attention_mask: Tensor | None, scaling: float | None) -> None:
        """Add the probes' attention to the buffered tokens' saliency, then compress the buffer's whole chunks.

        Args:
            query: `[batch, heads, queries, head_dim]`, the step's queries.
            keys: `[batch, kv_heads, kv_len, head_dim]`, what `update` returned (the buffer is its end).
            attention_mask: the step's mask (see `gearkit.compressors.saliency.visible_keys`).
            scaling: softmax scale.
        """
        buffered = self.keys.shape[-2]
        if not buffered:
            return
        received, seen = probe_attention(query, keys, attention_mask, scaling, self.recipe.probes)
        received, seen = self.received + received[..., -buffered:], self.seen + seen[..., -buffered:]
        compressed = None
        if buffered >= self.chunk_size:
            compressed = self._compress_buffer(self.keys, self.values, normalized_saliency(received, seen))
        done = compressed[-1] * self.chunk_size if compressed else 0
        self._commit(compressed)
        self.received, self.seen = received[..., done:].clone(), seen[..., done:].clone()

    def reset(self) -> None:
        super().reset()
        self.received = self.seen = None

    def _select(self, index: Tensor) -> None:
        super()._select(index)
        if self.received is not None:
            index = index.to(self.received.device)
            self.received, self.seen = self.received.index_select(0, index), self.seen.index_select(0, index)

    def crop(self, tokens_to_remove: int) -> None:
        """As `GearLayer.crop`; tokens that return to the buffer from a compressed chunk start with no saliency."""
        buffered = self.keys.shape[-2] if self.is_initialized else 0
        super().crop(tokens_to_remove)
        if self.received is None:
            return
        kept = self.keys.shape[-2]
        if -tokens_to_remove <= buffered:
            self.received, self.seen = self.received[..., :kept].clone(), self.seen[..., :kept].clone()
        else:
            self.received = self.received.new_zeros(*self.received.shape[:2], kept)
            self.seen = self.seen.new_zeros(self.seen.shape[0], kept)

    def held_tensors(self) -> list[Tensor]:
        extra = [] if self.received is None else [self.received, self.seen]
        return super().held_tensors() + extra

    def memory_report(self) -> MemoryReport:
        report = super().memory_report()
        if self.received is not None:
            report.components["probe_scores"] = tensor_nbytes(self.received) + tensor_nbytes(self.seen)
        return report


class GearCache(Cache):
    """A `transformers` `Cache` that stores keys and values compressed by a gearkit recipe.

    Pass it to `model.generate(..., cache=GearCache("gear-4", model.config))` or to a forward call.

    Args:
        recipe: a `Recipe` or a registered recipe name.
        config (transformers.PretrainedConfig | None): the model config; when given, layers are created up front (and unsupported layer types,
            such as sliding-window attention, are refused).
        buffer_dtype: storage dtype of the full-precision buffer (fp16 by default, as the fp16 baseline);
            None keeps the model's dtype.

    Raises:
        ValueError: if the recipe cannot serve this model (e.g. a CSR dictionary trained for another model).
    """

    def __init__(self, recipe: Recipe | str, config=None, buffer_dtype: torch.dtype | None = torch.float16):
        self.recipe = recipes.get(recipe) if isinstance(recipe, str) else recipe
        layer = SaliencyLayer if self.recipe.needs_saliency else GearLayer
        if config is None:  # layers are appended one at a time, so the next layer's index is len(self.layers)
            super().__init__(layer_class_to_replicate=lambda: layer(self.recipe, buffer_dtype, len(self.layers)))
            return
        text = config.get_text_config(decoder=True)
        types = set(getattr(text, "layer_types", None) or ["full_attention"])
        if types != {"full_attention"}:
            raise ValueError(f"GearCache supports full-attention layers only; this model has {sorted(types)}")
        implementation = getattr(config, "_attn_implementation", None)
        if self.recipe.needs_saliency and implementation not in (None, ATTENTION_NAME):
            raise ValueError(f"the model uses {implementation!r} attention, but " + NEEDS_QUERIES.format(name=self.recipe.name))
        self.recipe.key.check_model(config)
        self.recipe.value.check_model(config)
        super().__init__(layers=[layer(self.recipe, buffer_dtype, i) for i in range(text.num_hidden_layers)])

    def memory_report(self) -> MemoryReport:
        """Bytes held over all layers, by component, with bits per element and ratio against fp16."""
        return functools.reduce(lambda a, b: a + b, (layer.memory_report() for layer in self.layers), MemoryReport({}, 0, 0))

    def held_tensors(self) -> list[Tensor]:
        """Every tensor the cache holds."""
        return [t for layer in self.layers for t in layer.held_tensors()]
