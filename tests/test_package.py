import subprocess
import sys


def test_import_is_light():
    code = "import sys, gearkit; print(sorted(m for m in sys.modules if m.split('.')[0] in {'transformers', 'triton', 'lightning'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
