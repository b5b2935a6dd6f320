import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import Chars, tiny_llama

from gearkit.eval import retrieval as rt
from gearkit.eval.retrieval import (
    KEY_NEEDLE,
    KEY_QUESTION,
    MOVE_NEEDLE,
    MOVE_QUESTION,
    NUMBER,
    VALUES_NEEDLE,
    VARIABLE,
    Question,
    Sizes,
    build_trials,
    retrieval,
    retrieval_results,
)
from gearkit.eval.threads import cpu_threads

FILLER = "lorem ipsum dolor sit amet " * 200
SMALL = Sizes(trials=5, keys=3, value_keys=2, values=3, chains=2, hops=2)


def text_of(tok, ids) -> str:
    return tok.decode(ids.tolist() if isinstance(ids, torch.Tensor) else ids)


def test_trials_are_exact_seeded_and_hold_every_needle_in_order():
    tok = Chars()
    trials = build_trials(tok, FILLER, lengths=[500, 700], sizes=SMALL, seed=1)
    again = build_trials(tok, FILLER, lengths=[500, 700], sizes=SMALL, seed=1)
    per_haystack = {"multi-key": [3, 2], "multi-value": [2, 2, 1], "variable-tracking": [2, 2, 1]}
    assert [(t.task, t.length, len(t.questions)) for t in trials] == [
        (task, n, q) for task in rt.TASKS for n in (500, 700) for q in per_haystack[task]
    ]
    assert all(torch.equal(a.context, b.context) and a.questions == b.questions for a, b in zip(trials, again))
    other = build_trials(tok, FILLER, lengths=[500], sizes=SMALL, seed=2)
    assert not torch.equal(other[0].context, trials[0].context)
    for t in trials:
        assert t.context.shape == (t.length,) and t.context.dtype == torch.long
        text = text_of(tok, t.context)
        needle = lambda s: text_of(tok, tok(s)["input_ids"])  # the stand-in tokenizer maps "\n" to a letter
        if t.task == "multi-key":
            for q in t.questions:
                key = re.search(r"for (\w+)\?", q.cue).group(1)
                assert q.cue == KEY_QUESTION.format(key=key) and q.steps == 1 and q.pattern == NUMBER
                assert len(q.expected) == 1 and len(q.expected[0]) == SMALL.digits
                assert needle(KEY_NEEDLE.format(key=key, value=q.expected[0])) in text
        elif t.task == "multi-value":
            for q in t.questions:
                key = re.search(r"for (\w+)\?", q.cue).group(1)
                a, b, c = q.expected
                assert needle(VALUES_NEEDLE.format(key=key, values=f"{a}, {b} and {c}")) in text
        else:
            for q in t.questions:
                assert q.cue == MOVE_QUESTION and q.pattern == VARIABLE and q.steps == SMALL.hops + 1
                assert all(re.fullmatch(VARIABLE, v) for v in q.expected)
                sources = [q.start, *q.expected[:-1]]
                at = [text.index(needle(MOVE_NEEDLE.format(source=s, target=v))) for s, v in zip(sources, q.expected)]
                assert at == sorted(at)  # each variable is assigned before it is read
    numbers = [v for q in trials[0].questions for v in q.expected]
    assert len(set(numbers)) == len(numbers)


def test_depths_place_the_needles_and_bad_input_is_refused():
    tok = Chars()
    first = build_trials(tok, FILLER, ["multi-key"], [400], Sizes(trials=2, keys=2), depths=[0.0])[0]
    assert text_of(tok, first.context).startswith(text_of(tok, tok("\nThe special magic number for")["input_ids"]))
    with pytest.raises(ValueError, match="tasks must be among"):
        build_trials(tok, FILLER, ["needle"])
    with pytest.raises(ValueError, match="depth must be within"):
        build_trials(tok, FILLER, lengths=[400], depths=[1.5])
    with pytest.raises(ValueError, match="filler text has"):
        build_trials(tok, "short filler", lengths=[400])
    with pytest.raises(ValueError, match="needs more than"):
        build_trials(tok, FILLER, ["multi-key"], lengths=[100], sizes=Sizes(keys=4))
    with pytest.raises(ValueError, match="keys"):
        Sizes(keys=0)
    with pytest.raises(ValueError, match="more than the 29 names a haystack can hold"):
        Sizes(chains=10, hops=2)


def test_command_line_defaults_are_the_default_sizes():
    from gearkit.cli import build_parser

    args = build_parser().parse_args(["eval", "retrieval"])
    fields = ("trials", "keys", "value_keys", "values", "chains", "hops")
    assert Sizes(**{f: getattr(args, f) for f in fields}) == Sizes()


def test_answers_are_parsed_exactly(monkeypatch):
    script: dict[str, str] = {}
    asked = []

    def answer_line(model, tokenizer, context, cache, cue, max_new_tokens):
        asked.append(cue)
        return script.get(cue, "")

    monkeypatch.setattr(rt, "answer_line", answer_line)
    ask = lambda q: rt.ask(None, Chars(), torch.zeros(1, dtype=torch.long), None, q)

    key = Question(KEY_QUESTION.format(key="apple"), "", NUMBER, ("1234567",))
    for line, right in [(" 1234567.", True), (" 1234567, 7654321.", False), (" 123456.", False), ("", False)]:
        script[key.cue] = line
        assert ask(key) is right, line
    values = Question("values?", "", NUMBER, ("111", "222"))
    for line, right in [(" 222 and 111.", True), (" 111 and 111.", False), (" 111, 222 and 333.", False)]:
        script[values.cue] = line
        assert ask(values) is right, line
    chain = Question(MOVE_QUESTION, "12345", VARIABLE, ("apple", "tiger"), steps=2)
    script.update({"\nMOVE 12345 TO": " the apple.", "\nMOVE apple TO": " tiger.", "\nMOVE lemon TO": " tiger."})
    assert ask(chain)  # words outside the names are not items
    script["\nMOVE 12345 TO"] = " lemon."
    assert not ask(chain)
    script["\nMOVE 12345 TO"] = " pineapple."  # a name inside a longer word is not one
    assert not ask(chain)
    asked.clear()
    script["\nMOVE 12345 TO"] = " no idea."
    assert not ask(chain) and asked == ["\nMOVE 12345 TO"]  # a chain with no answer stops there


def test_every_cache_is_scored_beside_the_uncompressed_one_on_one_device_or_the_runner():
    from gearkit.eval.runner import RetrievalTask, predict

    model, tok = tiny_llama("gqa"), Chars()
    sizes = Sizes(trials=2, keys=2, value_keys=1, values=2, chains=1, hops=1)
    trials = build_trials(tok, FILLER, lengths=[300], sizes=sizes)
    with cpu_threads(1):
        results = retrieval(model, tok, ["fp16", "sink-2"], trials, "tiny")
    assert [(r.recipe, r.task) for r in results] == [
        (c, t) for c in ("uncompressed", "fp16", "sink-2") for t in rt.TASKS
    ]
    assert [r.trials for r in results[:3]] == [2, 2, 2]
    summary = results[0].summary()
    assert set(summary) == {"recipe", "model", "task", "length", "accuracy", "correct", "trials", "bits_per_element"}
    assert summary["model"] == "tiny" and summary["length"] == 300 and 0.0 <= summary["accuracy"] <= 1.0
    assert results[0].bits_per_element is None and results[3].bits_per_element == 16.0
    assert results[6].bits_per_element < 16.0
    task = RetrievalTask(["fp16", "sink-2"], trials, model=model, tokenizer=tok)
    rows = predict(task, [t.context for t in trials], threads=1, accelerator="cpu")
    assert [r.summary() for r in retrieval_results(rows, "tiny")] == [r.summary() for r in results]
    long = build_trials(tok, FILLER, lengths=[600], sizes=sizes)
    with pytest.raises(ValueError, match="longer than the model's context"):
        predict(RetrievalTask([], long, model=model, tokenizer=tok), [t.context for t in long])


def gearkit(*args):
    return subprocess.run([sys.executable, "-m", "gearkit.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_eval_retrieval_prints_one_object_per_cache_task_and_length(tiny_checkpoint):
    sizes = ["--trials", "1", "--keys", "1", "--value-keys", "1", "--values", "1", "--hops", "1"]
    model = ["--model", str(tiny_checkpoint)]
    run = gearkit("eval", "retrieval", *model, "--recipe", "kivi-2", "--text", "idle-help", "--length", "128", *sizes)
    assert run.returncode == 0, run.stderr
    run = gearkit("eval", "retrieval", *model, "--recipe", "kivi-2", "--length", "128", *sizes, "--json")
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.strip().splitlines()]
    assert [(r["recipe"], r["task"], r["length"], r["trials"]) for r in rows] == [
        (c, t, 128, 1) for c in ("uncompressed", "kivi-2") for t in rt.TASKS
    ]
    assert rows[0]["model"] == "tiny-llama" and rows[0]["bits_per_element"] is None
    assert rows[3]["bits_per_element"] > 2
    run = gearkit("eval", "retrieval", "--depth", "1.5", "--length", "128")
    assert run.returncode == 2 and "must be within [0, 1]" in run.stderr
