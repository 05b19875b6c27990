"""Mapping between the guest's view of addresses and the host's.

The guest's gateway address stands for the host's loopback (unless
--disable-host-loopback); other addresses inside the virtual network have no
host behind them; everything else is itself. Addresses are raw bytes on the
guest side and strings (for socket calls) on the host side.
"""

import socket

from pyslirp.stack import icmpv4

from .config import NetworkConfig

LOOPBACK4 = "127.0.0.1"


class AddressMap:
    def __init__(self, config: NetworkConfig) -> None:
        stack = config.stack_config()
        self.gateway = stack.gateway
        self.dns = stack.dns
        self.stack_config = stack
        self.host_loopback = not config.disable_host_loopback

    def to_host(self, dst: bytes):
        """Host address string for a guest destination, or an ICMP
        destination-unreachable code (int) to refuse the flow with."""
        if dst == self.gateway:
            return LOOPBACK4 if self.host_loopback else icmpv4.NET_UNREACHABLE
        if self.stack_config.in_network(dst):
            return icmpv4.HOST_UNREACHABLE
        first = dst[0]
        if first == 0 or first == 127 or first >= 224:
            return icmpv4.NET_UNREACHABLE
        return socket.inet_ntoa(dst)

    def to_guest(self, host_addr: str) -> bytes:
        """The source address the guest sees for a host peer."""
        if host_addr.startswith("127.") and self.host_loopback:
            return self.gateway
        return socket.inet_aton(host_addr)
