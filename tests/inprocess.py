"""Drive the real python backend loop in-process through a fake TAP.

The fake TAP is an AF_UNIX SOCK_SEQPACKET socketpair: one end is handed to
the loop as its TAP fd, the test reads and writes whole frames on the other.
``InProcessNetwork(backend="libslirp")`` runs another backend the same way
(through ``create_backend``; then ``net.loop`` is None and ``net.backend`` set).
"""

import os
import socket
import threading
import time

from pyslirp.config import NetworkConfig
from pyslirp.nat.backend import build_loop


class InProcessNetwork:
    def __init__(self, backend: str = "python", **config_kw) -> None:
        import random

        config_kw.setdefault("random", random.Random(1))
        self.config = NetworkConfig(**config_kw)
        self.guest, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._tap = tap
        self._stop_r, self._stop_w = os.pipe()
        if backend == "python":
            self.backend = None
            self.loop = build_loop(self.config, tap.fileno(), self._stop_r)
        else:
            from pyslirp.backend import create_backend

            try:
                self.backend = create_backend(backend, self.config)
            except BaseException:
                self._close_fds()
                raise
            self.loop = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            if self.loop is not None:
                self.loop.run()
            else:
                self.backend.run(self._tap.fileno(), self._stop_r)
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
        if self.loop is not None:
            self.loop.close()
        self._close_fds()
        if self.error is not None:
            raise self.error

    def _close_fds(self) -> None:
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self.guest.close()
        self._tap.close()

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
