"""QJL's sign sketch: inner products unbiased over the sketch's seed, bytes as counted."""

import math

import pytest
import torch
from conftest import kv_like

from gearkit import Pipeline, Quantizer, SignSketch


def test_inner_products_are_unbiased_and_bytes_are_one_bit_per_sketch_entry():
    x = kv_like(0, (1, 1, 4, 32))
    q = torch.randn(32, generator=torch.Generator().manual_seed(1))
    true = x @ q  # [1, 1, 4]
    draws = torch.stack([SignSketch(seed=s)(x) @ q for s in range(400)])
    scale = x.norm(dim=-1) * q.norm()
    single = (draws - true).abs().mean(0)  # one sketch is a noisy estimate ...
    assert (single > 0.05 * scale).all()
    assert ((draws.mean(0) - true).abs() < 0.03 * scale).all()  # ... whose mean over sketches is the truth
    # the same estimates scaled by sqrt(2 / pi), a biased variant, fail the same check
    assert ((draws.mean(0) * math.sqrt(2 / math.pi) - true).abs() > 0.03 * scale).any()
    c = Pipeline([SignSketch()]).compress(x)
    assert c.bits_per_element == pytest.approx(1 + 16 / 32)  # the signs, one fp16 scale per vector
    assert Pipeline([SignSketch(64)]).compress(x).bits_per_element == pytest.approx(2 + 16 / 32)


def test_as_a_last_stage_it_sketches_the_residual():
    x = kv_like(2, (2, 2, 16, 32))
    quantizer = Pipeline([Quantizer(2, 32, "token")])
    residual = x - quantizer.decompress(quantizer.compress(x))
    coded = Pipeline([Quantizer(2, 32, "token"), SignSketch(seed=3)]).compress(x)
    want = residual.norm(dim=-1, keepdim=True) * math.sqrt(math.pi / 2) / 32
    torch.testing.assert_close(coded.parts[1].scale.float(), want, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="size"):
        SignSketch(0)
