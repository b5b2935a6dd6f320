"""The example scripts run as a user would run them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize(
    "script, expect",
    [
        ("quickstart.py", "gear-2"),  # tutorial 1
        ("custom_recipe.py", "my-3"),  # tutorial 2
        ("generate_with_gearkit.py", "batch of 2 with left padding"),  # tutorial 3
        ("fabric_generate.py", '"index": 2'),  # tutorial 4
        ("kernels_backend.py", "stored bytes identical to eager: True"),  # tutorial 5
        ("csr_dictionary.py", "csr-8-tiny"),  # tutorial 6
        ("memory_report.py", "bytes of the tensors held: 73728 (report: 73728)"),  # tutorial 7
    ],
)
def test_example_runs(script, expect):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, whatever gearkit is installed elsewhere
    run = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert expect in run.stdout
