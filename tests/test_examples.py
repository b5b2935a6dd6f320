"""The example scripts run as a user would run them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize("script, expect", [("quickstart.py", "gear-2"), ("generate_with_gearkit.py", "sink-3"),
                                            ("fabric_generate.py", '"index": 2'), ("csr_dictionary.py", "csr-8-tiny")])
def test_example_runs(script, expect):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, whatever gearkit is installed elsewhere
    run = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert expect in run.stdout
