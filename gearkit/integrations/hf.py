"""gearkit in Hugging Face `transformers`: a `Cache` whose layers are chunk stores, and the one cache factory.

`GearCache` works in `generate()` and plain forwards. Each layer follows the model's config
(`gearkit.models.model_family`): a full-attention layer is a `GearLayer`, a thin adapter from transformers'
`CacheLayerMixin` to a framework-free `gearkit.cache.ChunkStore` (buffer, sink copy, compressed chunks); a
sliding-window layer keeps the model's own window, uncompressed (`SlidingLayer`) or compressed by a recipe of its
own (a `GearLayer` over a `gearkit.cache.WindowStore`); a layer of any other kind is refused when the cache is built.
When the model runs gearkit's attention function (`gearkit.integrations.attention`), decode steps of the
full-attention layers read the compressed chunks as stored (`StepView.attend`) instead of receiving the decompressed
past from `update`.

`make_cache` builds every cache gearkit evaluates: a recipe (name or `Recipe` object) as a `GearCache`, or one of
Hugging Face's own `QuantizedCache` baselines (`hf-quanto-2`, ...); `memory_report` reports the bytes of either.
This module is where users import every cache name from: the baselines themselves live in
`gearkit.integrations.baselines`, and `HF_BASELINES` and `available_baselines` are served here too.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from gearkit import recipes
from gearkit.accounting import MemoryReport, tensor_nbytes
from gearkit.cache import StepShared, make_store
from gearkit.cache.store import to_buffer
from gearkit.compressors.rope import RoPE
from gearkit.decode_attention import reads_storage
from gearkit.deprecation import moved
from gearkit.integrations import baselines
from gearkit.integrations.attention import NAME as ATTENTION_NAME
from gearkit.integrations.attention import check_taken, offer, withdraw
from gearkit.integrations.baselines import HF_BASELINES as HF_BASELINES
from gearkit.integrations.baselines import available_baselines as available_baselines
from gearkit.models import model_identity
from gearkit.models.family import Layer, model_family
from gearkit.recipe import Recipe

NEEDS_QUERIES = (
    "recipe {name!r} picks salient tokens from the model's queries, which reach the cache only "
    "through gearkit's attention function: call model.set_attn_implementation("
    "gearkit.integrations.attention.register()) (or load the model with that attn_implementation)"
)


class GearLayer(CacheLayerMixin):
    """One model layer's cache: a `ChunkStore` seen through transformers' layer interface.

    `keys`/`values` are the store's full-precision buffer `[batch, kv_heads, buffered, head_dim]`; everything
    else lives in `store`. A layer with a sliding `window` holds a `WindowStore`, which drops the chunks the window
    has left and is read decompressed.

    Args:
        recipe: the key/value pipelines, the buffer size (= chunk size) and the sink tokens.
        buffer_dtype: storage dtype of the buffer; None keeps the model's dtype.
        layer_idx: the model layer this cache layer serves (stages with per-layer dictionaries need it).
        config (transformers.PretrainedConfig | None): the model's config, read at every update to see whether
            gearkit's attention function runs the step (then the step reads the compressed storage); None: never.
        shared: the memo the cache's layers share for a step (see `gearkit.cache.StepShared`).
        rope: the layer's rotary embedding, for recipes that code keys before RoPE.
        window: the layer's sliding window in tokens, or None for a layer that attends to the whole past.
    """

    is_compileable = False
    supports_early_init = False

    def __init__(
        self,
        recipe: Recipe,
        buffer_dtype: torch.dtype | None = torch.float16,
        layer_idx: int | None = None,
        config=None,
        shared: StepShared | None = None,
        rope: RoPE | None = None,
        window: int | None = None,
    ):
        self.store = make_store(recipe, buffer_dtype, layer_idx, shared, rope, window)
        self.layer_idx = layer_idx
        self.config = config  # the model's config: it says which attention function runs this step
        self.window = window
        self.is_sliding = window is not None
        self.reads_storage = False  # whether the last step read the compressed storage

    recipe = property(lambda self: self.store.recipe, doc="The recipe.")
    keys = property(lambda self: self.store.keys, doc="The buffer's keys `[batch, kv_heads, buffered, head_dim]`.")
    values = property(lambda self: self.store.values, doc="The buffer's values, like `keys`.")
    is_initialized = property(lambda self: self.store.is_initialized, doc="Whether a first update has run.")
    device = property(lambda self: self.store.keys.device, doc="Device of the held tensors.")
    dtype = property(lambda self: self.store.dtype, doc="The model's dtype (what `update` returns).")
    record_past = property(
        lambda self: self.store.record_past,
        lambda self, on: setattr(self.store, "record_past", on),
        doc="Whether compression waits for the next `crop`, so rolling back the tokens added since leaves no trace.",
    )
    is_croppable = property(
        lambda self: self.store.record_past,
        doc="Whether `crop` puts the layer back exactly: while `record_past` is set (cropping into a compressed "
        "chunk otherwise re-encodes the tokens of that chunk that stay).",
    )

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing to do: the store initialises itself on its first append."""

    def activate_past_recording(self, **kwargs: object) -> None:
        """Hold every step's tokens in the buffer until the next `crop` (transformers calls this for assisted
        decoding, which crops the rejected draft tokens after each step): then `crop` is exact."""
        self.store.record_past = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]:
        """Add new tokens `[batch, kv_heads, new, head_dim]`; return the keys and values attention reads.

        When the model's config says gearkit's attention function runs this step (`make_cache` sets it), that is
        only the buffer and the new tokens, and the step (handed to the attention function with
        `gearkit.integrations.attention.offer`) reads the compressed chunks as stored, block by block: the
        full-precision past is never rebuilt. Otherwise (another attention function, no config to tell, a
        saliency-driven recipe, a sliding window, a long prefill on a GPU) it is every token held, decompressed,
        `KV`.

        The attention layer's keyword arguments (`kwargs=`, as `transformers` passes them) carry `position_ids`
        `[batch or 1, new]`: on the first update they tell where a left-padded row's real tokens start, so the
        sink copy holds each row's own first tokens.

        Raises:
            RuntimeError: for a saliency-driven recipe whose whole chunks still wait for queries (the model does
                not use gearkit's attention function), or when the previous step's storage read never ran.
            ValueError: for non-finite or malformed states; the layer is left unchanged.
        """
        store = self.store
        if store.recipe.needs_saliency and store.buffered >= store.buffer_size and not store.record_past:
            raise RuntimeError(NEEDS_QUERIES.format(name=store.recipe.name))
        check_taken()  # never silently lose the compressed past
        from_storage = (
            self.storage_attention_in_use()
            and not (store.recipe.needs_saliency or self.is_sliding)
            and store.chunks > 0
            and reads_storage(key_states.device, key_states.shape[-2])
        )
        forwarded = kwargs.get("kwargs")
        position_ids = forwarded.get("position_ids") if isinstance(forwarded, dict) else None
        step = store.append(key_states, value_states, position_ids)
        self.reads_storage = from_storage
        out = step.fresh() if from_storage else step.dense()
        offer(self, out[0], step if from_storage else None)
        return out

    def storage_attention_in_use(self) -> bool:
        """Whether gearkit's attention function runs the model's attention now (so a step may read the storage)."""
        return self.config is not None and getattr(self.config, "_attn_implementation", None) == ATTENTION_NAME

    def observe_queries(
        self, query: Tensor, keys: Tensor, attention_mask: Tensor | None, scaling: float | None
    ) -> None:
        """See the step's queries `[batch, heads, queries, head_dim]` and the keys `update` returned (saliency-driven
        recipes score and compress their buffered tokens here; a no-op for the others)."""
        self.store.observe_queries(query, keys, attention_mask, scaling)

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.store.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.store.mask_sizes(query_length)

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def reset(self) -> None:
        self.store.reset()
        self.reads_storage = False

    def snapshot(self) -> dict:
        """This layer's state, for `restore` (see `ChunkStore.snapshot`)."""
        return self.store.snapshot()

    def restore(self, snapshot: dict) -> None:
        """Go back to the state `snapshot()` returned."""
        self.store.restore(snapshot)

    def offload(self):
        """Refused: the compressed chunks are the saving; moving layers off the device is not supported."""
        raise RuntimeError("GearCache does not offload layers (its compressed chunks are the saving)")

    prefetch = offload

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.store.select(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self.store.select(torch.as_tensor(indices).flatten())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.store.select(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens (a negative count, as in `DynamicLayer.crop`); see
        `ChunkStore.crop`."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove, as DynamicLayer.crop does")
        self.store.crop(-tokens_to_remove)

    def held_tensors(self) -> list[Tensor]:
        """Every tensor this layer holds."""
        return self.store.held_tensors()

    def memory_report(self) -> MemoryReport:
        """Bytes held by this layer, by component."""
        return self.store.memory_report()


class SlidingLayer(DynamicSlidingWindowLayer):
    """A sliding-window layer's own window, uncompressed: transformers' `DynamicSlidingWindowLayer` (the last
    `sliding_window - 1` tokens, and their mask sizes), holding its tokens in the cache's buffer dtype and only them,
    with what a `GearCache` step needs (snapshots, held tensors, a memory report whose component is `window`).

    Args:
        sliding_window: the layer's window in tokens (each query sees itself and the `sliding_window - 1` before it).
        buffer_dtype: storage dtype of the window; None keeps the model's dtype.
    """

    def __init__(self, sliding_window: int, buffer_dtype: torch.dtype | None = torch.float16):
        super().__init__(sliding_window=sliding_window)
        self.buffer_dtype = buffer_dtype

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]:
        """Add new tokens `KV` (checked, in the buffer dtype); return the window and them in the model's dtype.

        Raises:
            ValueError: for non-finite states, or states that overflow the buffer dtype; the layer is left unchanged.
        """
        dtype = key_states.dtype
        keys = to_buffer(key_states, self.buffer_dtype, "key_states")
        values = to_buffer(value_states, self.buffer_dtype, "value_states")
        keys, values = super().update(keys, values, *args, **kwargs)
        self._own()
        return keys.to(dtype), values.to(dtype)

    def crop(self, tokens_to_remove: int) -> None:
        """`DynamicSlidingWindowLayer.crop` (a negative count), then the window holds its own bytes.

        Raises:
            ValueError: when the layer would no longer hold the window the next step needs (the tokens before the
                ones removed have left it).
        """
        if self.is_initialized and tokens_to_remove < 0:
            keep = self.cumulative_length + tokens_to_remove
            if self.keys.shape[-2] + tokens_to_remove < min(keep, self.sliding_window - 1):
                raise ValueError(
                    f"cannot remove {-tokens_to_remove} tokens: this sliding-window layer holds only its last "
                    f"{self.keys.shape[-2]}, and the window before them has left it"
                )
        super().crop(tokens_to_remove)
        self._own()

    def _own(self) -> None:
        """Hold the window's tokens in tensors of their own (a slice would keep the whole step's tensor alive)."""
        if self.is_initialized and self.keys.untyped_storage().nbytes() != tensor_nbytes(self.keys):
            self.keys, self.values = self.keys.clone(), self.values.clone()

    def snapshot(self) -> dict:
        """This layer's state, for `restore` (held tensors are never written in place: a shallow copy is it)."""
        return dict(vars(self))

    def restore(self, snapshot: dict) -> None:
        """Go back to the state `snapshot()` returned."""
        vars(self).update(snapshot)

    def held_tensors(self) -> list[Tensor]:
        """The window's keys and values (none before the first update)."""
        return [self.keys, self.values] if self.is_initialized else []

    def memory_report(self) -> MemoryReport:
        """Bytes held (component `window`) over the tokens held: the window, not the whole sequence."""
        if not self.is_initialized:
            return MemoryReport({}, 0, 0)
        batch, heads, held, _ = self.keys.shape
        elements = batch * heads * held * (self.keys.shape[-1] + self.values.shape[-1])
        nbytes = tensor_nbytes(self.keys) + tensor_nbytes(self.values)
        return MemoryReport({"window": nbytes}, self.cumulative_length, elements)


class GearCache(Cache):
    """A `transformers` `Cache` that stores keys and values compressed by a gearkit recipe.

    Pass it to `model.generate(..., cache=GearCache("gear-4", model.config))` or to a forward call.

    Each layer follows the model's config (`gearkit.models.model_family`): full-attention layers run `recipe`;
    sliding-window layers (Gemma 2/3, Mistral with a window, Phi-3) keep the model's window, uncompressed by default
    or compressed by `sliding`; a layer kind the cache cannot serve (chunked or linear attention, a shared-KV layer)
    is refused, as is a recipe that cannot code some layer (its head dim, its rotary embedding), all before any token.

    Args:
        recipe: a `Recipe` or a registered recipe name.
        config (transformers.PretrainedConfig | None): the model's config; when given, layers are created up front
            and read it to see whether gearkit's attention function runs a step (then decode reads the compressed
            storage; a deep copy of the cache follows the same config). Without it every layer is full attention,
            created as the model reaches it, and every step attends to the whole past, decompressed.
        buffer_dtype: storage dtype of the full-precision buffer and of uncompressed windows (fp16 by default, as
            the fp16 baseline); None keeps the model's dtype.
        sliding: a `Recipe` or recipe name for the sliding-window layers (no sink tokens, no saliency); None keeps
            their windows uncompressed.

    Raises:
        ValueError: if the cache cannot serve this model: a layer kind it does not know, an encoder-decoder model,
            or a recipe that cannot serve it (a CSR dictionary trained for another model, a head dim a stage cannot
            code, a rotary embedding that cannot be undone from positions).
    """

    def __init__(
        self,
        recipe: Recipe | str,
        config=None,
        buffer_dtype: torch.dtype | None = torch.float16,
        sliding: Recipe | str | None = None,
    ):
        self.recipe = _recipe(recipe, "recipe", config)
        self.sliding = None if sliding is None else _recipe(sliding, "sliding", config)
        self.config, self.buffer_dtype = config, buffer_dtype
        self.shared = StepShared()  # what every layer of a step computes alike, computed by the first
        self._before: list[dict] = []  # the layers' states before the current step (see `update`)
        self._layers_known = config is not None  # whether the last layer's update ends a step
        if config is None:  # layers are created by `update`, as the model reaches them
            if self.sliding is not None:
                raise ValueError("GearCache(sliding=...) needs the model's config, which says which layers slide")
            if "rope" in self.recipe.key.requires | self.recipe.value.requires:
                raise ValueError(
                    f"recipe {self.recipe.name!r} codes keys before RoPE: pass the model's config "
                    "(GearCache(recipe, model.config)), which gives each layer's rotary embedding"
                )
            if self.recipe.model_bound:
                raise ValueError(
                    f"recipe {self.recipe.name!r} was made for one model: pass that model's config "
                    "(GearCache(recipe, model.config), or make_cache(recipe, model)) so the cache can check it"
                )
            super().__init__(layers=[])
            return
        implementation = getattr(config, "_attn_implementation", None)
        if self.recipe.needs_saliency and implementation not in (None, ATTENTION_NAME):
            raise ValueError(
                f"the model uses {implementation!r} attention, but " + NEEDS_QUERIES.format(name=self.recipe.name)
            )
        identity = model_identity(config, getattr(config, "_name_or_path", "") or "this model")
        for recipe in (self.recipe, self.sliding):
            if recipe is not None:
                recipe.check_identity(identity)
                check_model(recipe, config)
        super().__init__(layers=[self._layer(spec) for spec in model_family(config).layers])

    def _layer(self, spec: Layer) -> GearLayer | SlidingLayer:
        """The cache layer for `spec`, checked against the recipe that codes it."""
        if spec.problem is not None:
            raise ValueError(f"GearCache cannot serve this model: {spec.problem}")
        recipe = self.recipe if spec.window is None else self.sliding
        if recipe is None:
            return SlidingLayer(spec.window, self.buffer_dtype)
        check_layer(recipe, spec)
        return GearLayer(recipe, self.buffer_dtype, spec.index, self.config, self.shared, spec.rope, spec.window)

    def __deepcopy__(self, memo: dict) -> GearCache:
        """A copy that holds copies of every tensor but the same model config (which attention function runs is the
        model's setting, so the copy follows it as the original does)."""
        if self.config is not None:
            memo[id(self.config)] = self.config
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        for name, value in vars(self).items():
            setattr(twin, name, copy.deepcopy(value, memo))
        return twin

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]:
        """`GearLayer.update` of layer `layer_idx` (created here when the cache was built without a config), as
        one step of all layers: if it raises, every layer this step has updated goes back to its state before
        the step, and the error propagates. A step abandoned between layers (an error in the model's own code)
        is undone the same way when the next step starts, which then raises (its mask counted the abandoned
        tokens) and can simply be run again.

        Args:
            key_states: `[batch, kv_heads, new, head_dim]`.
            value_states: like `key_states`.
            layer_idx: the model layer.
            *args: passed on to `GearLayer.update`.
            **kwargs: passed on to `GearLayer.update` (transformers' `kwargs=` with the `position_ids`).

        Returns:
            The keys and values attention reads (see `GearLayer.update`).

        Raises:
            RuntimeError: when the previous step stopped between layers (the cache is rolled back; run again).
        """
        while len(self.layers) <= layer_idx:
            self.layers.append(GearLayer(self.recipe, self.buffer_dtype, len(self.layers), shared=self.shared))
        if layer_idx == 0 and self._settle():  # this step's mask counted the abandoned tokens: it cannot go on
            raise RuntimeError(
                "the previous step stopped between layers (an error in the model); the cache is back "
                "as it was before that step: run this step again"
            )
        if layer_idx == len(self._before):
            self._before.append(self.layers[layer_idx].snapshot())
        try:
            out = self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)
        except BaseException:
            self._roll_back()
            raise
        if len(self._before) == len(self.layers) and self._layers_known:
            self._before = []  # the step is complete: hold no earlier state
        return out

    def _settle(self) -> bool:
        """Between steps: undo a step that stopped between layers; returns whether there was one."""
        if not self._before:
            return False
        if len({layer.get_seq_length() for layer in self.layers}) > 1:  # it stopped part-way
            self._roll_back()
            return True
        self._before, self._layers_known = [], True  # it was a first step, which created the layers
        return False

    def reset(self) -> None:
        """Forget every token (a step abandoned part-way included)."""
        self._before = []
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens from every layer (see `GearLayer.crop`, `SlidingLayer.crop`),
        after undoing a step abandoned part-way; if a layer refuses, every layer is left as it was."""
        self._settle()
        states = [layer.snapshot() for layer in self.layers]
        try:
            super().crop(tokens_to_remove)
        except BaseException:
            for layer, state in zip(self.layers, states):
                layer.restore(state)
            raise

    def _roll_back(self) -> None:
        """Put every layer the current step has updated back as it was before the step."""
        for layer, state in zip(self.layers, self._before):
            layer.restore(state)
        self._before = []
        withdraw()  # an offer the rolled-back step made is void

    def memory_report(self) -> MemoryReport:
        """Bytes held over all layers, by component, with bits per element and ratio against fp16."""
        return MemoryReport.total(layer.memory_report() for layer in self.layers)

    def held_tensors(self) -> list[Tensor]:
        """Every tensor the cache holds."""
        return [t for layer in self.layers for t in layer.held_tensors()]


def _recipe(recipe: Recipe | str, name: str, config=None) -> Recipe:
    """`recipe`, or the recipe of that name (for the model of `config`: see `gearkit.recipes.for_model`)."""
    if isinstance(recipe, str):
        return recipes.get(recipe) if config is None else recipes.for_model(recipe, config)
    if not isinstance(recipe, Recipe):
        owner = "GearCache" if name == "recipe" else f"GearCache's {name}"
        raise TypeError(f"{owner} takes a Recipe or a registered recipe name, got {type(recipe).__name__}")
    return recipe


def check_model(recipe: Recipe, config) -> None:
    """Raise unless every stage of `recipe` can serve the model of `config`; a recipe made for one model (a CSR
    dictionary, a calibrated bit allocation) that does not fit says how to make one for this model.

    Raises:
        ValueError: for a stage that refuses the model.
        FileNotFoundError: for a dictionary file that is not there.
    """
    try:
        recipe.key.check_model(config)
        recipe.value.check_model(config)
    except (ValueError, FileNotFoundError) as e:
        if recipe.needs_dictionary:
            how = (
                f"recipe {recipe.name!r} codes with a CSR dictionary, which must be trained for this model: train one "
                "with `gearkit dict train --model MODEL --out FILE` and pass it (--dictionary FILE, or "
                "gearkit.csr.csr(sparsity, FILE) in Python)"
            )
        elif recipe.model_bound:
            how = (
                f"recipe {recipe.name!r} is a bit allocation calibrated for one model: run `gearkit calibrate --model "
                "MODEL` for this one and pass the recipe file it writes"
            )
        else:
            raise
        raise type(e)(f"{how} ({e})") from None


def check_layer(recipe: Recipe, spec: Layer) -> None:
    """Raise `ValueError` unless `recipe` can code the model layer `spec`: every stage's shape limits at the layer's
    head dim (a Hadamard rotation needs a power of two), a stage for the layer where the recipe picks one per layer
    (one chunk of zeros is coded to find out), and the layer's rotary embedding for pre-RoPE stages."""
    for pipeline in (recipe.key, recipe.value):
        try:
            pipeline.check_chunk(recipe.buffer_size, spec.head_dim)
            needs = pipeline.requires
            if "layer" in needs and "saliency" not in needs and ("rope" not in needs or spec.rope is not None):
                chunk = torch.zeros(1, spec.kv_heads, recipe.buffer_size, spec.head_dim)
                start = torch.zeros(1, dtype=torch.long)
                pipeline.compress(chunk, layer=spec.index, positions=start, rope=spec.rope)
        except ValueError as e:
            raise ValueError(
                f"recipe {recipe.name!r} cannot code layer {spec.index} (head dim {spec.head_dim}): {e}"
            ) from None
        if "rope" in pipeline.requires and spec.rope is None:
            raise ValueError(
                f"recipe {recipe.name!r} codes keys before RoPE, which layer {spec.index} of this model cannot undo: "
                f"{spec.rope_problem}; use a recipe that codes keys as the model caches them"
            )


# -- the one cache factory ------------------------------------------------------------------------------------
def check_cache_name(name: str) -> str:
    """Return `name` if it is a recipe or an installed HF baseline, else raise `ValueError` listing both.

    Raises:
        ValueError: for an unknown name or a baseline whose backend is not installed.
        FileExistsError: for a quanto baseline whose C++ extension build is blocked by a stale lock.
    """
    if name in HF_BASELINES:
        return baselines.check_baseline(name)
    try:
        recipes.get(name)
    except ValueError as e:
        raise ValueError(f"{e}; Hugging Face baselines: {', '.join(HF_BASELINES)}") from None
    return name


def cache_name(spec: str | Recipe) -> str:
    """The name of a cache spec (a recipe's name, or the string itself)."""
    return spec.name if isinstance(spec, Recipe) else spec


def make_cache(
    spec: str | Recipe,
    model,
    attention: str = "gearkit",
    buffer_dtype: torch.dtype | None = torch.float16,
    sliding: str | Recipe | None = None,
) -> Cache:
    """A fresh cache for `spec`: a recipe (name or `Recipe`) as a `GearCache`, or an HF baseline name as a
    `QuantizedCache`.

    With `attention="gearkit"` (the default) a recipe's cache switches `model` to gearkit's attention function
    (`model.set_attn_implementation`), so decode steps read the compressed chunks as stored, block by block,
    without rebuilding the full-precision past; every other attention call (no cache, other caches) gets SDPA's
    result from it, or for a model that soft-caps its attention scores (Gemma 2), the soft-capped attention SDPA
    cannot compute. `attention="sdpa"` is the compatibility mode: the model attends with SDPA over the whole past
    decompressed at every step (same results, more memory and time). Saliency-driven recipes (ZipCache) need
    gearkit's function: it passes them the queries.

    Args:
        spec: a recipe name, a `Recipe`, or one of `HF_BASELINES`.
        model (transformers.PreTrainedModel): the model the cache serves.
        attention: `"gearkit"` or `"sdpa"` (recipes only).
        buffer_dtype: storage dtype of a recipe's full-precision buffer and sink copy (fp16 by default, as the fp16
            baseline); None keeps the model's dtype, as a bf16 model whose keys exceed fp16's range needs
            (Hugging Face's caches keep their residual in the model's dtype and ignore it).
        sliding: the recipe of the sliding-window layers (see `GearCache`); None keeps their windows uncompressed.

    Raises:
        ValueError: for an unknown name, a missing baseline backend, a recipe that cannot serve the model,
            `attention="sdpa"` with a saliency-driven recipe or a soft-capping model, or `sliding` with a baseline.
    """
    if attention not in ("gearkit", "sdpa"):
        raise ValueError(f"attention must be 'gearkit' or 'sdpa', got {attention!r}")
    if isinstance(spec, str) and spec in HF_BASELINES:
        if sliding is not None:
            raise ValueError(f"sliding= takes a gearkit recipe for the sliding-window layers, not with {spec!r}")
        return baselines.make_baseline(spec, model)
    recipe = spec if isinstance(spec, Recipe) else recipes.for_model(check_cache_name(spec), model.config)
    if attention == "sdpa" and recipe.needs_saliency:
        raise ValueError(f"recipe {recipe.name!r} scores tokens from the model's queries: it needs attention='gearkit'")
    if attention == "sdpa" and model_family(model.config).softcap is not None:
        raise ValueError(
            "this model soft-caps its attention scores, which SDPA cannot: use attention='gearkit' (gearkit's "
            "attention applies the soft cap)"
        )
    previous = getattr(model.config, "_attn_implementation", None)
    if attention == "gearkit":
        from gearkit.integrations.attention import register

        model.set_attn_implementation(register())
    elif previous == ATTENTION_NAME:
        model.set_attn_implementation("sdpa")
    try:
        return GearCache(recipe, model.config, buffer_dtype, sliding)
    except Exception:
        if previous is not None:  # a refused cache leaves the model as it was
            model.set_attn_implementation(previous)
        raise


def memory_report(cache: Cache, config, batch: int = 1) -> MemoryReport:
    """Bytes held by a cache of a model with `config`, holding `batch` sequences: a `GearCache`'s own report, or
    `gearkit.integrations.baselines.memory_report` for Hugging Face's caches (`QuantizedCache` nominal, any other
    as the dense keys and values it holds)."""
    if isinstance(cache, GearCache):
        return cache.memory_report()
    return baselines.memory_report(cache, config, batch)


def compressed_tokens(cache: Cache) -> tuple[int, int]:
    """How many of the tokens `cache` holds per sequence are held compressed: `(compressed, held)` (the rest is
    the full-precision buffer; an HF `QuantizedCache`'s residual)."""
    if not isinstance(cache, GearCache):
        return baselines.compressed_tokens(cache)
    store = _full_store(cache)
    if store is None:
        return 0, cache.get_seq_length() if cache.layers else 0
    return store.chunks * store.buffer_size, store.length


def _full_store(cache: GearCache):
    """The store of the cache's first full-attention layer (the recipe's), or None before any exists."""
    return next((layer.store for layer in cache.layers if isinstance(layer, GearLayer) and not layer.is_sliding), None)


def cache_step(cache: Cache, hf_step: int = baselines.STEP) -> int:
    """Tokens to feed next: up to where `cache` compresses its next chunk, so compression happens between steps
    (`hf_step` for an HF `QuantizedCache`: within its 128-token full-precision residual)."""
    if isinstance(cache, GearCache):
        store = _full_store(cache)
        return cache.recipe.buffer_size if store is None else store.tokens_to_next_chunk()
    return hf_step


__getattr__ = moved(
    __name__,
    {
        "STALE_LOCK_S": "gearkit.integrations.baselines:STALE_LOCK_S",
        "check_build_lock": "gearkit.integrations.baselines:check_build_lock",
        "head_dim": "gearkit.models:head_dim",
    },
)
