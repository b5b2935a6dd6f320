"""Every common model family on tiny random-weight configs (built offline with transformers' config classes): exact
recipes equal `DynamicCache` through `generate()`, storage reads equal the decompressed past, pre-RoPE coding
reproduces the model's own keys, every built-in recipe builds or says what to do, and sliding windows and layer
kinds the cache cannot serve are handled where the cache is built."""

import functools
import warnings

import pytest
import torch
import transformers
from transformers import DynamicCache

from gearkit import FullPrecision, Pipeline, PreRoPE, Quantizer, Recipe, recipes
from gearkit.integrations.hf import GearCache, make_cache
from gearkit.models import model_family

BASE = dict(
    vocab_size=97,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_size=64,
    intermediate_size=96,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=1,
)
WINDOW = 12  # below the tokens each test holds
PROMPT, NEW = 11, 10
HELD = PROMPT + NEW - 1  # what a cache holds after generate (the last token is never fed back)
FAMILIES = {
    "llama2": ("LlamaConfig", {}),
    "llama3": (
        "LlamaConfig",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            )
        ),
    ),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "mistral-window": ("MistralConfig", dict(sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", dict(head_dim=16)),  # QK-norm
    "phi3": ("Phi3Config", {}),
    "phi3-partial-96": (  # a quarter of a head dim of 96 turned by RoPE
        "Phi3Config",
        dict(hidden_size=192, num_attention_heads=2, num_key_value_heads=1, partial_rotary_factor=0.5),
    ),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=WINDOW)),  # soft-capping, alternating windows
    "gemma3": (  # hybrid 5:1, local and global RoPE bases, head dim 256
        "Gemma3TextConfig",
        dict(
            num_hidden_layers=6,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=256,
            sliding_window=WINDOW,
            rope_parameters={
                "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                "sliding_attention": dict(rope_type="default", rope_theta=1e4),
            },
        ),
    ),
    "gpt-neox": ("GPTNeoXConfig", dict(num_key_value_heads=4)),  # partial rotary (a quarter)
    "olmo2": ("Olmo2Config", {}),  # QK-norm over the whole projection
    "cohere": ("CohereConfig", {}),  # interleaved RoPE pairs
    "glm": ("GlmConfig", dict(head_dim=16)),  # interleaved pairs on half the head
}
EXACT = Recipe("exact-fp32", Pipeline([FullPrecision(torch.float32)]), Pipeline([FullPrecision(torch.float32)]), 8)
PRE_ROPE_EXACT = Recipe("pre-rope-exact", Pipeline([PreRoPE(FullPrecision(torch.float32))]), EXACT.value, 8)
LOSSY = Recipe("tiny-sink-3", Pipeline([Quantizer(3, 8, "channel")]), Pipeline([Quantizer(3, 8, "token")]), 8, 2)
GREEDY = dict(
    max_new_tokens=NEW,
    min_new_tokens=NEW,
    do_sample=False,
    pad_token_id=0,
    output_logits=True,
    return_dict_in_generate=True,
)


@functools.cache
def config(name: str):
    kind, extra = FAMILIES[name]
    return getattr(transformers, kind)(**{**BASE, **extra})


SLIDING = [name for name in FAMILIES if any(layer.window for layer in model_family(config(name)).layers)]


@functools.cache
def model(name: str):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config(name)).eval()


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "recipe .* stores more bits per element than fp16")  # the fp32 exact recipes
        yield


def prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of 2 (the second row padded by 3) and its mask."""
    ids = torch.randint(2, 97, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    ids[1, :3] = 0
    return ids, (ids != 0).long()


def held_bytes(cache: GearCache) -> int:
    return sum(t.untyped_storage().nbytes() for t in cache.held_tensors())


@functools.cache
def reference(name: str):
    """Greedy generation with transformers' own `DynamicCache` (SDPA, or eager attention where scores are capped)."""
    m = model(name)
    m.set_attn_implementation("sdpa" if model_family(m.config).softcap is None else "eager")
    ids, mask = prompt()
    return m.generate(ids, attention_mask=mask, cache=DynamicCache(config=m.config), **GREEDY)


def generate(name: str, cache) -> transformers.generation.utils.GenerateDecoderOnlyOutput:
    ids, mask = prompt()
    return model(name).generate(ids, attention_mask=mask, cache=cache, **GREEDY)


def assert_same(out, ref, atol: float = 1e-5) -> None:
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=atol, rtol=1e-4)


# -- exact recipes equal DynamicCache -------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "gearkit"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_an_exact_recipe_equals_dynamic_cache(name, attention):
    m, ref = model(name), reference(name)
    if attention == "sdpa" and model_family(m.config).softcap is not None:
        with pytest.raises(
            ValueError, match="soft-caps its attention scores, which SDPA cannot: use attention='gearkit"
        ):
            make_cache(EXACT, m, attention="sdpa")
        return
    make_cache(EXACT, m, attention=attention)  # sets the model's attention
    cache = GearCache(EXACT, m.config, buffer_dtype=None)
    assert_same(generate(name, cache), ref)
    full = [layer for layer in cache.layers if layer.get_max_length() == -1]  # Mistral's windowed layers: none
    assert all(layer.store.chunks == HELD // 8 for layer in full)  # compressed chunks were really used
    assert all(layer.reads_storage == (attention == "gearkit") for layer in full)
    assert cache.memory_report().nbytes == held_bytes(cache)


@pytest.mark.parametrize("name", SLIDING)
def test_sliding_layers_with_a_recipe_of_their_own_equal_dynamic_cache_and_let_chunks_go(name):
    m = model(name)
    make_cache(EXACT, m)
    cache = GearCache(EXACT, m.config, buffer_dtype=None, sliding=EXACT)
    assert_same(generate(name, cache), reference(name))
    report, windows = cache.memory_report(), [layer for layer in cache.layers if layer.is_sliding]
    assert report.nbytes == held_bytes(cache) and any(k.startswith("window_") for k in report.components)
    for layer in windows:  # the chunks before the window's last 11 tokens are dropped
        assert layer.store.offset == 8 and layer.get_mask_sizes(1) == (HELD - 8 + 1, 8)
    heads = model_family(m.config).layers[0]
    per_token = 2 * heads.kv_heads * 2 * heads.head_dim  # batch 2, keys and values
    held = sum(HELD - layer.store.offset if layer.is_sliding else HELD for layer in cache.layers)
    assert report.elements == per_token * held and report.tokens == HELD


def test_uncompressed_windows_are_reported_as_held():
    m = model("mistral-window")
    make_cache(EXACT, m)
    cache = GearCache("kivi-2", m.config)
    generate("mistral-window", cache)
    report = cache.memory_report()
    assert set(report.components) == {"window"} and report.nbytes == held_bytes(cache)
    assert report.elements == 2 * (2 * 2 * (WINDOW - 1) * 32) and report.bits_per_element == 16  # fp16 windows


@pytest.mark.parametrize("sliding", [None, EXACT], ids=["uncompressed-windows", "compressed-windows"])
def test_assisted_decoding_on_windowed_layers_equals_plain_greedy(sliding):
    layers = dict(layer_types=["full_attention", "sliding_attention"])  # a full layer first: crop it, then refuse
    m = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**{**BASE, **FAMILIES["gemma2"][1], **layers}))
    torch.manual_seed(1)
    assistant = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, "num_hidden_layers": 1})).eval()
    ids = torch.randint(2, 97, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=3 * WINDOW, min_new_tokens=3 * WINDOW, do_sample=False, pad_token_id=0)
    plain = m.eval().generate(ids, cache=DynamicCache(config=m.config), **kw)
    make_cache(EXACT, m)
    cache = GearCache(EXACT, m.config, buffer_dtype=None, sliding=sliding)
    assert torch.equal(m.generate(ids, cache=cache, assistant_model=assistant, **kw), plain)
    with pytest.raises(ValueError, match="window"):  # a window cannot be cropped past what it holds
        cache.crop(-2 * WINDOW)
    assert {layer.get_seq_length() for layer in cache.layers} == {PROMPT + 3 * WINDOW - 1}  # every layer as it was


def test_a_window_store_crops_what_it_holds():
    store = GearCache(EXACT, config("mistral-window"), buffer_dtype=None, sliding=EXACT).layers[0].store
    keys = torch.randn(1, 2, 30, 16)
    store.append(keys, keys)
    assert (store.offset, store.chunks, store.buffered) == (16, 1, 6)  # 30 - 11 = 19 visible: chunks 0-1 dropped
    store.crop(5)
    assert store.length == 25 and torch.equal(store.dequantized()[0], keys[:, :, 16:25])
    with pytest.raises(ValueError, match="no longer holds the tokens before 16"):
        store.crop(10)


# -- the storage read equals the decompressed past ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_storage_reads_equal_the_decompressed_past(name):
    m = model(name)
    ids, mask = prompt()
    logits = {}
    for attention in ("eager", "gearkit"):
        make_cache(LOSSY, m)  # gearkit's attention for one prefill (the padding's keys enter the chunks alike)
        cache = GearCache(LOSSY, m.config, buffer_dtype=None)  # no fp16 rounding of what the dense path decodes
        steps = [m(ids, attention_mask=mask, cache=cache).logits[:, -1]]
        if attention == "eager":  # then the model's own attention over the decompressed past
            m.set_attn_implementation("eager")
        for _ in range(6):
            token = steps[-1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            steps.append(m(token, attention_mask=mask, cache=cache).logits[:, -1])
        logits[attention], mask = torch.stack(steps), prompt()[1]
        full = [layer for layer in cache.layers if not layer.is_sliding]
        assert all(layer.reads_storage == (attention == "gearkit") and layer.store.chunks == 2 for layer in full)
    torch.testing.assert_close(logits["gearkit"], logits["eager"], atol=1e-4, rtol=1e-4)


# -- RoPE from the model ----------------------------------------------------------------------------------------------


def keys_before_and_after_rope(m, ids: torch.Tensor) -> tuple[dict, DynamicCache]:
    """Each layer's keys as the model projects (and normalizes) them, `KV`, and the cache of its post-RoPE keys."""
    before, hooks = {}, []
    tokens = ids.shape[1]
    projections = ("k_proj", "qkv_proj", "query_key_value")
    for attention in (a for a in m.modules() if hasattr(a, "layer_idx") and any(hasattr(a, p) for p in projections)):
        spec = model_family(m.config).layers[attention.layer_idx]
        d, i, kv = spec.head_dim, attention.layer_idx, spec.kv_heads * spec.head_dim

        def fused(module, args, out, i=i, d=d, kv=kv, start=None):  # q, k, v in one projection
            b = out.shape[0]
            if start is None:  # GPT-NeoX: [batch, tokens, heads, 3 * head_dim]
                before[i] = out.view(b, tokens, -1, 3 * d)[..., d : 2 * d].transpose(1, 2)
            else:  # Phi-3: queries, then keys
                before[i] = out[..., start : start + kv].view(b, tokens, -1, d).transpose(1, 2)

        def split(module, args, out, i=i, d=d):  # [batch, tokens, (heads head_dim)] or heads already split out
            b = out.shape[0]
            looks_split = out.dim() == 4 and out.shape[2] == tokens and out.shape[1] != tokens
            before[i] = out if looks_split else out.reshape(b, tokens, -1, d).transpose(1, 2)

        if hasattr(attention, "query_key_value"):
            hooks.append(attention.query_key_value.register_forward_hook(fused))
        elif hasattr(attention, "qkv_proj"):
            start = m.config.num_attention_heads * d
            hooks.append(attention.qkv_proj.register_forward_hook(functools.partial(fused, start=start)))
        elif hasattr(attention, "k_proj"):
            norm = getattr(attention, "k_norm", None)
            hooks.append((attention.k_proj if norm is None else norm).register_forward_hook(split))
    cache = DynamicCache(config=m.config)
    m(ids, cache=cache)
    for hook in hooks:
        hook.remove()
    return before, cache


@pytest.mark.parametrize("name", list(FAMILIES))
def test_pre_rope_coding_reproduces_the_models_own_keys(name):
    m = model(name)
    ids = torch.randint(2, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    before, cache = keys_before_and_after_rope(m, ids)
    layers = model_family(m.config).layers
    assert len(before) == len(layers)
    positions = torch.arange(9).expand(2, 9)
    start = torch.zeros(2, dtype=torch.long)
    stage = PreRoPE(FullPrecision(torch.float32))
    for spec in layers:
        pre, post = before[spec.index].float(), cache.layers[spec.index].keys.float()
        torch.testing.assert_close(spec.rope.apply(pre, positions), post, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(spec.rope.undo(post, positions), pre, atol=1e-5, rtol=1e-5)
        part = Pipeline([stage]).compress(post, positions=start, rope=spec.rope).parts[0]
        torch.testing.assert_close(stage.inner.decode(part.inner), pre, atol=1e-5, rtol=1e-5)  # coded before RoPE
        torch.testing.assert_close(stage.decode(part), post, atol=1e-5, rtol=1e-5)
    make_cache(PRE_ROPE_EXACT, m)  # the cache hands each layer its own rotary embedding
    assert_same(generate(name, GearCache(PRE_ROPE_EXACT, m.config, buffer_dtype=None)), reference(name), atol=1e-4)


def test_position_dependent_rope_is_refused_for_pre_rope_recipes_only():
    dynamic = transformers.LlamaConfig(**BASE, rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4))
    with pytest.raises(ValueError, match="kvquant-2.*layer 0.*'dynamic' RoPE changes its frequencies"):
        GearCache("kvquant-2", dynamic)
    GearCache("kivi-2", dynamic)  # keys coded as the model caches them: any RoPE
    with pytest.raises(ValueError, match="pass the model's config"):
        GearCache("kvquant-2")


def test_old_recipe_data_with_a_rope_theta_still_reads():
    data = recipes.get("kvquant-2").to_dict()
    assert "rope_theta" not in str(data)
    data["key"]["stages"][0]["rope_theta"] = 100000.0
    with pytest.warns(DeprecationWarning, match="'rope_theta' is ignored"):
        again = Recipe.from_dict(data)
    assert again.key.to_dict() == recipes.get("kvquant-2").key.to_dict()


# -- every built-in recipe builds or says what to do ------------------------------------------------------------------


def refusal(recipe_name: str, head_dim: int) -> str | None:
    """What a built-in recipe's refusal must say on a tiny model, or None when it must build."""
    recipe = recipes.get(recipe_name)
    if recipe.needs_dictionary:
        return "dictionary, which must be trained for this model"
    if recipe.model_bound:
        return "gearkit calibrate --model"
    if recipe_name.startswith("turboquant") and head_dim & (head_dim - 1):
        return f"head dim {head_dim}.*power-of-two"
    return None


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_builtin_recipe_builds_or_refuses_with_what_to_do(name):
    m = model(name)
    head_dim = model_family(m.config).layers[0].head_dim
    for recipe_name in recipes.names():
        expected = refusal(recipe_name, head_dim)
        if expected is None:
            assert isinstance(make_cache(recipe_name, m), GearCache)
        else:
            with pytest.raises((ValueError, FileNotFoundError), match=expected):
                make_cache(recipe_name, m)


# -- layer kinds the cache cannot serve ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("linear_attention", "recurrent state"),
        ("chunked_attention", "chunks of tokens"),
        ("dummy", "reuses another layer's keys and values"),
    ],
)
def test_layer_kinds_the_cache_cannot_serve_are_refused_by_name(kind, reason):
    cfg = transformers.Qwen2Config(**BASE)
    cfg.layer_types = ["full_attention", kind]
    cfg.attention_chunk_size = 8
    with pytest.raises(ValueError, match=f"layer 1 is a '{kind}' layer: it .*{reason}"):
        GearCache("kivi-2", cfg)


def test_models_without_a_decoder_cache_are_refused():
    with pytest.raises(ValueError, match="encoder-decoder"):
        GearCache("kivi-2", transformers.T5Config(vocab_size=97, d_model=32, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="sink tokens.*sink_tokens=0"):
        GearCache("kivi-2", config("gemma2"), sliding="sink-2")
    with pytest.raises(ValueError, match="sliding=.*needs the model's config"):
        GearCache("kivi-2", sliding="kivi-2")
