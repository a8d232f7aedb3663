"""Thin helpers over Microsoft SEAL as exposed by ``tenseal.sealapi``: the CKKS context, byte
serialisation (the bindings only save to and load from files), the rotation key set, and
plaintext polynomials from and to numpy coefficients (for the coefficient-encoded ``bfv``).

Kept apart from the ``ckks`` backend so that the kernel reads as the algorithm, not as plumbing.
"""

from __future__ import annotations

import collections
import itertools
import os
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tenseal import sealapi

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


def context(params: CKKSParameters) -> sealapi.SEALContext:
    parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(sealapi.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_bits)))
    ctx = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
    if not ctx.parameters_set():
        raise ValueError(f"invalid CKKS parameters: {ctx.parameters_error_message()}")
    return ctx


def client_keys(ctx: sealapi.SEALContext, secret_key: bytes | None) -> tuple[Any, Any, Any]:
    """A client's key generator (fresh keys, or the cached secret key reloaded), and the
    symmetric encryptor and the decryptor of that secret key."""
    if secret_key is None:
        keygen = sealapi.KeyGenerator(ctx)
    else:
        keygen = sealapi.KeyGenerator(ctx, from_bytes(sealapi.SecretKey, ctx, secret_key, "secret key"))
    secret = keygen.secret_key()
    return keygen, sealapi.Encryptor(ctx, secret), sealapi.Decryptor(ctx, secret)


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


def from_bytes(factory: Callable[[], Any], ctx: sealapi.SEALContext, payload: bytes, what: str) -> Any:
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
    return _HEADER.pack(_MAGIC, _HEADER.size, *_VERSION, int(sealapi.COMPR_MODE_TYPE.NONE), 0, size)


def plaintext_bytes(coefficients: np.ndarray) -> bytes:
    """A plaintext polynomial in SEAL's own (uncompressed) serialisation: SEALHeader, parms_id
    (zero: not NTT form), coefficient count, scale, then the coefficients as a DynArray. The
    bindings have no coefficient setter, and building the hex-string form costs 40x more."""
    data = np.ascontiguousarray(coefficients, dtype=np.uint64)
    array = _header(_HEADER.size + 8 + data.nbytes) + struct.pack("<Q", data.size) + data.tobytes()
    body = bytes(32) + struct.pack("<Qd", data.size, 1.0) + array
    return _header(_HEADER.size + len(body)) + body


def plaintext(ctx: sealapi.SEALContext, coefficients: np.ndarray) -> sealapi.Plaintext:
    """A SEAL plaintext with these coefficients (each below the plain modulus)."""
    return from_bytes(sealapi.Plaintext, ctx, plaintext_bytes(coefficients), "plaintext")


def coefficients(plain: sealapi.Plaintext, positions: list[int], degree: int) -> np.ndarray:
    """The plaintext's coefficients at ``positions`` (SEAL trims trailing zero coefficients: pad
    back to the ring degree first)."""
    if plain.coeff_count() < degree:
        plain.resize(degree)
    return np.fromiter(map(plain.data, positions), dtype=np.uint64, count=len(positions))


class ZeroPool:
    """Fresh public-key encryptions of zero, made ahead of time: a reply is re-randomised with one
    of them, used once. Making one is most of a reply ciphertext's cost (docs/benchmarks.md), so a
    background thread makes them while the server is idle (between a client's requests) and a
    reply takes a ready one, or makes its own when none is left. The time spent making them is
    counted (``made_seconds``): it is work moved off the critical path, never hidden."""

    def __init__(self, encryptor: Any, parms_id: list[int], target: int) -> None:
        self.encryptor, self.parms_id, self.target = encryptor, parms_id, target
        self.ready: collections.deque[sealapi.Ciphertext] = collections.deque()
        self.made_seconds = 0.0
        self.made = 0
        self.taken_ready = 0  # replies re-randomised with a zero made ahead of time

    def make(self) -> sealapi.Ciphertext:
        start = time.perf_counter()
        zero = sealapi.Ciphertext()
        self.encryptor.encrypt_zero(self.parms_id, zero)
        self.made_seconds += time.perf_counter() - start
        self.made += 1
        return zero

    @property
    def short(self) -> bool:
        return len(self.ready) < self.target

    def refill(self) -> None:
        """One more zero for the pool (the background thread's unit of work)."""
        self.ready.append(self.make())

    def take(self) -> sealapi.Ciphertext:
        try:
            zero = self.ready.popleft()  # deque operations are atomic: no lock needed
        except IndexError:
            return self.make()
        self.taken_ready += 1
        return zero

    @property
    def offline_seconds(self) -> float:
        """The time the zeros taken from the pool cost to make, ahead of time."""
        return self.taken_ready * self.made_seconds / max(self.made, 1)


class IdleFiller:
    """One daemon thread per server that tops up its sessions' zero pools (any session object
    with a ``zeros`` :class:`ZeroPool`) while no request is being evaluated. The SEAL bindings
    hold the GIL, so work in a thread only pays when the server would otherwise wait; it yields
    the GIL after every zero, so a request that arrives waits at most one zero's time
    (docs/benchmarks.md has the figures)."""

    def __init__(self) -> None:
        self.sessions: weakref.WeakSet[Any] = weakref.WeakSet()
        self.busy = 0  # requests being evaluated
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None

    def add(self, session: Any) -> None:
        with self.lock:
            self.sessions.add(session)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="privlora-bfv-zeros", daemon=True)
                self.thread.start()
        self.wake.set()

    def __enter__(self) -> None:
        with self.lock:
            self.busy += 1

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.busy -= 1
        self.wake.set()

    def _next(self) -> Any | None:
        with self.lock:
            if self.busy:
                return None
            return next((session for session in list(self.sessions) if session.zeros.short), None)

    def _run(self) -> None:
        while True:
            session = self._next()
            if session is None:
                self.wake.clear()
                self.wake.wait(timeout=1.0)
                continue
            session.zeros.refill()
            time.sleep(0)  # hand the GIL to a request that is waiting for it
