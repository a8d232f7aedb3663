"""API accounts and their persistent query budgets, in one SQLite file.

Why SQLite: the budget is the adapter owner's defence against extraction, so it must survive a
restart (``kill -9`` included) and be exact when several sessions, threads or server processes
of one account draw from it at once. Each charge is one ``BEGIN IMMEDIATE`` transaction in WAL
mode: concurrent writers queue on SQLite's lock, readers never block, and a committed charge is
in the WAL before the request is answered.

Tokens are random 256-bit strings shown once at creation; the database keeps only their SHA-256
(a fast hash is enough for keys of this entropy: there is nothing to brute-force).

The budget counts rows of x per LoRA site and per adapter, across all the account's sessions:
extracting one site's map needs about ``d_in`` chosen rows (docs/security.md), and a new session
no longer resets the count. The adapter is named by its weights' digest, not by an artifact's
id: two builds of one adapter (two backends, a recompile) draw on one budget.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from privlora.errors import PrivloraError
from privlora.core.wire import AuthError, BudgetError, ForbiddenError
from privlora.server.fingerprints import DEFAULT_STRENGTH, FINGERPRINT_SECRET_BYTES, FingerprintKey

SCHEMA_VERSION = 3  # 2: usage is keyed by the adapter's weights, not by the artifact; 3: the fingerprint key
TOKEN_PREFIX = "plk_"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS accounts (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    revoked REAL,
    max_rows INTEGER,
    max_sessions INTEGER NOT NULL,
    rate REAL,
    burst INTEGER NOT NULL,
    admin INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    account TEXT NOT NULL REFERENCES accounts(name),
    adapter TEXT NOT NULL,
    site TEXT NOT NULL,
    rows INTEGER NOT NULL,
    PRIMARY KEY (account, adapter, site)
);
PRAGMA user_version = {SCHEMA_VERSION};
"""
# One row: the secret every account's fingerprint is derived from, and their strength (0: off).
_FINGERPRINT_TABLE = """
CREATE TABLE IF NOT EXISTS fingerprint (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    secret BLOB NOT NULL,
    strength REAL NOT NULL
);
"""


class AccountError(PrivloraError):
    """A bad accounts database or a bad account operation (unknown name, duplicate, ...)."""


@dataclass(frozen=True)
class AccountLimits:
    # Rows of x per LoRA site, across sessions and restarts. A 150-token exchange (50-token
    # prompt, 100-token answer) uses 150 rows at every site; see docs/security.md for what a
    # budget allows an account to extract. None: no budget.
    max_rows: int | None = 20_000
    max_sessions: int = 4  # sessions held at once; a fifth evicts the account's own oldest
    rate: float | None = 500.0  # requests per second, sustained, for all the account's sessions
    burst: int = 1000


@dataclass(frozen=True)
class Account:
    name: str
    created: float
    revoked: float | None
    limits: AccountLimits
    admin: bool = False


@dataclass(frozen=True)
class AccountUsage:
    account: Account
    sites: int  # sites the account has sent rows to
    max_site_rows: int  # the most rows sent to one site: what the budget bounds
    total_rows: int


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _account(row: sqlite3.Row) -> Account:
    return Account(row["name"], row["created"], row["revoked"],
                   AccountLimits(row["max_rows"], row["max_sessions"], row["rate"], row["burst"]), bool(row["admin"]))


class AccountStore:
    """The accounts database. Safe to share between threads (one connection behind a lock) and
    between processes (SQLite's own locking)."""

    def __init__(self, path: str | Path, create: bool = False) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise AccountError(f"no accounts database at {self.path}: create one with "
                               f"'privlora accounts create NAME --db {self.path}'")
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable across a process crash; fsync at checkpoints
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._db.executescript(_SCHEMA)
            elif version == 1:  # rows stay under the artifact ids until a server hosting one adopts them
                self._db.executescript("ALTER TABLE usage RENAME COLUMN artifact TO adapter;")
            elif version > SCHEMA_VERSION:
                raise AccountError(f"{self.path} is an accounts database of schema {version}; this privlora reads "
                                   f"schema {SCHEMA_VERSION}")
            self._db.executescript(_FINGERPRINT_TABLE)
            self._db.execute("INSERT OR IGNORE INTO fingerprint VALUES (1, ?, ?)",
                             (secrets.token_bytes(FINGERPRINT_SECRET_BYTES), DEFAULT_STRENGTH))
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("SELECT name FROM accounts LIMIT 1")
        except sqlite3.DatabaseError as exc:
            raise AccountError(f"{self.path} is not a privlora accounts database: {exc}") from None
        self._lock = threading.Lock()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, parameters: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, parameters).fetchall()

    def create(self, name: str, limits: AccountLimits = AccountLimits(), admin: bool = False) -> str:
        """A new account; returns its token, which is stored nowhere (only its hash is)."""
        if not NAME_PATTERN.fullmatch(name):
            raise AccountError(f"bad account name {name!r}: letters, digits and _.@- (at most 64, starting with a "
                               "letter or digit)")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        try:
            with self._transaction() as db:
                db.execute("INSERT INTO accounts VALUES (?, ?, ?, NULL, ?, ?, ?, ?, ?)",
                           (name, token_hash(token), time.time(), limits.max_rows, limits.max_sessions, limits.rate,
                            limits.burst, int(admin)))
        except sqlite3.IntegrityError:
            raise AccountError(f"an account named {name!r} already exists") from None
        return token

    def revoke(self, name: str) -> None:
        with self._transaction() as db:
            if db.execute("UPDATE accounts SET revoked = ? WHERE name = ? AND revoked IS NULL",
                          (time.time(), name)).rowcount == 0:
                known = db.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone()
                raise AccountError(f"account {name!r} is already revoked" if known else f"no account named {name!r}")

    def authenticate(self, token: str) -> Account:
        """The account holding ``token``: AuthError (401) if none, ForbiddenError (403) if revoked."""
        rows = self._query("SELECT * FROM accounts WHERE token_sha256 = ?", (token_hash(token),))
        if not rows:
            raise AuthError("invalid API token")
        account = _account(rows[0])
        if account.revoked is not None:
            raise ForbiddenError(f"the API token of account {account.name!r} was revoked")
        return account

    def adopt(self, artifact: str, adapter: str) -> None:
        """Move use counted under an artifact's id (schema 1) to its adapter's key, adding it to
        what that adapter already has."""
        with self._transaction() as db:
            db.execute("INSERT INTO usage SELECT account, ?, site, rows FROM usage WHERE adapter = ? "
                       "ON CONFLICT (account, adapter, site) DO UPDATE SET rows = rows + excluded.rows", (adapter, artifact))
            db.execute("DELETE FROM usage WHERE adapter = ?", (artifact,))

    def charge(self, account: Account, adapter: str, sites: Iterable[str], rows: int) -> None:
        """Count ``rows`` against every one of ``sites``, or against none: BudgetError when any
        site would go over the account's budget."""
        sites = tuple(sites)
        if rows <= 0 or not sites:
            return
        with self._transaction() as db:
            limit = account.limits.max_rows
            if limit is not None:
                marks = ",".join("?" * len(sites))
                used = db.execute(f"SELECT MAX(rows) FROM usage WHERE account = ? AND adapter = ? AND site IN ({marks})",
                                  (account.name, adapter, *sites)).fetchone()[0] or 0
                if used + rows > limit:
                    raise BudgetError(f"query budget exhausted: account {account.name!r} has used {used} of its "
                                      f"{limit} rows per LoRA site on this adapter (this request: {rows})")
            db.executemany("INSERT INTO usage VALUES (?, ?, ?, ?) ON CONFLICT (account, adapter, site) "
                           "DO UPDATE SET rows = rows + excluded.rows",
                           [(account.name, adapter, site, rows) for site in sites])

    def site_rows(self, name: str, adapter: str) -> dict[str, int]:
        return {row["site"]: row["rows"] for row in
                self._query("SELECT site, rows FROM usage WHERE account = ? AND adapter = ?", (name, adapter))}

    def usage(self, adapter: str | None = None) -> list[AccountUsage]:
        """Every account with its use, on one adapter or on all."""
        where, parameters = ("AND u.adapter = ?", (adapter,)) if adapter else ("", ())
        rows = self._query(f"SELECT a.*, COUNT(u.site) AS sites, COALESCE(MAX(u.rows), 0) AS max_rows_used, "
                           f"COALESCE(SUM(u.rows), 0) AS total FROM accounts a LEFT JOIN usage u "
                           f"ON u.account = a.name {where} GROUP BY a.name ORDER BY a.created", parameters)
        return [AccountUsage(_account(row), row["sites"], row["max_rows_used"], row["total"]) for row in rows]

    def fingerprint_key(self) -> FingerprintKey:
        (row,) = self._query("SELECT secret, strength FROM fingerprint WHERE id = 1")
        return FingerprintKey(bytes(row["secret"]), float(row["strength"]))

    def set_fingerprint_strength(self, strength: float) -> None:
        with self._transaction() as db:
            db.execute("UPDATE fingerprint SET strength = ? WHERE id = 1", (strength,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
