"""Accounts: tokens kept only as hashes, per-site budgets that persist and stay exact under
concurrency, session quotas that never let one account evict another's session."""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from privlora.core.artifact import adapter_key
from privlora.server.accounts import AccountError, AccountLimits, AccountStore, token_hash
from privlora.client.secure import SecureClient
from privlora.client.generation import GenerationConfig, generate
from privlora.core.wire import AuthError, BudgetError, CapacityError, ForbiddenError, SessionError
from privlora.server.private import PrivateServer
from privlora.server.sessions import SessionLimits
from privlora.client.transports import TransportError
from privlora.local import InProcessTransport

PROMPT = [3, 14, 15, 92, 65]
CONFIG = GenerationConfig(max_new_tokens=4)


@pytest.fixture
def store(tmp_path: Path) -> AccountStore:
    return AccountStore(tmp_path / "accounts.db", create=True)


def test_tokens_are_shown_once_and_stored_only_as_hashes(store, tmp_path):
    token = store.create("alice")
    assert token.startswith("plk_") and len(token) > 40
    assert store.authenticate(token).name == "alice"
    store.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir())  # the database, its WAL and index
    assert token.encode() not in stored and token_hash(token).encode() in stored


def test_unknown_revoked_and_malformed(store, tmp_path):
    token = store.create("alice")
    with pytest.raises(AuthError):
        store.authenticate(token + "x")
    store.revoke("alice")
    with pytest.raises(ForbiddenError, match="revoked"):
        store.authenticate(token)
    with pytest.raises(AccountError, match="already revoked"):
        store.revoke("alice")
    with pytest.raises(AccountError, match="no account named"):
        store.revoke("bob")
    with pytest.raises(AccountError, match="already exists"):
        store.create("alice")
    with pytest.raises(AccountError, match="bad account name"):
        store.create("a b")
    with pytest.raises(AccountError, match="no accounts database"):
        AccountStore(tmp_path / "missing.db")
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(AccountError, match="not a privlora accounts database"):
        AccountStore(tmp_path / "junk.db")


def test_accounts_list_shows_the_session_quota_as_such(store, capsys):
    """The database holds each account's quota, not its open sessions (only the server knows
    those): the column says "max sessions"."""
    from privlora.cli import main

    store.create("alice", AccountLimits(max_sessions=3))
    assert main(["accounts", "list", "--db", str(store.path)]) == 0
    header, alice = (re.split(r"\s{2,}", line) for line in capsys.readouterr().out.splitlines())
    row = dict(zip(header, alice))
    assert "sessions" not in row and row["max sessions"] == "3" and row["account"] == "alice"


def test_the_budget_is_per_site_all_or_nothing_and_persists(store, tmp_path):
    alice = store.authenticate(store.create("alice", AccountLimits(max_rows=10)))
    store.charge(alice, "art", ["q", "v"], 6)
    store.charge(alice, "art", ["q"], 4)  # q is now full, v has 4 left
    with pytest.raises(BudgetError, match="used 10 of its 10"):
        store.charge(alice, "art", ["q", "v"], 1)
    assert store.site_rows("alice", "art") == {"q": 10, "v": 6}  # the refused charge touched neither site
    store.charge(alice, "other-adapter", ["q"], 10)  # budgets are per adapter
    store.close()
    reopened = AccountStore(tmp_path / "accounts.db")  # a restart
    with pytest.raises(BudgetError):
        reopened.charge(alice, "art", ["q"], 1)
    reopened.charge(alice, "art", ["v"], 4)
    assert reopened.site_rows("alice", "art") == {"q": 10, "v": 10}


class RacyStore(AccountStore):
    """Control: the check and the update in two transactions, as a naive implementation would."""

    def charge(self, account, adapter, sites, rows):
        sites = tuple(sites)
        used = max(self.site_rows(account.name, adapter).get(site, 0) for site in sites)
        if used + rows > account.limits.max_rows:
            raise BudgetError("over")
        time.sleep(0.001)
        with self._transaction() as db:
            db.executemany("INSERT INTO usage VALUES (?, ?, ?, ?) ON CONFLICT (account, adapter, site) "
                           "DO UPDATE SET rows = rows + excluded.rows", [(account.name, adapter, s, rows) for s in sites])


def _spend(stores: list[AccountStore], account, attempts: int) -> int:
    """Charge one row per attempt from 8 threads over two connections; the charges accepted."""
    def one(i: int) -> bool:
        try:
            stores[i % 2].charge(account, "art", ["q", "v"], 1)
            return True
        except BudgetError:
            return False

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(one, range(attempts)))


@pytest.mark.parametrize("kind", [AccountStore, RacyStore])
def test_concurrent_sessions_draw_from_one_exact_budget(tmp_path, kind):
    path = tmp_path / "accounts.db"
    alice = AccountStore(path, create=True)
    account = alice.authenticate(alice.create("alice", AccountLimits(max_rows=150)))
    stores = [kind(path), kind(path)]  # two connections: as two server processes would
    accepted = _spend(stores, account, 400)
    used = alice.site_rows("alice", "art")
    if kind is AccountStore:
        assert accepted == 150 and used == {"q": 150, "v": 150}
    else:  # the control shows the test can see a race
        assert used["q"] > 150


@pytest.fixture(scope="module")
def artifact(tiny_build):
    return tiny_build.artifact("plain")


def test_one_account_cannot_evict_anothers_session(artifact, store):
    alice = store.authenticate(store.create("alice", AccountLimits(max_sessions=2)))
    bob = store.authenticate(store.create("bob"))
    mallory = store.authenticate(store.create("mallory", AccountLimits(max_sessions=10)))
    carol = store.authenticate(store.create("carol"))
    server = PrivateServer(artifact, SessionLimits(max_sessions=4), store)
    keys = b""
    a1, a2 = server.open_session(keys, alice), server.open_session(keys, alice)
    a3 = server.open_session(keys, alice)  # over alice's quota: her own oldest goes
    with pytest.raises(SessionError):
        server.close_session(a1, alice)
    b1 = server.open_session(keys, bob)
    server.open_session(keys, mallory)  # the server is now full
    for _ in range(5):  # mallory keeps opening: each new one evicts her own previous one only
        server.open_session(keys, mallory)
    with pytest.raises(CapacityError):  # carol has nothing of her own to evict
        server.open_session(keys, carol)
    assert server.describe()["sessions"] == 4
    for session, owner in ((a2, alice), (a3, alice), (b1, bob)):
        server._session(session, owner)  # still there, for their owners
    with pytest.raises(SessionError):  # and nobody else can use them
        server._session(a2, mallory)
    without_accounts = PrivateServer(artifact, SessionLimits(max_sessions=2))
    first = without_accounts.open_session(keys)
    without_accounts.open_session(keys), without_accounts.open_session(keys)  # today's behaviour: LRU of all
    with pytest.raises(SessionError):
        without_accounts.close_session(first)


def test_the_budget_holds_across_sessions_and_restarts_in_real_generation(artifact, store):
    token = store.create("alice", AccountLimits(max_rows=len(PROMPT) + 4))  # one answer of 4 tokens: 5 + 3 rows
    client = SecureClient(artifact, InProcessTransport(PrivateServer(artifact, SessionLimits(), store), token),
                          cache_keys=False)
    first = list(generate(client, PROMPT, CONFIG))
    rows = store.site_rows("alice", adapter_key(artifact))
    assert set(rows.values()) == {len(PROMPT) + len(first) - 1} and len(rows) == 3 * 2  # q and v of 3 layers
    restarted = PrivateServer(artifact, SessionLimits(), store)  # a new server process, a new session
    again = SecureClient(artifact, InProcessTransport(restarted, token), cache_keys=False)
    with pytest.raises(TransportError, match="budget exhausted") as refused:
        list(generate(again, PROMPT, CONFIG))
    assert refused.value.status == 403 and not refused.value.recoverable


def test_an_in_flight_charge_survives_a_connection_from_another_process(store, tmp_path):
    """WAL mode: a reader (a second process's connection) never blocks a charge."""
    alice = store.authenticate(store.create("alice"))
    reader = sqlite3.connect(tmp_path / "accounts.db")
    reader.execute("BEGIN")
    reader.execute("SELECT * FROM usage").fetchall()
    done = threading.Event()
    threading.Thread(target=lambda: (store.charge(alice, "art", ["q"], 1), done.set()), daemon=True).start()
    assert done.wait(5)
    reader.rollback()
    assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_schema_1_database_keeps_its_use_under_the_adapter_key(tmp_path):
    """Schema 1 counted use per artifact id: opened by this version, its use moves to the adapter's
    key as soon as a server hosting that artifact adopts it, added to what the adapter had."""
    path = tmp_path / "old.db"
    store = AccountStore(path, create=True)
    alice = store.authenticate(store.create("alice", AccountLimits(max_rows=10)))
    store.close()
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE usage RENAME COLUMN adapter TO artifact; PRAGMA user_version = 1;")
    db.execute("INSERT INTO usage VALUES ('alice', 'artifact-id', 'q', 7)")
    db.commit()
    db.close()
    reopened = AccountStore(path)
    reopened.charge(alice, "adapter-key", ["q"], 2)
    reopened.adopt("artifact-id", "adapter-key")
    assert reopened.site_rows("alice", "adapter-key") == {"q": 9} and reopened.site_rows("alice", "artifact-id") == {}
    with pytest.raises(BudgetError, match="used 9 of its 10"):
        reopened.charge(alice, "adapter-key", ["q"], 2)
