"""Where gearkit keeps what it builds once and reuses: `$GEARKIT_CACHE_DIR`, default `~/.cache/gearkit`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where gearkit keeps converted models, trained dictionaries and compiled kernels: `$GEARKIT_CACHE_DIR` or
    `~/.cache/gearkit`."""
    return Path(os.environ.get("GEARKIT_CACHE_DIR", Path.home() / ".cache" / "gearkit"))
