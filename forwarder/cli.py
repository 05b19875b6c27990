"""The console script: pyslirp-forwarder [OPTION]... PATH | PID TAPNAME | -- COMMAND.

``main`` parses the command line (forwarder.options), sets up logging, and
either serves the target (forwarder.serve) or, with -- COMMAND, runs the
command in namespaces of its own (forwarder.runmode, imported only then).
Every error is one line on stderr and exit status 1 (forwarder.errors).
"""

from __future__ import annotations

import sys

from .errors import UsageError, fail
from .options import parse


def run(argv: list[str]) -> int:
    """The exit status of ``pyslirp-forwarder ARGV``."""
    try:
        text, options = parse(argv)
    except UsageError as exc:
        return fail(str(exc))
    if options is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return 0
    from .ratelimit import log_to_stderr

    # Guest-triggered warnings: a few per kind per interval. ``logging`` is
    # imported when the first line at the level is written (pyslirp.log).
    log_to_stderr(options.log_level)
    if options.command is not None:
        from .runmode import run_command

        return run_command(options)
    from .serve import serve

    return serve(options)


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(sys.argv[1:] if argv is None else argv))
