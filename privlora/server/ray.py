"""``privlora serve --ray``: the same HTTP API served by Ray Serve replicas, each a process of its
own, so that private rounds run on every core of a machine and on every machine of a cluster.

Why Ray: the SEAL bindings hold the GIL, so one server process evaluates one round at a time;
separate processes need shared session state, and Ray gives us the processes, the routing,
replica restarts and the shared state in one engine.

What replicas share, through Ray and not through HTTP:

- sessions: a :class:`SessionDirectory` actor (named, restarted by Ray if it dies) holds every
  session's evaluation keys, owner and bookkeeping, with the same rules as one server (idle
  expiry, bounds, per-account quotas, an account only evicts its own). A replica that gets a
  request for a session it has not seen loads the keys from the directory once and keeps the
  backend session in a local cache, checking with the directory on every request that the
  session is still alive;
- ``bfv``'s one-time masks: kept in the directory between message 0 and message 1 (taken once:
  a replay still finds none), so message 1 may land on another replica than message 0;
- budgets: the accounts database (SQLite, one transaction per charge) that every replica opens,
  exact across processes on one machine.

Rate limits stay per replica (K replicas allow K times the rate), and so do the per-session
budgets of a server without accounts; ``/metrics`` shows the replica that answers the scrape.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve

from privlora import backends
from privlora.core import wire
from privlora.core.artifact import read_manifest
from privlora.errors import PrivloraError
from privlora.server.accounts import Account, AccountStore
from privlora.server.hosting import Hosting
from privlora.server.private import PrivateServer
from privlora.server.sessions import Session, SessionLimits, SessionTable

log = logging.getLogger("privlora.server")

NAMESPACE = "privlora"
DIRECTORY = "privlora-session-directory"
APP = "privlora"
LOCAL_CACHE = 256  # backend sessions a replica keeps loaded
OBJECT_STORE_BYTES = 256 * 1024**2  # keys and masks are small; Ray's default is 30% of memory


@dataclass(frozen=True)
class Scaling:
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, by requests in flight
    cpus_per_replica: float = 1.0


def _refusal(result: Any) -> Any:
    """Re-raise a refusal the directory returned (Ray would wrap a raised one in its own type)."""
    if isinstance(result, tuple) and len(result) == 3 and result[0] == "refused":
        raise getattr(wire, result[1])(result[2])
    return result


def _refused(exc: PrivloraError) -> tuple[str, str, str]:
    return ("refused", type(exc).__name__, str(exc))


@ray.remote(num_cpus=0, max_restarts=-1)
class SessionDirectory:
    """Every replica's view of the sessions (keys, owners, bounds) and of bfv's pending masks."""

    def __init__(self, limits: SessionLimits) -> None:
        self.table = SessionTable(limits)
        self.pending: dict[tuple[str, str], Any] = {}

    def open(self, session_id: str, keys: bytes, account: Account | None) -> Any:
        try:
            evicted = self.table.add(session_id, Session(keys, len(keys), account.name if account else None),
                                     account.limits.max_sessions if account else None)
        except PrivloraError as exc:
            return _refused(exc)
        for gone in evicted:
            self._drop_pending(gone)
        return None

    def keys(self, session_id: str, owner: str | None) -> Any:
        """The session's evaluation keys, touching it; a refusal when unknown."""
        try:
            return self.table.get(session_id, owner).keys
        except PrivloraError as exc:
            return _refused(exc)

    def touch(self, session_id: str, owner: str | None) -> Any:
        try:
            self.table.get(session_id, owner)
        except PrivloraError as exc:
            return _refused(exc)
        return None

    def close(self, session_id: str, owner: str | None) -> Any:
        try:
            self.table.remove(session_id, owner)
        except PrivloraError as exc:
            return _refused(exc)
        self._drop_pending(session_id)
        return None

    def keep(self, session_id: str, key: str, value: Any) -> None:
        self.pending[(session_id, key)] = value

    def take(self, session_id: str, key: str) -> Any:
        return self.pending.pop((session_id, key), None)

    def has(self, session_id: str, key: str) -> bool:
        return (session_id, key) in self.pending

    def counts(self) -> tuple[int, int]:
        sessions = self.table.sessions()
        return len(sessions), sum(s.key_bytes for s in sessions)

    def _drop_pending(self, session_id: str) -> None:
        for key in [k for k in self.pending if k[0] == session_id]:
            del self.pending[key]


class SharedPending:
    """A session's pending masks (the backend contract's PendingStore), in the directory: message 1 may reach another
    replica than its message 0, and a mask is still taken once only."""

    def __init__(self, directory: Any, session_id: str) -> None:
        self.directory, self.session_id = directory, session_id

    def __setitem__(self, key: str, value: Any) -> None:
        ray.get(self.directory.keep.remote(self.session_id, key, value))

    def __contains__(self, key: object) -> bool:
        return ray.get(self.directory.has.remote(self.session_id, key))

    def pop(self, key: str, default: Any = None) -> Any:
        value = ray.get(self.directory.take.remote(self.session_id, key))
        return default if value is None else value


class ReplicaServer(PrivateServer):
    """One artifact in one replica: the sessions live in the directory; this process keeps the
    backend sessions it has loaded (least recently used out)."""

    def __init__(self, artifact: str | Path, limits: SessionLimits, accounts: AccountStore | None,
                 directory: Any, name: str) -> None:
        super().__init__(artifact, limits, accounts, name=name)
        self.directory = directory
        self._loaded: OrderedDict[str, Session] = OrderedDict()
        self._loaded_lock = threading.Lock()

    def _load(self, session_id: str, keys: bytes, account: Account | None) -> Session:
        backend_session = self.backend.open_session(keys, SharedPending(self.directory, session_id),
                                                    **self._fingerprint(account))
        session = Session(backend_session, len(keys), account.name if account else None, self._bucket(account))
        with self._loaded_lock:
            self._loaded[session_id] = session
            while len(self._loaded) > LOCAL_CACHE:
                self._loaded.popitem(last=False)
        return session

    def open_session(self, evaluation_keys: bytes, account: Account | None = None) -> str:
        self.backend.open_session(evaluation_keys)  # PayloadError on bad keys, before the directory hears of them
        session_id = self.new_session_id()
        _refusal(ray.get(self.directory.open.remote(session_id, evaluation_keys, account)))
        self._load(session_id, evaluation_keys, account)
        log.info("session opened", extra={"event": "open", "model": self.name,
                                          "account": account.name if account else None})
        return session_id

    def close_session(self, session_id: str, account: Account | None = None) -> None:
        with self._loaded_lock:
            self._loaded.pop(session_id, None)
        _refusal(ray.get(self.directory.close.remote(session_id, account.name if account else None)))

    def _session(self, session_id: str, account: Account | None) -> Session:
        owner = account.name if account else None
        with self._loaded_lock:
            session = self._loaded.get(session_id)
        if session is not None:
            try:
                _refusal(ray.get(self.directory.touch.remote(session_id, owner)))
            except wire.SessionError:
                with self._loaded_lock:
                    self._loaded.pop(session_id, None)
                raise
            return session
        keys = _refusal(ray.get(self.directory.keys.remote(session_id, owner)))
        return self._load(session_id, keys, account)

    def describe(self) -> dict[str, Any]:
        sessions, key_bytes = ray.get(self.directory.counts.remote())
        return {**super().describe(), "sessions": sessions, "session_key_bytes": key_bytes,
                "replica": f"{socket.gethostname()}:{os.getpid()}"}


def deployment(hosted: dict[str, str], limits: SessionLimits, accounts: str | None, scaling: Scaling):
    """The Ray Serve application: one ingress deployment whose replicas each host every artifact
    of ``hosted``, under the name it is served by (kept: the resolved path may have another)."""
    from privlora.server.http import create_app

    hosted = {name: str(Path(a).resolve()) for name, a in hosted.items()}
    accounts = str(Path(accounts).resolve()) if accounts else None

    def build_app():
        store = AccountStore(accounts) if accounts else None
        directory = ray.get_actor(DIRECTORY, namespace=NAMESPACE)
        return create_app(Hosting([ReplicaServer(a, limits, store, directory, name) for name, a in hosted.items()]))

    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": scaling.cpus_per_replica},
                               "max_ongoing_requests": 64}
    if scaling.autoscale:
        low, high = scaling.autoscale
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": 2}
    else:
        options["num_replicas"] = scaling.replicas

    @serve.deployment(name="privlora", **options)
    @serve.ingress(build_app)
    class PrivloraReplica:
        pass

    return PrivloraReplica.bind()


def check_replicable(artifact: str) -> None:
    """Refuse, before any replica starts, a backend whose session state would not follow a
    session from one replica to another."""
    name = read_manifest(Path(artifact))["backend"]["name"]
    if not backends.load(name).Server.replicable:
        raise PrivloraError(f"the {name} backend keeps each session's state in the process that opened it: serve "
                            f"{artifact} without --ray, or compile it with another backend")


def serve_with_ray(hosted: dict[str, str], host: str, port: int, limits: SessionLimits, accounts: str | None,
                   scaling: Scaling, address: str | None, tls: Any = None) -> None:
    """Start (or join) a Ray cluster, deploy each artifact of ``hosted`` under its name, and serve
    until SIGTERM or Ctrl-C. Ray Serve's proxy binds ``host:port`` itself, in its own actor."""
    for artifact in hosted.values():  # again here, for callers other than the CLI
        check_replicable(artifact)
    if address is None:  # a cluster of this machine's own, never one that happens to be running
        ray.init(address="local", namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, object_store_memory=OBJECT_STORE_BYTES)
    else:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    # Kept referenced for the life of this process: Ray collects an actor nobody holds.
    directory = SessionDirectory.options(name=DIRECTORY, namespace=NAMESPACE, get_if_exists=True).remote(limits)
    ray.get(directory.counts.remote())  # up before any replica looks for it
    http = {"host": host, "port": port, "keep_alive_timeout_s": 120}
    if tls is not None:
        http.update(ssl_certfile=str(tls.cert), ssl_keyfile=str(tls.key))
    serve.start(http_options=http)
    serve.run(deployment(hosted, limits, accounts, scaling), name=APP, route_prefix="/")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("serving with Ray", extra={"event": "ray"})
    stop.wait()
    serve.shutdown()
    del directory
    ray.shutdown()
