"""A server that strangers cannot use, over TLS, with metrics, and clients that lose nothing when
the server is killed, restarted or evicts their session: real uvicorn servers on loopback (in a
thread, or ``privlora serve`` in its own process where a test kills it), real encryption."""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from privlora.tools.loadtest import ServerProcess
from privlora.core.artifact import adapter_key
from privlora.server.accounts import AccountLimits, AccountStore
from privlora.client.secure import SecureClient
from privlora.client.generation import GenerationConfig, generate
from privlora.server.sessions import SessionLimits
from privlora.client.transports import Credentials, HttpTransport, StreamTransport, TransportError, http_transport
from support.live import LiveServer, plaintext_tokens

PROMPT = [3, 14, 15, 92, 65]
CONFIG = GenerationConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def build(tiny_build):
    return tiny_build


@pytest.fixture(scope="module")
def expected(build) -> list[int]:
    return plaintext_tokens(build.base, build.adapter, [PROMPT], CONFIG)[0]


@pytest.fixture
def accounts(tmp_path) -> AccountStore:
    return AccountStore(tmp_path / "accounts.db", create=True)


def api(url: str) -> str:
    return url + "/v1"


def refusal(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["code"]


def test_every_account_refusal_over_http_and_the_stream(build, accounts, expected):
    alice = accounts.create("alice")
    bob = accounts.create("bob")
    revoked = accounts.create("gone")
    accounts.revoke("gone")
    tight = accounts.create("tight", AccountLimits(max_rows=3))
    slow = accounts.create("slow", AccountLimits(rate=0.001, burst=1))
    ops = accounts.create("ops", admin=True)
    live = LiveServer(build.artifact("bfv"), session_limits=SessionLimits(max_sessions=3), accounts=accounts)
    url = api(live.url)

    def bearer(token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}

    try:
        assert httpx.get(f"{url}/health").status_code == 200  # health needs no token
        anonymous = httpx.post(f"{url}/sessions", content=b"")
        assert refusal(anonymous) == (401, "unauthenticated") and anonymous.headers["www-authenticate"] == "Bearer"
        assert refusal(httpx.post(f"{url}/sessions", content=b"", headers=bearer(alice + "x"))) == (401, "unauthenticated")
        assert refusal(httpx.post(f"{url}/sessions", content=b"", headers=bearer(revoked))) == (403, "forbidden")
        with pytest.raises(TransportError, match="401.*--token or \\$PRIVLORA_TOKEN"):  # why, and the fix, in one line
            SecureClient(build.artifact("bfv"), HttpTransport(live.url), cache_keys=False).close()

        client = SecureClient(build.artifact("bfv"), StreamTransport(live.url, Credentials(alice)), cache_keys=False)
        assert list(generate(client, PROMPT, CONFIG)) == expected
        session_path = f"{url}/sessions/{client.session}"
        # bob cannot use, close or stream into alice's session: to him it does not exist
        assert refusal(httpx.post(f"{session_path}/rounds/round_0/0/0", content=b"x", headers=bearer(bob))) == \
            (404, "unknown_session")
        assert refusal(httpx.delete(session_path, headers=bearer(bob))) == (404, "unknown_session")
        with pytest.raises(TransportError) as stranger:
            StreamTransport(live.url, Credentials(bob)).evaluate(client.session, "round_0", 0, 0, b"x")
        assert (stranger.value.status, stranger.value.code) == (404, "unknown_session")
        with pytest.raises(TransportError) as anonymous_frame:
            StreamTransport(live.url).evaluate(client.session, "round_0", 0, 0, b"x")
        assert (anonymous_frame.value.status, anonymous_frame.value.code) == (401, "unauthenticated")

        with pytest.raises(TransportError) as budget:  # a 5-token prompt is over a 3-row budget
            list(generate(SecureClient(build.artifact("bfv"), HttpTransport(live.url, Credentials(tight)),
                                       cache_keys=False), PROMPT, CONFIG))
        assert (budget.value.status, budget.value.code) == (403, "budget_exhausted")
        with pytest.raises(TransportError) as rate:  # a burst of one request, then 0.001 per second
            list(generate(SecureClient(build.artifact("bfv"), HttpTransport(live.url, Credentials(slow)),
                                       cache_keys=False), PROMPT, CONFIG))
        assert (rate.value.status, rate.value.code) == (429, "rate_limited")
        # The server holds its 3 sessions: alice's, tight's and slow's. bob has none of his own to evict.
        full = httpx.post(f"{url}/sessions", content=client.evaluation_keys, headers=bearer(bob))
        assert refusal(full) == (503, "at_capacity") and full.headers["retry-after"]
        assert list(generate(client, PROMPT, CONFIG)) == expected  # alice's session is untouched

        assert refusal(httpx.get(f"{live.url}/metrics", headers=bearer(alice))) == (403, "forbidden")
        assert refusal(httpx.get(f"{live.url}/metrics")) == (401, "unauthenticated")
        metrics = httpx.get(f"{live.url}/metrics", headers=bearer(ops))
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        for kind, count in (("unauthenticated", 5), ("forbidden", 2), ("unknown_session", 3),
                            ("budget_exhausted", 1), ("rate_limited", 1), ("at_capacity", 1)):
            assert f'privlora_refusals_total{{kind="{kind}"}} {count}.0' in text, "\n".join(l for l in text.splitlines() if "refusals_total" in l)
        rows = 2 * (len(PROMPT) + len(expected) - 1)  # two answers
        adapter = adapter_key(build.artifact("bfv"))[:16]
        assert f'privlora_account_rows{{account="alice",adapter="{adapter}"}} {rows}.0' in text
        assert 'privlora_account_budget_rows{account="alice"} 20000.0' in text
        assert "privlora_open_sessions 3.0" in text and "privlora_session_key_bytes" in text
        assert 'privlora_requests_total{method="FRAME",route="/v1/sessions/{session}/stream",status="200"}' in text
        assert 'privlora_request_seconds_bucket{le="0.5",route="/v1/sessions/{session}/rounds/{round_name}/' in text
        assert "process_resident_memory_bytes" in text
        assert client.session not in text and alice not in text  # neither session ids nor tokens
        client.close()
    finally:
        live.stop()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key (so it is its own CA), and the key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privlora test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    cert, key_path = directory / "server.pem", directory / "server.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert, key_path


def test_secure_generation_over_tls(build, accounts, expected, tmp_path):
    cert, key = self_signed(tmp_path)
    token = accounts.create("alice")
    server = ServerProcess(build.artifact("bfv"), "--accounts", str(accounts.path), "--tls-cert", str(cert),
                           "--tls-key", str(key), scheme="https")
    server.start(ready=False)
    try:
        server.wait_ready(credentials=Credentials(ca_cert=str(cert)))
        assert server.url.startswith("https://127.0.0.1:")
        for kind in ("stream", "http"):  # wss:// and https://
            client = SecureClient(build.artifact("bfv"), http_transport(server.url, kind, Credentials(token, str(cert))),
                                  cache_keys=False)
            assert list(generate(client, PROMPT, CONFIG)) == expected
            client.close()
        with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):  # the system's CAs do not know it
            HttpTransport(server.url, Credentials(token)).info()
        with pytest.raises(TransportError):  # plain HTTP to a TLS port
            HttpTransport(server.url.replace("https", "http"), timeout=5).info()
        command = [sys.executable, "-m", "privlora.cli", "generate", str(build.artifact("bfv")), "--server", server.url,
                   "--prompt", "hello", "--max-new-tokens", "2", "--quiet"]
        environment = {**os.environ, "PRIVLORA_TOKEN": token}
        ok = subprocess.run([*command, "--ca-cert", str(cert)], capture_output=True, text=True, env=environment)
        assert ok.returncode == 0, ok.stderr
        untrusted = subprocess.run(command, capture_output=True, text=True, env=environment)
        assert untrusted.returncode == 1 and untrusted.stderr.count("\n") == 1  # a runtime failure, in one line
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr and "was reached" in untrusted.stderr
        assert "--ca-cert" in untrusted.stderr
    finally:
        assert server.stop() == -signal.SIGTERM


class Faulty(StreamTransport):
    """The stream transport, calling ``fault`` once, just before its ``at``-th message."""

    def __init__(self, url: str, credentials: Credentials, at: int, fault) -> None:
        super().__init__(url, credentials)
        self.sent, self.at, self.fault = 0, at, fault

    def evaluate(self, session: str, round_name: str, index: int, message: int, payload: bytes) -> bytes:
        self.sent += 1
        if self.sent == self.at:
            self.fault()
        return super().evaluate(session, round_name, index, message, payload)


def test_a_generation_survives_kill_9_and_restart(build, accounts, expected):
    token = accounts.create("alice")
    artifact = build.artifact("bfv")
    server = ServerProcess(artifact, "--accounts", str(accounts.path)).start()

    def crash_and_restart() -> None:
        server.kill()
        server.start(ready=False)  # comes back on the same port while the client waits

    try:
        # tiny Llama, q+v fused: 3 groups of 2 messages per step; message 10 is in the first decode step
        client = SecureClient(artifact, Faulty(server.url, Credentials(token), 10, crash_and_restart), cache_keys=False)
        first_session = client.session
        assert list(generate(client, PROMPT, CONFIG)) == expected
        assert client.recoveries >= 1 and client.sessions_opened == 2 and client.session != first_session
        client.close()
        # Nothing charged before the crash was forgotten: the answer's rows (prompt + 5 decode steps)
        # at every site, plus the first decode step's row again at the two groups (4 sites) it had
        # reached when the server died.
        rows = sorted(accounts.site_rows("alice", adapter_key(artifact)).values())
        answer = len(PROMPT) + len(expected) - 1
        assert rows == [answer] * 2 + [answer + 1] * 4
    finally:
        assert server.stop() == -signal.SIGTERM


def test_a_generation_survives_its_session_being_evicted(build, accounts, expected):
    token = accounts.create("alice", AccountLimits(max_sessions=1))
    artifact = build.artifact("bfv")
    live = LiveServer(artifact, accounts=accounts)
    keys = {}

    def open_another_session() -> None:  # the same account elsewhere: over its quota of one
        keys["other"] = HttpTransport(live.url, Credentials(token)).open_session(client.evaluation_keys)

    try:
        client = SecureClient(artifact, Faulty(live.url, Credentials(token), 8, open_another_session), cache_keys=False)
        assert list(generate(client, PROMPT, CONFIG)) == expected
        assert client.recoveries == 1 and client.sessions_opened == 2 and live.private.describe()["sessions"] == 1
        client.close()
    finally:
        live.stop()


def test_sigterm_answers_the_request_in_flight_then_exits(build):
    artifact = build.artifact("reference")  # exact replies: the late answer must equal the first
    server = ServerProcess(artifact).start()
    recorded: list[tuple] = []

    class Recording(HttpTransport):
        def evaluate(self, session, round_name, index, message, payload):
            reply = super().evaluate(session, round_name, index, message, payload)
            recorded.append((session, round_name, index, message, payload, reply))
            return reply

    client = SecureClient(artifact, Recording(server.url), cache_keys=False)
    list(generate(client, PROMPT, GenerationConfig(max_new_tokens=1)))
    session, round_name, index, message, payload, reply = recorded[0]
    release = threading.Event()

    def body():  # the request is in flight until its body is complete
        yield payload[:10]
        release.wait(30)
        yield payload[10:]

    answer: dict[str, httpx.Response] = {}
    url = f"{api(server.url)}/sessions/{session}/rounds/{round_name}/{index}/{message}"
    sender = threading.Thread(target=lambda: answer.setdefault("late", httpx.post(url, content=body(), timeout=60)))
    sender.start()
    time.sleep(1.0)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert server.process.poll() is None  # still running: it waits for the request in flight
    refused = httpx.post(f"{api(server.url)}/sessions", content=b"")
    assert refusal(refused) == (503, "at_capacity")  # and takes no new work
    release.set()
    sender.join(30)
    assert answer["late"].status_code == 200 and answer["late"].content == reply
    assert server.process.wait(timeout=30) == -signal.SIGTERM
