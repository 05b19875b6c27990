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
  (slirp4netns's entries), ``list_connections()`` (dicts, one per flow),
  ``stats()`` (counters, drops, memory, descriptors, flows; see there).
"""

from __future__ import annotations

import abc

from pyslirp.config import NetworkConfig

# Each backend by name, as "module:Class", imported only when chosen: the
# front end and the libslirp backend load nothing of the python stack, and
# nothing needs cffi or libslirp.so.0 but the libslirp backend. The backends
# import this module (for Backend); it imports none of them.
BACKENDS = {
    "python": "pyslirp.nat.backend:PythonBackend",
    "libslirp": "pyslirp.libslirp:LibslirpBackend",
}
READ = 1  # select.POLLIN == selectors.EVENT_READ


class Backend(abc.ABC):
    name = ""
    # NetworkConfig settings beyond the common ones that this backend carries
    # out; the front end refuses the others rather than ignore them.
    supported_options: frozenset = frozenset()
    # register()'s bit for "writable": selectors.EVENT_WRITE here, the
    # backends whose loop polls say select.POLLOUT.
    write_event = 2
    # A VM's socket (pyslirp/link.py) to serve instead of the TAP: the front
    # end sets it before start(), and run()'s tap_fd is then the link's fd.
    link = None

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

    def stats(self) -> dict:
        """Counters for the API's ``stats``: "backend", "uptime" (seconds),
        "counters" ({source: {event: n}}), "drops" ({reason: n}), "memory"
        (held, limit, peak, pressure, refused bytes), "descriptors" (open,
        limit, peak, rlimit), "flows" and "flow_limits" ({kind: n}), and
        "unsupported": the keys this backend cannot fill (left out)."""
        raise NotImplementedError(f"the {self.name} backend has no statistics")


def create_backend(name: str, config: NetworkConfig) -> Backend:
    """The backend called ``name`` (a key of BACKENDS) for ``config``. A
    missing libslirp raises LibslirpUnavailable with one line to act on."""
    try:
        where = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r} (available: {', '.join(BACKENDS)})") from None
    module, _, cls = where.partition(":")
    # __import__ with a fromlist gives the module itself (importlib, for
    # import_module, would be one more package in the forwarder's memory)
    return getattr(__import__(module, fromlist=[cls]), cls)(config)
