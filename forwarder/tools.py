"""The console script ``pyslirp``: the study tools, one subcommand each.

``pyslirp replay FILE``  play a recording (--record) through a fresh stack
``pyslirp top``          a live view of a forwarder's flows (its API socket)
``pyslirp stats``        a forwarder's counters, once (its API socket)

Each subcommand's module is imported only when it is asked for; none of
them is on ``pyslirp-forwarder``'s start-up path. Errors are one line on
stderr and exit status 1, as the forwarder's.
"""

from __future__ import annotations

import importlib
import sys

TOOLS = "pyslirp"  # the program name in usage and errors
# subcommand -> (module, function, one line of help)
COMMANDS = {
    "replay": ("forwarder.replay", "main", "play a recording through a fresh stack and check it"),
    "top": ("forwarder.top", "main", "a live view of a forwarder's flows"),
    "stats": ("forwarder.top", "stats_main", "a forwarder's counters, once"),
}


def usage() -> str:
    lines = [f"Usage: {TOOLS} COMMAND [OPTION]...", "", "Commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_m, _f, help_) in COMMANDS.items()]
    lines += ["", f"{TOOLS} COMMAND --help shows a command's options."]
    return "\n".join(lines) + "\n"


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0 if argv else 1
    entry = COMMANDS.get(argv[0])
    if entry is None:
        sys.stderr.write(f"{TOOLS}: unknown command {argv[0]!r} (see {TOOLS} --help)\n")
        return 1
    module, function, _help = entry
    return getattr(importlib.import_module(module), function)(argv[1:])


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
