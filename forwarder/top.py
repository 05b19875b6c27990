"""``pyslirp top`` and ``pyslirp stats``: a forwarder's flows and counters,
read from its API socket (-a).

``pyslirp top --api-socket PATH`` redraws a table every ``--interval``
seconds, as ``ss -ti`` and ``top`` do: per flow the protocol, both ends, the
state, age, bytes each way and their rates (the difference between two
samples), and for TCP the smoothed RTT, RTO, congestion window, bytes in
flight, retransmissions and both windows; above it the totals, drops by
reason, held bytes against the budget and descriptors. Keys: ``s`` next
sort key, ``r`` reverse, ``q`` quit. ``--once`` takes two samples
``--interval`` apart and prints one plain-text table (for scripts).

``pyslirp stats --api-socket PATH`` prints the counters once (``--json``:
the API's reply as it is).

The screen is drawn with curses, from the standard library: the view is a
table redrawn in place, which curses does with nothing to install and no
start-up cost worth measuring (rich would be a dependency, and slower to
import than the sample takes). It is imported only by the live view.
Nothing of the forwarder imports this module.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time

from .api import request
from .tools import TOOLS

# What --sort takes: key -> (function of a row, largest first?)
SORT_KEYS = {
    "bytes": (lambda r: r.get("bytes_from_guest", 0) + r.get("bytes_to_guest", 0), True),
    "rate": (lambda r: r.get("rate_from_guest", 0.0) + r.get("rate_to_guest", 0.0), True),
    "age": (lambda r: r.get("age", 0.0), True),
    "rtt": (lambda r: r.get("srtt") or 0.0, True),
    "retrans": (lambda r: r.get("retransmits", 0), True),
    "state": (lambda r: r.get("state", ""), False),
    "guest": (lambda r: r.get("guest", ""), False),
    "host": (lambda r: r.get("host", ""), False),
}
COLUMNS = (
    # (heading, width, function of a row -> text)
    ("PROTO", 5, lambda r: r["proto"]),
    ("GUEST", 21, lambda r: r.get("guest", "")),
    ("HOST", 21, lambda r: r.get("host", "")),
    ("STATE", 11, lambda r: r.get("state", "")),
    ("AGE", 7, lambda r: _seconds(r.get("age"))),
    ("G>H", 7, lambda r: _size(r.get("bytes_from_guest"))),
    ("H>G", 7, lambda r: _size(r.get("bytes_to_guest"))),
    ("G>H/s", 7, lambda r: _size(r.get("rate_from_guest"))),
    ("H>G/s", 7, lambda r: _size(r.get("rate_to_guest"))),
    ("SRTT", 7, lambda r: _millis(r.get("srtt"))),
    ("RTO", 7, lambda r: _millis(r.get("rto"))),
    ("CWND", 7, lambda r: _size(r.get("cwnd"))),
    ("INFLT", 7, lambda r: _size(r.get("in_flight"))),
    ("RETR", 5, lambda r: _plain(r.get("retransmits"))),
    ("SWND", 7, lambda r: _size(r.get("snd_wnd"))),
    ("RWND", 7, lambda r: _size(r.get("rcv_wnd"))),
)
API_TIMEOUT = 5.0  # seconds to wait for the forwarder's answer


class ToolError(Exception):
    """One line for the user (``pyslirp: ...``, exit status 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ToolError(f"{self.prog.split()[-1]}: {message}")


# ------------------------------------------------------------- formatting
def _plain(value) -> str:
    return "-" if value is None else str(value)


def _size(value) -> str:
    """Bytes in at most 6 characters: 512, 12.3K, 4.0M."""
    if value is None:
        return "-"
    value = float(value)
    for unit in ("", "K", "M", "G"):
        if abs(value) < 1000 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1024
    return "-"


def _millis(seconds) -> str:
    if seconds is None:
        return "-"
    millis = seconds * 1000
    return f"{millis:.2f}ms" if millis < 10 else f"{millis:.0f}ms"


def _seconds(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 100:
        return f"{seconds:.1f}s"
    if seconds < 6000:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


# ------------------------------------------------------------- sampling
def ask(path: str, execute: str) -> dict:
    """The "return" of one API request; ToolError for anything else."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise ToolError(f"{path} is not a socket (give the forwarder's -a)")
        reply = request(path, {"execute": execute}, timeout=API_TIMEOUT)
    except FileNotFoundError:
        raise ToolError(f"no API socket at {path} (is the forwarder running with -a?)") from None
    except ConnectionRefusedError:
        raise ToolError(f"nothing listens on {path} (the forwarder is not running)") from None
    except OSError as exc:
        raise ToolError(f"cannot reach the forwarder at {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise ToolError(f"the forwarder at {path} sent a reply that is not JSON") from None
    if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
        raise ToolError(f"{execute}: {reply['error'].get('desc', 'error')}")
    if not isinstance(reply, dict) or not isinstance(reply.get("return"), dict):
        raise ToolError(f"{execute}: unexpected reply from {path}")
    return reply["return"]


class Sample:
    """One look at the forwarder: its flows and its stats (None when the
    backend has none), and when (monotonic seconds)."""

    def __init__(self, path: str) -> None:
        self.connections = ask(path, "list_connections").get("connections", [])
        try:
            self.stats = ask(path, "stats")
        except ToolError:
            self.stats = None
        self.at = time.monotonic()


def _key(row: dict) -> tuple:
    return (row.get("flow"), row["proto"], row.get("guest"), row.get("host"), row.get("forward"))


def rows(now: Sample, before: Sample | None) -> list[dict]:
    """The flows of ``now``, with rates of bytes each way since ``before``
    for the flows that were there (no rate without a second sample)."""
    previous = {_key(r): r for r in before.connections} if before is not None else {}
    elapsed = now.at - before.at if before is not None else 0.0
    out = []
    for row in now.connections:
        row = dict(row)
        old = previous.get(_key(row))
        if old is not None and elapsed > 0:
            for field in ("from_guest", "to_guest"):
                moved = row.get(f"bytes_{field}", 0) - old.get(f"bytes_{field}", 0)
                row[f"rate_{field}"] = max(0, moved) / elapsed
        out.append(row)
    return out


def matches(row: dict, text: str) -> bool:
    """--filter: a port (digits: either end's port), else a substring of
    either end, the protocol, the state or the flow's name."""
    if text.isdigit():
        return any(row.get(end, "").rpartition(":")[2] == text for end in ("guest", "host"))
    fields = (row.get("guest", ""), row.get("host", ""), row["proto"], row.get("state", ""))
    return any(text in field for field in (*fields, row.get("flow") or ""))


def select_rows(table: list[dict], sort: str, reverse: bool, text: str | None) -> list[dict]:
    if text:
        table = [r for r in table if matches(r, text)]
    function, largest_first = SORT_KEYS[sort]
    return sorted(table, key=function, reverse=largest_first != reverse)


# ------------------------------------------------------------- the text
def summary(stats: dict | None, table: list[dict]) -> list[str]:
    """The lines above the table."""
    kinds: dict[str, int] = {}
    for row in table:
        kinds[row["proto"]] = kinds.get(row["proto"], 0) + 1
    flows = " ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none"
    if stats is None:
        return [f"flows: {flows}   (no stats from this backend)"]
    lines = [f"backend {stats.get('backend', '?')}, up {_seconds(stats.get('uptime'))}, "
             f"flows: {flows}"]  # fmt: skip
    memory, fds = stats.get("memory"), stats.get("descriptors")
    parts = []
    if memory:
        parts.append(
            f"held {_size(memory['held'])} of {_size(memory['limit'])} "
            f"(peak {_size(memory['peak'])})"
        )
    if fds:
        limit = fds.get("limit", fds.get("rlimit"))
        parts.append(f"fds {fds['open']} of {limit}")
    if parts:
        lines.append(", ".join(parts))
    drops = stats.get("drops")
    if drops is not None:
        shown = ", ".join(f"{reason} {n}" for reason, n in sorted(drops.items(), key=_by_count))
        lines.append(f"drops: {shown or 'none'}")
    if stats.get("unsupported"):
        lines.append(f"not reported by this backend: {', '.join(stats['unsupported'])}")
    return lines


def totals(table: list[dict]) -> str:
    """Bytes each way over the flows shown, and their rates."""
    parts = []
    for field, label in (("from_guest", "guest>host"), ("to_guest", "host>guest")):
        moved = sum(r.get(f"bytes_{field}", 0) for r in table)
        rates = [r[f"rate_{field}"] for r in table if f"rate_{field}" in r]
        rate = f" ({_size(sum(rates))}/s)" if rates else ""
        parts.append(f"{label} {_size(moved)}{rate}")
    return f"{len(table)} flows shown: " + ", ".join(parts)


def _by_count(item) -> tuple:
    return (-item[1], item[0])


def table_lines(table: list[dict]) -> list[str]:
    head = " ".join(f"{name:<{width}}" for name, width, _ in COLUMNS).rstrip()
    lines = [head]
    for row in table:
        cells = [f"{text(row):<{width}}" for _, width, text in COLUMNS]
        lines.append(" ".join(cells).rstrip())
    return lines


def snapshot(path: str, interval: float, sort: str, reverse: bool, text: str | None) -> str:
    """--once: two samples ``interval`` apart (one if 0: no rates), as text."""
    before = None
    if interval > 0:
        before = Sample(path)
        time.sleep(interval)
    now = Sample(path)
    table = select_rows(rows(now, before), sort, reverse, text)
    lines = [*summary(now.stats, now.connections), totals(table)]
    if before is None:
        lines.append("(rates need two samples: --interval above 0)")
    return "\n".join([*lines, "", *table_lines(table)]) + "\n"


# ------------------------------------------------------------- the live view
def live(path: str, interval: float, sort: str, reverse: bool, text: str | None) -> None:
    import curses

    def draw(screen) -> None:
        nonlocal sort, reverse
        curses.curs_set(0)
        screen.timeout(int(interval * 1000))
        keys = list(SORT_KEYS)
        before = None
        while True:
            now = Sample(path)
            table = select_rows(rows(now, before), sort, reverse, text)
            before = now
            height, width = screen.getmaxyx()
            head = [*summary(now.stats, now.connections), totals(table)]
            head.append(
                f"sort {sort}{' (reversed)' if reverse else ''}"
                f"{f', filter {text!r}' if text else ''}   s: sort  r: reverse  q: quit"
            )
            lines = [*head, "", *table_lines(table)]
            screen.erase()
            for y, line in enumerate(lines[: height - 1]):
                screen.addnstr(y, 0, line, width - 1, curses.A_BOLD if y == len(head) + 1 else 0)
            screen.refresh()
            key = screen.getch()
            if key in (ord("q"), ord("Q")):
                return
            if key == ord("s"):
                sort = keys[(keys.index(sort) + 1) % len(keys)]
            elif key == ord("r"):
                reverse = not reverse

    try:
        curses.wrapper(draw)
    except KeyboardInterrupt:
        pass


# ------------------------------------------------------------- commands
def _api_socket(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-a", "--api-socket", required=True, metavar="PATH",
                        help="the forwarder's API socket (its -a)")  # fmt: skip


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be seconds from 0 to 3600, not {text!r}")
    return value


def main(argv: list[str]) -> int:
    parser = _Parser(prog=f"{TOOLS} top", description="A live view of a forwarder's flows.")
    _api_socket(parser)
    parser.add_argument("--once", action="store_true",
                        help="print one plain-text snapshot and exit")  # fmt: skip
    parser.add_argument("--sort", choices=list(SORT_KEYS), default="bytes",
                        help="the order of the flows (default bytes)")  # fmt: skip
    parser.add_argument("--reverse", action="store_true", help="the other way round")
    parser.add_argument("--filter", metavar="TEXT", default=None,
                        help="only flows with this port, or this text in an address")  # fmt: skip
    parser.add_argument("--interval", type=_interval, default=1.0, metavar="S",
                        help="seconds between samples (default 1)")  # fmt: skip
    try:
        ns = parser.parse_args(argv)
        if ns.once:
            sys.stdout.write(snapshot(ns.api_socket, ns.interval, ns.sort, ns.reverse, ns.filter))
            return 0
        if ns.interval <= 0:
            raise ToolError("top: the live view needs --interval above 0")
        if not sys.stdout.isatty():
            raise ToolError("top: the live view needs a terminal (--once prints plain text)")
        Sample(ns.api_socket)  # fail before curses takes the screen
        live(ns.api_socket, ns.interval, ns.sort, ns.reverse, ns.filter)
    except ToolError as exc:
        return _fail(str(exc))
    return 0


def stats_main(argv: list[str]) -> int:
    parser = _Parser(prog=f"{TOOLS} stats", description="A forwarder's counters, once.")
    _api_socket(parser)
    parser.add_argument("--json", action="store_true", help="the API's reply as it is")
    try:
        ns = parser.parse_args(argv)
        stats = ask(ns.api_socket, "stats")
    except ToolError as exc:
        return _fail(str(exc))
    if ns.json:
        sys.stdout.write(json.dumps(stats, indent=2, sort_keys=True) + "\n")
        return 0
    lines = [f"backend:     {stats.get('backend', '?')}"]
    if "uptime" in stats:
        lines.append(f"uptime:      {stats['uptime']:.1f} s")
    for section in ("flows", "flow_limits", "memory", "descriptors", "drops"):
        if section in stats:
            values = stats[section]
            shown = "  ".join(f"{k}={v}" for k, v in sorted(values.items())) or "none"
            lines.append(f"{section + ':':<12} {shown}")
    for source, counters in sorted(stats.get("counters", {}).items()):
        shown = "  ".join(f"{k}={v}" for k, v in sorted(counters.items()) if v)
        lines.append(f"{'events ' + source + ':':<20} {shown or '-'}")
    if stats.get("unsupported"):
        lines.append(f"unsupported: {', '.join(stats['unsupported'])}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _fail(message: str) -> int:
    print(f"{TOOLS}: {message}", file=sys.stderr, flush=True)
    return 1
