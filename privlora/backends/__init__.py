"""Private-round backends: one module per backend behind one typed contract (``base``), found
through a registry.

Modules are imported on first use: each pulls in its own FHE library, and a client or server
install carries only what its backend needs. ``docs/backends.md`` says how to add one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import cast

from privlora.backends.base import BackendError, BackendModule


@dataclass(frozen=True)
class BackendInfo:
    name: str
    module: str  # import path of the module implementing base.BackendModule
    summary: str  # one line for help texts: what it protects and how
    encrypted: bool  # whether the client's rows leave the client encrypted


REGISTRY: dict[str, BackendInfo] = {}


def register(info: BackendInfo) -> None:
    if info.name in REGISTRY:
        raise BackendError(f"backend {info.name!r} is already registered")
    REGISTRY[info.name] = info


for _info in (
    BackendInfo("bfv", "privlora.backends.bfv",
                "coefficient-encoded BFV (SEAL), the masked PLL in two messages per group: prompt and adapter protected",
                True),
    BackendInfo("pads", "privlora.backends.pads",
                "the PLL with pads: bfv's exchange made ahead of time on random pads, one plain message per group "
                "online: prompt and adapter protected", True),
    BackendInfo("ckks", "privlora.backends.ckks", "CKKS encryption (SEAL): prompt and adapter protected", True),
    BackendInfo("concrete", "privlora.backends.concrete", "TFHE (Concrete): protects the prompt, not the adapter", True),
    BackendInfo("plain", "privlora.backends.plain", "the PLL integer protocol, unencrypted (a reference)", False),
    BackendInfo("reference", "privlora.backends.reference", "float, unencrypted, exact (for debugging)", False),
):
    register(_info)

DEFAULT_BACKEND = "pads"  # no encryption on the critical path; bfv and ckks stay selectable (per query)


def available() -> tuple[str, ...]:
    return tuple(sorted(REGISTRY))


def load(name: str) -> BackendModule:
    """The backend module registered as ``name``; a clear error for an unknown name."""
    info = REGISTRY.get(name)
    if info is None:
        raise BackendError(f"unknown backend {name!r} (available: {', '.join(available())})")
    return cast(BackendModule, importlib.import_module(info.module))
