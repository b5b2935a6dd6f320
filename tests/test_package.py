import subprocess
import sys
from pathlib import Path


def test_import_is_light():
    heavy = "{'transformers', 'triton', 'lightning'}"
    code = f"import sys, gearkit; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_import_builds_no_recipe():
    """Built-in recipes are registered as builders: importing gearkit (and listing names) creates no stage."""
    code = (
        "import gc, gearkit; from gearkit import Stage, recipes; recipes.names(); "
        "print(sum(isinstance(o, Stage) for o in gc.get_objects()), len(recipes.names()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    stages, registered = map(int, out.split())
    assert stages == 0 and registered >= 30


def test_the_tree_passes_ruff():
    """CI's style check: `ruff check` and `ruff format --check`, configured in pyproject.toml."""
    root = Path(__file__).resolve().parent.parent
    for args in (["check", "."], ["format", "--check", "."]):
        run = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=root, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
