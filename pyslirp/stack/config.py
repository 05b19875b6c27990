"""Addresses and limits of the virtual network, as the stack sees them.

Every bound the stack enforces lives here, with its reason. Addresses are raw
``bytes`` (4 for IPv4, 16 for IPv6); ``ipaddress`` objects stay at the CLI.
"""

from __future__ import annotations

from pyslirp.settings import Settings, factory


class TcpConfig(Settings):
    """The TCP layer's settings (StackConfig.tcp)."""

    # Connections in the table, TIME-WAIT included (those are reclaimed
    # first when the table is full): ten thousand from one guest with room to
    # spare, a few KiB each while idle; the buffers below and the memory
    # budget bound what they may hold.
    max_connections: int = 16384
    # Per connection: bytes from the guest not yet taken by the host socket
    # (bounds the window we advertise) and bytes for the guest not yet
    # acknowledged by it. 1 MiB each keeps a 64 KiB-segment link busy.
    receive_buffer: int = 1 << 20
    send_buffer: int = 1 << 20
    # Segments held out of order per connection (their bytes are bounded by
    # the receive window they must lie in).
    max_out_of_order: int = 256
    # RFC 6298: initial RTO 1 s (2.1), bounds (2.4, 2.5). The lower bound is
    # Linux's 200 ms rather than the RFC's 1 s: the guest is one hop away.
    initial_rto: float = 1.0
    min_rto: float = 0.2
    max_rto: float = 60.0
    clock_granularity: float = 0.001
    # Retransmissions before giving up (RFC 1122 4.2.3.5 R2), for data and
    # for our SYN or SYN-ACK (Linux's tcp_synack_retries is 5 too).
    max_retransmits: int = 12
    syn_retries: int = 5
    dupack_threshold: int = 3  # RFC 5681 3.2
    # Duplicate ACKs sent at once for segments that came out of order (one
    # per wire segment, RFC 5681 4.2; a GSO frame from the guest holds many):
    # enough for the guest's fast retransmit (3 duplicates) and a little of
    # NewReno's window inflation, without a burst of tiny frames.
    dupack_burst: int = 4
    # RFC 1122 4.2.3.2 allows 500 ms; a guest that writes small pieces with
    # Nagle on waits this long for each ACK, so it stays short. 0: off.
    delayed_ack_timeout: float = 0.002
    # TIME-WAIT: 2*MSL would be 4 minutes (RFC 9293); Linux uses 60 s.
    time_wait_timeout: float = 60.0
    # RFC 1122 4.2.3.6: keep-alive no sooner than 2 hours idle; we probe a
    # silent guest so that its connections do not hold host sockets forever.
    keepalive_idle: float = 7200.0
    keepalive_interval: float = 75.0
    keepalive_probes: int = 9
    challenge_ack_limit: int = 1000  # per second, RFC 5961 section 7
    window_scaling: bool = True  # RFC 7323 section 2
    timestamps: bool = True  # RFC 7323 sections 3-5
    # The guest's checksum is checked by default; a TAP that hands us frames
    # straight from the guest kernel's memory may turn this off.
    verify_checksum: bool = True


class StackConfig(Settings):
    network: bytes = bytes([10, 0, 2, 0])
    prefix_len: int = 24
    gateway: bytes = bytes([10, 0, 2, 2])
    dns: bytes = bytes([10, 0, 2, 3])
    # libslirp's convention: 52:55 followed by the IPv4 address it answers for.
    gateway_mac: bytes = bytes([0x52, 0x55, 10, 0, 2, 2])
    mtu: int = 1500  # slirp4netns's default; up to 65520 like slirp4netns
    # The TAP carries a virtio-net header (IFF_VNET_HDR with checksum and TSO
    # offloads): TCP toward the guest goes out with partial checksums and in
    # segments of up to 64 KiB (virtio.py); use the vnet_ verbs of the Stack.
    offload: bool = False
    # Every byte held on the guests' behalf, all flows together (budget.py):
    # past three quarters of it windows close, at it new buffers are refused.
    memory_budget: int = 256 * 1024 * 1024
    # RFC 6528's secret key for TCP initial sequence numbers. The stack draws
    # no randomness of its own: the NAT side fills this from os.urandom(16)
    # (NetworkConfig.isn_key); this fixed default is for tests only.
    isn_key: bytes = bytes(16)
    # TCP (the Stack's own layer, stack.tcp): its bounds and timers.
    tcp: TcpConfig = factory(TcpConfig)

    # ARP (RFC 1122 2.3.2.2 asks to queue at least one packet per address).
    arp_queue_per_address: int = 32
    # ...and at most this many bytes per address (IPv6 ND's queue too): four
    # packets at the largest MTU, so that 64 addresses waiting cannot hold
    # 32 x 64 KiB each (128 MiB per family); all of it counts against
    # memory_budget as well.
    arp_queue_bytes_per_address: int = 256 * 1024
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

    # IPv6 (off unless enabled): slirp4netns's defaults, fd00::/64 with the
    # gateway at ::2 (also answering as fe80::2) and the DNS proxy at ::3.
    ipv6: bool = False
    ipv6_prefix: bytes = bytes.fromhex("fd000000000000000000000000000000")
    ipv6_prefix_len: int = 64  # SLAAC over Ethernet needs /64 (RFC 4862 5.5.3, RFC 2464)
    ipv6_gateway: bytes = bytes.fromhex("fd000000000000000000000000000002")
    ipv6_dns: bytes = bytes.fromhex("fd000000000000000000000000000003")
    ipv6_link_local: bytes = bytes.fromhex("fe800000000000000000000000000002")
    # Domain names for the RA's DNSSL option (and DHCPv6's domain list).
    dns_search: tuple = ()
    # Router advertisements: RFC 4861 6.2.1 defaults (MaxRtrAdvInterval 600 s,
    # MinRtrAdvInterval 0.33 of it, router lifetime 3 times it), the first
    # few 16 s apart (6.2.4: MAX_INITIAL_RTR_ADVERT_INTERVAL, 3 of them), and
    # at most one multicast answer to solicitations per 3 s (6.2.6).
    ra_interval_max: float = 600.0
    ra_interval_min: float = 198.0
    ra_initial_interval: float = 16.0
    ra_initial_count: int = 3
    ra_min_delay: float = 3.0
    router_lifetime: int = 1800
    # RFC 4861 6.2.1 AdvValidLifetime (30 days) and AdvPreferredLifetime (7 days).
    prefix_valid_lifetime: int = 2592000
    prefix_preferred_lifetime: int = 604800
    # RFC 8106 5.1: at least MaxRtrAdvInterval; 3 times it is its suggestion.
    dns_lifetime: int = 1800
    # Neighbour discovery toward the guest (RFC 4861 10: MAX_MULTICAST_SOLICIT
    # 3, RETRANS_TIMER 1 s); the queue and cache bounds are ARP's.
    nd_attempts: int = 3
    nd_retry_interval: float = 1.0
    # After a router advertisement, while the guest's address in the prefix
    # is unknown (no duplicate address detection, no traffic yet), ask for it:
    # an echo request from the gateway to all nodes, which Linux answers from
    # that address (source selection for fd00::2). Delays after the RA.
    guest_probe_delays: tuple = (0.1, 1.5, 5.0)
    # RFC 4443 2.4(f): ICMPv6 errors are rate limited (token bucket of this
    # size, refilled at this rate per second; Linux allows about 1000/s).
    icmpv6_error_burst: int = 100
    icmpv6_error_rate: float = 1000.0

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
        """The MAC the stack uses for one of its own addresses: libslirp's
        52:55 and the IPv4 address, or 52:56 and the low 32 bits of an IPv6
        one (so fd00::2 and fe80::2 are 52:56:00:00:00:02)."""
        if len(addr) == 16:
            return b"\x52\x56" + addr[-4:]
        return b"\x52\x55" + addr[-4:]

    def in_prefix6(self, addr: bytes) -> bool:
        """Whether an IPv6 address lies in the guest's prefix."""
        if len(addr) != 16:
            return False
        shift = 128 - self.ipv6_prefix_len
        prefix = int.from_bytes(self.ipv6_prefix, "big") >> shift
        return int.from_bytes(addr, "big") >> shift == prefix
