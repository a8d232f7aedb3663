"""Per-account fingerprints: attribution that survives a clone.

A client that chats with the adapter sees enough (x, delta) rows to fit every site's map by least
squares (docs/security.md, "What ordinary use reveals"). The server cannot stop that without
spoiling honest answers, but it can make every account's copy different: each account is served
``dW + F_acct`` at every site, where ``F_acct`` is a secret rank-1 term (a direction added to one
column of the site's integer B_hat: ``backends/pll.py:mark_offset``), derived from a server
secret and the account's name. A clone fitted on an account's answers learns its ``F_acct``
along with ``dW``; :func:`trace` then tests a suspect adapter against every account's term and
names the one it carries, with a p-value. At the recommended strength SmolLM2's greedy answers do
not change (measured in docs/security.md); a new accounts database starts with them off.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from privlora.backends.pll import Fingerprint, SiteMark
from privlora.core.types import PLLSite

FINGERPRINT_SECRET_BYTES = 32
# Measured (docs/security.md, "What ordinary use rebuilds"): the rows per site after which a
# least-squares clone of SmolLM2 + the demo adapter answers as the adapter does, and the rows an
# ordinary question and its answer take.
CLONE_ROWS = 1000
TOKENS_PER_EXCHANGE = 60
# Of a B_hat column's size: a term smaller than the PLL error itself, the largest measured that
# left SmolLM2's greedy answers as the unmarked service gives them; off in a new database, because
# near-tied logits (tiny random models) do flip (docs/security.md, "Fingerprints").
RECOMMENDED_STRENGTH = 0.002
DEFAULT_STRENGTH = 0.0


@dataclass(frozen=True)
class FingerprintKey:
    """The server's fingerprint secret and strength (0: fingerprints off), kept in the accounts
    database beside the accounts they mark."""

    secret: bytes
    strength: float

    @property
    def enabled(self) -> bool:
        return self.strength > 0


def _seed(secret: bytes, *parts: str) -> bytes:
    return hmac.new(secret, "\0".join(parts).encode(), hashlib.sha256).digest()


def site_mark(secret: bytes, account: str, site: PLLSite) -> SiteMark:
    """One site's mark for one account: a column of its B and a standard normal direction."""
    rng = np.random.default_rng(list(_seed(secret, account, site.module)))
    return SiteMark(column=int(rng.integers(site.rank)), direction=rng.standard_normal(site.d_out))


def account_fingerprint(key: FingerprintKey, account: str, sites: Iterable[PLLSite]) -> Fingerprint:
    """Every site's mark for ``account``; the tag names it without revealing the secret."""
    tag = _seed(key.secret, "tag", account).hex()[:24]
    return Fingerprint(tag, key.strength, {site.module: site_mark(key.secret, account, site) for site in sites})


@dataclass(frozen=True)
class Suspect:
    """How strongly a suspect adapter carries one account's fingerprint."""

    account: str
    carried: float  # the share of the account's term the suspect carries (1: all of it)
    z: float  # standard deviations above what a fingerprint it does not carry scores
    p_value: float  # one-sided, before correction for the number of accounts


def normal_tail(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))
