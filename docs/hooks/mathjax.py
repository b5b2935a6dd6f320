"""mkdocs hook: MathJax served from the site itself, so formulas render offline and the build fetches nothing.

The copy is MathJax 3's combined TeX bundle and its web fonts from the PyPI package `django-static-mathjax` (the
`docs` extra; it ships MathJax's files and needs no Django to be read). The bundle finds its fonts next to itself.
"""

from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

TARGET = "javascripts/mathjax"  # where the bundle lands in the site; mkdocs.yml's extra_javascript names it


def on_files(files: Files, config) -> Files:
    """Add MathJax's TeX bundle and its fonts to the site's files."""
    try:
        import mathjax
    except ModuleNotFoundError:
        raise PluginError(
            "formulas are rendered by a local MathJax: pip install 'django-static-mathjax>=3.2' (the docs extra)"
        ) from None
    es5 = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    fonts = sorted((es5 / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    for path in [es5 / "tex-mml-chtml.js", *fonts]:
        files.append(File.generated(config, f"{TARGET}/{path.relative_to(es5).as_posix()}", abs_src_path=str(path)))
    return files
