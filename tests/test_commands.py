"""Every command the docs and the benchmarks' docstrings write (`gearkit ...`, `python benchmarks/...`,
`sh benchmarks/...`) runs as written: its program exists, every option it names is one the program takes (from the
program's own `--help`), a concrete `gearkit` command parses, and each benchmark runs for real at tiny sizes where
that takes seconds. Commands are read out of README.md, docs/ and the benchmark scripts, so a new one is covered
without touching this file.

The benchmark scripts run in one subprocess (this file run as a script), each as `python benchmarks/<script>.py`
would run it: with the script's folder first on `sys.path`.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.machinery
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = (
    r"(?:[A-Z_]+=\S*\s+)*(?:gearkit\s+[a-z]|python3?\s+(?:-m\s+gearkit\.cli\s|benchmarks/)|(?:ba)?sh\s+benchmarks/)"
)
IN_PROSE = re.compile(rf"`({PROGRAM}[^`]*)`")  # an inline code span
ON_A_LINE = re.compile(rf"^\s*(?:\$\s+|Run:\s+)?({PROGRAM}.*)$")  # a line of a code block or docstring
# Benchmarks that run for real at these sizes (`{out}`: a temporary folder), in seconds. The others show their --help:
# a real run takes minutes at any size (ppl_frontier, frontier_sweep, bit_allocation, calibrated_codebooks, csr_rope)
# or repeats what these cover (decode_ab steps the caches throughput steps; plots draws the committed results).
TINY = {
    "benchmarks/recipes_random.py": "--tokens 64 --heads 1 --head-dim 16",
    "benchmarks/kernel_bench.py": "--contexts 256 --batches 1 --recipes sink-3 --skip-compiled --out {out}/k.csv",
    "benchmarks/throughput.py": "--context 16 --new-tokens 2 --caches DynamicCache,sink-3 --out {out}/t.csv",
}


def joined_lines(text: str) -> list[str]:
    """`text`'s lines, a line ending in a backslash joined with the next (as a shell reads them)."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def documented() -> list[tuple[str, str, bool]]:
    """`(where, command, complete)` for every command written in README.md, docs/, the benchmarks' docstrings and
    the benchmarks' shell scripts; `complete` for a command on a line of its own (in a code block or docstring), as
    opposed to one named in prose (which may leave out required options)."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        fenced = False
        for line in joined_lines(page.read_text()):
            if line.lstrip().startswith("```"):
                fenced = not fenced
            elif fenced and (match := ON_A_LINE.match(line)):
                found.append((page.name, match.group(1), True))
            elif not fenced:
                found += [(page.name, span, False) for span in IN_PROSE.findall(line)]
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        docstring = ast.get_docstring(ast.parse(script.read_text())) or ""
        found += [(script.name, m.group(1), True) for line in joined_lines(docstring) if (m := ON_A_LINE.match(line))]
    for script in sorted((ROOT / "benchmarks").glob("*.sh")):
        for line in joined_lines(script.read_text()):
            if match := re.search(r"(python3?\s+benchmarks/\S+\.py[^|>]*)", line):
                found.append((script.name, match.group(1), False))  # shell variables: options only
    return found


def parse(command: str) -> tuple[str, list[str], bool]:
    """`(program, argv, concrete)`: the program (`gearkit`, also as `python -m gearkit.cli`; `benchmarks/x.py`,
    `benchmarks/x.sh`) and its arguments, with optional `[...]` parts kept and comments dropped; a command with
    placeholders (`...`, `a|b`, `$VAR`) is not concrete."""
    tokens = [t for t in shlex.split(command, comments=True) if not re.fullmatch(r"[A-Z_]+=\S*", t)]
    if tokens[:3] in (["python", "-m", "gearkit.cli"], ["python3", "-m", "gearkit.cli"]):
        tokens = ["gearkit", *tokens[3:]]
    program, *argv = tokens[1:] if tokens[0] in ("python", "python3", "sh", "bash") else tokens
    argv = [t.strip("[]") for t in argv if t.strip("[]")]
    concrete = not any(t == "..." or "|" in t or "$" in t for t in argv)
    return program, argv, concrete


COMMANDS = documented()


def subcommand(argv: list[str]) -> list[str]:
    """The leading words of `argv` that name a subcommand (`eval ppl`, `measure`); alternatives `a|b` take the
    first."""
    words = []
    for token in argv:
        if token.startswith("-"):
            break
        words.append(token.split("|")[0])
    return words


def options(argv: list[str]) -> set[str]:
    """The long options `argv` names."""
    return {t.split("=")[0] for t in argv if t.startswith("--")}


def test_commands_are_found():
    programs = {parse(c)[0] for _, c, _ in COMMANDS}
    assert {"gearkit", "benchmarks/throughput.py", "benchmarks/kernel_bench.py", "benchmarks/gpu_check.sh"} <= programs


def test_no_script_shadows_an_importable_module():
    """`python benchmarks/x.py` puts benchmarks/ first on `sys.path`, so a script named like an installed package or
    a standard module replaces it for everything the script imports (transformers probes `kernels`)."""
    for folder in (ROOT / "benchmarks", ROOT / "examples"):
        elsewhere = [p for p in sys.path if Path(p or ".").resolve() != folder]
        for script in folder.glob("*.py"):
            shadowed = script.stem in sys.stdlib_module_names or importlib.machinery.PathFinder.find_spec(
                script.stem, elsewhere
            )
            assert not shadowed, f"{script.relative_to(ROOT)} shadows the importable module {script.stem!r}: rename it"


# -- gearkit ---------------------------------------------------------------------------------------------------------
GEARKIT = [(where, command, complete) for where, command, complete in COMMANDS if parse(command)[0] == "gearkit"]


def label(command: str) -> str:
    """A test id: the command without its comment."""
    program, argv, _ = parse(command)
    return shlex.join([program, *argv])


def gearkit_help(words: list[str], capsys) -> str:
    from gearkit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([*words, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("where, command, complete", GEARKIT, ids=[label(c) for _, c, _ in GEARKIT])
def test_documented_gearkit_command(where, command, complete, capsys):
    from gearkit.cli import build_parser

    _, argv, concrete = parse(command)
    usage = gearkit_help(subcommand(argv), capsys)
    unknown = {o for o in options(argv) if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", usage)}
    assert not unknown, f"{where}: `{command}` names options gearkit does not take: {sorted(unknown)}"
    if complete and concrete:
        build_parser().parse_args(argv)  # exits (code 2, with the reason on stderr) if the docs are wrong


def test_gearkit_recipes_runs():
    from gearkit import recipes
    from gearkit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["recipes", "--json"]) in (0, None)
    assert len(out.getvalue().splitlines()) == len(recipes.names())


# -- the benchmark scripts -------------------------------------------------------------------------------------------
SCRIPTS = [(where, command) for where, command, _ in COMMANDS if parse(command)[0].startswith("benchmarks/")]


def run_jobs(jobs: list[dict]) -> list[dict]:
    """Run each job `{"script", "argv"}` as `python <script> <argv>` would (the script's folder first on
    `sys.path`, `__name__ == "__main__"`), one after another in this process; returns `{"ok", "output"}` for each."""
    results = []
    for job in jobs:
        script = str(ROOT / job["script"])
        sys.argv, sys.path[0] = [script, *job["argv"]], str(Path(script).parent)
        out, ok = io.StringIO(), True
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as e:
                ok = e.code in (0, None)
            except BaseException:
                traceback.print_exc()
                ok = False
        results.append({"ok": ok, "output": out.getvalue()})
    return results


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory) -> dict[tuple[str, ...], dict]:
    """Every benchmark's `--help` (and each documented subcommand's), and the tiny runs, by `(script, *argv)`."""
    out = tmp_path_factory.mktemp("runs")
    scripts = [p for p in ROOT.glob("benchmarks/*.py") if '__name__ == "__main__"' in p.read_text()]  # not helpers
    jobs = {(s,): {"script": s, "argv": ["--help"]} for s in (str(p.relative_to(ROOT)) for p in scripts)}
    for _, command in SCRIPTS:
        program, argv, _ = parse(command)
        if program.endswith(".py") and subcommand(argv):
            jobs[(program, *subcommand(argv))] = {"script": program, "argv": [*subcommand(argv), "--help"]}
    for script, argv in TINY.items():
        jobs[(script, "tiny")] = {"script": script, "argv": shlex.split(argv.format(out=out))}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}  # this checkout, whatever is installed
    run = subprocess.run(
        [sys.executable, __file__, json.dumps(list(jobs.values()))],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(zip(jobs, json.loads(run.stdout.splitlines()[-1])))


@pytest.mark.parametrize("where, command", SCRIPTS, ids=[label(c) for _, c in SCRIPTS])
def test_documented_benchmark_command(where, command, script_runs):
    program, argv, _ = parse(command)
    assert (ROOT / program).is_file(), f"{where}: `{command}` runs {program}, which does not exist"
    if program.endswith(".sh"):
        run = subprocess.run(["bash", "-n", str(ROOT / program)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return
    usage = script_runs[(program, *subcommand(argv))]
    assert usage["ok"], usage["output"][-3000:]
    unknown = {o for o in options(argv) if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", usage["output"])}
    assert not unknown, f"{where}: `{command}` names options {program} does not take: {sorted(unknown)}"


@pytest.mark.parametrize("script", list(TINY))
def test_benchmark_runs_at_tiny_sizes(script, script_runs):
    run = script_runs[(script, "tiny")]
    assert run["ok"], run["output"][-3000:]


if __name__ == "__main__":
    print(json.dumps(run_jobs(json.loads(sys.argv[1]))))
