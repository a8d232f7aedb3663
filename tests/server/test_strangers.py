"""What a stranger (no token, or a bad one) can make a server with accounts do: nothing it must
read, keep or answer at length. The token is checked before a body is read and at the WebSocket
handshake; connections that send no request are cut after a deadline, and beyond a cap at once;
oversized headers and text frames get their refusal; health tells a stranger only that the
server is up. Each protection has its control: the same measurement where it does not apply."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from support.live import LiveServer
from privlora.server.accounts import AccountStore
from privlora.server.guard import ConnectionLimits

CHUNK = 1024**2
UPLOAD_CHUNKS = 192  # a 192 MiB upload, under the body limit


@pytest.fixture(scope="module")
def accounts(tmp_path_factory):
    return AccountStore(tmp_path_factory.mktemp("strangers") / "accounts.db", create=True)


@pytest.fixture(scope="module")
def tokens(accounts):
    return {"user": accounts.create("user"), "admin": accounts.create("operator", admin=True)}


@pytest.fixture(scope="module")
def live(tiny_build, accounts, tokens):
    limits = ConnectionLimits(header_seconds=2.0, max_connections=48)
    server = LiveServer(tiny_build.artifact("bfv"), accounts=accounts, connections=limits)
    yield server
    server.stop()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def upload(url: str, headers: dict[str, str]) -> tuple[int, int]:
    """POST a large body as a stream; the status and how many MiB the server pulled before answering."""
    pulled = 0

    def body():
        nonlocal pulled
        for _ in range(UPLOAD_CHUNKS):
            pulled += 1
            yield bytes(CHUNK)

    try:
        status = httpx.post(url, content=body(), headers=headers, timeout=60).status_code
    except httpx.HTTPError:  # the server answered and closed while the upload went on
        status = 0
    return status, pulled


def test_a_strangers_body_is_never_read(live, tokens):
    status, pulled = upload(f"{live.url}/v1/sessions", {})
    assert status in (401, 0) and pulled < UPLOAD_CHUNKS // 4, (status, pulled)
    status, pulled = upload(f"{live.url}/v1/sessions", bearer("plk_not-a-token"))
    assert status in (401, 0) and pulled < UPLOAD_CHUNKS // 4, (status, pulled)
    # Control: an account's body is read to its end (and refused as keys only then).
    status, pulled = upload(f"{live.url}/v1/sessions", bearer(tokens["user"]))
    assert status == 400 and pulled == UPLOAD_CHUNKS


def test_a_round_body_is_not_read_for_an_unknown_session(live, tokens):
    url = f"{live.url}/v1/sessions/{'0' * 12}.nosuchsession/rounds/round_0/0/0"
    status, pulled = upload(url, bearer(tokens["user"]))
    assert status in (404, 0) and pulled < UPLOAD_CHUNKS // 4, (status, pulled)


def test_the_stream_handshake_checks_the_token(live, tokens):
    ws = live.url.replace("http", "ws") + "/v1/sessions/whatever/stream"
    with pytest.raises(InvalidStatus) as refused:
        connect(ws, open_timeout=10)
    assert refused.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as refused:  # a valid token, an unknown session: 404 at the handshake
        connect(ws, additional_headers=bearer(tokens["user"]), open_timeout=10)
    assert refused.value.response.status_code == 404


def test_a_text_frame_closes_the_stream_with_a_code(live, tokens, tiny_build):
    from privlora.client.secure import SecureClient
    from privlora.client.transports import Credentials, HttpTransport

    client = SecureClient(tiny_build.artifact("bfv"), HttpTransport(live.url, Credentials(tokens["user"])),
                          cache_keys=False)
    ws = live.url.replace("http", "ws") + f"/v1/sessions/{client.session}/stream"
    with connect(ws, additional_headers=bearer(tokens["user"]), open_timeout=10) as stream:  # control: accepted
        stream.send("a text frame")
        with pytest.raises(ConnectionClosed) as closed:
            stream.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003
    client.close()


def test_oversized_headers_are_refused(live):
    assert httpx.get(f"{live.url}/v1/health", headers={"x-padding": "a" * 1000}).status_code == 200  # control
    response = httpx.get(f"{live.url}/v1/health", headers={"x-padding": "a" * 100_000})
    assert response.status_code == 431 and response.json()["code"] == "headers_too_large"


def test_health_tells_a_stranger_only_that_the_server_is_up(live, tokens):
    stranger = httpx.get(f"{live.url}/v1/health").json()
    assert stranger == {"status": "ok", "accounts": True}
    user = httpx.get(f"{live.url}/v1/health", headers=bearer(tokens["user"])).json()
    assert user["artifacts"] and "sessions" not in user and "peak_rss_bytes" not in user
    admin = httpx.get(f"{live.url}/v1/health", headers=bearer(tokens["admin"])).json()  # control
    assert {"sessions", "peak_rss_bytes", "session_key_bytes"} <= admin.keys()


def _idle_sockets(port: int, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sockets.append(sock)
    return sockets


def _closed(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_idle_connections_are_cut_after_the_header_deadline(live):
    idle = _idle_sockets(live.port, 10)
    slow = socket.create_connection(("127.0.0.1", live.port), timeout=10)
    slow.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # a request whose headers never end
    kept = socket.create_connection(("127.0.0.1", live.port), timeout=10)  # control: a kept-alive client
    kept.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert kept.recv(65536).startswith(b"HTTP/1.1 200")
    time.sleep(4.0)  # the deadline is 2 s
    assert all(_closed(sock, 2.0) for sock in [*idle, slow])
    assert not _closed(kept, 0.5)  # kept alive after its answer: uvicorn's keep-alive governs it
    for sock in [*idle, slow, kept]:
        sock.close()


def test_connections_beyond_the_cap_are_cut_at_once_and_health_answers_soon(live):
    idle = _idle_sockets(live.port, 80)  # the cap is 48
    cut = sum(_closed(sock, 0.5) for sock in idle[48:])
    assert cut >= 30
    time.sleep(3.0)  # the admitted idle ones pass their header deadline
    assert httpx.get(f"{live.url}/v1/health", timeout=10).status_code == 200
    for sock in idle:
        sock.close()
