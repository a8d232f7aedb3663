"""The hosted artifacts in a process of their own, the evaluation process, beside the process
that holds the connections (``privlora serve`` runs both).

Why: SEAL's bindings hold the GIL for as long as they compute. In one process, the event loop
that reads every caller's requests and writes every reply waits for it behind each evaluation,
so one account's uploads and evaluations slowed every other account's rounds many times over
(docs/security.md, "A noisy neighbour"). Split in two, the front process authenticates, counts
requests in progress and reads bodies on its own interpreter, and hands each checked message to
the evaluation process, which owns every session's keys and state and gives out evaluation
turns fairly (``server/fairness.py``).

The front calls the evaluation process's :class:`Hosting` over a pool of pipes, one call at a
time on each, so that a small message never waits behind another caller's large upload; the
evaluation process answers each pipe in a thread of its own. The evaluation process ignores
SIGINT and SIGTERM, so that a shutdown lets the front answer its work in flight, and it exits
when the front's end of the pipe closes (after a graceful stop, a crash or a ``kill -9``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue
import resource
import signal
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from privlora.core.wire import CapacityError
from privlora.errors import PrivloraError
from privlora.server.accounts import Account, AccountStore
from privlora.server.fairness import FairLimits
from privlora.server.hosting import Hosting, HostingBase
from privlora.server.logs import configure_logging
from privlora.server.memory import release_large_buffers
from privlora.server.private import PrivateServer
from privlora.server.sessions import SessionLimits

log = logging.getLogger("privlora.server")

# The Hosting methods the front may call: the ones that touch sessions or artifacts.
CALLS = frozenset({"open_session", "close_session", "check_session", "check_round", "evaluate", "info"})
SWITCH_INTERVAL_SECONDS = 0.001  # Python's default is 0.005
CHANNELS = 40  # calls in progress at once: as many as the front's worker threads (anyio's default, 40)


@dataclass(frozen=True)
class Hosted:
    """What the evaluation process loads: artifacts by the names they are served under."""
    artifacts: dict[str, str]
    limits: SessionLimits
    accounts: str | None  # the accounts database's path
    log_level: str


@dataclass(frozen=True)
class Ready:
    """The evaluation process's first message: what the front serves without asking it again."""
    adapter_keys: list[str]
    models: list[dict[str, Any]]


class EvaluationProcessError(CapacityError):
    """The evaluation process is gone: the server answers 503 while it stops (a supervisor
    restarts it; clients re-open their sessions)."""


class HostingProcess(HostingBase):
    """A :class:`Hosting` in a child process, called from any of the front's threads."""

    def __init__(self, hosted: Hosted, accounts: AccountStore | None, fair: FairLimits = FairLimits()) -> None:
        """``accounts``: the front's own connection to the accounts database (the same file as
        ``hosted.accounts``), which authenticates callers without a call to the evaluation process."""
        spawn = multiprocessing.get_context("spawn")
        pairs = [spawn.Pipe() for _ in range(CHANNELS)]
        self._process = spawn.Process(target=_evaluation_process, args=([child for _, child in pairs], hosted),
                                      name="privlora-evaluation", daemon=True)
        self._process.start()
        for _, child in pairs:
            child.close()
        self._free: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        for front, _ in pairs:
            self._free.put(front)
        self._closing = False
        ready = self._call("ready")
        super().__init__(accounts, ready.adapter_keys, ready.models, fair)
        threading.Thread(target=self._watch, name="privlora-evaluation-watch", daemon=True).start()

    def _watch(self) -> None:
        """Stop the server (gracefully: SIGTERM to itself) if the evaluation process dies under
        it: every session was in it, and a supervisor's restart serves again."""
        self._process.join()
        if not self._closing:
            code = self._process.exitcode or 0
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            log.error(f"the evaluation process ended ({how}): stopping the server",
                      extra={"event": "shutdown", "kind": "evaluation process"})
            os.kill(os.getpid(), signal.SIGTERM)

    def _call(self, method: str, *args: Any) -> Any:
        """One call on a free channel: its answer, or its exception raised here."""
        channel = self._free.get()
        try:
            channel.send((method, args))
            ok, value = channel.recv()
        except (EOFError, OSError):
            raise EvaluationProcessError("the server's evaluation process exited") from None
        finally:
            self._free.put(channel)
        if not ok:
            raise value
        return value

    def open_session(self, account: Account | None, artifact: str | None, evaluation_keys: bytes) -> str:
        return self._call("open_session", account, artifact, evaluation_keys)

    def close_session(self, account: Account | None, session_id: str) -> None:
        self._call("close_session", account, session_id)

    def check_session(self, account: Account | None, session_id: str) -> None:
        self._call("check_session", account, session_id)

    def check_round(self, account: Account | None, session_id: str, round_name: str, index: int, message: int) -> None:
        self._call("check_round", account, session_id, round_name, index, message)

    def evaluate(self, account: Account | None, session_id: str, round_name: str, index: int, message: int,
                 payload: bytes) -> bytes:
        return self._call("evaluate", account, session_id, round_name, index, message, payload)

    def info(self) -> dict[str, Any]:
        """The evaluation process's figures, with the front's requests in progress, and both
        processes' peak memory added up."""
        info = self._call("info")
        own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {**info, "requests_in_progress": self.fair.in_progress(),
                "peak_rss_bytes": info["peak_rss_bytes"] + own_peak}

    def close(self) -> None:
        """Close the channels (the evaluation process exits once all are closed) and wait for it;
        a call still in progress after the shutdown's grace period ends with the process."""
        self._closing = True
        while True:
            try:
                self._free.get_nowait().close()
            except queue.Empty:
                break
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


def _evaluation_process(channels: list[Connection], hosted: Hosted) -> None:
    """The evaluation process's main: load the artifacts, then answer each channel's calls in a
    thread of its own until the front closes them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(hosted.log_level)
    release_large_buffers()
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)  # a channel's reader gets the GIL back sooner between SEAL calls
    try:
        store = AccountStore(hosted.accounts) if hosted.accounts is not None else None
        hosting = Hosting([PrivateServer(artifact, hosted.limits, store, name=name)
                           for name, artifact in hosted.artifacts.items()])
    except Exception as exc:
        _answer_failure(channels[0], exc)
        return
    threads = [threading.Thread(target=_answer_calls, args=(hosting, channel), name="privlora-channel", daemon=True)
               for channel in channels]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    os._exit(0)  # the front is gone; a SEAL or ONNX Runtime thread pool must not hold the exit up


def _answer_failure(channel: Connection, exc: Exception) -> None:
    try:
        channel.recv()
        channel.send((False, _sendable(exc)))
    except (EOFError, OSError):
        pass


def _answer_calls(hosting: Hosting, channel: Connection) -> None:
    """Answer one channel's calls, one at a time, until the front closes it. Nothing of a call
    outlives its answer: a thread that kept its last request (or an exception whose traceback
    holds it) would keep one body per channel resident."""
    while True:
        try:
            channel.send(_answer(hosting, *channel.recv()))
        except (EOFError, OSError):
            return


def _answer(hosting: Hosting, method: str, args: tuple) -> tuple[bool, Any]:
    try:
        if method == "ready":
            return True, Ready(hosting.adapter_keys, hosting.models()["data"])
        if method in CALLS:
            return True, getattr(hosting, method)(*args)
        raise EvaluationProcessError(f"no call {method!r} in the evaluation process")
    except Exception as exc:
        return False, _sendable(exc)


def _sendable(exc: Exception) -> Exception:
    """``exc`` if it crosses the pipe intact (without its traceback, which holds the request),
    else a PrivloraError with its words."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc.with_traceback(None)
    except Exception:
        return PrivloraError(f"{type(exc).__name__}: {exc}")
