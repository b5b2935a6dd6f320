"""Old names kept for one release: each still works, warns where it is used, and names its replacement."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

REMOVAL = "0.2"  # the release that drops every old name served here


def moved(module: str, names: dict[str, str]) -> Callable[[str], object]:
    """A module-level `__getattr__` that serves old names with a `DeprecationWarning`.

    Args:
        module: the module's name (`__name__`).
        names: old name -> `"new.module:attribute"`.
    """

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target, _, attribute = names[name].partition(":")
        warnings.warn(
            f"{module}.{name} is deprecated and goes in gearkit {REMOVAL}: use {target}.{attribute}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(target), attribute)

    return __getattr__


def ignored_argument(owner: str, name: str, reason: str) -> None:
    """Warn (`DeprecationWarning`, at the caller's caller) that `owner`'s argument `name` is still accepted, ignored,
    and goes in `REMOVAL`; `reason` says what replaces it."""
    warnings.warn(
        f"{owner}'s argument {name!r} is ignored and goes in gearkit {REMOVAL}: {reason}",
        DeprecationWarning,
        stacklevel=3,
    )
