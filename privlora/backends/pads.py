"""``pads`` backend: the Private Linear Layer split into an offline and an online phase (the
preprocessing of Delphi and MiniONN), so that no homomorphic operation waits on the prompt.

With integers mod p = 2^k (the PLL of docs/pll.md) and a group's ``A_hat``, ``B_hat``:

- **offline** (input-independent, batched): the client draws pads ``s_j`` uniform mod p, one per
  future row, and runs the ``bfv`` exchange on them (message 1: ``A_hat s + t``, message 2: the
  result), with one change: the server subtracts an output mask ``r_j`` from message 2's result,
  ``r_j`` a pseudorandom function of a per-session server key, the group and the pad id ``j``
  (the server assigns the ids, each once). The client keeps ``y_j = B A s_j + e_j - r_j mod p``:
  uniform to it, because it never learns ``r_j``. Offline messages carry no row of x: they are
  not charged to the query budget.
- **online** (one message per group, plain modular arithmetic): the client sends
  ``u = x_hat - s_j mod p`` with the pad id (uniform: a one-time pad, so the server learns nothing
  about x) and the server answers ``z = B_hat (A_hat u) + r_j mod p``. The client computes
  ``z + y_j = B_hat A_hat x_hat + e_j mod p``, then centres and rescales as ``bfv`` does.

A pad answers one online row only: an id used again with another ``u`` is refused (its two
answers would give ``dW (u - u')`` in the clear); the identical resend of a lost message gets
the identical answer. Pads die with their session. Online rows travel packed at the modulus
width. Message numbers: 0 online, 1 and 2 the offline exchange (``bfv``'s messages 0 and 1).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privlora.backends import bfv
from privlora.backends.base import (BackendBuild, GroupSpec, MessageOrderError, PayloadError, PendingStore, Request, Send,
                                    Weights)
from privlora.backends.common import WireValues, check_message, delta_of, frame, rows_of, unframe
from privlora.backends.exchange import ExchangeCost
from privlora.backends.pll import Fingerprint, PLLError, decode, encode_input

NAME = "pads"
ONLINE, OFFLINE_MASK, OFFLINE_FINISH = 0, 1, 2
MESSAGES = 3  # message indices a server accepts; a client's online evaluation takes one
MAX_BATCH = 256  # pad rows one offline exchange may carry
MAX_UNUSED = 16384  # pads issued and not yet used, per group and session: bounds a client's offline asks
CLIENT_PARAMS = bfv.CLIENT_PARAMS
_ROWS = struct.Struct("<I")
_START = struct.Struct("<Q")


def compile(groups: list[GroupSpec], weights: Weights, options: dict[str, Any]) -> BackendBuild:
    """``bfv``'s build, with ``rigorous`` smudging by default: its offline cost is amortised."""
    build = bfv.compile(groups, weights, {"privacy": "rigorous", **options})
    # No pool of encryptions of zero: the offline batches are off the critical path already, and
    # the pool's filling thread would take the GIL from the online work of an in-process client.
    public = {**build.public_params, "zero_pool": 0}
    return BackendBuild(build.server_tensors, {**build.client_params, "backend": NAME}, public, 1)


# -- packing at the modulus width -------------------------------------------------------------
# Each value takes the fewest whole bytes that hold it (6 for a 46-bit modulus, not 8), written as
# a packed record of 4-, 2- and 1-byte little-endian fields: far cheaper than bit packing, for at
# most 7 bits of slack per value.

def _record(bits: int) -> np.dtype:
    """A packed record of ceil(bits / 8) bytes: fields of 4, 2 and 1 bytes, least significant first."""
    width, fields, offset = (bits + 7) // 8, [], 0
    for size in (4, 2, 1):
        while width - offset >= size:
            fields.append((f"b{offset}", f"<u{size}"))
            offset += size
    return np.dtype(fields)


def packed_size(count: int, bits: int) -> int:
    return count * ((bits + 7) // 8)


def pack_values(values: np.ndarray, bits: int) -> bytes:
    """Values below 2^bits, each in ``ceil(bits / 8)`` little-endian bytes."""
    flat = np.asarray(values, dtype=np.uint64).reshape(-1)
    record = _record(bits)
    out = np.empty(flat.size, dtype=record)
    for name in record.names:
        offset, kind = int(name[1:]), record[name]
        out[name] = (flat >> np.uint64(8 * offset)).astype(kind)
    return out.tobytes()


def unpack_values(data: bytes | np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` values :func:`pack_values` wrote; PayloadError when the length is wrong or a
    value does not fit ``bits``."""
    record = _record(bits)
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else np.ascontiguousarray(data).reshape(-1)
    if raw.size != count * record.itemsize:
        raise PayloadError(f"malformed payload: {count} values of {bits} bits take {count * record.itemsize} "
                           f"bytes, got {raw.size}")
    fields = raw.view(record)
    values = np.zeros(count, dtype=np.uint64)
    for name in record.names:
        values |= fields[name].astype(np.uint64) << np.uint64(8 * int(name[1:]))
    if bits < 64 and count and int(values.max()) >> bits:
        raise PayloadError(f"malformed payload: a value does not fit {bits} bits")
    return values


def _stream(key: bytes, label: bytes, index: int, count: int, bits: int) -> np.ndarray:
    """``count`` pseudorandom values below 2^bits: SHAKE-128 of (key, label, index)."""
    digest = hashlib.shake_128(key + label + index.to_bytes(8, "little")).digest(8 * count)
    return np.frombuffer(digest, dtype=np.uint64) & np.uint64((1 << bits) - 1)


def _rows(key: bytes, label: bytes, first: int, rows: int, width: int, bits: int) -> np.ndarray:
    """Rows ``first .. first + rows - 1`` of a keyed pseudorandom matrix of ``width`` columns."""
    return np.stack([_stream(key, label, first + i, width, bits) for i in range(rows)])


def _bits(modulus: int) -> int:
    if modulus & (modulus - 1):
        raise PLLError(f"the pads backend needs a power-of-two modulus, got {modulus}")
    return modulus.bit_length() - 1


# -- server ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Online:
    """A parsed online message: the pad ids and the padded rows ``u`` (mod p)."""

    ids: np.ndarray
    u: np.ndarray
    digest: bytes  # of the message's rows, to tell an identical resend from a reuse


@dataclass
class Ledger:
    """The pads one session was issued and used, per group: the server keeps no pad itself, only
    its key for the output masks, the next id and, for each used id, what it answered."""

    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    issued: dict[str, int] = field(default_factory=dict)
    used: dict[str, dict[int, bytes]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, group: str, rows: int) -> int:
        """The first id ``rows`` more pads would get; PayloadError beyond the unused bound."""
        start = self.issued.get(group, 0)
        if start + rows - len(self.used.get(group, ())) > MAX_UNUSED:
            raise PayloadError(f"at most {MAX_UNUSED} unused pads per group and session: use some first")
        return start

    def issue(self, group: str, rows: int) -> int:
        with self.lock:
            start = self.check(group, rows)
            self.issued[group] = start + rows
            return start

    def use(self, group: str, online: Online) -> None:
        """Mark the ids used; a repeat of the same message passes, any other reuse is refused."""
        with self.lock:
            used = self.used.setdefault(group, {})
            issued = self.issued.get(group, 0)
            for pad in online.ids.tolist():
                if pad >= issued:
                    raise MessageOrderError(f"pad {pad} of {group} was never issued in this session")
                if used.get(pad, online.digest) != online.digest:
                    raise MessageOrderError(f"pad {pad} of {group} was already used: a pad answers one row once")
            for pad in online.ids.tolist():
                used[pad] = online.digest


@dataclass(eq=False)
class Session:
    crypto: bfv.Session  # the offline exchange's keys, zeros and pending masks
    ledger: Ledger
    marked: dict[str, np.ndarray] = field(default_factory=dict)  # group key -> B_hat^T as uint64, when marked


class Server(bfv.Server):
    messages = MESSAGES
    replicable = False  # each session's ledger of pads lives in the process that opened it
    max_rows = MAX_BATCH  # pad rows one offline request may declare (online rows: bfv.MAX_ROWS)

    def __init__(self, tensors: dict[str, np.ndarray], groups: list[GroupSpec], params: dict[str, Any]) -> None:
        super().__init__(tensors, groups, params)
        self.bits = _bits(self.modulus)
        # two's-complement views: uint64 products wrap mod 2^64, and p divides 2^64
        self.online = {key: (a.astype(np.uint64).T.copy(), b.astype(np.uint64).T.copy())
                       for key, (a, b) in self.matrices.items()}

    def open_session(self, evaluation_keys: bytes, pending: PendingStore | None = None,
                     fingerprint: Fingerprint | None = None) -> Session:
        crypto = super().open_session(evaluation_keys, pending, fingerprint)
        marked = {key: b.astype(np.uint64).T.copy() for key, b in crypto.marked.items()}
        return Session(crypto, Ledger(), marked)

    def offline_seconds(self, session: Session) -> float:
        return super().offline_seconds(session.crypto)

    def parse(self, group: GroupSpec, message: int, payload: bytes, session: Session | None = None) -> Request:
        """An offline message is the ``bfv`` one (checked as it is, with the pads' own bound on
        unused pads before any ciphertext is read); an online one is pad ids and padded rows."""
        check_message(message, self.messages)
        if message != ONLINE:
            request = super().parse(group, message - 1, payload, session)
            return Request(message, 0, request.data)  # pads carry no row of x: nothing to charge
        parts = unframe(payload, 3)
        if len(parts[0]) != _ROWS.size:
            raise PayloadError("malformed payload: no row count")
        (rows,) = _ROWS.unpack(parts[0])
        if rows > bfv.MAX_ROWS or len(parts[1]) != 8 * rows:
            raise PayloadError(f"malformed payload: {rows} rows take {rows} pad ids")
        ids = np.frombuffer(parts[1], dtype="<u8").astype(np.int64)
        if ids.size and (ids.min() < 0 or len(set(ids.tolist())) != rows):
            raise PayloadError("malformed payload: pad ids must be distinct")
        u = unpack_values(parts[2], self.bits, rows * group.d_in).reshape(rows, group.d_in)
        return Request(ONLINE, rows, Online(ids, u, hashlib.blake2b(payload, digest_size=16).digest()))

    def _check_state(self, group: GroupSpec, message: int, rows: int, exchange: int, session: Session) -> None:
        if message == 0:  # the pads' first offline message: the bound on unused pads
            with session.ledger.lock:
                session.ledger.check(group.key, rows)
        else:
            super()._check_state(group, message, rows, exchange, session.crypto)

    def evaluate(self, group: GroupSpec, request: Request, session: Session) -> bytes:
        if request.message == ONLINE:
            return self._answer(group, request.data, session)
        with self.filler:
            inner = Request(request.message - 1, request.rows, request.data)
            if request.message == OFFLINE_MASK:  # bounded like the pads it will make: no uncharged work beyond
                with session.ledger.lock:
                    session.ledger.check(group.key, request.data.layout.rows)
                return self._evaluate(group, inner, session.crypto)
            rows = request.data.layout.rows
            start = session.ledger.issue(group.key, rows)
            shift = np.mod(-self._masks(group, session.ledger, range(start, start + rows)).astype(np.int64), self.modulus)
            return frame([_START.pack(start), self._evaluate(group, inner, session.crypto, shift)])

    def _answer(self, group: GroupSpec, online: Online, session: Session) -> bytes:
        """z = B (A u) + r mod p, in plain integer arithmetic (B as the session's account is served it)."""
        session.ledger.use(group.key, online)
        a_t, b_t = self.online[group.key]
        b_t = session.marked.get(group.key, b_t)
        z = ((online.u @ a_t) @ b_t + self._masks(group, session.ledger, online.ids.tolist())) & np.uint64(self.modulus - 1)
        return pack_values(z, self.bits)

    def _masks(self, group: GroupSpec, ledger: Ledger, ids: Sequence[int]) -> np.ndarray:
        """The output masks r_j of these pads: a PRF of the session's key, the group and the id."""
        if not len(ids):
            return np.zeros((0, group.d_out), np.uint64)
        return np.stack([_stream(ledger.key, group.key.encode(), pad, group.d_out, self.bits) for pad in ids])


# -- client ------------------------------------------------------------------------------------

@dataclass
class Batch:
    """Pads of one offline exchange: ids ``start ..``, the pads re-derivable from ``seed``, and the
    client's shares ``y`` packed at the modulus width."""

    start: int
    seed: bytes
    shares: np.ndarray  # [rows, packed row] uint8
    next: int = 0  # the first unused row

    @property
    def rows(self) -> int:
        return len(self.shares)

    @property
    def left(self) -> int:
        return self.rows - self.next


@dataclass
class State:
    scale: np.ndarray
    leading: tuple[int, ...]
    shares: np.ndarray  # y_j of the rows' pads [rows, d_out]


class PadsShortError(PayloadError):
    """An online evaluation found fewer pads than rows: the caller prepares pads first."""


class Client(bfv.Client):
    messages = 1

    def __init__(self, params: dict[str, Any], secret_key: bytes | None = None) -> None:
        super().__init__(params, secret_key)
        self.bits = _bits(self.modulus)
        self.pools: dict[str, deque[Batch]] = {}

    def ready(self, group: GroupSpec) -> int:
        """Pads ready for ``group``'s online rows."""
        return sum(batch.left for batch in self.pools.get(group.key, ()))

    def pooled_bytes(self) -> int:
        """What the pools hold: each batch's seed and packed shares."""
        return sum(len(b.seed) + b.shares[b.next:].nbytes for pool in self.pools.values() for b in pool)

    def forget_pads(self) -> None:
        """Drop every pad: they belong to a session the server no longer has."""
        self.pools.clear()

    def prepare(self, group: GroupSpec, rows: int, send: Send, cost: ExchangeCost | None = None) -> None:
        """Make ``rows`` pads for ``group`` ahead of need: the offline exchange, in batches."""
        cost = cost if cost is not None else ExchangeCost()
        while rows > 0:
            batch = min(rows, MAX_BATCH)
            self.pools.setdefault(group.key, deque()).append(self._offline(group, batch, send, cost))
            rows -= batch

    def _offline(self, group: GroupSpec, rows: int, send: Send, cost: ExchangeCost) -> Batch:
        t0 = time.perf_counter()
        seed, exchange = os.urandom(32), secrets.randbits(64)
        pads = _rows(seed, b"pad", 0, rows, group.d_in, self.bits)
        request = self._send(self._layout(group, 0, rows), pads, exchange)
        t1 = time.perf_counter()
        masked_reply = send(OFFLINE_MASK, request)
        t2 = time.perf_counter()
        masked = self._receive(self._layout(group, 0, rows), masked_reply)
        finish = self._send(self._layout(group, 1, rows), masked, exchange)
        t3 = time.perf_counter()
        reply = send(OFFLINE_FINISH, finish)
        t4 = time.perf_counter()
        head, inner = unframe(reply, 2)
        if len(head) != _START.size:
            raise PayloadError("malformed reply: no pad ids")
        (start,) = _START.unpack(head)
        shares = self._receive(self._layout(group, 1, rows), inner)
        cost.encrypt_s += (t1 - t0) + (t3 - t2)
        cost.server_s += (t2 - t1) + (t4 - t3)
        cost.decrypt_s += time.perf_counter() - t4
        cost.bytes_up += len(request) + len(finish)
        cost.bytes_down += len(masked_reply) + len(reply)
        cost.messages += 2
        packed = np.frombuffer(pack_values(shares, self.bits), dtype=np.uint8).reshape(rows, -1).copy()
        return Batch(start, seed, packed)

    def _take(self, group: GroupSpec, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pad ids, pads and shares for ``rows`` online rows, each pad taken once."""
        if self.ready(group) < rows:
            raise PadsShortError(f"{group.key} has {self.ready(group)} pads ready for {rows} rows: prepare more")
        pool, ids, pads, shares = self.pools[group.key], [], [], []
        while len(ids) < rows:
            batch = pool[0]
            n = min(batch.left, rows - len(ids))
            ids += range(batch.start + batch.next, batch.start + batch.next + n)
            pads.append(_rows(batch.seed, b"pad", batch.next, n, group.d_in, self.bits))
            shares.append(unpack_values(batch.shares[batch.next:batch.next + n], self.bits, n * group.d_out)
                          .reshape(n, group.d_out))
            batch.next += n
            if not batch.left:
                pool.popleft()
        if not ids:
            return np.zeros(0, "<u8"), np.zeros((0, group.d_in), np.uint64), np.zeros((0, group.d_out), np.uint64)
        return np.asarray(ids, dtype="<u8"), np.concatenate(pads), np.concatenate(shares)

    def encrypt(self, group: GroupSpec, x: np.ndarray) -> tuple[bytes, State]:
        rows, leading = rows_of(x, group.d_in)
        x_hat, scale = encode_input(rows, self.pll.x_bits)
        scale = np.where(np.abs(x_hat).max(axis=1, initial=0) > 0, scale, 0.0)  # a zero row decodes to 0
        ids, pads, shares = self._take(group, len(rows))
        u = (np.mod(x_hat, self.modulus).astype(np.uint64) - pads) & np.uint64(self.modulus - 1)
        request = frame([_ROWS.pack(len(rows)), ids.tobytes(), pack_values(u, self.bits)])
        return request, State(scale, leading, shares)

    def wire_values(self, group: GroupSpec, request: bytes) -> WireValues:
        """The padded rows ``x_hat - r mod p`` of an online message, as the server reads them."""
        parts = unframe(request, 3)
        (rows,) = _ROWS.unpack(parts[0])
        return WireValues(unpack_values(parts[2], self.bits, rows * group.d_in), 0, self.modulus,
                          f"x plus a one-time pad, mod 2^{self.bits}")

    def advance(self, group: GroupSpec, message: int, reply: bytes, state: State) -> tuple[bytes, State]:
        raise MessageOrderError("the pads backend answers a group online in one message")

    def decrypt(self, group: GroupSpec, reply: bytes, state: State) -> np.ndarray:
        z = unpack_values(reply, self.bits, len(state.scale) * group.d_out).reshape(len(state.scale), group.d_out)
        y = ((z + state.shares) & np.uint64(self.modulus - 1)).astype(np.int64)
        return delta_of(decode(y, self.modulus, state.scale, self.out_scales[group.key]), state.leading, group.d_out)
