"""The ledger's exceptions: one root, ``LedgerError``, and a few families.

Every exception the ledger raises on purpose derives from ``LedgerError`` (``except
LedgerError`` catches them all) and from the built-in class it always had, so that callers'
``except ValueError`` / ``except RuntimeError`` clauses keep working. Each message is one line
that says what failed and what to do.

    LedgerError
    ├── InvalidInput (ValueError)     a value, setting, command line or stream entry breaks a
    │                                 rule: fix the input (the CLI exits with status 2)
    │     ValueRuleError, ConfigError, UsageError, WireError > UnknownEventType
    ├── OperationFailed (RuntimeError) the ledger or a server could not do what was asked
    │                                 (the CLI exits with status 1)
    │     CommandRejected, LedgerTimeout, CliError, RebuildError, ServerError, ServerNotConfigured,
    │     ShardCountMismatch, LogError, RolesStuck
    ├── Inconsistent (RuntimeError)   the log or stored state contradicts itself: a bug or damaged
    │                                 data, never bad input (exit status 1)
    │     StateError
    └── HandlingSignal                a consumer's handler tells its runner what to do with a
                                      delivery, never seen by a caller
          LeaseLost (retry elsewhere), Undeliverable (dead-letter now)

Driver errors (``redis.exceptions``, ``psycopg.Error``) are not wrapped where they happen: the
runner retries them and the edges report them; the command line's ``FAILURES`` table
(``ledger.app.cli``) turns each into one line naming the server and what to do.

Not in the tree: ``ledger.domain.decider._Rejected``, the decider's internal control flow. It never
leaves ``decide`` (which returns it as a ``Rejection`` value), so no caller ever sees it; a bug
that let it escape must show its traceback, not pass for a reported failure.

This module imports nothing: the pure domain raises these classes too.
"""

from __future__ import annotations


class LedgerError(Exception):
    """The ledger could not do what was asked; the message says why and what to do."""


class InvalidInput(LedgerError, ValueError):
    """Something given to the ledger (a value, a setting, a command line, a stream entry)
    breaks a rule; the message names the rule."""


class OperationFailed(LedgerError, RuntimeError):
    """The ledger or one of its servers could not do what was asked."""


class Inconsistent(LedgerError, RuntimeError):
    """The log or the stored state contradicts itself: a bug or damaged data."""


class HandlingSignal(LedgerError):
    """A consumer's handler tells its runner what to do with an entry (retry, dead-letter)."""
