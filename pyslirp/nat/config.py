"""Configuration of one virtual network: addresses, upstreams and every limit."""

import ipaddress
import random as _random
from dataclasses import dataclass, field

from pyslirp.stack.config import StackConfig

MIN_MTU = 68  # RFC 791: every host must take 68-byte datagrams
MAX_MTU = 65520  # slirp4netns's upper bound (libslirp IF_MTU_MAX)


@dataclass
class NetworkConfig:
    cidr: ipaddress.IPv4Network = field(
        default_factory=lambda: ipaddress.IPv4Network("10.0.2.0/24")
    )
    mtu: int = 1500
    disable_host_loopback: bool = False
    # (address, port) pairs; empty means "read /etc/resolv.conf" at start-up.
    dns_upstreams: list = field(default_factory=list)
    random: _random.Random = field(default_factory=_random.Random)
    pcap_path: str | None = None
    # slirp4netns's --outbound-addr: host sockets toward the outside are
    # bound to this IPv4 address (None: the kernel chooses).
    outbound_addr: str | None = None
    # slirp4netns's --disable-dns: no DNS proxy at the DNS address.
    disable_dns: bool = False

    # UDP NAT. RFC 4787 REQ-5: a UDP mapping must live at least 2 minutes,
    # 5 recommended. DNS flows are one query and one answer, so they go sooner
    # (libslirp uses 10 s for them too).
    max_udp_flows: int = 1024
    udp_idle_timeout: float = 300.0
    udp_dns_idle_timeout: float = 10.0
    # DNS proxy: how many guest queries may wait for an upstream at once, and
    # how long one upstream gets before the next is asked.
    dns_max_pending: int = 512
    dns_upstream_timeout: float = 2.0
    # DHCP: libslirp hands out 16 addresses from .15; we do the same.
    dhcp_pool_size: int = 16
    dhcp_lease_time: int = 86400
    # ICMP echo relay through host ping sockets.
    max_ping_sockets: int = 64
    ping_idle_timeout: float = 30.0
    # Frames read from the TAP per wake-up before host sockets get a turn.
    tap_batch: int = 512
    # DHCP (added with the DHCP server): how long an OFFERed address stays
    # reserved for a client that has not REQUESTed it yet (RFC 2131 4.3.1
    # leaves it to the server; a REQUEST follows within seconds), and how
    # long a DECLINEd address stays out of the pool (RFC 2131 4.3.3: "mark
    # the network address as not available").
    dhcp_offer_timeout: float = 60.0
    dhcp_decline_timeout: float = 600.0
    # TCP (added with the TCP NAT; protocol timers are in
    # pyslirp.stack.tcp_layer.TcpConfig). Connections the stack tracks and
    # host sockets open at once: past it (or past the process's file
    # descriptor limit) new guest connections get RST, the others carry on.
    tcp_max_connections: int = 4096
    # Per connection, bytes from the guest the host socket has not taken yet
    # (the guest's window) and bytes for the guest it has not acknowledged:
    # memory per connection is bounded by their sum.
    tcp_receive_buffer: int = 1 << 20
    tcp_send_buffer: int = 1 << 20
    # A host connect still pending after this long becomes ICMP host
    # unreachable for the guest (BSD's connection-establishment timer, 75 s).
    tcp_connect_timeout: float = 75.0
    # TIME-WAIT lifetime (Linux's 60 s; RFC 9293's 2*MSL is 4 minutes).
    tcp_time_wait_timeout: float = 60.0
    # Keep-alive toward a silent guest (RFC 1122 4.2.3.6: not under 2 hours).
    tcp_keepalive_idle: float = 7200.0
    # Check the checksum of every segment from the guest (RFC 9293 3.1).
    tcp_verify_checksum: bool = True

    def __post_init__(self) -> None:
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValueError(f"MTU must be between {MIN_MTU} and {MAX_MTU}, got {self.mtu}")
        if self.cidr.prefixlen > 25:
            # room for .2, .3, .15 .. .15+pool and .100 (slirp4netns: "1-25")
            raise ValueError(f"CIDR {self.cidr} is too small: the prefix must be /25 or shorter")

    def host(self, offset: int) -> ipaddress.IPv4Address:
        return self.cidr.network_address + offset

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.host(2)

    @property
    def dns(self) -> ipaddress.IPv4Address:
        return self.host(3)

    @property
    def dhcp_start(self) -> ipaddress.IPv4Address:
        return self.host(15)

    @property
    def recommended_guest(self) -> ipaddress.IPv4Address:
        return self.host(100)

    def stack_config(self) -> StackConfig:
        gateway = self.gateway.packed
        return StackConfig(
            network=self.cidr.network_address.packed,
            prefix_len=self.cidr.prefixlen,
            gateway=gateway,
            dns=self.dns.packed,
            gateway_mac=b"\x52\x55" + gateway,
            mtu=self.mtu,
        )


def read_resolv_conf(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """Every IPv4 nameserver in resolv.conf, as (address, 53)."""
    upstreams = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        addr = ipaddress.ip_address(parts[1].split("%")[0])
                    except ValueError:
                        continue
                    if addr.version == 4:
                        upstreams.append((str(addr), 53))
    except OSError:
        pass
    return upstreams
