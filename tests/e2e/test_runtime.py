"""Secure generation end to end over a real uvicorn server on 127.0.0.1: secure greedy output
equals the plaintext fine-tuned model's; the ckks wire carries only well-formed ciphertexts and
keys, and a stranger's key reads no activation from them; two clients with their own keys are
served at once; bad, oversized (declared or streamed) and keyless-backend key requests get a 4xx
without hurting the server."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from tenseal import sealapi
from support.live import LiveServer, plaintext_tokens
from privlora.backends import bfv, bfv_layout, ckks
from privlora.backends import seal
from privlora.backends.base import PayloadError
from privlora.backends.common import frame, pack, unframe, unpack
from privlora.core.artifact import CLIENT, CRYPTO, load_bundle
from privlora.core.types import GroupSpec
from privlora.client.secure import SecureClient, key_path
from privlora.client.timings import render_timings
from privlora.client.generation import GenerationConfig, generate
from privlora.server.http import BodyLimits
from privlora.client.transports import HttpTransport, StreamTransport, TransportError

PROMPTS = ([3, 14, 15, 92, 65], [27, 18, 28])
CONFIG = GenerationConfig(max_new_tokens=6)
# |correlation| of a stranger's decryption with x's slots; noise alone gives about 1/sqrt(4096) = 0.016
MAX_CORRELATION = 0.1


class RecordingTransport(HttpTransport):
    """HTTP transport that keeps the key upload and every request and reply."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.keys = b""
        self.requests: list[bytes] = []
        self.replies: list[bytes] = []

    def open_session(self, evaluation_keys: bytes, artifact: str | None = None) -> str:
        self.keys = evaluation_keys
        return super().open_session(evaluation_keys, artifact)

    def evaluate(self, session: str, round_name: str, index: int, message: int, payload: bytes) -> bytes:
        reply = super().evaluate(session, round_name, index, message, payload)
        self.requests.append(payload)
        self.replies.append(reply)
        return reply


@pytest.fixture(scope="module")
def artifacts(tiny_build):
    built = {name: tiny_build.artifact(name) for name in ("bfv", "ckks", "concrete", "reference")}
    built["plain-masked"] = tiny_build.artifact("plain", protocol="masked")
    return tiny_build.base, tiny_build.adapter, built


@pytest.fixture(scope="module")
def live(artifacts):
    servers = {name: LiveServer(path) for name, path in artifacts[2].items()}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def expected(artifacts):
    """The plaintext fine-tuned model's tokens for each of PROMPTS (the base model's differ on each)."""
    base, adapter, _ = artifacts
    return plaintext_tokens(base, adapter, list(PROMPTS), CONFIG)


Inputs = list[tuple[GroupSpec, np.ndarray]]  # the group and the activation rows of each request, in order


def recorded_client(artifacts, live, name: str) -> tuple[SecureClient, RecordingTransport, Inputs]:
    """A client whose wire is recorded, with the group and the activation rows of every request it sends."""
    transport = RecordingTransport(live[name].url)
    client = SecureClient(artifacts[2][name], transport, cache_keys=False)
    inputs: Inputs = []
    encrypt = client.crypto.encrypt

    def recording_encrypt(group, x):
        inputs.append((group, np.asarray(x, dtype=np.float32).reshape(-1, group.d_in)))
        return encrypt(group, x)

    client.crypto.encrypt = recording_encrypt
    return client, transport, inputs


def stranger(artifact) -> ckks.Client:
    """A fresh ckks client for the artifact's parameters: a secret key of its own, nobody else's."""
    return ckks.Client(json.loads(load_bundle(artifact, CLIENT).path(CRYPTO).read_text()))


def ciphertexts(ctx, body: bytes, parms_id, scale: float | None = None) -> list:
    """The body's frame parts as SEAL ciphertexts of two polynomials at ``parms_id`` (and
    ``scale``); PayloadError for anything else."""
    parts = [seal.from_bytes(sealapi.Ciphertext, ctx, blob, "ciphertext") for blob in unframe(body)]
    for ct in parts:
        if ct.size() != 2 or ct.parms_id() != parms_id or (scale is not None and ct.scale != scale):
            raise PayloadError(f"a ciphertext of size {ct.size()} at another level or scale ({ct.scale:g})")
    return parts


def slot_image(rows: np.ndarray, lay: ckks.Layout) -> np.ndarray:
    """Where x's rows lie in one ciphertext's slots: each at unit norm, zero-padded to d_pad and
    repeated across its block, the blocks in row order (the unused ones zero)."""
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    padded = np.pad(unit, ((0, lay.rows_per_ciphertext - len(rows)), (0, lay.d_pad - lay.d_in)))
    return np.tile(padded, lay.block // lay.d_pad).reshape(-1)


def readable_x(reader: ckks.Client, group: GroupSpec, x: np.ndarray, body: bytes) -> str | None:
    """Why ``body`` could give x to someone without the client's secret key, or None. It must be
    ckks input ciphertexts (first level, x's scale), one per ciphertext's worth of rows, each of
    which ``reader``'s key decrypts to slots uncorrelated with where x's rows lie."""
    try:
        parts = ciphertexts(reader.ctx, body, reader.ctx.first_parms_id(), reader.scale)
    except PayloadError as exc:
        return f"not ckks input ciphertexts: {exc}"
    lay = ckks.layout(group, reader.params.slots)
    chunks = [x[start:start + lay.rows_per_ciphertext] for start in range(0, len(x), lay.rows_per_ciphertext)]
    if len(parts) != len(chunks):
        return f"{len(parts)} ciphertexts for {len(chunks)} ciphertexts' worth of rows"
    for ct, rows in zip(parts, chunks):
        plain = sealapi.Plaintext()
        reader.decryptor.decrypt(ct, plain)
        correlation = np.corrcoef(reader.encoder.decode_double(plain), slot_image(rows, lay))[0, 1]
        if not abs(correlation) < MAX_CORRELATION:  # a NaN is flagged too
            return f"a stranger's key reads x (correlation {correlation:.2f})"
    return None


@pytest.mark.parametrize("backend", ["bfv", "ckks"])
def test_secure_generation_over_http_equals_the_plaintext_model(artifacts, live, expected, backend):
    client = SecureClient(artifacts[2][backend], HttpTransport(live[backend].url), cache_keys=False)
    try:
        for prompt, tokens in zip(PROMPTS, expected):
            client.steps.clear()
            assert list(generate(client, prompt, CONFIG)) == tokens
            assert client.steps[0].rows == len(prompt) and all(s.rows == 1 for s in client.steps[1:])
            assert all(s.bytes_up > 0 and s.bytes_down > 0 and s.server_s > 0 for s in client.steps)
        assert "tokens/s" in render_timings(client.steps)
    finally:
        client.close()


def recorded_generation(artifacts, live, name: str) -> tuple[RecordingTransport, Inputs]:
    """Two tokens from PROMPTS[0] with the wire recorded."""
    client, transport, inputs = recorded_client(artifacts, live, name)
    try:
        list(generate(client, PROMPTS[0], GenerationConfig(max_new_tokens=2)))
    finally:
        client.close()
    assert inputs and client.crypto.messages * len(inputs) == len(transport.requests) == len(transport.replies)
    return transport, inputs


def test_nothing_on_the_wire_is_plaintext(artifacts, live):
    """The ckks wire carries exactly a rotation-key set and a public key, input ciphertexts that a
    stranger's key cannot read x from, and replies at the last level."""
    transport, inputs = recorded_generation(artifacts, live, "ckks")
    reader = stranger(artifacts[2]["ckks"])
    galois, public = unframe(transport.keys, 2)  # raises PayloadError unless they parse as exactly these keys
    seal.from_bytes(sealapi.GaloisKeys, reader.ctx, galois, "rotation keys")
    seal.from_bytes(sealapi.PublicKey, reader.ctx, public, "public key")
    found = [readable_x(reader, group, x, body) for (group, x), body in zip(inputs, transport.requests)]
    assert found == [None] * len(inputs)
    for reply in transport.replies:  # ciphertexts at the last level
        ciphertexts(reader.ctx, reply, reader.ctx.last_parms_id())


def bfv_stranger(artifact) -> bfv.Client:
    return bfv.Client(json.loads(load_bundle(artifact, CLIENT).path(CRYPTO).read_text()))


def bfv_readable(reader: bfv.Client, group: GroupSpec, x: np.ndarray, body: bytes) -> str | None:
    """Why a bfv message-0 body could give x to someone without the client's secret key, or None:
    it must be a row count and BFV ciphertexts at the first level, which ``reader``'s key decrypts to
    coefficients uncorrelated with where the client put x's quantised rows."""
    try:
        header, *blobs = unframe(body)
        parts = [seal.from_bytes(sealapi.Ciphertext, reader.ctx, blob, "ciphertext") for blob in blobs]
    except PayloadError as exc:
        return f"not bfv input ciphertexts: {exc}"
    if any(ct.size() != 2 or ct.parms_id() != reader.ctx.first_parms_id() for ct in parts):
        return "not bfv input ciphertexts: wrong size or level"
    layout = bfv_layout.message_layout(group, 0, len(x), reader.bfv.poly_modulus_degree)
    if len(parts) != layout.input_ciphertexts:
        return f"{len(parts)} ciphertexts for a layout of {layout.input_ciphertexts}"
    image = layout.encode(np.mod(np.rint(x / np.abs(x).max(axis=1, keepdims=True) * 32767), reader.modulus))
    for ct, expected_poly in zip(parts, image.reshape(-1, layout.degree)):
        plain = sealapi.Plaintext()
        reader.decryptor.decrypt(ct, plain)
        got = seal.coefficients(plain, list(range(layout.degree)), layout.degree).astype(np.float64)
        centred = np.where(expected_poly > reader.modulus // 2, expected_poly - float(reader.modulus), expected_poly)
        got = np.where(got > reader.modulus // 2, got - reader.modulus, got)
        correlation = np.corrcoef(got, centred)[0, 1]
        if not abs(correlation) < MAX_CORRELATION:
            return f"a stranger's key reads x (correlation {correlation:.2f})"
    return None


def test_nothing_on_the_bfv_wire_is_plaintext(artifacts, live):
    """bfv: the key upload is exactly a public key; every message-0 request is BFV ciphertexts that a
    stranger's key cannot read x from (control: the client's own key reads them); every reply is at
    the reply level."""
    transport, inputs = recorded_generation(artifacts, live, "bfv")
    reader = bfv_stranger(artifacts[2]["bfv"])
    (public,) = unframe(transport.keys, 1)
    seal.from_bytes(sealapi.PublicKey, reader.ctx, public, "public key")
    first = transport.requests[::2]  # message 0 of each group; message 1 carries the masked h'
    assert [bfv_readable(reader, group, x, body) for (group, x), body in zip(inputs, first)] == [None] * len(inputs)
    own = bfv_stranger(artifacts[2]["bfv"])
    group, x = inputs[0]
    assert (bfv_readable(own, group, x, own.encrypt(group, x)[0]) or "").startswith("a stranger's key reads x")
    for reply in transport.replies:
        assert all(seal.from_bytes(sealapi.Ciphertext, reader.ctx, blob, "reply").parms_id() == reader.ctx.last_parms_id()
                   for blob in unframe(reply))


def test_the_wire_check_flags_x_sent_readably(artifacts, live):
    """Controls of the check above: the reference backend's requests carry x and are flagged; so
    are x as an unencrypted CKKS plaintext in a frame, as float16 bytes, as a transposed array, as
    a ciphertext at the wrong level, and as a well-formed ciphertext under the reader's own key
    (which only the decryption arm of the check can flag)."""
    transport, inputs = recorded_generation(artifacts, live, "reference")
    reader = stranger(artifacts[2]["ckks"])
    for (group, x), body in zip(inputs, transport.requests):
        assert np.array_equal(unpack(body, np.float32, group.d_in), x)
        assert (readable_x(reader, group, x, body) or "").startswith("not ckks input ciphertexts")
    group, x = inputs[0]  # the prefill: every prompt row
    plain = sealapi.Plaintext()
    reader.encoder.encode(slot_image(x, ckks.layout(group, reader.params.slots)).tolist(), reader.ctx.first_parms_id(),
                          reader.scale, plain)
    own = reader.encrypt(group, x)[0]
    (lower,) = ciphertexts(reader.ctx, own, reader.ctx.first_parms_id())
    sealapi.Evaluator(reader.ctx).mod_switch_to_next_inplace(lower)
    readable = {"CKKS plaintext": (frame([seal.to_bytes(plain)]), "not ckks input ciphertexts"),
                "float16": (x.astype(np.float16).tobytes(), "not ckks input ciphertexts"),
                "transposed": (pack(x.T), "not ckks input ciphertexts"),
                "a ciphertext at the last level": (frame([seal.to_bytes(lower)]), "not ckks input ciphertexts"),
                "the reader's own ciphertext": (own, "a stranger's key reads x")}
    for what, (body, reason) in readable.items():
        assert (readable_x(reader, group, x, body) or "").startswith(reason), what


def test_concrete_over_http_agreement(artifacts, live, expected):
    """TFHE with 8-bit inputs and 6-bit weights is an approximation of the float LoRA: report how
    many greedy tokens agree with the plaintext model."""
    client = SecureClient(artifacts[2]["concrete"], HttpTransport(live["concrete"].url), cache_keys=False)
    try:
        pairs = [(got, want) for prompt, tokens in zip(PROMPTS, expected)
                 for got, want in zip(generate(client, prompt, CONFIG), tokens)]
    finally:
        client.close()
    agreement = sum(got == want for got, want in pairs) / len(pairs)
    print(f"concrete greedy tokens agreeing with the plaintext model: {agreement:.0%} of {len(pairs)}")
    assert len(pairs) == len(PROMPTS) * CONFIG.max_new_tokens and agreement >= 0.5


def test_two_message_rounds_over_http(artifacts, live):
    """A backend of two messages per group (plain, masked protocol) through the real server:
    every step sends two messages per group, and message 1 is answered once only."""
    client = SecureClient(artifacts[2]["plain-masked"], HttpTransport(live["plain-masked"].url), cache_keys=False)
    groups = sum(len(groups) for groups in client.groups.values())
    try:
        tokens = list(generate(client, PROMPTS[0], GenerationConfig(max_new_tokens=3)))
        assert len(tokens) == 3 and all(step.messages == 2 * groups for step in client.steps)
        group = next(iter(client.groups.values()))[0]
        url = f"{live['plain-masked'].url}/v1/sessions/{client.session}/rounds/{group.round}/{group.index}"
        request, state = client.crypto.encrypt(group, np.ones((2, group.d_in), np.float32))
        reply = httpx.post(f"{url}/0", content=request)
        second, _ = client.crypto.advance(group, 0, reply.content, state)
        assert httpx.post(f"{url}/1", content=second).status_code == 200
        replayed = httpx.post(f"{url}/1", content=second)
        assert replayed.status_code == 409 and "replayed" in replayed.json()["error"]
        assert httpx.post(f"{url}/2", content=second).status_code == 404
    finally:
        client.close()


def test_two_clients_with_their_own_keys_at_once(artifacts, live, expected):
    def run(prompt):
        client = SecureClient(artifacts[2]["ckks"], HttpTransport(live["ckks"].url), cache_keys=False)
        try:
            return list(generate(client, prompt, CONFIG))
        finally:
            client.close()

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, PROMPTS))
    assert results == expected


def test_bad_requests_get_4xx_and_the_server_stays_up(artifacts, live, expected):
    url = live["ckks"].url + "/v1"
    client = SecureClient(artifacts[2]["ckks"], HttpTransport(live["ckks"].url), cache_keys=False)
    try:
        round_name = next(iter(client.groups))
        garbage = httpx.post(f"{url}/sessions/{client.session}/rounds/{round_name}/0/0", content=b"garbage")
        assert garbage.status_code == 400 and "malformed" in garbage.json()["error"]
        assert httpx.post(f"{url}/sessions/nope/rounds/{round_name}/0/0", content=b"x").status_code == 404
        assert httpx.post(f"{url}/sessions/{client.session}/rounds/round_99/0/0", content=b"x").status_code == 404
        assert httpx.post(f"{url}/sessions", content=b"not keys").status_code == 400
        assert "garbage" not in garbage.text and httpx.get(f"{url}/health").json()["status"] == "ok"
        assert list(generate(client, PROMPTS[1], CONFIG)) == expected[1]
    finally:
        client.close()
    client.close()  # a session the server no longer knows needs no ending
    with pytest.raises(TransportError, match="404") as refused:
        client.transport.close_session(client.session)  # already closed
    assert refused.value.code == "unknown_session" and refused.value.recoverable


def streamed(body: bytes, chunk: int = 1 << 16) -> Iterator[bytes]:
    """The body as a generator: httpx sends it chunked, without a Content-Length to check first."""
    for start in range(0, len(body), chunk):
        yield body[start:start + chunk]


def test_body_limits_hold_exactly_for_declared_and_streamed_bodies(artifacts, live):
    """On both routes, a body as large as the limit is served and one byte more gets 413, whether
    its length is declared (Content-Length) or only found by reading the stream (chunked)."""
    client = SecureClient(artifacts[2]["ckks"], HttpTransport(live["ckks"].url), cache_keys=False)
    group = next(iter(client.groups.values()))[0]
    keys = client.crypto.evaluation_keys()
    request, state = client.crypto.encrypt(group, np.random.default_rng(0).normal(size=(1, group.d_in)))
    reply = client.transport.evaluate(client.session, group.round, group.index, 0, request)  # no limit on this server
    unlimited = client.crypto.decrypt(group, reply, state)
    server = LiveServer(artifacts[2]["ckks"], BodyLimits(keys=len(keys), round=len(request)))

    def post(path: str, body: bytes, stream: bool) -> httpx.Response:
        response = httpx.post(f"{server.url}/v1{path}", content=streamed(body) if stream else body, timeout=60)
        assert ("content-length" in response.request.headers) is not stream  # the reading path under test
        return response

    try:
        for stream in (False, True):
            too_large = [post("/sessions", keys + b"\0", stream)]
            session = post("/sessions", keys, stream).json()["session"]
            path = f"/sessions/{session}/rounds/{group.round}/{group.index}/0"
            too_large.append(post(path, request + b"\0", stream))
            assert [(r.status_code, r.json()["error"]) for r in too_large] == [(413, "request body too large")] * 2
            answered = post(path, request, stream)
            assert answered.status_code == 200
            delta = client.crypto.decrypt(group, answered.content, state)
            assert np.allclose(delta, unlimited, atol=1e-2 * np.abs(unlimited).max())
    finally:
        server.stop()
        client.close()


def test_keyless_servers_refuse_key_material_over_http(live):
    """The plain and reference backends take no evaluation keys: a non-empty upload is refused,
    not ignored, while an empty one opens a session."""
    for name in ("plain-masked", "reference"):
        url = f"{live[name].url}/v1/sessions"
        refused = httpx.post(url, content=b"\0")
        assert refused.status_code == 400 and refused.json()["error"] == "this backend takes no evaluation keys", name
        opened = httpx.post(url, content=b"")
        assert opened.status_code == 200 and httpx.delete(f"{url}/{opened.json()['session']}").status_code == 200


def test_client_refuses_a_server_on_another_artifact(artifacts, live):
    with pytest.raises(Exception, match="another artifact"):
        SecureClient(artifacts[2]["ckks"], HttpTransport(live["reference"].url), cache_keys=False)


def test_keys_are_cached_privately_per_artifact(artifacts, monkeypatch, tmp_path):
    monkeypatch.setenv("PRIVLORA_CACHE_DIR", str(tmp_path))
    from privlora.local import open_local

    first = open_local(artifacts[2]["ckks"], cache_keys=True)
    path = key_path(first.artifact_id, "ckks")
    assert path.is_file() and (path.stat().st_mode & 0o777) == 0o600
    second = open_local(artifacts[2]["ckks"], cache_keys=True)
    assert second.crypto.secret_key() == first.crypto.secret_key()
    x = np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32)
    group = next(iter(first.groups.values()))[0]
    request, state = first.crypto.encrypt(group, x[:, :group.d_in])
    reply = first.transport.evaluate(first.session, group.round, group.index, 0, request)
    assert np.allclose(second.crypto.decrypt(group, reply, state), first.crypto.decrypt(group, reply, state), atol=1e-3)


def test_the_stream_transport_carries_the_same_messages_and_refusals(artifacts, live, expected):
    """One WebSocket per session: the same tokens as HTTP, and the HTTP route's refusals as frames
    (unknown session 404, malformed frame 400, replayed message 1 409); a frame over the round
    limit closes the stream (413)."""
    url = live["bfv"].url
    client = SecureClient(artifacts[2]["bfv"], StreamTransport(url), cache_keys=False)
    try:
        assert list(generate(client, PROMPTS[0], CONFIG)) == expected[0]
        assert client.steps[1].messages == 2 * sum(len(g) for g in client.groups.values())
        group = next(iter(client.groups.values()))[0]
        first, state = client.crypto.encrypt(group, np.ones((2, group.d_in), np.float32))
        second, _ = client.crypto.advance(group, 0, client.transport.evaluate(client.session, group.round, group.index,
                                                                               0, first), state)
        client.transport.evaluate(client.session, group.round, group.index, 1, second)
        refusals = {"replayed": (client.session, 1, second, 409), "unknown session": ("nope", 0, first, 404),
                    "malformed": (client.session, 0, b"garbage", 400)}
        for what, (session, message, body, status) in refusals.items():
            with pytest.raises(TransportError) as refused:
                client.transport.evaluate(session, group.round, group.index, message, body)
            assert refused.value.status == status, what
        socket = client.transport._socket(client.session)
        socket.send(b"\x00" * 6)  # shorter than a frame header: refused, the stream stays open
        assert struct.unpack_from("<H", socket.recv(timeout=60))[0] == 400
    finally:
        client.close()
    small = LiveServer(artifacts[2]["bfv"], BodyLimits(keys=10**6, round=1000))
    try:
        client = SecureClient(artifacts[2]["bfv"], StreamTransport(small.url), cache_keys=False)
        with pytest.raises(TransportError) as too_large:
            list(generate(client, PROMPTS[0], CONFIG))
        assert too_large.value.status == 413
    finally:
        small.stop()
