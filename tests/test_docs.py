"""The documentation site builds with `mkdocs build --strict`: no broken links, no missing pages or snippets, no
docstring warnings from the API reference (which imports the modules it documents)."""

import os
import re
import subprocess
import sys
from pathlib import Path

from gearkit import recipes
from gearkit.integrations.hf import HF_BASELINES

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
    site = tmp_path / "site"
    for page in ("index.html", "tutorials/02-custom-recipe/index.html", "reference/compressors/index.html"):
        assert (site / page).is_file(), page
    # formulas render offline: MathJax is served with the site, and no page loads a script or style from outside
    assert (site / "javascripts" / "mathjax" / "tex-mml-chtml.js").stat().st_size > 100_000
    gear = (site / "concepts" / "gear" / "index.html").read_text()
    assert 'class="arithmatex"' in gear and "javascripts/mathjax/tex-mml-chtml.js" in gear
    for page in site.rglob("*.html"):
        html = page.read_text()
        assert not re.findall(r'src="https?:', html), page  # no script (or image) from outside
        assert not re.findall(r'<link[^>]+href="https?:', html), page  # no style sheet or font from outside


def test_docs_images_are_committed_and_embedded():
    for name in ("ppl_frontier.png", "residual_spectrum.png", "decode_speed.png"):
        assert (ROOT / "docs" / "img" / name).stat().st_size > 10_000, name
        assert f"img/{name}" in (ROOT / "docs" / "results.md").read_text(), name


def test_results_page_names_every_registered_recipe_family():
    """The Results page covers every recipe family (`gk-2.5` -> `gk`) and Hugging Face baseline registered."""
    page = (ROOT / "docs" / "results.md").read_text()
    families = {re.sub(r"-\d+(\.\d+)?$", "", name) for name in recipes.names() + list(HF_BASELINES)}
    assert not [f for f in sorted(families) if f"`{f}" not in page]
