"""Private-round backends: one module per backend behind one small interface (see ``base``).

Modules are imported on first use: each pulls in its own FHE library.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from privlora.errors import PrivloraError

BACKENDS: tuple[str, ...] = ("ckks", "concrete", "plain", "reference")
DEFAULT_BACKEND = "ckks"


def backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise PrivloraError(f"unknown backend {name!r} (available: {', '.join(BACKENDS)})")
    return importlib.import_module(f"privlora.backends.{name}")
