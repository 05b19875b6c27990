"""--metrics=[ADDR:]PORT: the API's ``stats`` in the Prometheus text format.

Read first: the Prometheus exposition format, version 0.0.4 ("Exposition
formats" in the Prometheus documentation: ``# HELP``, ``# TYPE``, one sample
a line, label values escaped), and RFC 1945 (HTTP/1.0: one request, one
response, then the connection closes).

``GET /metrics`` answers 200 with the figures of ``Backend.stats``;
any other path 404, any other method 405, a request that is not HTTP 400.
The listener is served in the backend's loop like the API socket, never
blocking it: sockets are non-blocking, a client that has not sent its
request and read its reply within ``MetricsLimits.client_timeout`` is
dropped (a timerfd in the loop), and at most ``max_clients`` wait at once
(the oldest goes first).

Why no library: ``prometheus_client`` 0.26 takes 45-70 ms to import and
adds about 10 MiB of RSS (88 modules) to a process that otherwise starts
in 14 MiB, and its server runs in a thread outside our loop; the format is
a few lines of text. This module is imported only when --metrics is given.
"""

from __future__ import annotations

import dataclasses
import socket

from .oneshot import OneRequestServer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclasses.dataclass
class MetricsLimits:
    # Scrapers connect one at a time (Prometheus scrapes a target serially);
    # a few more allow a person with curl. Past this the oldest client goes,
    # so clients that never speak cannot take the listener away.
    max_clients: int = 8
    # A GET with its headers is a few hundred bytes; a request larger than
    # this is not a scrape (answered 400 and closed).
    max_request: int = 8192
    # Seconds to send the request and read the reply; Prometheus's default
    # scrape timeout is 10 s, and a healthy scrape here takes milliseconds.
    client_timeout: float = 10.0


# ------------------------------------------------------------- the format
def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: dict) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in pairs.items()) + "}"


def _family(out: list, name: str, kind: str, help_: str, samples) -> None:
    """One metric family: HELP, TYPE, then (labels, value) samples."""
    samples = list(samples)
    if not samples:
        return
    out.append(f"# HELP {name} {help_}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        out.append(f"{name}{_labels(labels)} {value}")


def render(stats: dict) -> str:
    """``Backend.stats()`` as Prometheus text (0.0.4)."""
    out: list[str] = []
    _family(out, "pyslirp_info", "gauge", "The backend serving the network.",
            [({"backend": stats.get("backend", "")}, 1)])  # fmt: skip
    if "uptime" in stats:
        _family(out, "pyslirp_uptime_seconds", "gauge", "Seconds since the backend started.",
                [({}, stats["uptime"])])  # fmt: skip
    counters = stats.get("counters", {})
    _family(
        out,
        "pyslirp_events_total",
        "counter",
        "Events counted since start, by the part that counts them.",
        (
            ({"source": source, "event": event}, value)
            for source, events in sorted(counters.items())
            for event, value in sorted(events.items())
        ),
    )
    _family(
        out,
        "pyslirp_drops_total",
        "counter",
        "Frames and datagrams from the guest (or for it) dropped, by reason.",
        (({"reason": reason}, value) for reason, value in sorted(stats.get("drops", {}).items())),
    )
    memory = stats.get("memory", {})
    for key, help_ in (
        ("held", "Bytes held on the guest's behalf now (the memory budget)."),
        ("limit", "The memory budget (--memory-budget)."),
        ("peak", "The most bytes held at once."),
        ("pressure", "Held bytes past which windows close."),
    ):
        if key in memory:
            name = "pyslirp_memory_bytes" if key == "held" else f"pyslirp_memory_{key}_bytes"
            _family(out, name, "gauge", help_, [({}, memory[key])])
    if "refused" in memory:
        _family(out, "pyslirp_memory_refused_total", "counter",
                "Charges the memory budget refused.", [({}, memory["refused"])])  # fmt: skip
    descriptors = stats.get("descriptors", {})
    for key, help_ in (
        ("open", "Host descriptors open (for flows in the python backend)."),
        ("limit", "Host descriptors flows may take."),
        ("peak", "The most flow descriptors open at once."),
        ("rlimit", "The process's RLIMIT_NOFILE."),
    ):
        if key in descriptors:
            _family(out, f"pyslirp_descriptors_{key}", "gauge", help_, [({}, descriptors[key])])
    _family(
        out,
        "pyslirp_flows",
        "gauge",
        "Flows open now, by kind.",
        (({"kind": kind}, n) for kind, n in sorted(stats.get("flows", {}).items())),
    )
    _family(
        out,
        "pyslirp_flows_limit",
        "gauge",
        "The most flows of a kind at once.",
        (({"kind": kind}, n) for kind, n in sorted(stats.get("flow_limits", {}).items())),
    )
    _family(
        out,
        "pyslirp_unsupported",
        "gauge",
        "Figures this backend cannot report (1 each).",
        (({"figure": figure}, 1) for figure in stats.get("unsupported", [])),
    )
    return "\n".join(out) + "\n"


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def answer(request: bytes, backend) -> bytes:
    """The response to one request (its bytes up to the blank line)."""
    line = request.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return _response("400 Bad Request", b"bad request\n")
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return _response("405 Method Not Allowed", b"only GET\n")
    if target != b"/metrics":
        return _response("404 Not Found", b"try /metrics\n")
    try:
        body = render(backend.stats()).encode()
    except NotImplementedError as exc:
        return _response("501 Not Implemented", f"{exc}\n".encode())
    response = _response("200 OK", body, CONTENT_TYPE)
    return response[: len(response) - len(body)] if method == b"HEAD" else response


# ------------------------------------------------------------- the server
class MetricsServer(OneRequestServer):
    """The HTTP listener, served in the backend's loop by
    forwarder/oneshot.py with ``MetricsLimits``."""

    name = "metrics"
    answer_at_eof = False  # HTTP: a request ends with its blank line

    def __init__(self, address: str, port: int, limits: MetricsLimits | None = None) -> None:
        self.limits = limits = limits or MetricsLimits()
        self.max_clients = limits.max_clients
        self.max_request = limits.max_request
        self.client_timeout = limits.client_timeout
        super().__init__()
        self.address = address
        self.port = port

    def listen(self) -> None:
        """Bind and listen; OSError as the kernel says."""
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.address, self.port))
            sock.listen(self.max_clients)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock = sock

    def complete(self, buffer: bytearray) -> bool:
        return b"\r\n\r\n" in buffer or b"\n\n" in buffer

    def too_large(self, size: int) -> bytes | None:
        if size <= self.max_request:
            return None
        return _response("400 Bad Request", b"request too large\n")

    def handle(self, data: bytes) -> bytes:
        return answer(data, self._backend)

    def internal_error(self) -> bytes:
        return _response("500 Internal Server Error", b"internal error\n")
