"""Where privlora keeps converted models and other derived files, and where its packaged data is."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "PRIVLORA_CACHE_DIR"


def cache_root() -> Path:
    """``$PRIVLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/privlora``, else ``~/.cache/privlora``."""
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "privlora"


DATA_DIR = Path(__file__).parent / "data"
DEMO_ADAPTER = DATA_DIR / "demo_adapter"  # the clinic adapter the demo, benchmarks and tests use
