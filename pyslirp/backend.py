"""The backends behind one interface.

A backend carries the frames of one TAP device: ``run(tap_fd, stop_fd)``
returns once ``stop_fd`` becomes readable. The front end does not know which
backend it runs.
"""

import abc

from pyslirp.nat.config import NetworkConfig

BACKENDS = ("python", "libslirp")


class Backend(abc.ABC):
    name = ""

    def __init__(self, config: NetworkConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def run(self, tap_fd: int, stop_fd: int) -> None:
        """Serve the TAP until stop_fd is readable."""


class PythonBackend(Backend):
    name = "python"

    def run(self, tap_fd: int, stop_fd: int) -> None:
        from pyslirp.nat.loop import Loop
        from pyslirp.pcap import PcapWriter

        capture = PcapWriter(self.config.pcap_path) if self.config.pcap_path else None
        loop = Loop(self.config, tap_fd, stop_fd, capture)
        self.loop = loop
        try:
            loop.run()
        finally:
            loop.close()
            if capture is not None:
                capture.close()


def create_backend(name: str, config: NetworkConfig) -> Backend:
    if name == "python":
        return PythonBackend(config)
    if name == "libslirp":
        # Imported here so that nothing else needs cffi or libslirp.so.0; a
        # missing library raises LibslirpUnavailable with one line to act on.
        from pyslirp.libslirp import LibslirpBackend

        return LibslirpBackend(config)
    raise ValueError(f"unknown backend {name!r} (available: {', '.join(BACKENDS)})")
