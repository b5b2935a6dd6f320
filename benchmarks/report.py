"""Shared by the benchmark scripts: print a markdown report and save it with the command that made it."""

from __future__ import annotations

import sys


def publish(lines: list[str], out: str | None) -> None:
    """Print `lines` and, when `out` is given, write them there under the command line that produced them."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(f"Command: `OMP_NUM_THREADS=1 PYTHONPATH=. python {' '.join(sys.argv)}`\n\n" + text)
