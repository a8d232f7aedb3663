"""A real uvicorn server on a free loopback port, in a background thread, and the plaintext
model's tokens that secure generation through it must reproduce (for end-to-end tests)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import uvicorn

from privlora.server.fairness import FairLimits
from privlora.server.guard import ConnectionLimits
from privlora.server.hosting import Hosting
from privlora.tools.loadtest import free_port
from privlora.models.loading import load_model
from privlora.models.step import TorchStep
from privlora.client.generation import GenerationConfig, generate
from privlora.server.accounts import AccountStore
from privlora.server.http import BodyLimits, create_app, server_config
from privlora.server.private import PrivateServer
from privlora.server.sessions import SessionLimits


class LiveServer:
    """uvicorn serving a PrivateServer in a background thread on a loopback port."""

    def __init__(self, artifact, limits=BodyLimits(), session_limits=SessionLimits(),
                 accounts: AccountStore | None = None, connections: ConnectionLimits = ConnectionLimits(),
                 fair: FairLimits = FairLimits()) -> None:
        self.port = free_port()
        self.private = PrivateServer(artifact, session_limits, accounts)
        self.hosting = Hosting([self.private], fair)
        app = create_app(self.hosting, limits, connections)
        self.server = uvicorn.Server(server_config(app, "127.0.0.1", self.port, limits, connections))
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


def plaintext_tokens(base: Path, adapter: Path, prompts: list[list[int]], config: GenerationConfig) -> list[list[int]]:
    """The plaintext fine-tuned model's tokens for each prompt: what a secure run must produce.
    The base model's tokens must differ on every prompt, so that equality shows the adapter's
    deltas came back right (a dropped, damaged or sign-flipped delta changes the tokens)."""
    tuned, plain = TorchStep(load_model(base, adapter).model), TorchStep(load_model(base).model)
    expected = [list(generate(tuned, prompt, config)) for prompt in prompts]
    for prompt, tokens in zip(prompts, expected):
        assert list(generate(plain, prompt, config)) != tokens, f"the adapter does not change the tokens of {prompt}"
    return expected
