"""gearkit in Hugging Face `transformers`: a `Cache` whose layers are chunk stores, and the one cache factory.

`GearCache` works in `generate()` and plain forwards. Each `GearLayer` is a thin adapter from transformers'
`CacheLayerMixin` to a framework-free `gearkit.cache.ChunkStore` (buffer, sink copy, compressed chunks). When
the model runs gearkit's attention function (`gearkit.integrations.attention`), decode steps read the
compressed chunks as stored (`StepView.attend`) instead of receiving the decompressed past from `update`.

`make_cache` builds every cache gearkit evaluates: a recipe (name or `Recipe` object) as a `GearCache`, or one of
Hugging Face's own `QuantizedCache` baselines (`hf-quanto-2`, ...); `memory_report` reports the bytes of either.
This module is where users import every cache name from: the baselines themselves live in
`gearkit.integrations.baselines`, and `HF_BASELINES` and `available_baselines` are served here too.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from gearkit import recipes
from gearkit.accounting import MemoryReport
from gearkit.cache import StepShared, make_store
from gearkit.decode_attention import reads_storage
from gearkit.deprecation import moved
from gearkit.integrations import baselines
from gearkit.integrations.attention import NAME as ATTENTION_NAME
from gearkit.integrations.attention import check_taken, offer, withdraw
from gearkit.integrations.baselines import HF_BASELINES as HF_BASELINES
from gearkit.integrations.baselines import available_baselines as available_baselines
from gearkit.recipe import Recipe

NEEDS_QUERIES = (
    "recipe {name!r} picks salient tokens from the model's queries, which reach the cache only "
    "through gearkit's attention function: call model.set_attn_implementation("
    "gearkit.integrations.attention.register()) (or load the model with that attn_implementation)"
)


class GearLayer(CacheLayerMixin):
    """One model layer's cache: a `ChunkStore` seen through transformers' layer interface.

    `keys`/`values` are the store's full-precision buffer `[batch, kv_heads, buffered, head_dim]`; everything
    else lives in `store`.

    Args:
        recipe: the key/value pipelines, the buffer size (= chunk size) and the sink tokens.
        buffer_dtype: storage dtype of the buffer; None keeps the model's dtype.
        layer_idx: the model layer this cache layer serves (stages with per-layer dictionaries need it).
        config (transformers.PretrainedConfig | None): the model's config, read at every update to see whether
            gearkit's attention function runs the step (then the step reads the compressed storage); None: never.
        shared: the memo the cache's layers share for a step (see `gearkit.cache.StepShared`).
    """

    is_compileable = False
    is_croppable = False  # cropping into a compressed chunk cannot restore its tokens exactly
    is_sliding = False
    supports_early_init = False

    def __init__(
        self,
        recipe: Recipe,
        buffer_dtype: torch.dtype | None = torch.float16,
        layer_idx: int | None = None,
        config=None,
        shared: StepShared | None = None,
    ):
        self.store = make_store(recipe, buffer_dtype, layer_idx, shared)
        self.layer_idx = layer_idx
        self.config = config  # the model's config: it says which attention function runs this step
        self.reads_storage = False  # whether the last step read the compressed storage

    recipe = property(lambda self: self.store.recipe, doc="The recipe.")
    keys = property(lambda self: self.store.keys, doc="The buffer's keys `[batch, kv_heads, buffered, head_dim]`.")
    values = property(lambda self: self.store.values, doc="The buffer's values, like `keys`.")
    is_initialized = property(lambda self: self.store.is_initialized, doc="Whether a first update has run.")
    device = property(lambda self: self.store.keys.device, doc="Device of the held tensors.")
    dtype = property(lambda self: self.store.dtype, doc="The model's dtype (what `update` returns).")

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing to do: the store initialises itself on its first append."""

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]:
        """Add new tokens `[batch, kv_heads, new, head_dim]`; return the keys and values attention reads.

        When the model's config says gearkit's attention function runs this step (`make_cache` sets it), that is
        only the buffer and the new tokens, and the step (handed to the attention function with
        `gearkit.integrations.attention.offer`) reads the compressed chunks as stored, block by block: the
        full-precision past is never rebuilt. Otherwise (another attention function, no config to tell, a
        saliency-driven recipe, a long prefill on a GPU) it is every token held, decompressed, `KV`.

        The attention layer's keyword arguments (`kwargs=`, as `transformers` passes them) carry `position_ids`
        `[batch or 1, new]`: on the first update they tell where a left-padded row's real tokens start, so the
        sink copy holds each row's own first tokens.

        Raises:
            RuntimeError: for a saliency-driven recipe whose whole chunks still wait for queries (the model does
                not use gearkit's attention function), or when the previous step's storage read never ran.
            ValueError: for non-finite or malformed states; the layer is left unchanged.
        """
        store = self.store
        if store.recipe.needs_saliency and store.buffered >= store.buffer_size:
            raise RuntimeError(NEEDS_QUERIES.format(name=store.recipe.name))
        check_taken()  # never silently lose the compressed past
        from_storage = (
            self.storage_attention_in_use()
            and not store.recipe.needs_saliency
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
        return self.store.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

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

    def memory_report(self) -> MemoryReport:
        """Bytes held by this layer, by component."""
        return self.store.memory_report()


class GearCache(Cache):
    """A `transformers` `Cache` that stores keys and values compressed by a gearkit recipe.

    Pass it to `model.generate(..., cache=GearCache("gear-4", model.config))` or to a forward call.

    Args:
        recipe: a `Recipe` or a registered recipe name.
        config (transformers.PretrainedConfig | None): the model's config; when given, layers are created up front
            (unsupported layer types, such as sliding-window attention, are refused) and read it to see whether
            gearkit's attention function runs a step (then decode reads the compressed storage). Without it
            every step attends to the whole past, decompressed.
        buffer_dtype: storage dtype of the full-precision buffer (fp16 by default, as the fp16 baseline);
            None keeps the model's dtype.

    Raises:
        TypeError: if `recipe` is neither a `Recipe` nor a name.
        ValueError: if the recipe cannot serve this model (e.g. a CSR dictionary trained for another model).
    """

    def __init__(self, recipe: Recipe | str, config=None, buffer_dtype: torch.dtype | None = torch.float16):
        self.recipe = recipes.get(recipe) if isinstance(recipe, str) else recipe
        if not isinstance(self.recipe, Recipe):
            raise TypeError(f"GearCache takes a Recipe or a registered recipe name, got {type(recipe).__name__}")
        self.buffer_dtype = buffer_dtype
        self.shared = StepShared()  # what every layer of a step computes alike, computed by the first
        self._before: list[dict] = []  # the layers' states before the current step (see `update`)
        self._layers_known = config is not None  # whether the last layer's update ends a step
        if config is None:  # layers are created by `update`, as the model reaches them
            super().__init__(layers=[])
            return
        check_full_attention(config)
        implementation = getattr(config, "_attn_implementation", None)
        if self.recipe.needs_saliency and implementation not in (None, ATTENTION_NAME):
            raise ValueError(
                f"the model uses {implementation!r} attention, but " + NEEDS_QUERIES.format(name=self.recipe.name)
            )
        self.recipe.key.check_model(config)
        self.recipe.value.check_model(config)
        layers = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[GearLayer(self.recipe, buffer_dtype, i, config, self.shared) for i in range(layers)])

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
        """Remove the last `-tokens_to_remove` tokens (see `GearLayer.crop`), after undoing a step abandoned
        part-way."""
        self._settle()
        super().crop(tokens_to_remove)

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
        return [t for layer in self.layers for t in layer.store.held_tensors()]


def check_full_attention(config) -> None:
    """Raise `ValueError` unless every layer of the model with `config` attends to the whole past.

    A sliding-window layer (a `layer_types` entry other than `full_attention`, or a Mistral-style
    `sliding_window` without `layer_types`) holds only its window; a `GearCache` would keep and report every
    token, so it refuses such models rather than mis-report them.
    """
    text = config.get_text_config(decoder=True)
    types = getattr(text, "layer_types", None)
    if types is not None:
        if set(types) != {"full_attention"}:
            raise ValueError(f"GearCache supports full-attention layers only; this model has {sorted(set(types))}")
    elif getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True):
        raise ValueError(
            f"GearCache supports full-attention layers only; this model attends to a sliding window of "
            f"{text.sliding_window} tokens (config.sliding_window); set config.sliding_window = None to "
            "attend to the whole past instead (unlike the model's training beyond the window)"
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
    spec: str | Recipe, model, attention: str = "gearkit", buffer_dtype: torch.dtype | None = torch.float16
) -> Cache:
    """A fresh cache for `spec`: a recipe (name or `Recipe`) as a `GearCache`, or an HF baseline name as a
    `QuantizedCache`.

    With `attention="gearkit"` (the default) a recipe's cache switches `model` to gearkit's attention function
    (`model.set_attn_implementation`), so decode steps read the compressed chunks as stored, block by block,
    without rebuilding the full-precision past; every other attention call (no cache, other caches) gets SDPA's
    result from it. `attention="sdpa"` is the compatibility mode: the model attends with SDPA over the whole
    past decompressed at every step (same results, more memory and time). Saliency-driven recipes (ZipCache)
    need gearkit's function: it passes them the queries.

    Args:
        spec: a recipe name, a `Recipe`, or one of `HF_BASELINES`.
        model (transformers.PreTrainedModel): the model the cache serves.
        attention: `"gearkit"` or `"sdpa"` (recipes only).
        buffer_dtype: storage dtype of a recipe's full-precision buffer and sink copy (fp16 by default, as the fp16
            baseline); None keeps the model's dtype, as a bf16 model whose keys exceed fp16's range needs
            (Hugging Face's caches keep their residual in the model's dtype and ignore it).

    Raises:
        ValueError: for an unknown name, a missing baseline backend, a recipe that cannot serve the model, or
            `attention="sdpa"` with a saliency-driven recipe.
    """
    if attention not in ("gearkit", "sdpa"):
        raise ValueError(f"attention must be 'gearkit' or 'sdpa', got {attention!r}")
    if isinstance(spec, str) and spec in HF_BASELINES:
        return baselines.make_baseline(spec, model)
    recipe = spec if isinstance(spec, Recipe) else recipes.get(check_cache_name(spec))
    if attention == "gearkit" or recipe.needs_saliency:
        if attention == "sdpa":
            raise ValueError(
                f"recipe {recipe.name!r} scores tokens from the model's queries: it needs attention='gearkit'"
            )
        from gearkit.integrations.attention import register

        model.set_attn_implementation(register())
    elif getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME:
        model.set_attn_implementation("sdpa")
    return GearCache(recipe, model.config, buffer_dtype)


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
    if not cache.layers:
        return 0, 0
    layer = cache.layers[0]
    return layer.store.chunks * layer.store.buffer_size, layer.get_seq_length()


def cache_step(cache: Cache, hf_step: int = baselines.STEP) -> int:
    """Tokens to feed next: up to where `cache` compresses its next chunk, so compression happens between steps
    (`hf_step` for an HF `QuantizedCache`: within its 128-token full-precision residual)."""
    if isinstance(cache, GearCache):
        return cache.layers[0].store.tokens_to_next_chunk() if cache.layers else cache.recipe.buffer_size
    return hf_step


__getattr__ = moved(
    __name__,
    {
        "STALE_LOCK_S": "gearkit.integrations.baselines:STALE_LOCK_S",
        "check_build_lock": "gearkit.integrations.baselines:check_build_lock",
        "head_dim": "gearkit.models:head_dim",
    },
)
