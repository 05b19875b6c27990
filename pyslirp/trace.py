"""The decision trace (--trace): one JSON object per line.

Every line has ``t`` (the stack's ``now``, seconds), ``event`` (a dotted
name, e.g. ``tcp.state``), ``flow`` (names.flow_name, or null for what
concerns no flow) and ``msg`` (a short sentence for people); the other keys
depend on the event (docs/trace.md lists them).

The stack and the NAT side call a tracer as ``tracer(now, event, flow, msg,
**fields)``; with tracing off there is no tracer (None), and the hot paths
pay one ``is not None`` test where a decision is taken.
"""

from __future__ import annotations

import json
import sys


class JsonTracer:
    """Writes each decision as a JSON line to ``stream`` (a text file).

    ``frame_index``, if given, is a callable that returns the pcap index of
    the frame being handled (or None): drops name the frame they concern."""

    def __init__(self, stream, frame_index=None, close=False) -> None:
        self.stream = stream
        self.frame_index = frame_index
        self.lines = 0
        self.errors = 0  # lines that could not be written
        self._close = close
        self._encode = json.JSONEncoder(separators=(",", ":"), default=_default).encode

    def __call__(self, now: float, event: str, flow, msg: str, **fields) -> None:
        record = {"t": round(now, 6), "event": event, "flow": flow, "msg": msg}
        record.update(fields)
        try:
            self.stream.write(self._encode(record) + "\n")
        except (OSError, ValueError):  # a full disk, a closed stream: the network goes on
            self.errors += 1
            return
        self.lines += 1

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            self.errors += 1

    def close(self) -> None:
        self.flush()
        if self._close:
            self.stream.close()


def _default(value):
    """bytes as hex (MAC addresses, payload excerpts); anything else as text."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return str(value)


def open_tracer(path: str, frame_index=None) -> JsonTracer:
    """A tracer writing to ``path`` (appended to), or stderr for ``-``."""
    if path == "-":
        return JsonTracer(sys.stderr, frame_index)
    stream = open(path, "a", buffering=1 << 16)  # noqa: SIM115 - the tracer closes it
    return JsonTracer(stream, frame_index, close=True)
