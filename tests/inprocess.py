"""Drive the real python backend loop in-process through a fake TAP.

The fake TAP is an AF_UNIX SOCK_SEQPACKET socketpair: one end is handed to
the loop as its TAP fd, the test reads and writes whole frames on the other.
"""

import os
import socket
import threading
import time

from pyslirp.nat.config import NetworkConfig
from pyslirp.nat.loop import Loop


class InProcessNetwork:
    def __init__(self, **config_kw) -> None:
        import random

        config_kw.setdefault("random", random.Random(1))
        self.config = NetworkConfig(**config_kw)
        self.guest, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._tap = tap
        self._stop_r, self._stop_w = os.pipe()
        self.loop = Loop(self.config, tap.fileno(), self._stop_r)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.loop.run()
        except BaseException as exc:  # surfaced by close()
            self.error = exc

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        assert not self._thread.is_alive(), "loop did not stop"
        self.loop.close()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self.guest.close()
        self._tap.close()
        if self.error is not None:
            raise self.error

    def send(self, frame: bytes) -> None:
        self.guest.send(bytes(frame))

    def receive(self, timeout: float = 2.0, predicate=None):
        """The next frame (bytes) the loop sends to the guest that satisfies
        ``predicate``, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.guest.settimeout(left)
            try:
                frame = self.guest.recv(70000)
            except TimeoutError:
                return None
            if predicate is None or predicate(frame):
                return frame
