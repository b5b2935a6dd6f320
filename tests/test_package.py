import subprocess
import sys


def test_import_is_light():
    heavy = "{'transformers', 'triton', 'lightning'}"
    code = f"import sys, gearkit; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
