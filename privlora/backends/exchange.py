"""The driver of one group's evaluation through all of its messages, and where its time and
bytes went; with :func:`local_send`, straight to a backend server in this process."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from privlora.backends.base import BackendClient, BackendServer
from privlora.core.types import GroupSpec


@dataclass
class ExchangeCost:
    """Where a group evaluation's time and bytes went, summed over its messages."""

    encrypt_s: float = 0.0  # message 0 and the client's work between messages
    server_s: float = 0.0  # the transport and the server, as the client waits for them
    decrypt_s: float = 0.0
    bytes_up: float = 0
    bytes_down: float = 0
    messages: float = 0


def exchange(client: BackendClient, group: GroupSpec, x: np.ndarray, send: Callable[[int, bytes], bytes],
             cost: ExchangeCost | None = None) -> np.ndarray:
    """One group through all of its messages: encrypt, then ``send(message, request) -> reply``
    and the next message until the last reply, then decrypt. ``cost`` accumulates the timings."""
    cost = cost if cost is not None else ExchangeCost()
    t0 = time.perf_counter()
    request, state = client.encrypt(group, x)
    cost.encrypt_s += time.perf_counter() - t0
    for message in range(client.messages):
        t1 = time.perf_counter()
        reply = send(message, request)
        t2 = time.perf_counter()
        cost.server_s += t2 - t1
        cost.bytes_up += len(request)
        cost.bytes_down += len(reply)
        cost.messages += 1
        if message + 1 < client.messages:
            request, state = client.advance(group, message, reply, state)
            cost.encrypt_s += time.perf_counter() - t2
    t3 = time.perf_counter()
    delta = client.decrypt(group, reply, state)
    cost.decrypt_s += time.perf_counter() - t3
    return delta


def local_send(server: BackendServer, group: GroupSpec, session: Any) -> Callable[[int, bytes], bytes]:
    """``send`` for :func:`exchange` straight to a backend server in this process (tests, benchmarks)."""
    return lambda message, payload: server.evaluate(group, server.parse(group, message, payload, session), session)


