"""A refused request costs the server no more than the check that refuses it: a message 1 with
no pending message 0 is refused before its ciphertexts are loaded or its masks drawn, and a
header declaring more rows than its ciphertexts can hold before any block layout is computed.
Counted by the calls that load ciphertexts and draw masks, and by tracemalloc (numpy's arrays
are traced, SEAL's own memory is not). The controls ask the same of the backend without the
session, the way it answered before: the work happens, then the refusal."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from test_bfv import deploy, group, random_weights

from privlora.backends import bfv, bfv_layout
from privlora.backends.base import MessageOrderError, PayloadError
from privlora.backends.common import frame, unframe

ROWS = 4096  # a message 1 claiming many rows: its reply masks would be rows x d_out values


@pytest.fixture(scope="module")
def wide():
    g = group(0, 64, (512,), rank=8)
    return g, deploy([g], random_weights([g]), {"sigma": 0.0})


def forged_message_one(d, g, rows: int) -> bytes:
    """A message 1 of ``rows`` rows (the right number of valid ciphertexts) for an exchange that never began."""
    layout = bfv_layout.message_layout(g, 1, rows, d.client.bfv.poly_modulus_degree)
    one = d.client._send(layout, np.zeros((rows, g.rank), np.uint64), exchange=12345)
    _, blob, *_ = unframe(one)
    return frame([bfv._HEADER.pack(rows, 12345), *[blob] * layout.input_ciphertexts])


def counted(monkeypatch, server: bfv.Server, *methods: str) -> dict[str, int]:
    """Calls to each of the server's ``methods`` from now on."""
    calls = dict.fromkeys(methods, 0)
    for name in methods:
        original = getattr(server, name)

        def wrapper(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(server, name, wrapper)
    return calls


def test_a_message_one_without_its_message_zero_loads_and_draws_nothing(wide, monkeypatch):
    g, d = wide
    payload = forged_message_one(d, g, ROWS)
    calls = counted(monkeypatch, d.server, "_load_input", "_uniform")
    tracemalloc.start()
    with pytest.raises(MessageOrderError):
        d.server.parse(g, 1, payload, d.session)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert calls == {"_load_input": 0, "_uniform": 0} and peak < 2 * len(payload)  # the body's own parts at most
    # Control: without the session at hand, parse loads every ciphertext before anyone can refuse it
    # (evaluate still refuses before drawing a mask).
    request = d.server.parse(g, 1, payload)
    assert calls["_load_input"] == len(request.data.inputs) > 1
    with pytest.raises(MessageOrderError):
        d.server.evaluate(g, request, d.session)
    assert calls["_uniform"] == 0


def test_a_row_count_beyond_the_ciphertexts_sent_is_refused_before_a_layout(wide, monkeypatch):
    g, d = wide
    header_only = frame([bfv._HEADER.pack(bfv.MAX_ROWS, 1), b"x" * 64])  # 65 536 rows, one "ciphertext"

    def no_layout(*args, **kwargs):
        raise AssertionError("a block layout was computed for a request that could not hold its rows")

    with monkeypatch.context() as patched:
        patched.setattr(bfv, "message_layout", no_layout)
        with pytest.raises(PayloadError, match="65536 rows in 1 ciphertexts"):
            d.server.parse(g, 0, header_only, d.session)
        # Control: a count the ciphertexts could hold goes on to the layout (where this one is refused).
        with pytest.raises(AssertionError, match="block layout"):
            d.server.parse(g, 0, frame([bfv._HEADER.pack(4, 1), b"x" * 64]), d.session)
