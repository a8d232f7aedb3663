"""A real uvicorn server on a free loopback port, in a background thread, and the plaintext
model's tokens that secure generation through it must reproduce (for end-to-end tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from privlora.models.loading import load_model
from privlora.models.step import TorchStep
from privlora.runtime.generation import GenerationConfig, generate
from privlora.runtime.accounts import AccountStore
from privlora.runtime.http import KEEP_ALIVE_SECONDS, BodyLimits, create_app
from privlora.runtime.server import PrivateServer, SessionLimits
from privlora.runtime.transport import HttpTransport, TransportError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving a PrivateServer in a background thread on a loopback port."""

    def __init__(self, artifact, limits=BodyLimits(), session_limits=SessionLimits(),
                 accounts: AccountStore | None = None) -> None:
        self.port = free_port()
        self.private = PrivateServer(artifact, session_limits, accounts)
        config = uvicorn.Config(create_app(self.private, limits), host="127.0.0.1", port=self.port,
                                log_level="warning", access_log=False, timeout_keep_alive=KEEP_ALIVE_SECONDS,
                                ws_max_size=limits.round, ws_ping_interval=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class ServerProcess:
    """``privlora serve`` in its own process (so that a test can kill it), on a fixed port so
    that a restart comes back at the same address."""

    def __init__(self, artifact: Path, *options: str, port: int | None = None, scheme: str = "http") -> None:
        self.command = [sys.executable, "-m", "privlora.cli", "serve", str(artifact), "--log-level", "warning",
                        *options]
        self.port = port or free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, ready: bool = True) -> "ServerProcess":
        self.log = tempfile.TemporaryFile("w+")  # a pipe nobody reads could fill and block the server
        self.process = subprocess.Popen([*self.command, "--port", str(self.port)], stderr=self.log,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0, **transport) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None and self.process.poll() is None, f"the server exited: {self.output()}"
            try:
                HttpTransport(self.url, timeout=5, **transport).info()
                return
            except TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def kill(self) -> None:
        """``kill -9``: no shutdown, nothing flushed."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        """SIGTERM, then the exit status: uvicorn re-raises the signal once it has shut down
        gracefully, so a clean stop is -SIGTERM."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=90)


def plaintext_tokens(base: Path, adapter: Path, prompts: list[list[int]], config: GenerationConfig) -> list[list[int]]:
    """The plaintext fine-tuned model's tokens for each prompt: what a secure run must produce.
    The base model's tokens must differ on every prompt, so that equality shows the adapter's
    deltas came back right (a dropped, damaged or sign-flipped delta changes the tokens)."""
    tuned, plain = TorchStep(load_model(base, adapter).model), TorchStep(load_model(base).model)
    expected = [list(generate(tuned, prompt, config)) for prompt in prompts]
    for prompt, tokens in zip(prompts, expected):
        assert list(generate(plain, prompt, config)) != tokens, f"the adapter does not change the tokens of {prompt}"
    return expected
