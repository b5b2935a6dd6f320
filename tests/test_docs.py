"""The documentation site builds with `mkdocs build --strict`: no broken links, no missing pages or snippets, no
docstring warnings from the API reference (which imports the modules it documents)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # mkdocs, mkdocstrings and matplotlib: the `docs` extra


def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert not [line for line in log.splitlines() if "WARNING" in line], log[-3000:]
    for page in ("index.html", "tutorials/02-custom-recipe/index.html", "reference/compressors/index.html"):
        assert (tmp_path / "site" / page).is_file(), page


def test_docs_images_are_committed_and_embedded():
    for name in ("ppl_frontier.png", "residual_spectrum.png", "decode_speed.png"):
        assert (ROOT / "docs" / "img" / name).stat().st_size > 10_000, name
        assert f"img/{name}" in (ROOT / "docs" / "results.md").read_text(), name
