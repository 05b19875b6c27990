"""Addresses and limits of the virtual network, as the stack sees them.

Every bound the stack enforces lives here, with its reason. Addresses are raw
``bytes`` (4 for IPv4, 16 for IPv6); ``ipaddress`` objects stay at the CLI.
"""

from dataclasses import dataclass


@dataclass(slots=True)
class StackConfig:
    network: bytes = bytes([10, 0, 2, 0])
    prefix_len: int = 24
    gateway: bytes = bytes([10, 0, 2, 2])
    dns: bytes = bytes([10, 0, 2, 3])
    # libslirp's convention: 52:55 followed by the IPv4 address it answers for.
    gateway_mac: bytes = bytes([0x52, 0x55, 10, 0, 2, 2])
    mtu: int = 1500  # slirp4netns's default; up to 65520 like slirp4netns

    # ARP (RFC 1122 2.3.2.2 asks to queue at least one packet per address).
    arp_queue_per_address: int = 32
    arp_pending_addresses: int = 64
    arp_retry_interval: float = 1.0
    arp_attempts: int = 3
    arp_cache_size: int = 256

    # IPv4 reassembly, after Linux's defaults (ipfrag_time 30 s,
    # ipfrag_high_thresh 4 MiB); RFC 791 suggests a 15 s lower bound.
    reassembly_timeout: float = 30.0
    reassembly_max_datagrams: int = 64
    reassembly_max_bytes: int = 4 * 1024 * 1024
    reassembly_max_fragments: int = 256  # per datagram; bounds overlap checks

    @property
    def netmask_int(self) -> int:
        bits = len(self.network) * 8
        return ((1 << bits) - 1) ^ ((1 << (bits - self.prefix_len)) - 1)

    def in_network(self, addr: bytes) -> bool:
        if len(addr) != len(self.network):
            return False
        mask = self.netmask_int
        return int.from_bytes(addr, "big") & mask == int.from_bytes(self.network, "big")

    @property
    def broadcast(self) -> bytes:
        bits = len(self.network) * 8
        value = int.from_bytes(self.network, "big") | ((1 << (bits - self.prefix_len)) - 1)
        return value.to_bytes(len(self.network), "big")

    def mac_for(self, addr: bytes) -> bytes:
        """The MAC the stack uses for one of its own IPv4 addresses."""
        return b"\x52\x55" + addr[-4:]
