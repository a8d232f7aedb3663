"""Small file helpers shared by models, adapters and artifacts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from privlora.errors import PrivloraError


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path, error: type[PrivloraError], missing: str) -> Any:
    """Parse a JSON file; ``error(missing)`` when it does not exist, ``error`` naming the file when
    it does not parse."""
    if not path.is_file():
        raise error(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is corrupted: not valid JSON ({exc})") from None
