import subprocess
import sys


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
