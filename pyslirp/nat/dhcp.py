"""DHCP server (RFC 2131, options RFC 2132). STUB: being written."""


class DhcpServer:
    def __init__(self, config) -> None:
        self.config = config

    def handle(self, payload: bytes, src_mac: bytes, now: float) -> list:
        """Return [(reply payload, destination IP bytes, destination MAC bytes)]."""
        return []
