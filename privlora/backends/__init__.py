"""Private-round backends: one module per backend behind one small interface (see ``base``)."""

from __future__ import annotations

from types import ModuleType

from privlora.backends import plain, reference
from privlora.errors import PrivloraError

BACKENDS: dict[str, ModuleType] = {module.NAME: module for module in (reference, plain)}
DEFAULT_BACKEND = reference.NAME


def backend(name: str) -> ModuleType:
    try:
        return BACKENDS[name]
    except KeyError:
        raise PrivloraError(f"unknown backend {name!r} (available: {', '.join(BACKENDS)})") from None
