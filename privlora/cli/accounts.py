"""``privlora accounts create|revoke|list|fingerprints``: the API accounts behind ``serve --accounts``."""

from __future__ import annotations

import argparse
import sys

from privlora.cli.parsing import COUNT, NON_NEGATIVE, POSITIVE_INT, Subparsers, add_command, formatter, table
from privlora.server.accounts import AccountLimits, AccountStore
from privlora.server.fingerprints import CLONE_ROWS, RECOMMENDED_STRENGTH


def register(subparsers: Subparsers) -> None:
    accounts = add_command(subparsers, "accounts", run,
                           "manage the API accounts of 'serve --accounts': tokens, query budgets, session quotas")
    actions = accounts.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", formatter_class=formatter, help="add an account and print its token (once)")
    create.add_argument("name", help="account name (letters, digits, _.@-)")
    create.add_argument("--max-rows", type=COUNT, default=AccountLimits.max_rows,
                        help=f"query budget: rows of x per LoRA site, across all sessions and restarts (0: none). "
                             f"Ordinary chats rebuild the adapter's function after about {CLONE_ROWS} rows per site "
                             "(docs/security.md): a budget above that limits how much, not whether")
    create.add_argument("--max-sessions", type=POSITIVE_INT, default=AccountLimits.max_sessions,
                        help="sessions held at once (one more evicts the account's own oldest)")
    create.add_argument("--rate", type=NON_NEGATIVE, default=AccountLimits.rate,
                        help="requests per second for all the account's sessions (0: no limit)")
    create.add_argument("--burst", type=POSITIVE_INT, default=AccountLimits.burst,
                        help="requests at once before the rate applies")
    create.add_argument("--admin", action="store_true", help="may also read /metrics (every account's use)")
    revoke = actions.add_parser("revoke", formatter_class=formatter,
                                help="revoke an account's token at once (its use is kept)")
    revoke.add_argument("name", help="account name")
    listing = actions.add_parser("list", formatter_class=formatter, help="accounts, their limits and their use")
    fingerprints = actions.add_parser("fingerprints", formatter_class=formatter,
                                      help="show or set the strength of the accounts' fingerprints",
                                      description="Every account is served the adapter plus a secret rank-1 term of "
                                                  "its own, so that a clone made from its answers can be traced to it "
                                                  "(`privlora attack trace`). Servers read the strength at start.")
    fingerprints.add_argument("--strength", type=NON_NEGATIVE, default=None,
                              help=f"size of the term, relative to the B column it is added to (0: off, as in a "
                                   f"new database; recommended: {RECOMMENDED_STRENGTH:g})")
    for action in (create, revoke, listing, fingerprints):
        action.set_defaults(handler=run)
        action.add_argument("--db", required=True, metavar="PATH", help="the accounts database (SQLite)")


def run(args: argparse.Namespace) -> int:
    store = AccountStore(args.db, create=args.action == "create")
    if args.action == "create":
        limits = AccountLimits(max_rows=args.max_rows or None, max_sessions=args.max_sessions, rate=args.rate or None,
                               burst=args.burst)
        token = store.create(args.name, limits, admin=args.admin)
        print(token)
        print(f"created account {args.name!r}; its API token (on stdout) is shown this once only (the database "
              "keeps its hash)", file=sys.stderr)
    elif args.action == "revoke":
        store.revoke(args.name)
        print(f"revoked account {args.name!r}", file=sys.stderr)
    elif args.action == "fingerprints":
        if args.strength is not None:
            store.set_fingerprint_strength(args.strength)
        strength = store.fingerprint_key().strength
        print(f"fingerprints: strength {strength:g}" + ("" if strength else " (off)"))
    else:
        print(_usage_table(store))
    return 0


def _usage_table(store: AccountStore) -> str:
    """One row an account: its status, limits and what it has used, in aligned columns. Its
    session quota, not its open sessions: those only the server holds (its health, to an admin)."""
    rows = [("account", "status", "budget/site", "most used site", "sites", "rows in all", "max sessions", "rate")]
    for usage in store.usage():
        account, limits = usage.account, usage.account.limits
        status = "revoked" if account.revoked else ("admin" if account.admin else "active")
        rows.append((account.name, status, str(limits.max_rows or "none"), str(usage.max_site_rows),
                     str(usage.sites), str(usage.total_rows), str(limits.max_sessions),
                     f"{limits.rate:g}/s" if limits.rate else "none"))
    return table(rows)
