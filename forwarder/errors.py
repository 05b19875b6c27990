"""How the front end reports a failure: one line on stderr, as slirp4netns.

Every module of the front end that ends the program with an error says it
through ``fail`` (``pyslirp-forwarder: MESSAGE``, then exit status 1), so
the wording that container runtimes parse has one home.
"""

from __future__ import annotations

import sys

PROG = "pyslirp-forwarder"


class UsageError(Exception):
    """A bad command line; the message is one line."""


class SetupError(Exception):
    """A failure after the namespace is attached; one line for the user."""


def fail(message: str) -> int:
    """Print ``PROG: message`` on stderr; returns the exit status, 1."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return 1
