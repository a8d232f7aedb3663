"""The compiled artifact: a directory with a versioned manifest, a client bundle and a server bundle.

```
ARTIFACT/
  manifest.json                 format version, identities, model shape, plan, segments, rounds,
                                schedule, files + sha256
  client/segments/public_K.onnx public segments (ONNX, opset 17)
  client/tokenizer/...          the base model's tokenizer
  client/crypto.json            client-side parameters of the backend
  server/program.safetensors    the backend's private program (only the server bundle has it)
  ir/NN-pass.{txt,py}, summary.json   the IR after every pass (no weights)
```

Every file is listed in the manifest with its bundle, size and sha256. Loading a bundle checks
the format version and the hash of every file of that bundle. A missing, corrupted or mismatched
file fails with a clear message. The layout lives here, torch-free, because the compiler writes it
and the client and the server read it (docs/architecture.md describes every manifest key).

Format versions: 1 named the round schedule ``passes``; 2 calls it ``schedule`` and adds
``model`` (the base model's shape, for runtimes that know no architecture).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy as safetensors_numpy

from privlora.errors import PrivloraError
from privlora.files import file_sha256, read_json

FORMAT = "privlora-artifact"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
CLIENT, SERVER = "client", "server"
IR = "ir"  # the IR after every pass: hashed like the bundles, read only by `privlora inspect --ir`
SERVER_PROGRAM = f"{SERVER}/program.safetensors"  # the backend's private tensors
CRYPTO = f"{CLIENT}/crypto.json"  # the backend's client parameters
TOKENIZER_DIR = f"{CLIENT}/tokenizer"


class ArtifactError(PrivloraError):
    """The artifact is missing, corrupted, or of another format version."""


def file_entry(root: Path, path: Path, bundle: str) -> tuple[str, dict[str, Any]]:
    relative = path.relative_to(root).as_posix()
    return relative, {"bundle": bundle, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Add every file under client/, server/ and ir/ with its hash, then write manifest.json."""
    files = {}
    for bundle in (CLIENT, SERVER, IR):
        for path in sorted((root / bundle).rglob("*")):
            if path.is_file():
                name, entry = file_entry(root, path, bundle)
                files[name] = entry
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
    (root / MANIFEST).write_text(json.dumps(document, indent=2) + "\n")


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    manifest = read_json(path, ArtifactError, f"{root} is not a privlora artifact (no {MANIFEST})")
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a privlora manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{root} has artifact format version {manifest.get('format_version')!r}; "
                            f"this privlora reads version {FORMAT_VERSION}: recompile it with `privlora compile`")
    return manifest


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict[str, Any]
    name: str  # CLIENT or SERVER

    def path(self, relative: str) -> Path:
        entry = self.manifest["files"].get(relative)
        if entry is None or entry["bundle"] != self.name:
            raise ArtifactError(f"{relative} is not part of the {self.name} bundle")
        return self.root / relative


def load_bundle(root: str | Path, bundle: str) -> Bundle:
    """Read the manifest and verify every file of one bundle (``client``, ``server`` or ``ir``)."""
    root = Path(root)
    manifest = read_manifest(root)
    for relative, entry in manifest.get("files", {}).items():
        if entry.get("bundle") != bundle:
            continue
        path = root / relative
        if not path.is_file():
            raise ArtifactError(f"{root}: {relative} is missing")
        if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise ArtifactError(f"{root}: {relative} is corrupted or was replaced (sha256 mismatch)")
    return Bundle(root, manifest, bundle)


def artifact_id(root: str | Path) -> str:
    """The manifest's sha256: it names every file of both bundles by hash, so it identifies the
    artifact exactly (client and server must agree on it)."""
    return file_sha256(Path(root) / MANIFEST)


def adapter_key(root: str | Path) -> str:
    """The adapter's weights, named by content: a digest of its weight files' digests (its config
    and training notes left out), the same for every build of that adapter. A server counts
    query budgets against it, so that two builds of one adapter draw on one budget."""
    digests = read_manifest(Path(root))["adapter"]["sha256"]
    weights = sorted(f"{name}:{digest}" for name, digest in digests.items() if name.endswith((".safetensors", ".bin")))
    return hashlib.sha256("\n".join(weights or sorted(digests.values())).encode()).hexdigest()


def read_server_program(bundle: Bundle) -> dict[str, np.ndarray]:
    """The backend's private tensors, as numpy (read into memory: no mmap of a file that could be
    replaced under a running server)."""
    path = bundle.path(SERVER_PROGRAM)
    try:
        return safetensors_numpy.load(path.read_bytes())
    except Exception as exc:  # safetensors raises several unrelated types for a bad file
        raise ArtifactError(f"cannot read the server program {path}: {exc}") from None
