import pytest
import torch
from conftest import Chars, tiny_llama

from gearkit.eval.passkey import BASELINE, NEEDLE, QUESTION, passkey, passkey_ids, passkey_keys


def test_prompt_has_the_length_asked_the_needle_at_its_depth_and_the_question_last():
    tok = Chars()
    filler = "lorem ipsum dolor sit amet " * 40
    for depth in (0.0, 0.5, 1.0):
        ids = passkey_ids(tok, filler, 300, depth, 12345)
        text = tok.decode(ids.tolist())
        assert ids.shape == (300,) and ids.dtype == torch.long
        assert text.endswith("The pass key is") and text.count("12345") == 2
        budget = 300 - len(NEEDLE.format(key=12345)) - len(QUESTION)  # one token per character here
        assert text.index("The pass key is 12345") == round(depth * budget) + 1  # after the needle's newline
    with pytest.raises(ValueError, match="filler text has"):
        passkey_ids(tok, "short", 300, 0.5, 1)
    with pytest.raises(ValueError, match="needs more than"):
        passkey_ids(tok, filler, 50, 0.5, 1)
    with pytest.raises(ValueError, match="depth"):
        passkey_ids(tok, filler, 300, 1.5, 1)
    assert passkey_keys(3) == passkey_keys(3) and all(10000 <= k < 100000 for k in passkey_keys(3))


def test_every_cache_is_scored_beside_the_uncompressed_one():
    model, tok = tiny_llama("gqa"), Chars()
    results = passkey(model, tok, ["fp16", "sink-2"], "lorem ipsum dolor sit amet " * 40, [200], depths=[0.5], keys=1)
    assert [r.recipe for r in results] == [BASELINE, "fp16", "sink-2"]
    assert all(r.trials == 1 and r.length == 200 and 0.0 <= r.accuracy <= 1.0 for r in results)
    assert (
        results[0].bits_per_element is None
        and results[1].bits_per_element == 16.0
        and results[2].bits_per_element < 16.0
    )
