"""A real uvicorn server on a free loopback port, in a background thread (for end-to-end tests)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from privlora.runtime.http import KEEP_ALIVE_SECONDS, BodyLimits, create_app
from privlora.runtime.server import PrivateServer, SessionLimits


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving a PrivateServer in a background thread on a loopback port."""

    def __init__(self, artifact, limits=BodyLimits(), session_limits=SessionLimits()) -> None:
        self.port = _free_port()
        config = uvicorn.Config(create_app(PrivateServer(artifact, session_limits), limits), host="127.0.0.1", port=self.port,
                                log_level="warning", access_log=False, timeout_keep_alive=KEEP_ALIVE_SECONDS)
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


