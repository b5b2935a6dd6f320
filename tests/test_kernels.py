"""Triton kernels against their pure-torch references, in Triton's interpreter (TRITON_INTERPRET=1, conftest).

Tolerances: codes, scales and zeros are bit-exact; reconstructions agree to float32 rounding (the kernel
sums the low-rank term in another order); attention agrees to 1e-5 relative with float32 dot products and
to 1e-2 with fp16/bf16 queries (the kernel then multiplies in half precision, as on the GPU).
"""

import importlib.util
import os

import pytest
import torch
from conftest import kv_like

from gearkit import LowRankResidual, Pipeline, Quantizer, SparseOutlier, decode_attention
from gearkit.kernels import cpu
from gearkit.kernels.backend import get_backend, set_backend, use_backend, use_triton
from gearkit.kernels.reference import SUPPORTED_BITS, pack_bits

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

# CPU (interpreter) here; on a GPU machine: GEARKIT_TEST_DEVICE=cuda TRITON_INTERPRET=0 compiles the kernels.
DEVICE = torch.device(os.environ.get("GEARKIT_TEST_DEVICE", "cpu"))
cpu_only = pytest.mark.skipif(DEVICE.type != "cpu", reason="checks the CPU backend choice")


def kv(seed, shape, magnitude=1.0):
    return kv_like(seed, shape, magnitude=magnitude).to(DEVICE)


def both(fn):
    """`fn()` under the torch backend and under the Triton backend."""
    with use_backend("torch"):
        ref = fn()
    with use_backend("triton"):
        got = fn()
    return ref, got


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis,group", [("token", 16), ("token", None), ("channel", 32), ("channel", 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_pack_is_bit_exact(bits, axis, group, dtype):
    x = kv(bits, (2, 3, 64, 64), magnitude=3.0).to(dtype)
    q = Quantizer(bits, group, axis)
    ref, got = both(lambda: q.encode(x))
    for name in ("codes", "scale", "zero"):
        assert torch.equal(getattr(ref, name), getattr(got, name)), name


@pytest.mark.parametrize("tokens,head_dim", [(37, 64), (5, 128)])
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float32])
def test_quantize_pack_odd_token_counts_exclusions_and_param_dtypes(tokens, head_dim, param_dtype):
    x = kv(1, (1, 2, tokens, head_dim), magnitude=10.0)
    exclude = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.1).to(DEVICE)
    exclude[0, 0, 0] = True  # a whole group excluded
    q = Quantizer(2, 32, "token", param_dtype=param_dtype)
    ref, got = both(lambda: q.encode(x, exclude))
    assert all(torch.equal(getattr(ref, n), getattr(got, n)) for n in ("codes", "scale", "zero"))


def test_quantize_pack_ties_round_to_even_like_torch():
    # Entries on exact half steps of the grid [0, 3]: 0.5 and 2.5 round to 0 and 2, 1.5 to 2.
    row = torch.tensor([0.0, 0.5, 1.5, 2.5, 3.0, 1.0, 2.0, 0.0] * 2)
    x = row.expand(1, 1, 4, 16).contiguous().to(DEVICE)
    ref, got = both(lambda: Quantizer(2, 16, "token", param_dtype=torch.float32).encode(x))
    assert torch.equal(ref.codes, got.codes)


def gear(k_axis: str, q_axis: str, bits: int, group: int, rank: int, ratio: float = 0.04) -> Pipeline:
    stages = [SparseOutlier(ratio, k_axis)] if ratio else []
    stages.append(Quantizer(bits, group, q_axis))
    return Pipeline(stages + ([LowRankResidual(rank)] if rank else []))


@pytest.mark.parametrize(
    "pipeline",
    [
        gear("channel", "channel", 2, 32, 2),  # GEAR keys
        gear("token", "token", 4, 64, 4),  # GEAR values
        gear("token", "channel", 8, 16, 0),
        gear("channel", "token", 2, 16, 0, ratio=0),  # KIVI
        gear("channel", "channel", 3, 64, 0, ratio=0),  # sink-3 keys: 3-bit codes straddle bytes
        gear("token", "token", 3, 16, 2),
        Pipeline([SparseOutlier(0.02, "token", across_heads=True), Quantizer(2, 32, "token"), LowRankResidual(2)]),
    ],
    ids=["gear-keys", "gear-values", "outliers+q8", "kivi", "3-bit-keys", "3-bit-gear-values", "across-heads"],
)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fused_reconstruction_matches_pipeline(pipeline, head_dim):
    x = kv(3, (4, 2, 64, head_dim), magnitude=2.0)
    c = pipeline.compress(x)
    assert pipeline.storage_layout(c.shape)[0].triton_unsupported(c) is None
    ref, got = both(lambda: pipeline.decompress(c))
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    # outliers come back exactly through the kernel too
    mask = pipeline.stages[0].exact_mask(c.parts[0]) if isinstance(pipeline.stages[0], SparseOutlier) else None
    if mask is not None:
        assert torch.equal(got[mask], ref[mask])


# sink-gear-2's values: outliers among a token's channels of all heads, then per-head groups
SINK_GEAR_VALUES = Pipeline([SparseOutlier(0.05, "token", across_heads=True), Quantizer(2, 32, "token")])


def stored_chunks(pipeline, batch: int, heads: int, chunks: int, tokens: int, head_dim: int, seed: int):
    x = kv(seed, (chunks * batch, heads, tokens, head_dim), magnitude=1.5)
    return pipeline.compress(x)


@pytest.mark.parametrize("heads,kv_heads,queries", [(2, 2, 1), (6, 2, 1), (8, 2, 2), (9, 3, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("qdtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_attention_matches_reference_and_sdpa(heads, kv_heads, queries, head_dim, qdtype):
    batch, chunks, tokens = 2, 3, 32
    kp, vp = gear("channel", "channel", 2, 32, 2), gear("token", "token", 2, 32, 2)
    keys = stored_chunks(kp, batch, kv_heads, chunks, tokens, head_dim, 1)
    values = stored_chunks(vp, batch, kv_heads, chunks, tokens, head_dim, 2)
    query = torch.randn(batch, heads, queries, head_dim, generator=torch.Generator().manual_seed(3)).to(DEVICE, qdtype)
    bias = torch.zeros(batch, chunks * tokens, device=DEVICE)
    bias[0, :5] = float("-inf")  # left padding of the first sequence
    scale = head_dim**-0.5
    (ref, ref_lse), (got, got_lse) = both(lambda: decode_attention.attend(query, kp, vp, [(keys, values)], bias, scale))
    tol = 1e-5 if qdtype == torch.float32 else 1e-2
    assert torch.allclose(got, ref, rtol=tol, atol=tol) and torch.allclose(got_lse, ref_lse, rtol=tol, atol=tol)
    # and against PyTorch's SDPA on the dequantized tensors
    k = kp.decompress(keys).reshape(chunks, batch, kv_heads, tokens, head_dim).permute(1, 2, 0, 3, 4)
    v = vp.decompress(values).reshape(chunks, batch, kv_heads, tokens, head_dim).permute(1, 2, 0, 3, 4)
    k, v = (t.reshape(batch, kv_heads, chunks * tokens, head_dim) for t in (k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        query.float(),
        k.repeat_interleave(heads // kv_heads, 1),
        v.repeat_interleave(heads // kv_heads, 1),
        attn_mask=(bias == 0)[:, None, None],
        scale=scale,
    )
    assert torch.allclose(got, sdpa, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "kp,vp",
    [
        (gear("channel", "channel", 3, 32, 0, ratio=0), gear("token", "token", 3, 32, 0, ratio=0)),  # sink-3: in codes
        (
            gear("channel", "channel", 2, 16, 0, ratio=0),
            gear("token", "token", 4, 8, 0, ratio=0),
        ),  # KIVI: groups per row
        (gear("channel", "channel", 2, 32, 2), gear("token", "token", 2, 32, 3)),  # GEAR
        (
            gear("token", "token", 1, 32, 2, ratio=0),
            gear("channel", "channel", 8, 32, 1, ratio=0),
        ),  # other orientations
        (gear("token", "channel", 3, 40, 0), gear("channel", "token", 4, 40, 2)),  # outliers across rows
        (gear("channel", "channel", 2, 32, 0), SINK_GEAR_VALUES),  # across heads
    ],
    ids=["sink-3", "kivi", "gear", "token-keys", "crossed", "sink-gear"],
)
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch-products"])
def test_stored_form_torch_path_matches_the_reference(kp, vp, compiled, monkeypatch):
    """The default CPU path (the "stored" path of `gearkit.decode_attention`: several blocks, an online softmax, the
    compiled kernel or torch products on the codes) against block-wise decompression."""
    if not compiled:
        monkeypatch.setenv("GEARKIT_CPU_KERNEL", "0")
    elif DEVICE.type == "cpu" and cpu.unavailable():
        pytest.skip(f"no compiled CPU kernel: {cpu.unavailable()}")
    batch, kv_heads, tokens, head_dim = 2, 3, 32, 32
    sizes = (2, 1, 3)
    shape = (1, kv_heads, tokens, head_dim)
    assert kp.storage_layout(shape)[0] is not None and vp.storage_layout(shape)[0] is not None
    blocks = [
        (
            stored_chunks(kp, batch, kv_heads, n, tokens, head_dim, 10 + i),
            stored_chunks(vp, batch, kv_heads, n, tokens, head_dim, 20 + i),
        )
        for i, n in enumerate(sizes)
    ]
    query = torch.randn(batch, 6, 2, head_dim, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    bias = torch.zeros(batch, sum(sizes) * tokens, device=DEVICE)
    bias[0, :70] = float("-inf")  # left padding past the whole first block (64 tokens)
    bias[1] = float("-inf")  # a row that sees nothing here
    with use_backend("torch"):
        ref, ref_lse = decode_attention.attend(query, kp, vp, blocks, bias, 0.2)
    got, got_lse = decode_attention.attend(query, kp, vp, blocks, bias, 0.2)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got_lse, ref_lse, atol=2e-5, rtol=2e-5)
    assert (got[1] == 0).all() and torch.isinf(got_lse[1]).all()
    # with full-precision tokens in the same softmax (sinks, buffer): causal over the two queries
    causal = torch.ones(2, 5, dtype=torch.bool, device=DEVICE).triu(4)
    exact = (
        kv(30, (batch, kv_heads, 5, head_dim)),
        kv(31, (batch, kv_heads, 5, head_dim)),
        torch.zeros(batch, 2, 5, device=DEVICE).masked_fill(causal, float("-inf")),
    )
    with use_backend("torch"):
        ref, ref_lse = decode_attention.attend(query, kp, vp, blocks, bias, 0.2, exact)
    got, got_lse = decode_attention.attend(query, kp, vp, blocks, bias, 0.2, exact)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got_lse, ref_lse, atol=2e-5, rtol=2e-5)


@cpu_only
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_compiled_cpu_kernel_matches_torch(bits):
    """`cpu.dequant_matmul` against torch on the dequantized rows: every width, uniform codes and codebooks (with
    and without zeros), fp16 (subnormal scales included) and fp32 parameters, one or several groups per row, both
    orientations, more output rows than the kernel keeps in registers, a query shared by several groups."""
    if cpu.unavailable():
        pytest.skip(f"no compiled CPU kernel: {cpu.unavailable()}")
    g = torch.Generator().manual_seed(bits)
    for dtype, (a_groups, groups, m, k, n, ng) in [
        (torch.float16, (3, 12, 3, 64, 64, 1)),
        (torch.float32, (5, 5, 11, 7, 16, 2)),
        (torch.float16, (1, 2, 1, 130, 64, 4)),
    ]:
        codes = torch.randint(0, 2**bits, (groups, k, n), generator=g, dtype=torch.uint8)
        scale = (torch.rand(groups, k, ng, generator=g) * 0.1).to(dtype)
        scale[0, 0] = 3e-7  # a subnormal fp16 scale
        zero = torch.randn(groups, k, ng, generator=g).to(dtype)
        levels = torch.randn(2**bits, generator=g).sort().values
        packed = pack_bits(codes, bits).reshape(groups, -1)
        # uniform codes, a codebook without zeros (rotated vectors), a codebook with centers (KVQuant's keys)
        for table, offset in [(None, zero), (levels, None), (levels, zero)]:
            c = codes.float() if table is None else table[codes.long()]
            w = c.reshape(groups, k, ng, -1) * scale.float()[..., None]
            w = (w if offset is None else w + offset.float()[..., None]).reshape(groups, k, n)
            for transposed in (False, True):
                a = torch.randn(a_groups, m, n if transposed else k, generator=g)
                want = a.repeat(groups // a_groups, 1, 1) @ (w.mT if transposed else w)
                got = cpu.dequant_matmul(a, packed, scale, offset, bits, n, transposed, table)
                torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-5)
    with pytest.raises(ValueError, match="rows of 16"):
        cpu.dequant_matmul(torch.zeros(1, 1, 3), packed, scale, zero, bits, 16)


def test_without_a_compiler_the_cpu_kernel_says_why_once(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    cpu._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="unavailable .*cannot run the C compiler"):
            assert "/nonexistent/cc" in cpu.unavailable()
        assert not cpu.usable(torch.device("cpu"), 8)  # decode then runs the torch products (tested above)
        with pytest.raises(RuntimeError, match="unavailable"):
            cpu.dequant_matmul(
                torch.zeros(1, 1, 1), torch.zeros(1, 3, dtype=torch.uint8), torch.ones(1, 1), torch.zeros(1, 1), 3, 8
            )
    finally:
        cpu._library.cache_clear()
        cpu._warn_once.cache_clear()


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4)])
@pytest.mark.parametrize(
    "bits,values",
    [(3, gear("token", "token", 3, 64, 0, ratio=0)), (2, SINK_GEAR_VALUES)],
    ids=["sink-3", "sink-gear-2"],
)
def test_decode_attention_reads_sink_layouts(heads, kv_heads, bits, values):
    """`sink-3` (3-bit codes straddling bytes) and `sink-gear-2` (value outliers across heads) through the fused
    kernel, against the reference."""
    batch, chunks, tokens, head_dim = 2, 3, 64, 64
    kp, vp = gear("channel", "channel", bits, 64, 0, ratio=0), values
    keys = stored_chunks(kp, batch, kv_heads, chunks, tokens, head_dim, 5)
    values = stored_chunks(vp, batch, kv_heads, chunks, tokens, head_dim, 6)
    assert kp.storage_layout(keys.shape)[0].triton_unsupported(keys) is None
    assert vp.storage_layout(values.shape)[0].triton_unsupported(values) is None
    query = torch.randn(batch, heads, 1, head_dim, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    bias = torch.zeros(batch, chunks * tokens, device=DEVICE)
    bias[1, :70] = float("-inf")
    (ref, ref_lse), (got, got_lse) = both(lambda: decode_attention.attend(query, kp, vp, [(keys, values)], bias, 0.125))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_decode_attention_fully_masked_sequence_gives_zero_weight():
    kp = vp = gear("channel", "token", 4, 32, 0, ratio=0)
    keys, values = stored_chunks(kp, 2, 1, 2, 32, 64, 4), stored_chunks(vp, 2, 1, 2, 32, 64, 5)
    bias = torch.zeros(2, 64, device=DEVICE)
    bias[1] = float("-inf")
    with use_backend("triton"):
        out, lse = decode_attention.attend(
            torch.randn(2, 1, 1, 64, device=DEVICE), kp, vp, [(keys, values)], bias, 0.125
        )
    assert torch.isfinite(out).all() and (out[1] == 0).all() and torch.isinf(lse[1]).all()


@cpu_only
def test_backend_choice():
    assert get_backend() == "auto"
    cpu = torch.device("cpu")
    assert not use_triton(cpu)  # auto never interprets: the reference is the CPU path
    with use_backend("triton"):
        assert use_triton(cpu)  # TRITON_INTERPRET=1 in this suite
        with pytest.raises(RuntimeError, match="cannot run"):
            use_triton(cpu, "1-bit codes")
        with pytest.raises(RuntimeError, match="cannot run"):  # an explicit request is never silently dropped
            Quantizer(1, 32, "token").encode(torch.randn(1, 1, 4, 64))
    with pytest.raises(ValueError, match="unknown kernel backend"):
        set_backend("cuda")
    with use_backend("torch"):
        assert not use_triton(cpu)
    assert get_backend() == "auto"


def test_unsupported_layouts_fall_back_under_auto():
    x = kv(0, (1, 2, 48, 64))
    q = Quantizer(3, 48, "channel")  # 48-token rows: outside the kernels
    assert Pipeline([q]).storage_layout(x.shape)[0].triton_unsupported(Pipeline([q]).compress(x)) is not None
    assert torch.equal(q.encode(x).codes, Quantizer(3, 48, "channel").encode(x).codes)
