"""The one error type the wire layer raises for untrusted input."""

from __future__ import annotations


class MalformedFrame(Exception):
    """A frame from the guest that cannot be parsed; ``reason`` is a short counter key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
