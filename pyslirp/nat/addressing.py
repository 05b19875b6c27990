"""Mapping between the guest's view of addresses and the host's.

The guest's gateway address stands for the host's loopback (unless
--disable-host-loopback): 10.0.2.2 for 127.0.0.1 and, with IPv6, fd00::2
(and fe80::2) for ::1. Other addresses inside the virtual network have no
host behind them; everything else is itself. Addresses are raw bytes (4 or
16) on the guest side and strings (for socket calls) on the host side.
"""

from __future__ import annotations

import _socket

from pyslirp.config import NetworkConfig
from pyslirp.stack import icmpv4
from pyslirp.stack.names import endpoint  # noqa: F401 (re-exported for the NAT's modules)

LOOPBACK4 = "127.0.0.1"
LOOPBACK6 = "::1"


def family_of(addr: bytes) -> int:
    return _socket.AF_INET6 if len(addr) == 16 else _socket.AF_INET


def to_text(addr: bytes) -> str:
    """A raw address (4 or 16 bytes) as text, for logs and socket calls."""
    return _socket.inet_ntop(family_of(addr), addr)


class AddressMap:
    def __init__(self, config: NetworkConfig) -> None:
        stack = config.stack_config()
        self.gateway = stack.gateway
        self.dns = stack.dns
        self.stack_config = stack
        self.host_loopback = not config.disable_host_loopback
        self.ipv6 = stack.ipv6
        self.gateway6 = stack.ipv6_gateway
        self.dns6 = stack.ipv6_dns
        self.gateways6 = (stack.ipv6_gateway, stack.ipv6_link_local)

    def is_dns(self, dst: bytes) -> bool:
        """Whether ``dst`` is the DNS proxy's address (either family)."""
        return dst == self.dns or (self.ipv6 and dst == self.dns6)

    def to_host(self, dst: bytes):
        """Host address string for a guest destination, or an ICMP
        destination-unreachable code (int, ICMP's numbering for both
        families: the stack turns it into ICMPv6) to refuse the flow with."""
        if len(dst) == 16:
            return self._to_host6(dst)
        if dst == self.gateway:
            return LOOPBACK4 if self.host_loopback else icmpv4.NET_UNREACHABLE
        if self.stack_config.in_network(dst):
            return icmpv4.HOST_UNREACHABLE
        first = dst[0]
        if first == 0 or first == 127 or first >= 224:
            return icmpv4.NET_UNREACHABLE
        return _socket.inet_ntoa(dst)

    def _to_host6(self, dst: bytes):
        if not self.ipv6:
            return icmpv4.NET_UNREACHABLE
        if dst in self.gateways6:
            return LOOPBACK6 if self.host_loopback else icmpv4.NET_UNREACHABLE
        if self.stack_config.in_prefix6(dst) or dst[0] == 0xFE and dst[1] & 0xC0 == 0x80:
            return icmpv4.HOST_UNREACHABLE  # nobody else on the link
        import ipaddress  # IPv6 only (a forwarder without -6 does without its 0.4 MB)

        address = ipaddress.IPv6Address(dst)
        # The unspecified and loopback addresses, multicast, and addresses
        # that would reach IPv4 through the host's stack (mapped, NAT64's
        # well-known prefix is left alone as a real route) go nowhere.
        if (
            address.is_unspecified
            or address.is_loopback
            or address.is_multicast
            or address.ipv4_mapped is not None
            or dst[:12] == bytes(12)  # IPv4-compatible (deprecated, RFC 4291 2.5.5.1)
        ):
            return icmpv4.NET_UNREACHABLE
        return str(address)

    def to_guest(self, host_addr: str) -> bytes:
        """The source address the guest sees for a host peer."""
        if ":" in host_addr:
            import ipaddress  # as in _to_host6

            address = ipaddress.IPv6Address(host_addr.split("%")[0])
            if address.is_loopback and self.host_loopback:
                return self.gateway6
            mapped = address.ipv4_mapped
            if mapped is not None:  # a dual-stack socket's IPv4 peer
                return self.to_guest(str(mapped))
            return address.packed
        if host_addr.startswith("127.") and self.host_loopback:
            return self.gateway
        return _socket.inet_aton(host_addr)
