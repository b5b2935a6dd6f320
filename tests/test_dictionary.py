"""CSR: sparse solvers, RoPE undo/redo, the SparseDictionary stage and its part, dictionary files, the cache."""

import itertools

import pytest
import torch
import torch.utils._pytree as pytree
from conftest import kv_like, rel_error
from hypothesis import given
from hypothesis import strategies as st

from gearkit import CompressedTensor, Context, DictionarySet, Pipeline, Recipe, RoPE, SparseDictionary, recipes
from gearkit.compressors.dictionary_set import model_signature
from gearkit.compressors.solvers import SOLVERS, combine_atoms, matching_pursuit, orthogonal_matching_pursuit
from gearkit.parts import cat_batch, select_batch


def unit_atoms(dim: int, atoms: int, seed: int = 0, groups: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (dim, atoms) if groups is None else (groups, dim, atoms)
    d = torch.randn(shape, generator=g)
    return d / d.norm(dim=-2, keepdim=True)


def rope(dim: int = 16) -> RoPE:
    return RoPE(1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)), 1.0)


def tiny_set(dim: int = 16, atoms: int = 48, layers: int = 2, pre_rope: bool = True, model=None) -> DictionarySet:
    groups = tuple((i,) for i in range(layers))
    return DictionarySet(
        unit_atoms(dim, atoms, 1, layers),
        unit_atoms(dim // 2, atoms, 2, layers),
        groups,
        rope=rope(dim) if pre_rope else None,
        model=model or {"name": "tiny"},
    )


@given(
    seed=st.integers(0, 2**16),
    solver=st.sampled_from(sorted(SOLVERS)),
    dim=st.sampled_from([8, 16, 32]),
    atoms=st.sampled_from([16, 64]),
)
def test_error_decreases_monotonically_with_sparsity(seed, solver, dim, atoms):
    x = torch.randn(64, dim, generator=torch.Generator().manual_seed(seed))
    d = unit_atoms(dim, atoms, seed)
    errors = [rel_error(x, combine_atoms(*SOLVERS[solver](x, d, s), d)) for s in range(1, min(8, atoms) + 1)]
    assert all(b <= a * (1 + 1e-5) for a, b in itertools.pairwise(errors)), errors


def test_omp_is_at_least_as_good_as_mp():
    x, d = torch.randn(256, 32), unit_atoms(32, 128)
    for s in (2, 4, 8):
        assert (
            rel_error(x, combine_atoms(*orthogonal_matching_pursuit(x, d, s), d))
            <= rel_error(x, combine_atoms(*matching_pursuit(x, d, s), d)) + 1e-6
        )


@given(seed=st.integers(0, 2**16), s=st.integers(1, 4))
def test_omp_recovers_an_exact_sparse_combination(seed, s):
    g = torch.Generator().manual_seed(seed)
    d = unit_atoms(64, 128, seed)
    index = torch.stack([torch.randperm(128, generator=g)[:s] for _ in range(16)])
    coef = (torch.rand(16, s, generator=g) + 0.5) * torch.randn(16, s, generator=g).sign()
    x = combine_atoms(index, coef, d)
    found, fitted = orthogonal_matching_pursuit(x, d, s)
    assert torch.allclose(combine_atoms(found, fitted, d), x, atol=1e-4)
    assert torch.equal(found.sort(-1).values, index.sort(-1).values)


def test_solvers_batch_over_groups_like_one_group_at_a_time():
    x, d = torch.randn(3, 20, 16), unit_atoms(16, 32, groups=3)
    index, coef = matching_pursuit(x, d, 4)
    for k in range(3):
        i, c = matching_pursuit(x[k], d[k], 4)
        assert torch.equal(index[k], i) and torch.allclose(coef[k], c)


def test_solver_inputs_are_checked():
    with pytest.raises(ValueError, match="dim"):
        matching_pursuit(torch.randn(4, 8), unit_atoms(16, 32), 2)
    with pytest.raises(ValueError, match="sparsity"):
        matching_pursuit(torch.randn(4, 16), unit_atoms(16, 32), 0)
    with pytest.raises(ValueError, match="distinct atoms"):
        orthogonal_matching_pursuit(torch.randn(4, 16), unit_atoms(16, 4), 5)


@given(start=st.integers(0, 100_000), scaling=st.sampled_from([1.0, 1.2]), dim=st.sampled_from([8, 64]))
def test_rope_undo_then_redo_is_exact(start, scaling, dim):
    r = RoPE(rope(dim).inv_freq, scaling)
    x = kv_like(start % 997, (2, 3, 33, dim))
    positions = start + torch.arange(33)[None].repeat(2, 1)
    assert torch.allclose(r.apply(r.undo(x, positions), positions), x, atol=1e-5, rtol=1e-5)
    assert torch.allclose(r.undo(r.apply(x, positions), positions), x, atol=1e-5, rtol=1e-5)


def test_rope_matches_the_models_own_rotation():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=1,
        intermediate_size=32,
        vocab_size=16,
    )
    module = LlamaRotaryEmbedding(config)
    r = RoPE.from_model(torch.nn.Sequential(module))
    k, positions = torch.randn(1, 2, 40, 16), torch.arange(500, 540)[None]
    cos, sin = module(k, positions)
    rotated = apply_rotary_pos_emb(k, k, cos, sin)[1]
    assert torch.equal(r.apply(k, positions), rotated)
    assert torch.allclose(r.undo(rotated, positions), k, atol=1e-5)


def test_rotary_checks_shapes():
    with pytest.raises(ValueError, match="head dim"):
        rope(16).apply(torch.randn(1, 1, 4, 8), torch.arange(4)[None])
    with pytest.raises(ValueError, match="positions"):
        rope(16).apply(torch.randn(2, 1, 4, 16), torch.arange(4)[None])
    with pytest.raises(ValueError, match="rotary"):
        RoPE.from_model(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("solver", ["mp", "omp"])
@pytest.mark.parametrize("coef_bits", [16, 8])
def test_stage_stores_int16_indices_and_counts_every_byte(solver, coef_bits):
    stage = SparseDictionary(tiny_set(), "key", 4, solver=solver, coef_bits=coef_bits)
    x = kv_like(0, (2, 3, 8, 16))
    c = Pipeline([stage]).compress(x, positions=torch.tensor([0, 64]), layer=1)
    part = c.parts[0]
    assert part.indices.dtype == torch.int16 and part.indices.shape == (2, 3, 8, 4)
    assert part.coefficients.dtype == (torch.float16 if coef_bits == 16 else torch.int8)
    per_vector = 4 * (2 + coef_bits // 8) + (2 if coef_bits == 8 else 0)
    assert c.nbytes == 2 * 3 * 8 * per_vector + 2 * 4 == sum(c.components().values())
    assert set(c.components()) >= {"atom_indices", "coefficients", "positions"}
    assert rel_error(x, Pipeline([stage]).decompress(c)) < 1


def test_more_atoms_per_vector_give_less_error_through_the_stage():
    x = kv_like(1, (1, 2, 32, 16))
    errors = [rel_error(x, Pipeline([SparseDictionary(tiny_set(layers=1), "value", s, 2)])(x)) for s in (1, 2, 4)]
    assert errors[0] > errors[1] > errors[2]


def test_pre_rope_keys_decode_at_their_positions():
    """A key that is an atom before RoPE, rotated to its position, comes back exactly (one atom suffices)."""
    ds = tiny_set()
    atoms = ds.dictionary("key", 0).float()
    positions = torch.tensor([64, 128])
    pre = atoms.mT[torch.arange(6)].reshape(1, 1, 6, 16).repeat(2, 1, 1, 1) * 3.0
    x = ds.rope.apply(pre, positions[:, None] + torch.arange(6))
    stage = SparseDictionary(ds, "key", 1, solver="omp")
    out = stage.decode(stage.encode(x, ctx=Context(positions=positions, layer=0)))
    assert torch.allclose(out, x, atol=1e-2)
    post = SparseDictionary(ds, "key", 1, pre_rope=False)
    assert rel_error(x, post.decode(post.encode(x, ctx=Context(positions=positions, layer=0)))) > 0.1


def test_parts_concatenate_select_and_flatten():
    stage = SparseDictionary(tiny_set(), "key", 3)
    pipeline = Pipeline([stage])
    a, b = kv_like(2, (2, 3, 8, 16)), kv_like(3, (1, 3, 8, 16))
    ca = pipeline.compress(a, positions=torch.tensor([0, 8]), layer=0)
    cb = pipeline.compress(b, positions=torch.tensor([16]), layer=0)
    joined = cat_batch([ca, cb])
    assert torch.allclose(pipeline.decompress(joined), torch.cat([pipeline.decompress(ca), pipeline.decompress(cb)]))
    picked = select_batch(joined, torch.tensor([2, 0]))
    assert torch.equal(pipeline.decompress(picked), pipeline.decompress(joined)[[2, 0]])
    leaves, spec = pytree.tree_flatten(joined)
    assert len(leaves) == len(joined.tensors())
    assert isinstance(pytree.tree_unflatten(leaves, spec), CompressedTensor)


@pytest.mark.parametrize("shape", [(0, 3, 5, 16), (1, 3, 0, 16)])
def test_empty_tensors_round_trip(shape):
    pipeline = Pipeline([SparseDictionary(tiny_set(), "value", 2, 2)])
    x = torch.empty(shape, dtype=torch.float16)
    out = pipeline.decompress(pipeline.compress(x, layer=0))
    assert out.shape == x.shape and out.dtype == x.dtype


def test_stage_errors_are_clear():
    with pytest.raises(ValueError, match="role"):
        SparseDictionary(tiny_set(), "query", 2)
    with pytest.raises(ValueError, match="coef_bits"):
        SparseDictionary(tiny_set(), "key", 2, coef_bits=4)
    with pytest.raises(ValueError, match="unknown solver"):
        SparseDictionary(tiny_set(), "key", 2, solver="lasso")
    with pytest.raises(ValueError, match="layer must be given"):
        SparseDictionary(tiny_set(), "key", 2).encode(kv_like(0, (1, 1, 4, 16)))
    with pytest.raises(ValueError, match="dim 16"):
        SparseDictionary(tiny_set(), "key", 2).encode(kv_like(0, (1, 1, 4, 32)), ctx=Context(layer=0))
    with pytest.raises(ValueError, match="pre-RoPE"):
        SparseDictionary(tiny_set(pre_rope=False), "key", 2, pre_rope=True).encode(
            kv_like(0, (1, 1, 4, 16)), ctx=Context(layer=0)
        )
    with pytest.raises(FileNotFoundError, match="dict train"):
        _ = SparseDictionary("/nonexistent/d.safetensors", "key", 2).dictionaries
    with pytest.raises(ValueError, match="even"):
        recipes.csr(3)


def test_save_load_round_trips(tmp_path):
    ds = tiny_set(model={"name": "tiny", "head_dim": 16})
    loaded = DictionarySet.load(ds.save(tmp_path / "d.safetensors"))
    assert torch.equal(loaded.keys, ds.keys) and torch.equal(loaded.values, ds.values)
    assert loaded.groups == ds.groups and loaded.model == ds.model and loaded.sparsity == ds.sparsity
    assert torch.equal(loaded.rope.inv_freq, ds.rope.inv_freq)
    x = kv_like(4, (1, 2, 8, 16))
    a, b = SparseDictionary(ds, "key", 3), SparseDictionary(str(tmp_path / "d.safetensors"), "key", 3)
    assert torch.equal(a.decode(a.encode(x, ctx=Context(layer=1))), b.decode(b.encode(x, ctx=Context(layer=1))))


def test_a_dictionary_for_another_model_is_refused(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=32,
        vocab_size=16,
    )
    ds = tiny_set(model={"name": "tiny", **model_signature(config)})
    path = ds.save(tmp_path / "d.safetensors")
    DictionarySet.load(path, config)  # fits
    other = LlamaConfig(
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=32,
        vocab_size=16,
    )
    with pytest.raises(ValueError, match="trained for tiny.*head_dim: trained for 16, model has 32"):
        DictionarySet.load(path, other)
    deeper = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=3,
        intermediate_size=32,
        vocab_size=16,
    )
    with pytest.raises(ValueError, match="num_hidden_layers"):
        DictionarySet.load(path, deeper)
    (tmp_path / "bad.safetensors").write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        DictionarySet.load(tmp_path / "bad.safetensors")


def test_csr_recipes_are_lazy_and_count_the_paper_levels():
    for name, s in (("csr-8", 8), ("csr-4", 4)):
        r = recipes.get(name)
        assert r.needs_dictionary and not recipes.get("kivi-2").needs_dictionary
        key, value = r.key.stages[0], r.value.stages[0]
        assert (key.sparsity, key._chunks, value.sparsity, value._chunks) == (s, 1, s // 2, 2)
        assert key.source == "gearkit:default" and key._produced is None  # nothing trained or read until first use


def test_cache_amortises_the_dictionary_and_reads_positions(smol):
    from gearkit.integrations.hf import GearCache
    from gearkit.neuraldict import train_dictionaries

    model, tokenizer = smol
    text = "The quick brown fox jumps over the lazy dog. " * 40
    ds, _ = train_dictionaries(
        model,
        tokenizer,
        text,
        "smol",
        atoms=32,
        sparsity=4,
        group_layers=15,
        vectors=256,
        epochs=1,
        tokens=128,
        windows=1,
        progress=False,
        log=lambda *_: None,
    )
    recipe = Recipe("test-csr", *(recipes.csr(4, ds).key, recipes.csr(4, ds).value), buffer_size=32)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :100]
    cache = GearCache(recipe, model.config)
    with torch.inference_mode():
        model(ids, cache=cache, use_cache=True)
    report = cache.memory_report()
    held = sum(t.numel() * t.element_size() for t in cache.held_tensors())
    assert report.components["dictionary"] == 2 * (ds.keys.numel() + ds.values.numel())
    assert report.nbytes - report.components["dictionary"] == held
    assert report.bits_per_element_excluding("dictionary") < report.bits_per_element
    layer = cache.layers[3].store
    assert (
        layer.lanes.keys.chunks.joined().parts[0].start.tolist() == [0, 32, 64]
        and layer.lanes.keys.chunks.joined().parts[0].layer == 3
    )
    keys, _ = layer.dequantized()
    assert keys.shape == (1, 3, 100, 64) and torch.isfinite(keys).all()
    with pytest.raises(ValueError, match="does not fit"):
        wrong = DictionarySet(ds.keys, ds.values, ds.groups, rope=ds.rope, model={**ds.model, "head_dim": 128})
        GearCache(recipes.csr(4, wrong), model.config)


def test_a_short_trainer_fit_lowers_the_held_out_loss(tmp_path):
    from gearkit.neuraldict import fit, kmeans_init, layer_groups

    g = torch.Generator().manual_seed(0)
    truth = unit_atoms(16, 24, 5, groups=2)  # vectors are sparse combinations of hidden atoms, plus noise
    index = torch.randint(0, 24, (2, 3000, 3), generator=g)
    x = combine_atoms(index, torch.randn(2, 3000, 3, generator=g), truth) + 0.01 * torch.randn(2, 3000, 16, generator=g)
    x[1] *= 50  # groups of different scale weigh the same
    atoms, stats = fit(x, 24, 3, epochs=4, batch_size=128, lr=1e-2, root=tmp_path, progress=False)
    assert stats["mse_trained"] < 0.8 * stats["mse_init"]
    assert atoms.shape == (2, 16, 24) and torch.allclose(atoms.norm(dim=-2), torch.ones(2, 24), atol=1e-5)
    assert list(tmp_path.rglob("*.ckpt"))  # Lightning's checkpointing
    assert kmeans_init(x, 8).shape == (2, 16, 8)
    assert layer_groups(5, 2) == ((0, 1), (2, 3), (4,))


def test_cli_trains_a_dictionary_that_eval_ppl_reads(tmp_path):
    import json
    import subprocess
    import sys

    def gearkit(*args):
        return subprocess.run([sys.executable, "-m", "gearkit.cli", *args], capture_output=True, text=True, timeout=900)

    out = tmp_path / "d.safetensors"
    run = gearkit(
        "dict",
        "train",
        "--text",
        "idle-help",
        "--atoms",
        "32",
        "--sparsity",
        "4",
        "--out",
        str(out),
        "--group-layers",
        "15",
        "--vectors",
        "256",
        "--epochs",
        "1",
        "--tokens",
        "64",
        "--windows",
        "1",
        "--work-dir",
        str(tmp_path / "runs"),
        "--quiet",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["groups"] == 2 and summary["key_space"] == "pre-rope" and out.is_file()
    assert list((tmp_path / "runs").rglob("*.ckpt"))
    run = gearkit(
        "eval",
        "ppl",
        "--dictionary",
        str(out),
        "--recipe",
        "csr-4",
        "--text",
        "pydoc-topics",
        "--prefix",
        "64",
        "--continuation",
        "64",
        "--windows",
        "1",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "csr-4" in run.stdout and "bits/elt w/o dict" in run.stdout
    run = gearkit("eval", "ppl", "--dictionary", str(tmp_path / "none.safetensors"), "--recipe", "csr-4")
    assert run.returncode == 2 and "no dictionary file" in run.stderr
