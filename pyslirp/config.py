"""Configuration of one virtual network: addresses, upstreams and every limit.

Both backends take a NetworkConfig (the python one carries out every field,
libslirp the common ones), so this module imports nothing of the python
stack at load time: ``stack_config`` and ``tcp_config``, the one mapping
from these fields to the sans-IO stack's settings, import it when called.
"""

from __future__ import annotations

import _random
import _socket
import os

from pyslirp.settings import Settings, factory

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2 ms at start-up)

if TYPE_CHECKING:
    from pyslirp.stack.config import StackConfig, TcpConfig

MIN_MTU = 68  # RFC 791: every host must take 68-byte datagrams
MIN_MTU_IPV6 = 1280  # RFC 8200 section 5
DEFAULT_IPV6_PREFIX = "fd00::/64"  # slirp4netns's and libslirp's
MAX_MTU = 65520  # slirp4netns's upper bound (libslirp IF_MTU_MAX)


class NetworkConfig(Settings):
    # The guest's network, as text (an ipaddress.IPv4Network is taken too,
    # and kept as its text). Its addresses are text as well (``gateway``,
    # ``dns``, ...): ``ipaddress`` is not imported for them, which keeps
    # 0.4 MB off an idle forwarder's RSS. ``network`` and ``prefix_len``
    # are the parsed form.
    cidr: str = "10.0.2.0/24"
    mtu: int = 1500
    disable_host_loopback: bool = False
    # (address, port) pairs; empty means "read /etc/resolv.conf" at start-up.
    dns_upstreams: list = factory(list)
    # What the stack draws its visible randomness from (IP IDs, timestamp
    # offsets): anything with random.Random's getrandbits. The C generator
    # itself, seeded from os.urandom: the ``random`` module would add
    # 0.4 MB to the forwarder's RSS for nothing the stack uses.
    random: _random.Random = factory(_random.Random)
    # RFC 6528: the secret key of TCP initial sequence numbers, drawn once
    # per process (not from ``random``, whose outputs the guest can see).
    isn_key: bytes = factory(lambda: os.urandom(16))
    pcap_path: str | None = None
    # The study tools (python backend): --trace (a JSON line per decision,
    # "-" for stderr), --record (everything crossing the stack's boundary)
    # and the size at which a recording stops (0: no limit).
    trace_path: str | None = None
    record_path: str | None = None
    record_limit: int = 0
    # Virtio-net offloads on the TAP (IFF_VNET_HDR, TUNSETOFFLOAD with
    # checksum, TSO4 and TSO6): the guest hands us 64 KiB TCP segments and
    # takes them from us at any MTU. The front end asks for them unless
    # --no-offload and sets this to what the kernel granted.
    offload: bool = False
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
    # Upstream queries each go out from a socket of their own (RFC 5452 9.2:
    # a random source port per query); at most this many at once, further
    # queries wait for one to close (within dns_max_pending).
    dns_max_sockets: int = 128
    # DHCP: libslirp hands out 16 addresses from .15; we do the same.
    dhcp_pool_size: int = 16
    dhcp_lease_time: int = 86400
    # ICMP echo relay through host ping sockets.
    max_ping_sockets: int = 64
    ping_idle_timeout: float = 30.0
    # Frames read from the TAP per wake-up before host sockets get a turn.
    tap_batch: int = 512
    # Busy polling (seconds; 0: off): after a wake-up that moved traffic,
    # the loop polls without sleeping for up to this long before it sleeps.
    # A request/response peer answers within tens of microseconds, and a
    # sleep and wake-up cost about as much again on each side; Linux's
    # busy_read/busy_poll sysctls recommend the same 50 us. An idle forwarder
    # never spins: only a wake-up with ready file descriptors starts it.
    busy_poll: float = 50e-6
    # DHCP: how long an OFFERed address stays
    # reserved for a client that has not REQUESTed it yet (RFC 2131 4.3.1
    # leaves it to the server; a REQUEST follows within seconds), and how
    # long a DECLINEd address stays out of the pool (RFC 2131 4.3.3: "mark
    # the network address as not available").
    dhcp_offer_timeout: float = 60.0
    dhcp_decline_timeout: float = 600.0
    # TCP (protocol timers are in pyslirp.stack.config.TcpConfig; these
    # reach it through tcp_config(), the one mapping). Connections the stack tracks and
    # host sockets open at once: past it (or past the process's file
    # descriptor limit) new guest connections get RST, the others carry on.
    # 16,384: ten thousand from one guest with room to spare (a few KiB of
    # memory each while idle); the table is the smaller of this and what the
    # descriptors allow once RLIMIT_NOFILE is raised (descriptors.py).
    tcp_max_connections: int = 16384
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
    # Retransmission toward the guest (RFC 1122 4.2.3.5 R2, RFC 6298 2.5):
    # timeouts in a row before the connection is reset, and the largest
    # backed-off RTO. 12 and 60 s give up after about 6 minutes of silence.
    # The front end reads PYSLIRP_TCP_MAX_RETRANSMITS and PYSLIRP_TCP_MAX_RTO
    # (for tests that must see a timeout within seconds).
    tcp_max_retransmits: int = 12
    tcp_max_rto: float = 60.0
    # Keep-alive toward a silent guest (RFC 1122 4.2.3.6: not under 2 hours).
    tcp_keepalive_idle: float = 7200.0
    # Check the checksum of every segment from the guest (RFC 9293 3.1).
    tcp_verify_checksum: bool = True
    # Every byte held for the guest's flows, all together (TCP buffers,
    # reassembly, frames awaiting ARP/ND, DNS queries): Linux's tcp_mem.
    memory_budget: int = 256 * 1024 * 1024
    # Descriptors (pyslirp/nat/descriptors.py). Flows (UDP, TCP, ping) share
    # RLIMIT_NOFILE less what is open at start-up less these reserves, so a
    # guest that opens flows without end never takes the descriptors of:
    # published ports' listening sockets (-p and add_hostfwd)...
    fd_reserve_listeners: int = 64
    # ...the API socket and the clients it serves at once (api.MAX_CLIENTS)...
    fd_reserve_api: int = 17
    # ...(the DNS proxy's upstream sockets: dns_max_sockets) and the rest: the
    # pcap file, netlink, /proc reads, the accept guards' spare descriptors.
    fd_reserve_margin: int = 32
    # How long a listener whose accept() fails, even after shedding a client
    # with the spare descriptor, sleeps before it is polled again (a
    # level-triggered loop would otherwise call accept() again at once).
    accept_pause: float = 1.0
    # At most one log line per this many seconds for each kind of repeated
    # trouble (descriptors exhausted, an internal error in a handler).
    log_interval: float = 10.0

    # IPv6 (slirp4netns's -6): off by default as in
    # slirp4netns. The prefix is a /64 because the guest forms its address by
    # SLAAC (RFC 4862 5.5.3); the gateway is prefix::2 (and fe80::2), the DNS
    # proxy prefix::3.
    enable_ipv6: bool = False
    # As text, like ``cidr`` (``ipv6_network`` is the parsed form).
    ipv6_prefix: str = DEFAULT_IPV6_PREFIX
    # slirp4netns's --outbound-addr6: host sockets toward the outside over
    # IPv6 are bound to this address (None: the kernel chooses).
    outbound_addr6: str | None = None
    # Domain search list for the guest (RA DNSSL, DHCPv6 domain list);
    # empty means "the search line of /etc/resolv.conf", read by the front end.
    dns_search: list = factory(list)
    # Stateless DHCPv6 (RFC 8415 18.3.6): how often the guest should ask
    # again (INFORMATION_REFRESH_TIME; RFC 8415 21.23's default is 1 day).
    dhcpv6_refresh_time: int = 86400

    def __post_init__(self) -> None:
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValueError(f"MTU must be between {MIN_MTU} and {MAX_MTU}, got {self.mtu}")
        if self.enable_ipv6 and self.mtu < MIN_MTU_IPV6:
            raise ValueError(f"IPv6 needs an MTU of at least {MIN_MTU_IPV6}, got {self.mtu}")
        self.cidr = str(self.cidr)
        self.network, self.prefix_len = parse_network(self.cidr, _socket.AF_INET)
        self.ipv6_prefix = str(self.ipv6_prefix)
        self.ipv6_network, prefix_len6 = parse_network(self.ipv6_prefix, _socket.AF_INET6)
        if prefix_len6 != 64:
            raise ValueError(f"the IPv6 prefix must be a /64 (for SLAAC), not {self.ipv6_prefix}")
        if self.tcp_max_retransmits < 1 or not 0.2 <= self.tcp_max_rto <= 600:
            raise ValueError("TCP retransmission: at least 1 retry, a max RTO of 0.2 to 600 s")
        if self.prefix_len > 25:
            # room for .2, .3, .15 .. .15+pool and .100 (slirp4netns: "1-25")
            raise ValueError(f"CIDR {self.cidr} is too small: the prefix must be /25 or shorter")

    def host_bytes(self, offset: int) -> bytes:
        """Address ``offset`` of the network (2 is the gateway), 4 bytes."""
        return (int.from_bytes(self.network, "big") + offset).to_bytes(4, "big")

    def host(self, offset: int) -> str:
        return _socket.inet_ntoa(self.host_bytes(offset))

    @property
    def network_address(self) -> str:
        return self.host(0)

    @property
    def netmask(self) -> str:
        return _socket.inet_ntoa(((1 << 32) - (1 << (32 - self.prefix_len))).to_bytes(4, "big"))

    @property
    def broadcast(self) -> str:
        return self.host((1 << (32 - self.prefix_len)) - 1)

    @property
    def gateway(self) -> str:
        return self.host(2)

    @property
    def dns(self) -> str:
        return self.host(3)

    @property
    def dhcp_start(self) -> str:
        return self.host(15)

    @property
    def recommended_guest(self) -> str:
        return self.host(100)

    def ipv6_host_bytes(self, offset: int) -> bytes:
        return (int.from_bytes(self.ipv6_network, "big") + offset).to_bytes(16, "big")

    @property
    def ipv6_gateway(self) -> str:
        return _socket.inet_ntop(_socket.AF_INET6, self.ipv6_host_bytes(2))

    @property
    def ipv6_dns(self) -> str:
        return _socket.inet_ntop(_socket.AF_INET6, self.ipv6_host_bytes(3))

    def stack_config(self) -> StackConfig:
        """The sans-IO stack's settings (addresses, MTU, offload, budget)."""
        from pyslirp.stack.config import StackConfig

        gateway = self.host_bytes(2)
        return StackConfig(
            network=self.network,
            prefix_len=self.prefix_len,
            gateway=gateway,
            dns=self.host_bytes(3),
            gateway_mac=b"\x52\x55" + gateway,
            mtu=self.mtu,
            offload=self.offload,
            memory_budget=self.memory_budget,
            isn_key=self.isn_key,
            ipv6=self.enable_ipv6,
            ipv6_prefix=self.ipv6_network,
            ipv6_prefix_len=64,
            ipv6_gateway=self.ipv6_host_bytes(2),
            ipv6_dns=self.ipv6_host_bytes(3),
            dns_search=tuple(self.dns_search),
            tcp=self.tcp_config(),
        )

    def tcp_config(self) -> TcpConfig:
        """The TCP layer's settings: the tcp_* fields, and nothing else sets them."""
        from pyslirp.stack.config import TcpConfig

        return TcpConfig(
            max_connections=self.tcp_max_connections,
            receive_buffer=self.tcp_receive_buffer,
            send_buffer=self.tcp_send_buffer,
            time_wait_timeout=self.tcp_time_wait_timeout,
            keepalive_idle=self.tcp_keepalive_idle,
            max_retransmits=self.tcp_max_retransmits,
            max_rto=self.tcp_max_rto,
            verify_checksum=self.tcp_verify_checksum,
        )


def parse_network(text: str, family: int) -> tuple[bytes, int]:
    """``ADDRESS/PREFIX`` (IPv4 or IPv6 by ``family``) as (packed address,
    prefix length); ValueError unless it is a network address (no host
    bits set), as ipaddress's strict networks."""
    address, slash, prefix_text = text.partition("/")
    bits = 32 if family == _socket.AF_INET else 128
    try:
        packed = _socket.inet_pton(family, address)
    except (OSError, ValueError):
        raise ValueError(f"{text!r} is not an IPv{4 if bits == 32 else 6} network") from None
    prefix_len = int(prefix_text) if prefix_text.isdigit() else -1 if slash else bits
    if not 0 <= prefix_len <= bits:
        raise ValueError(f"{text!r}: the prefix length must be 0 to {bits}")
    if int.from_bytes(packed, "big") & ((1 << (bits - prefix_len)) - 1):
        raise ValueError(f"{text!r} has host bits set")
    return packed, prefix_len


def is_address(text: str) -> int:
    """4 or 6 if ``text`` is an IPv4 or IPv6 address (without a zone), else 0."""
    for family, version in ((_socket.AF_INET, 4), (_socket.AF_INET6, 6)):
        try:
            _socket.inet_pton(family, text)
            return version
        except (OSError, ValueError):
            pass
    return 0


def read_resolv_conf(path: str = "/etc/resolv.conf", ipv6: bool = False) -> list[tuple[str, int]]:
    """Every IPv4 nameserver in resolv.conf (and the IPv6 ones if ``ipv6``),
    as (address, 53); an IPv6 one keeps its zone ("fe80::1%eth0")."""
    upstreams = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    address = parts[1].split("%")[0]
                    version = is_address(address)
                    if version == 4:
                        upstreams.append((address, 53))
                    elif version == 6 and ipv6:
                        upstreams.append((parts[1], 53))  # with its zone
    except OSError:
        pass
    return upstreams


def read_resolv_conf_search(path: str = "/etc/resolv.conf") -> list[str]:
    """The domain search list of resolv.conf (its last search or domain line)."""
    search: list[str] = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] in ("search", "domain"):
                    search = parts[1:] if parts[0] == "search" else parts[1:2]
    except OSError:
        pass
    return [name for name in search if valid_domain(name)]


def valid_domain(name: str) -> bool:
    """A name fit for DNSSL and DHCPv6 (RFC 1035 2.3.4: labels of 1 to 63
    bytes, at most 253 in all; letters, digits, hyphens and underscores)."""
    name = name.rstrip(".")
    if not name or len(name) > 253:
        return False
    return all(
        0 < len(label) <= 63 and all(c.isascii() and (c.isalnum() or c in "-_") for c in label)
        for label in name.split(".")
    )
