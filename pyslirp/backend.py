"""The backends behind one interface.

A backend carries the frames of one TAP device: ``run(tap_fd, stop_fd)``
returns once ``stop_fd`` becomes readable. The front end does not know which
backend it runs.

Beside the TAP, the front end needs a few things from a backend (the API
socket, -p, the exit fd). They work after ``start`` (which ``run`` calls
itself when the front end has not) and from inside handlers while ``run``
serves; all in the backend's own thread:

- ``register(fd, events, handler)`` / ``unregister(fd)``: serve an extra
  descriptor in the loop; ``handler(mask, now)`` when it is ready. READ (1)
  is both ``select.POLLIN`` and ``selectors.EVENT_READ``.
- ``add_hostfwd(proto, host_addr, host_port, guest_addr, guest_port)`` -> id
  (ValueError for a bad argument, OSError when the host socket cannot be
  bound), ``remove_hostfwd(id)`` (KeyError if unknown), ``list_hostfwd()``
  (slirp4netns's entries), ``list_connections()`` (dicts, one per flow).
"""

from __future__ import annotations

import abc

from pyslirp.nat.config import NetworkConfig

BACKENDS = ("python", "libslirp")
READ = 1  # select.POLLIN == selectors.EVENT_READ


class Backend(abc.ABC):
    name = ""
    # NetworkConfig settings beyond the common ones that this backend carries
    # out; the front end refuses the others rather than ignore them.
    supported_options: frozenset = frozenset()
    # register()'s bit for "writable": selectors.EVENT_WRITE here, the
    # backends whose loop polls say select.POLLOUT.
    write_event = 2

    def __init__(self, config: NetworkConfig) -> None:
        self.config = config

    def start(self, tap_fd: int, stop_fd: int) -> None:
        """Prepare to serve (open files such as the pcap); optional."""
        return None

    @abc.abstractmethod
    def run(self, tap_fd: int, stop_fd: int) -> None:
        """Serve the TAP until stop_fd is readable."""

    def close(self) -> None:
        """Release what start() made, when run() will not be called."""
        return None

    def register(self, fd: int, events: int, handler) -> None:
        raise NotImplementedError(f"the {self.name} backend cannot serve extra descriptors")

    def unregister(self, fd: int) -> None:
        raise NotImplementedError(f"the {self.name} backend cannot serve extra descriptors")

    def add_hostfwd(self, proto, host_addr, host_port, guest_addr, guest_port) -> int:
        raise NotImplementedError(f"the {self.name} backend has no port forwarding")

    def remove_hostfwd(self, forward_id: int) -> None:
        raise NotImplementedError(f"the {self.name} backend has no port forwarding")

    def list_hostfwd(self) -> list[dict]:
        raise NotImplementedError(f"the {self.name} backend has no port forwarding")

    def list_connections(self) -> list[dict]:
        raise NotImplementedError(f"the {self.name} backend cannot list its connections")


class PythonBackend(Backend):
    name = "python"
    supported_options = frozenset({"outbound_addr", "disable_dns", "enable_ipv6", "outbound_addr6"})

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__(config)
        self.loop = None
        self._capture = None

    def start(self, tap_fd: int, stop_fd: int) -> None:
        if self.loop is not None:
            return
        from pyslirp.nat.forward import Forwards
        from pyslirp.nat.loop import Loop
        from pyslirp.pcap import PcapWriter

        self._capture = PcapWriter(self.config.pcap_path) if self.config.pcap_path else None
        loop = Loop(self.config, tap_fd, stop_fd, self._capture)
        loop.forwards = Forwards(loop)
        loop.services.append(loop.forwards)
        self.loop = loop

    def run(self, tap_fd: int, stop_fd: int) -> None:
        self.start(tap_fd, stop_fd)
        try:
            self.loop.run()
        finally:
            self.close()

    def close(self) -> None:
        loop, self.loop = self.loop, None
        if loop is not None:
            loop.close()
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.close()

    def _started(self):
        if self.loop is None:
            raise RuntimeError("the python backend has not started")
        return self.loop

    def register(self, fd: int, events: int, handler) -> None:
        self._started().register(fd, events, handler)

    def unregister(self, fd: int) -> None:
        self._started().unregister(fd)

    def call_at(self, at: float, callback) -> None:
        """``callback(now)`` once at ``at`` (the loop's monotonic clock)."""
        self._started().call_at(at, callback)

    def add_hostfwd(self, proto, host_addr, host_port, guest_addr, guest_port) -> int:
        return self._started().forwards.add(proto, host_addr, host_port, guest_addr, guest_port)

    def remove_hostfwd(self, forward_id: int) -> None:
        self._started().forwards.remove(forward_id)

    def list_hostfwd(self) -> list[dict]:
        return self._started().forwards.entries()

    def list_connections(self) -> list[dict]:
        from pyslirp.nat.forward import list_connections

        loop = self._started()
        return list_connections(loop, loop.now())

    def held_bytes(self) -> int:
        """Bytes charged to the memory budget now (the stack's budget.held)."""
        return self._started().stack.budget.held


def create_backend(name: str, config: NetworkConfig) -> Backend:
    if name == "python":
        return PythonBackend(config)
    if name == "libslirp":
        # Imported here so that nothing else needs cffi or libslirp.so.0; a
        # missing library raises LibslirpUnavailable with one line to act on.
        from pyslirp.libslirp import LibslirpBackend

        return LibslirpBackend(config)
    raise ValueError(f"unknown backend {name!r} (available: {', '.join(BACKENDS)})")
