"""Lazy package attributes (PEP 562): a package names what its submodules define and imports a submodule only
when one of its names is first used, so that importing the package (and its light submodules) does not load
torch, open_clip or FAISS."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package`: name -> the module that defines it, imported on first use."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(names[name]), name)

    return __getattr__
