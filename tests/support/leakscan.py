"""Scan files for private adapter weights in every form a mistake could leave them.

``find_leaks`` reports each finding as ``"DETECTOR: where: what"``, with three detectors:

- ``bytes``: every row and column of a secret as little-endian bytes at any offset of every file
  (and of every base64 string in a JSON file): float16/32/64 as they are, divided by their largest
  |value| or by their L2 norm, and quantised, ``round(v / max|v| * (2^(b-1) - 1))`` for b = 4..16,
  as int8 (b <= 8), int16 (b >= 6) and int32 (b >= 12). A needle must carry 128 bits and 4
  distinct values, so the columns of a rank-4 A (4 values each) are found as float32/64 only.
- ``vector``: numeric arrays parsed from ONNX initializers and Constant nodes (subgraphs
  included), JSON numbers (a list of strings of numbers too), .npy/.npz and .safetensors, compared
  with each secret's rows and columns up to any factor per vector. A low-rank secret (rank <=
  length / 4: A's rows, B's columns, dW) matches a vector in the span of its rows (|cosine| >=
  SPAN_COSINE), so dW with a factor per row counts; a short full-rank one (A's columns, B's rows)
  matches one of its vectors (|cosine| >= VECTOR_COSINE). Candidates: an array's rows (last axis)
  and columns (first axis); a 1-D array's consecutive and strided chunks of every length of a
  low-rank secret. Vectors shorter than MIN_LENGTH are not compared.
- ``merged``: with the base checkpoint, every parsed 2-D array with the shape of an adapted
  module's W0 or W0^T must equal a base weight bit for bit; W0 + dW in a public weight does not.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

# The demo adapter's A rows quantised to 5 bits keep a cosine >= 0.997 (4 bits: 0.989-0.993); a
# random 576-vector scores 0.11 against a rank-8 span, and reaches 0.99 against a rank-8 span of
# R^32 with probability 2e-18. Two random 8-vectors reach 0.999 with probability 1e-10.
SPAN_COSINE = 0.99
VECTOR_COSINE = 0.999
MIN_LENGTH = 8
MIN_BITS = 128  # a byte needle this informative does not occur by chance in gigabytes
MIN_DISTINCT = 4  # nor one of few values (a mostly-zero quantised row)
MIN_KEY_BITS = 24  # a key of fewer bits is shared by too many needles and found too often
QUANT_BITS = range(4, 17)
_KEY = 8  # bytes of a needle looked up by hash before the whole needle is compared
_MULT = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing
_HASH_BITS = 26  # a fine hash set of the keys (64 MB of bools) behind a coarse one that stays in cache
_COARSE = np.uint64(4)  # bits fewer in the coarse set (4 MB)
_CHUNK = 1 << 22  # words hashed at once (32 MB)


@dataclass(frozen=True)
class PublicBase:
    """The base checkpoint and the modules the adapter updates: their weight in a public segment
    must be W0 itself, never W0 + dW."""

    weights: dict[str, np.ndarray]
    adapted: tuple[str, ...]


def adapter_secrets(adapter: str | Path, sites: int | None = None) -> dict[str, np.ndarray]:
    """A, B and dW of the adapter's first ``sites`` LoRA sites (all by default)."""
    from privlora.models.lora import read_adapter

    secrets = {}
    for site in read_adapter(adapter).sites[:sites]:
        secrets.update({f"{site.module}.A": site.lora_A.numpy(), f"{site.module}.B": site.lora_B.numpy(),
                        f"{site.module}.dW": site.delta_weight().numpy()})
    return secrets


def public_base(checkpoint: str | Path, adapter: str | Path) -> PublicBase:
    """The base checkpoint's float32 weights and every module the adapter adapts."""
    from privlora.models.checkpoint import load_state_dict
    from privlora.models.lora import read_adapter

    weights = {name: tensor.numpy() for name, tensor in load_state_dict(Path(checkpoint)).items()}
    return PublicBase(weights, tuple(site.module for site in read_adapter(adapter).sites))


def _oriented(secrets: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """(label, matrix) pairs whose rows are every secret's rows, then its columns."""
    pairs = []
    for name, tensor in secrets.items():
        matrix = np.atleast_2d(np.asarray(tensor, dtype=np.float64))
        matrix = matrix.reshape(-1, matrix.shape[-1])
        pairs += [(f"{name} row", matrix), (f"{name} column", np.ascontiguousarray(matrix.T))]
    return pairs


# --- bytes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Form:
    """One way a vector could be written out as bytes."""

    dtype: str  # little-endian numpy dtype
    scale: str  # "raw", "max" (over max|v|), "l2" (over ||v||) or "quantised"
    bits: int  # information per element (the quantisation width for "quantised")

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        if self.scale == "raw":
            return vectors.astype(self.dtype)
        norm = np.linalg.norm(vectors, axis=1, keepdims=True) if self.scale == "l2" else \
            np.abs(vectors).max(axis=1, keepdims=True)
        unit = vectors / np.where(norm > 0, norm, 1.0)
        if self.scale == "quantised":
            return np.round(unit * (2 ** (self.bits - 1) - 1)).astype(self.dtype)
        return unit.astype(self.dtype)

    def __str__(self) -> str:
        name = np.dtype(self.dtype).name
        return {"raw": name, "max": f"{name} / max|v|", "l2": f"{name} / ||v||",
                "quantised": f"{name} ({self.bits}-bit)"}[self.scale]


def _key_bits(dtype: str, bits: int) -> int:
    """Information in the 8-byte key of a needle of this form."""
    return _KEY // np.dtype(dtype).itemsize * bits


# Quantised values in wide integers (3-bit values in int16, 8-bit values in int32) have keys too
# common to look up; such arrays are still compared as vectors when a file parses.
_FORMS = tuple([_Form(dtype, scale, bits) for dtype, bits in (("<f2", 16), ("<f4", 32), ("<f8", 32))
                for scale in ("raw", "max", "l2")]
               + [_Form(dtype, "quantised", bits) for bits in QUANT_BITS for dtype in ("<i1", "<i2", "<i4")
                  if bits <= 8 * np.dtype(dtype).itemsize and _key_bits(dtype, bits) >= MIN_KEY_BITS])


@dataclass(frozen=True, slots=True)
class _Needle:
    label: str
    vector: np.ndarray
    form: _Form
    key_at: int  # byte offset of the hashed key inside the needle

    def data(self) -> bytes:
        return self.form.encode(self.vector[None])[0].tobytes()


@dataclass(frozen=True)
class _Needles:
    by_key: dict[int, list[_Needle]]
    keys: np.ndarray  # sorted uint64
    fine: np.ndarray  # bool hash sets of the keys: by the whole hash
    coarse: np.ndarray  # and by its top bits

    @classmethod
    def of(cls, oriented: list[tuple[str, np.ndarray]]) -> _Needles:
        by_key: dict[int, list[_Needle]] = defaultdict(list)
        for label, matrix in oriented:
            for form in _FORMS:
                for key, needle in _needles(label, matrix, form):
                    by_key[key].append(needle)
        keys = np.array(sorted(by_key), dtype=np.uint64)
        fine, coarse = np.zeros(1 << _HASH_BITS, dtype=bool), np.zeros(1 << (_HASH_BITS - int(_COARSE)), dtype=bool)
        fine[_hash(keys)] = coarse[_hash(keys) >> _COARSE] = True
        return cls(dict(by_key), keys, fine, coarse)

    def find(self, words: np.ndarray) -> np.ndarray:
        """Indices of the words that are keys: two hash sets filter, a binary search confirms."""
        hashed = _hash(words)
        maybe = np.flatnonzero(self.coarse[hashed >> _COARSE])
        maybe = maybe[self.fine[hashed[maybe]]]
        at = np.minimum(np.searchsorted(self.keys, words[maybe]), len(self.keys) - 1)
        return maybe[self.keys[at] == words[maybe]]


def _hash(words: np.ndarray) -> np.ndarray:
    return (words * _MULT) >> np.uint64(64 - _HASH_BITS)


def _needles(label: str, matrix: np.ndarray, form: _Form) -> Iterator[tuple[int, _Needle]]:
    """(key, needle) for every row of ``matrix`` informative enough in ``form``; the key is the 8
    bytes at the row's largest |value|, never a run of zeros."""
    rows, length = matrix.shape
    size = np.dtype(form.dtype).itemsize
    if length * form.bits < MIN_BITS:
        return
    encoded = form.encode(matrix)
    ordered = np.sort(encoded, axis=1)
    distinct = 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(axis=1)
    first = np.minimum(np.abs(matrix).argmax(axis=1), length - _KEY // size)
    raw = encoded.view(np.uint8).reshape(rows, length * size)
    keys = raw[np.arange(rows)[:, None], first[:, None] * size + np.arange(_KEY)].copy().view("<u8")[:, 0]
    for row in np.flatnonzero(distinct >= MIN_DISTINCT):
        yield int(keys[row]), _Needle(label, matrix[row], form, int(first[row]) * size)


def _key_hits(data: bytes, needles: _Needles) -> Iterator[tuple[int, int]]:
    """(offset, key) of every 8-byte window of ``data`` that equals a needle's key."""
    for offset in range(min(_KEY, len(data))):
        words = np.frombuffer(data, dtype="<u8", count=(len(data) - offset) // _KEY, offset=offset)
        for start in range(0, len(words), _CHUNK):
            chunk = words[start:start + _CHUNK]
            found = needles.find(chunk)
            yield from zip((offset + _KEY * (start + found)).tolist(), chunk[found].tolist())


def _byte_leaks(where: str, data: bytes, needles: _Needles) -> list[str]:
    found: dict[tuple[str, _Form], list[int]] = defaultdict(list)
    for offset, key in _key_hits(data, needles):
        for needle in needles.by_key[key]:
            expected = needle.data()
            start = offset - needle.key_at
            if start >= 0 and data[start:start + len(expected)] == expected:
                found[needle.label, needle.form].append(start)
    return [f"bytes: {where}: {len(starts)} x {label} as {form} (first at byte {min(starts)})"
            for (label, form), starts in found.items()]


# --- parsed arrays -----------------------------------------------------------------------------


def _onnx_arrays(graph: onnx.GraphProto, where: str) -> Iterator[tuple[str, np.ndarray]]:
    for tensor in graph.initializer:
        yield f"{where}: initializer {tensor.name}", numpy_helper.to_array(tensor)
    for node in graph.node:
        for attribute in node.attribute:
            name = f"{where}: {node.op_type} {node.name or node.output[0]}"
            tensors = [attribute.t] if attribute.type == onnx.AttributeProto.TENSOR else attribute.tensors
            for tensor in tensors:
                yield name, numpy_helper.to_array(tensor)
            for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                yield from _onnx_arrays(subgraph, f"{name}.{attribute.name}")


def _base64(text: str) -> bytes | None:
    if len(text) < 24:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _json_parts(value: Any, where: str) -> Iterator[tuple[str, np.ndarray | bytes]]:
    """Every numeric array (nested lists become matrices) and every base64 string's bytes."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _json_parts(item, f"{where}.{key}")
    elif isinstance(value, list):
        try:
            yield where, np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):  # ragged or not numbers
            for index, item in enumerate(value):
                yield from _json_parts(item, f"{where}[{index}]")
    elif isinstance(value, str) and (blob := _base64(value)) is not None:
        yield f"{where} (base64)", blob


def _parts(path: Path, data: bytes) -> Iterator[tuple[str, np.ndarray | bytes]]:
    """The file's bytes, then what it holds: arrays to compare, and blobs to scan as bytes."""
    yield str(path), data
    if path.suffix == ".onnx":
        yield from _onnx_arrays(onnx.load(str(path)).graph, str(path))
    elif data.startswith(b"\x93NUMPY"):
        yield str(path), np.load(io.BytesIO(data), allow_pickle=False)
    elif path.suffix == ".npz":
        yield from ((f"{path}: {name}", array) for name, array in np.load(io.BytesIO(data), allow_pickle=False).items())
    elif path.suffix == ".safetensors":
        from safetensors.torch import load  # torch reads bfloat16, numpy does not

        yield from ((f"{path}: {name}", tensor.float().numpy()) for name, tensor in load(data).items())
    else:
        try:
            document = json.loads(data)
        except ValueError:  # not JSON (UnicodeDecodeError included): bytes only
            return
        yield from _json_parts(document, f"{path}: $")


# --- vector ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Probe:
    label: str
    basis: np.ndarray  # [length, k]: an orthonormal basis of the span, or unit secret vectors
    span: bool  # score: the projection's norm (span) or the largest |cosine| with one vector

    def hits(self, projected: np.ndarray) -> np.ndarray:
        """Which unit candidate vectors match, given their products with the basis."""
        if self.span:
            return np.linalg.norm(projected, axis=1) >= SPAN_COSINE
        return np.abs(projected).max(axis=1) >= VECTOR_COSINE


def _probe(label: str, matrix: np.ndarray) -> _Probe | None:
    """The span of a low-rank secret's rows, or its unit rows; None for short or zero vectors."""
    length = matrix.shape[1]
    if length < MIN_LENGTH:
        return None
    _, singular, vt = np.linalg.svd(matrix, full_matrices=False)
    rank = int((singular > singular[0] * 1e-4).sum()) if singular[0] > 0 else 0
    if rank == 0:
        return None
    if rank <= length // 4:
        return _Probe(f"the span of {label}s", vt[:rank].T, True)
    norms = np.linalg.norm(matrix, axis=1)
    return _Probe(f"a {label}", (matrix[norms > 0] / norms[norms > 0, None]).T, False)


def _probes(oriented: list[tuple[str, np.ndarray]]) -> dict[int, list[_Probe]]:
    """Probes grouped by vector length."""
    probes: dict[int, list[_Probe]] = defaultdict(list)
    for label, matrix in oriented:
        if (probe := _probe(label, matrix)) is not None:
            probes[matrix.shape[1]].append(probe)
    return probes


def _views(array: np.ndarray, lengths: set[int]) -> Iterator[tuple[str, np.ndarray, bool]]:
    """Candidate vectors of an array: (which, rows of a matrix, whether cut from a 1-D array)."""
    if array.dtype.kind not in "iuf" or array.size < MIN_LENGTH:
        return
    values = np.asarray(array, dtype=np.float64)
    if values.ndim == 1:
        for length in sorted(lengths):
            if values.size % length == 0:
                yield f"chunks of {length}", values.reshape(-1, length), values.size > length
                if values.size > length:
                    yield f"stride {values.size // length}", values.reshape(length, -1).T, True
        return
    if values.shape[-1] in lengths:
        yield "rows", values.reshape(-1, values.shape[-1]), False
    if values.shape[0] in lengths:
        yield "columns", values.reshape(values.shape[0], -1).T, False


def _vector_leaks(where: str, array: np.ndarray, probes: dict[int, list[_Probe]]) -> list[str]:
    """Cut vectors meet span probes only: the many short chunks of a 1-D array (per-channel scales,
    norm weights) are too likely to align with one of thousands of short secret vectors."""
    leaks = []
    for view, vectors, cut in _views(array, set(probes)):
        group = [probe for probe in probes[vectors.shape[1]] if probe.span or not cut]
        vectors = vectors[np.isfinite(vectors).all(axis=1)]
        norms = np.linalg.norm(vectors, axis=1)
        units = vectors[norms > 0] / norms[norms > 0, None]
        if not group or not len(units):
            continue
        projected = units @ np.concatenate([probe.basis for probe in group], axis=1)
        bounds = np.cumsum([0] + [probe.basis.shape[1] for probe in group])
        for probe, start, stop in zip(group, bounds, bounds[1:]):
            hits = probe.hits(projected[:, start:stop])
            if hits.any():
                leaks.append(f"vector: {where} ({view}): {hits.sum()} of {len(units)} in {probe.label}")
    return leaks


# --- merged ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Public:
    """Every base weight (both orientations) with the shape of an adapted module's W0 or W0^T."""

    by_shape: dict[tuple[int, ...], list[tuple[str, np.ndarray]]]
    digests: frozenset[bytes]

    @classmethod
    def of(cls, base: PublicBase) -> _Public:
        adapted = [base.weights[f"{module}.weight"] for module in base.adapted]
        shapes = {shape for weight in adapted for shape in (weight.shape, weight.T.shape)}
        by_shape: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = defaultdict(list)
        for name, weight in base.weights.items():
            for oriented, suffix in ((weight, ""), (weight.T, " (transposed)")):
                if oriented.shape in shapes:
                    by_shape[oriented.shape].append((name + suffix, np.ascontiguousarray(oriented, np.float32)))
        digests = frozenset(_digest(w) for group in by_shape.values() for _, w in group)
        return cls(dict(by_shape), digests)


def _digest(array: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).digest()


def _merged_leaks(where: str, array: np.ndarray, public: _Public) -> list[str]:
    if array.shape not in public.by_shape or array.dtype.kind not in "iuf" or _digest(array) in public.digests:
        return []
    distance, name = min((float(np.abs(array - weight).max()), name) for name, weight in public.by_shape[array.shape])
    return [f"merged: {where}: {array.shape} equals no base weight (nearest {name}, max |difference| {distance:.3g})"]


def find_leaks(files: list[Path], secrets: dict[str, np.ndarray], base: PublicBase | None = None) -> list[str]:
    """Every place a secret tensor (a row or column of it, in any form above) appears in ``files``,
    and, given the ``base`` checkpoint, every adapted public weight that is not the base's own."""
    oriented = _oriented(secrets)
    needles, probes = _Needles.of(oriented), _probes(oriented)
    public = _Public.of(base) if base is not None else None
    leaks = []
    for path in files:
        for where, part in _parts(path, path.read_bytes()):
            if isinstance(part, bytes):
                leaks += _byte_leaks(where, part, needles)
                continue
            leaks += _vector_leaks(where, part, probes)
            if public is not None:
                leaks += _merged_leaks(where, part, public)
    return leaks
