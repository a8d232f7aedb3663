"""Thin helpers over Microsoft SEAL as exposed by ``tenseal.sealapi``: the CKKS context, byte
serialisation (the bindings only save to and load from files), the rotation key set, and
plaintext polynomials from and to numpy coefficients (for the coefficient-encoded ``bfv``).

Kept apart from the ``ckks`` backend so that the kernel reads as the algorithm, not as plumbing.
"""

from __future__ import annotations

import itertools
import os
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from privlora.backends.base import PayloadError


@dataclass(frozen=True)
class CKKSParameters:
    """The CKKS parameter set. SEAL itself enforces its 128-bit classical security bound on the
    coefficient modulus (at most 218 bits for N = 8192); the default uses 170.


    Two data primes. Everything that rotates a value of the rank vector happens at q0*q1, or
    after the product with B: at the single-prime level q0 a key switch adds about N^1.5 sigma
    q0/P of noise, far too much for h's scale. The one rescale (by q1) leaves h at 2^h_scale_bits,
    and the B product is not rescaled, so B is encoded at the largest scale that keeps |u| <= 1
    below q0/4 at the output."""

    poly_modulus_degree: int = 8192
    coeff_bits: tuple[int, ...] = (60, 50, 60)  # q0 | rescaling prime q1 | special (key-switching) prime
    scale_bits: int = 40  # x
    a_scale_bits: int = 44  # A: h at 2^34, B at 2^24 (measured best balance of h and B noise)

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def h_scale_bits(self) -> int:
        return self.scale_bits + self.a_scale_bits - self.coeff_bits[1]

    @property
    def b_scale_bits(self) -> int:
        return self.coeff_bits[0] - 2 - self.h_scale_bits


def context(params: CKKSParameters) -> seal.SEALContext:
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_bits)))
    ctx = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not ctx.parameters_set():
        raise ValueError(f"invalid CKKS parameters: {ctx.parameters_error_message()}")
    return ctx


def client_keys(ctx: seal.SEALContext, secret_key: bytes | None) -> tuple[Any, Any, Any]:
    """A client's key generator (fresh keys, or the cached secret key reloaded), and the
    symmetric encryptor and the decryptor of that secret key."""
    if secret_key is None:
        keygen = seal.KeyGenerator(ctx)
    else:
        keygen = seal.KeyGenerator(ctx, from_bytes(seal.SecretKey, ctx, secret_key, "secret key"))
    secret = keygen.secret_key()
    return keygen, seal.Encryptor(ctx, secret), seal.Decryptor(ctx, secret)


def galois_elements(steps: Iterable[int], poly_modulus_degree: int) -> list[int]:
    """SEAL's Galois element of a left rotation by ``s`` slots is 3^s mod 2N (the bindings'
    ``create_galois_keys`` takes elements, not steps)."""
    return sorted({pow(3, step, 2 * poly_modulus_degree) for step in steps})


_HEADER = struct.Struct("<HBBBBHQ")  # SEALHeader: magic, header size, version, compression, reserved, total size
_MAGIC, _VERSION = 0xA15E, (4, 3)


class _Scratch:
    """A private temporary directory for the file-only save/load of the bindings (in memory on
    Linux where /dev/shm exists). Names are unique across threads: a server evaluates several
    sessions at once, and two calls must never share a file. Plain ``os`` calls: this is on the
    path of every ciphertext, where pathlib's parsing costs as much as SEAL's own load."""

    def __init__(self) -> None:
        root = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self._dir = tempfile.TemporaryDirectory(prefix="privlora-seal-", dir=root)
        self._count = itertools.count()  # next() on a count is atomic under the GIL
        self._local = threading.local()

    def path(self) -> str:
        return f"{self._dir.name}/{os.getpid()}-{threading.get_ident()}-{next(self._count)}.bin"

    def loader(self) -> tuple[int, str]:
        """This thread's file for loads, kept open and never truncated: rewriting it in place costs
        a third of creating, filling and unlinking a file (freeing tmpfs pages is the slow part).
        Stale bytes past a payload are harmless: SEAL reads the size its header declares, and
        :func:`from_bytes` checks that size against the payload first."""
        if getattr(self._local, "pid", None) != os.getpid():  # a forked child gets a file of its own
            path = self.path()
            self._local.file = (os.open(path, os.O_RDWR | os.O_CREAT, 0o600), path)
            self._local.pid = os.getpid()
        return self._local.file


_SCRATCH: _Scratch | None = None
_SCRATCH_LOCK = threading.Lock()


def _scratch() -> _Scratch:
    global _SCRATCH
    if _SCRATCH is None:
        with _SCRATCH_LOCK:
            if _SCRATCH is None:
                _SCRATCH = _Scratch()
    return _SCRATCH


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def to_bytes(obj: Any) -> bytes:
    """Serialise a SEAL object (or a seeded ``Serializable``) with SEAL's own format (zstd-compressed)."""
    path = _scratch().path()
    try:
        obj.save(path)
        with open(path, "rb") as handle:
            return handle.read()
    finally:
        _unlink(path)


def from_bytes(factory: Callable[[], Any], ctx: seal.SEALContext, payload: bytes, what: str) -> Any:
    """Load a SEAL object, turning SEAL's validation errors into :class:`PayloadError`."""
    if len(payload) < _HEADER.size or _HEADER.unpack_from(payload)[-1] != len(payload):
        raise PayloadError(f"malformed {what}: its SEAL header does not match its length")  # SEAL ignores extra bytes
    descriptor, path = _scratch().loader()
    obj = factory()
    try:
        os.pwrite(descriptor, payload, 0)
        obj.load(ctx, path)
    except (RuntimeError, ValueError, OSError) as exc:
        raise PayloadError(f"malformed {what}: {exc}") from None
    return obj




def _header(size: int) -> bytes:
    return _HEADER.pack(_MAGIC, _HEADER.size, *_VERSION, int(seal.COMPR_MODE_TYPE.NONE), 0, size)


def plaintext_bytes(coefficients: np.ndarray) -> bytes:
    """A plaintext polynomial in SEAL's own (uncompressed) serialisation: SEALHeader, parms_id
    (zero: not NTT form), coefficient count, scale, then the coefficients as a DynArray. The
    bindings have no coefficient setter, and building the hex-string form costs 40x more."""
    data = np.ascontiguousarray(coefficients, dtype=np.uint64)
    array = _header(_HEADER.size + 8 + data.nbytes) + struct.pack("<Q", data.size) + data.tobytes()
    body = bytes(32) + struct.pack("<Qd", data.size, 1.0) + array
    return _header(_HEADER.size + len(body)) + body


def plaintext(ctx: seal.SEALContext, coefficients: np.ndarray) -> seal.Plaintext:
    """A SEAL plaintext with these coefficients (each below the plain modulus)."""
    return from_bytes(seal.Plaintext, ctx, plaintext_bytes(coefficients), "plaintext")


def coefficients(plain: seal.Plaintext, positions: list[int], degree: int) -> np.ndarray:
    """The plaintext's coefficients at ``positions`` (SEAL trims trailing zero coefficients: pad
    back to the ring degree first)."""
    if plain.coeff_count() < degree:
        plain.resize(degree)
    return np.fromiter(map(plain.data, positions), dtype=np.uint64, count=len(positions))
