"""`privlora gateway` as a real process on loopback, in front of a `privlora serve`, and the
lines it logs per request (for the gateway and chat page tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from privlora.tools.loadtest import free_port


class GatewayProcess:
    """``privlora gateway ARTIFACT... --server URL`` on a free port; its stderr (the banner and
    one line per request) goes to a file, as a pipe nobody reads could fill and block it."""

    def __init__(self, artifacts: Sequence[Path], server: str, token: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "privlora.cli", "gateway", *map(str, artifacts), "--server", server,
                        "--port", str(self.port)]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"PRIVLORA_TOKEN": token} if token else {})}
        self.log = tempfile.TemporaryFile("w+")
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        self.process = subprocess.Popen(self.command, env=self.env, stderr=self.log)
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, self.output()
            try:
                httpx.get(f"{self.url}/health").raise_for_status()
                return self
            except httpx.HTTPError:
                assert time.monotonic() < deadline, f"the gateway did not come up: {self.output()}"
                time.sleep(0.2)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def answers(self) -> list[dict[str, str]]:
        """The fields of every answer's log line (``key=value`` after the prefix), oldest first."""
        lines = [line.split("privlora gateway: ", 1)[1] for line in self.output().splitlines()
                 if "privlora gateway: model=" in line]
        return [dict(field.split("=", 1) for field in line.split()) for line in lines]

    def wait_for_answers(self, count: int, timeout: float = 60.0) -> list[dict[str, str]]:
        """The answers logged once there are at least ``count`` (an answer is logged when it ends)."""
        deadline = time.monotonic() + timeout
        while len(answers := self.answers()) < count:
            assert time.monotonic() < deadline, f"{len(answers)} answers logged, not {count}: {self.output()}"
            time.sleep(0.05)
        return answers

    def stop(self) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(30)
