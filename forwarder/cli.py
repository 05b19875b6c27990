"""The command line: pyslirp-forwarder [OPTION]... PATH | PID TAPNAME | -- COMMAND.

Every slirp4netns 1.2 option is accepted with its spelling, default and (where
it has one) error wording, so that rootlesskit and podman can run us in its
place; ours sit beside them. Every error is one line on stderr and exit status
1, and leaves no mount, namespace, TAP or socket file behind.

Lifecycle, as slirp4netns: set up the TAP, the forwards (-p) and the API
socket; enter the sandbox and the seccomp filter if asked; write "1" to the
ready fd and close it; serve until SIGINT/SIGTERM or a hang-up on the exit
fd; then close every host socket, remove the API socket and the bind mount,
and exit 0.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import ipaddress
import logging
import os
import re
import select
import signal
import socket
import struct
import sys

from pyslirp.nat.compat import if_nametoindex

PROG = "pyslirp-forwarder"
DEFAULT_CIDR = "10.0.2.0/24"
DEFAULT_TAP = "tap0"
NETWORK_PREFIX_MIN = 1
# The recommended guest address is network + 100, so a /26 or longer has no
# room for it; slirp4netns refuses those too.
NETWORK_PREFIX_MAX = 25
LOG_LEVELS = ("debug", "info", "warning", "error")
_CIDR_FORM = re.compile(r"^((\d{1,3}\.){3}\d{1,3})/(\d{1,2})$")
_PUBLISH_FORM = re.compile(
    r"^(?:(?P<addr>[^:/\[\]]+):)?(?P<host>\d{1,5}):(?P<guest>\d{1,5})(?:/(?P<proto>[a-z]+))?$"
)
_PUBLISH6_FORM = re.compile(
    r"^\[(?P<addr>[0-9A-Fa-f:.]+)\]:(?P<host>\d{1,5}):(?P<guest>\d{1,5})(?:/(?P<proto>[a-z]+))?$"
)
SIOCGIFADDR = 0x8915

USAGE = f"""\
Usage: {PROG} [OPTION]... PATH
       {PROG} [OPTION]... PID|PATH TAPNAME
       {PROG} [OPTION]... -- COMMAND [ARG]...
User-mode networking for unprivileged network namespaces, in pure Python.

With PATH alone, create a network namespace with a TAP named {DEFAULT_TAP} and
bind-mount it on PATH (an existing file); enter it with nsenter --net=PATH.
With PID (or PATH and --netns-type=path) and TAPNAME, create TAPNAME in the
network namespace of PID (or at PATH), as slirp4netns does. With -- COMMAND,
run COMMAND in new user (unless root), mount and network namespaces set up
as with -c, with a resolv.conf that names the DNS proxy, and exit with its
status.

-c, --configure          bring up the interface
-e, --exit-fd=FD         specify the FD for terminating {PROG}
-r, --ready-fd=FD        specify the FD to write to when the network is configured
-m, --mtu=MTU            specify MTU (default=1500, max=65520)
-6, --enable-ipv6        enable IPv6 (prefix fd00::/64, gateway fd00::2, DNS fd00::3;
                         the guest configures itself by SLAAC)
-a, --api-socket=PATH    specify API socket path
--cidr=CIDR              specify network address CIDR (default={DEFAULT_CIDR})
--disable-host-loopback  prohibit connecting to 127.0.0.1:* on the host namespace
--netns-type=TYPE        specify network namespace type ([path|pid], default=pid)
--userns-path=PATH       specify user namespace path
--enable-sandbox         create a new mount namespace (and drop all caps except \
CAP_NET_BIND_SERVICE if running as the root)
--enable-seccomp         enable seccomp to limit syscalls
--outbound-addr=IPv4     sets outbound ipv4 address to bound to
--outbound-addr6=IPv6    sets outbound ipv6 address to bound to
--disable-dns            disables 10.0.2.3 (or configured internal ip) to host dns redirect
--macaddress=MAC         specify the MAC address of the TAP (only valid with -c)
--target-type=TYPE       specify the target type ([netns], default=netns)
-p, --publish=[HOST_ADDR:]HOST_PORT:GUEST_PORT[/tcp|/udp]
                         forward a host port to the guest (repeatable;
                         default HOST_ADDR=0.0.0.0, protocol tcp; with -6,
                         [IPv6]:HOST_PORT:GUEST_PORT goes to the guest's
                         IPv6 address)
--ipv6-prefix=PREFIX     the guest's IPv6 /64 (default=fd00::/64; "random":
                         a random unique local prefix, RFC 4193)
--dns-search=DOMAIN      search domain announced with IPv6 (RA, DHCPv6)
                         (repeatable; default=the search line of
                         /etc/resolv.conf)
--backend=NAME           specify the backend ([BACKENDS], default=python)
--pcap=FILE              write every frame to and from the TAP to FILE (pcap)
--no-offload             open the TAP without virtio-net offloads (checksum,
                         TSO: on by default with the python backend)
--busy-poll=USEC         poll without sleeping for up to USEC microseconds
                         after traffic (python backend; default=50, 0: off,
                         max=1000)
--memory-budget=SIZE     bytes held for the guest's flows at most, all
                         together (python backend; K, M, G suffixes,
                         binary; default=256M, min=1M)
--dns-upstream=ADDR[:PORT]
                         resolver for the DNS proxy (repeatable;
                         default=every nameserver in /etc/resolv.conf)
--log-level=LEVEL        [debug|info|warning|error] (default=warning)
-h, --help               show this help and exit
-v, --version            show version and exit
"""


class UsageError(Exception):
    """A bad command line; the message is one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit 2
        raise UsageError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, add_help=False, allow_abbrev=False)
    p.add_argument("-c", "--configure", action="store_true")
    p.add_argument("-e", "--exit-fd", default=None)
    p.add_argument("-r", "--ready-fd", default=None)
    p.add_argument("-m", "--mtu", default="1500")
    p.add_argument("-6", "--enable-ipv6", action="store_true")
    p.add_argument("-a", "--api-socket", default=None)
    p.add_argument("--cidr", default=DEFAULT_CIDR)
    p.add_argument("--disable-host-loopback", action="store_true")
    p.add_argument("--no-host-loopback", action="store_true")  # deprecated spelling
    p.add_argument("--netns-type", default=None)
    p.add_argument("--userns-path", default=None)
    p.add_argument("--enable-sandbox", action="store_true")
    p.add_argument("--create-sandbox", action="store_true")  # deprecated spelling
    p.add_argument("--enable-seccomp", action="store_true")
    p.add_argument("--outbound-addr", default=None)
    p.add_argument("--outbound-addr6", default=None)
    p.add_argument("--disable-dns", action="store_true")
    p.add_argument("--macaddress", default=None)
    p.add_argument("--target-type", default=None)
    p.add_argument("-p", "--publish", action="append", default=[])
    p.add_argument("--ipv6-prefix", default=None)
    p.add_argument("--dns-search", action="append", default=[])
    p.add_argument("--backend", default="python")
    p.add_argument("--pcap", default=None)
    p.add_argument("--no-offload", action="store_true")
    p.add_argument("--busy-poll", default="50")
    p.add_argument("--dns-upstream", action="append", default=[])
    p.add_argument("--memory-budget", default="256M")
    p.add_argument("--log-level", default="warning")
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("-v", "--version", action="store_true")
    p.add_argument("args", nargs="*")
    return p


def version_text() -> str:
    # slirp4netns's layout ("NAME version X" then "key: value" lines), which
    # is meant to be machine-parsable.
    from pyslirp import __version__
    from pyslirp.backend import BACKENDS

    py = ".".join(str(n) for n in sys.version_info[:3])
    return f"{PROG} version {__version__}\nbackends: {', '.join(BACKENDS)}\npython: {py}\n"


# ------------------------------------------------------------ validation
def parse_mtu(text: str) -> int:
    from pyslirp.config import MAX_MTU, MIN_MTU

    try:
        mtu = int(text, 10)
    except ValueError:
        mtu = None
    if mtu is None or not MIN_MTU <= mtu <= MAX_MTU:
        raise UsageError(f"MTU must be an integer from {MIN_MTU} to {MAX_MTU}, not {text!r}")
    return mtu


MIN_MEMORY_BUDGET = 1 << 20  # below a MiB one 1 MiB window would not fit
_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_memory_budget(text: str) -> int:
    """--memory-budget: bytes, or K, M, G (powers of 1024)."""
    match = re.fullmatch(r"(\d{1,15})([KMG]?)", text.strip().upper())
    size = int(match.group(1)) * _SIZE_SUFFIXES[match.group(2)] if match else None
    if size is None or size < MIN_MEMORY_BUDGET:
        raise UsageError(
            f"--memory-budget must be a size of at least 1M (bytes, or with K, M or G), "
            f"not {text!r}"
        )
    return size


MAX_BUSY_POLL_US = 1000


def parse_busy_poll(text: str) -> float:
    """--busy-poll in microseconds, as seconds."""
    try:
        usec = int(text, 10)
    except ValueError:
        usec = None
    if usec is None or not 0 <= usec <= MAX_BUSY_POLL_US:
        raise UsageError(
            f"--busy-poll must be an integer from 0 to {MAX_BUSY_POLL_US} (microseconds), "
            f"not {text!r}"
        )
    return usec / 1e6


def tcp_retransmission_from_env(environ) -> dict:
    """PYSLIRP_TCP_MAX_RETRANSMITS and PYSLIRP_TCP_MAX_RTO (seconds): not
    options, a tuning kept for tests that must see TCP give up in seconds."""
    fields = {}
    for name, key, kind in (
        ("PYSLIRP_TCP_MAX_RETRANSMITS", "tcp_max_retransmits", int),
        ("PYSLIRP_TCP_MAX_RTO", "tcp_max_rto", float),
    ):
        text = environ.get(name)
        if text:
            try:
                fields[key] = kind(text)
            except ValueError:
                raise UsageError(f"invalid {name} {text!r}: not a number") from None
    return fields


def parse_cidr(text: str) -> ipaddress.IPv4Network:
    """slirp4netns's checks and messages."""
    match = _CIDR_FORM.match(text)
    if not match:
        raise UsageError(f"invalid CIDR: {text}")
    try:
        address = ipaddress.IPv4Address(match.group(1))
    except ValueError:
        raise UsageError(f"invalid network address: {match.group(1)}") from None
    prefix = int(match.group(3))
    if not NETWORK_PREFIX_MIN <= prefix <= NETWORK_PREFIX_MAX:
        raise UsageError(f"prefix length needs to be {NETWORK_PREFIX_MIN}-{NETWORK_PREFIX_MAX}")
    try:
        return ipaddress.IPv4Network(f"{address}/{prefix}")
    except ValueError:
        raise UsageError(
            "CIDR needs to be a network address like 10.0.2.0/24, not like 10.0.2.100/24"
        ) from None


def parse_upstream(text: str) -> tuple[str, int]:
    """ADDR[:PORT], with an IPv6 ADDR bare or as [ADDR]:PORT."""
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]")
        if not sep or (port_text and not port_text.startswith(":")):
            host = ""  # refused below
        port_text = port_text[1:] if port_text else "53"
    elif text.count(":") > 1:
        host, port_text = text, "53"
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, "53"
    try:
        address = ipaddress.ip_address(host.split("%")[0])
        port = int(port_text, 10)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise UsageError(
            f"invalid --dns-upstream {text!r}: expected ADDR[:PORT], e.g. 127.0.0.1:5353 "
            "or [::1]:5353"
        ) from None
    return (host if address.version == 6 else str(address)), port


def parse_fd(text: str | None, name: str) -> int | None:
    """-e/-r: slirp4netns's wording; the descriptor must be open too."""
    if text is None:
        return None
    try:
        fd = int(text, 10)
    except ValueError:
        fd = -1
    if fd < 0:
        raise UsageError(f"{name} must be a non-negative integer")
    try:
        os.fstat(fd)
    except OSError as exc:
        raise UsageError(f"{name} {fd}: {exc.strerror}") from None
    if fd > 2:
        os.set_inheritable(fd, False)  # not for COMMAND in the run mode
    return fd


def parse_mac(text: str) -> str:
    parts = text.split(":")
    try:
        octets = bytes(int(p, 16) for p in parts if len(p) in (1, 2))
    except ValueError:
        octets = b""
    if len(parts) != 6 or len(octets) != 6:
        raise UsageError(
            f'"{text}" is an invalid MAC address: it has to be 6 bytes in hex, '
            "each separated by a ':'"
        )
    if octets[0] & 1:
        raise UsageError(f'"{text}" is an invalid MAC address: it is a multicast address')
    if octets == bytes(6):
        raise UsageError(f'"{text}" is an invalid MAC address: it is all zero')
    return ":".join(f"{b:02x}" for b in octets)


def interface_ipv4(name: str) -> str | None:
    """The IPv4 address of interface ``name`` in our network namespace."""
    if not name or len(name.encode()) >= 16:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            ifreq = fcntl.ioctl(sock, SIOCGIFADDR, struct.pack("16s16x", name.encode()))
        except OSError:
            return None
    return socket.inet_ntoa(ifreq[20:24])


def parse_outbound_addr(text: str) -> str:
    try:
        address = str(ipaddress.IPv4Address(text))
    except ValueError:
        address = interface_ipv4(text)
    if address is None:
        raise UsageError("outbound-addr has to be valid ipv4 address or interface name.")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError as exc:
            raise UsageError(f"--outbound-addr {address}: {exc.strerror}") from None
    return address


def interface_ipv6(name: str) -> str | None:
    """A global IPv6 address of interface ``name`` (from /proc/net/if_inet6)."""
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                fields = line.split()
                # address, index, prefix length, scope (0: global), flags, name
                if len(fields) >= 6 and fields[5] == name and fields[3] == "00":
                    return str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
    except (OSError, ValueError):
        pass
    return None


def parse_outbound_addr6(text: str) -> str:
    try:
        address = str(ipaddress.IPv6Address(text))
    except ValueError:
        address = None
    if address is None:
        try:
            if_nametoindex(text)
        except OSError:
            raise UsageError(
                "outbound-addr6 has to be valid ipv6 address or interface name."
            ) from None
        address = interface_ipv6(text)
        if address is None:
            raise UsageError(f"--outbound-addr6 {text}: the interface has no global IPv6 address")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind((address, 0))
    except OSError as exc:
        raise UsageError(f"--outbound-addr6 {address}: {exc.strerror}") from None
    return address


def parse_ipv6_prefix(text: str) -> ipaddress.IPv6Network:
    """--ipv6-prefix: a /64 (bare address or PREFIX/64), or "random"."""
    if text == "random":
        # RFC 4193 3.2: fd00::/8, a 40-bit random global ID, subnet 0.
        global_id = os.urandom(5)
        return ipaddress.IPv6Network((b"\xfd" + global_id + bytes(10), 64))
    try:
        network = ipaddress.IPv6Network(text if "/" in text else f"{text}/64")
    except ValueError as exc:
        raise UsageError(f"invalid --ipv6-prefix {text!r}: {exc}") from None
    if network.prefixlen != 64:
        raise UsageError(f"invalid --ipv6-prefix {text!r}: SLAAC needs a /64")
    address = network.network_address
    if (
        address.is_multicast
        or address.is_link_local
        or address.is_loopback
        or (address.is_unspecified or address.ipv4_mapped is not None)
    ):
        raise UsageError(f"invalid --ipv6-prefix {text!r}: not a unicast prefix")
    return network


def parse_publish(text: str, ipv6: bool = False) -> tuple[str, str, int, int]:
    """-p [HOST_ADDR:]HOST_PORT:GUEST_PORT[/tcp|/udp] -> (proto, addr, host, guest);
    with ``ipv6``, HOST_ADDR may be [IPv6]."""
    form = "expected [HOST_ADDR:]HOST_PORT:GUEST_PORT[/tcp|/udp], e.g. 8080:80/tcp"
    v6 = text.startswith("[") or text.count(":") > 2
    if v6 and not ipv6:
        raise UsageError(f"invalid --publish {text!r}: IPv6 host addresses need --enable-ipv6")
    match = (_PUBLISH6_FORM if v6 else _PUBLISH_FORM).match(text)
    if not match:
        if v6:
            form = "expected [IPv6]:HOST_PORT:GUEST_PORT[/tcp|/udp], e.g. [::1]:8080:80"
        raise UsageError(f"invalid --publish {text!r}: {form}")
    proto = match.group("proto") or "tcp"
    if proto not in ("tcp", "udp"):
        raise UsageError(f"invalid --publish {text!r}: the protocol must be tcp or udp")
    addr = match.group("addr") or "0.0.0.0"
    family = socket.AF_INET6 if v6 else socket.AF_INET
    try:
        socket.inet_pton(family, addr)
    except OSError:
        kind = "IPv6" if v6 else "IPv4"
        raise UsageError(f"invalid --publish {text!r}: {addr!r} is not an {kind} address") from None
    host_port, guest_port = int(match.group("host")), int(match.group("guest"))
    for port in (host_port, guest_port):
        if not 1 <= port <= 65535:
            raise UsageError(f"invalid --publish {text!r}: ports are 1 to 65535")
    return proto, addr, host_port, guest_port


# --------------------------------------------------------------- options
class Options:
    """The validated command line."""

    def __init__(self, ns, command: list[str] | None = None) -> None:
        from pyslirp.backend import BACKENDS
        from pyslirp.config import (
            DEFAULT_IPV6_PREFIX,
            NetworkConfig,
            read_resolv_conf,
            read_resolv_conf_search,
            valid_domain,
        )

        from .namespace import ExistingNamespace, NewNamespace

        self.warnings: list[str] = []
        self.command = command
        self.enable_ipv6 = ns.enable_ipv6
        if ns.target_type not in (None, "netns"):
            if ns.target_type == "bess":
                raise UsageError("--target-type=bess is not supported")
            raise UsageError('--target-type must be either "netns" or "bess"')
        if ns.no_host_loopback:
            self.warnings.append(
                "WARNING: --no-host-loopback is deprecated and will be removed in future "
                "releases, please use --disable-host-loopback instead."
            )
        if ns.create_sandbox:
            self.warnings.append(
                "WARNING: --create-sandbox is deprecated and will be removed in future "
                "releases, please use --enable-sandbox instead."
            )
        self.configure = ns.configure or command is not None
        if ns.backend not in BACKENDS:
            raise UsageError(f"unknown backend {ns.backend!r} (available: {', '.join(BACKENDS)})")
        self.backend = ns.backend
        # Virtio offloads on the TAP: only the python backend reads vnet headers.
        self.offload = ns.backend == "python" and not ns.no_offload
        if ns.log_level.lower() not in LOG_LEVELS:
            raise UsageError(
                f"invalid --log-level {ns.log_level!r} (choose from {', '.join(LOG_LEVELS)})"
            )
        self.log_level = ns.log_level.upper()
        # The run mode is for people: the banner only when they ask for logs.
        self.quiet = command is not None and self.log_level not in ("DEBUG", "INFO")
        self.exit_fd = parse_fd(ns.exit_fd, "exit-fd")
        self.ready_fd = parse_fd(ns.ready_fd, "ready-fd")
        mtu = parse_mtu(ns.mtu)
        busy_poll = parse_busy_poll(ns.busy_poll)
        memory_budget = parse_memory_budget(ns.memory_budget)
        cidr = parse_cidr(ns.cidr)
        self.macaddress = None
        if ns.macaddress is not None:
            if not self.configure:
                raise UsageError(
                    "--macaddr cannot be specified when --configure or -c is not specified"
                )
            self.macaddress = parse_mac(ns.macaddress)
        self.outbound_addr = (
            parse_outbound_addr(ns.outbound_addr) if ns.outbound_addr is not None else None
        )
        self.outbound_addr6 = None
        if ns.outbound_addr6 is not None:
            self.outbound_addr6 = parse_outbound_addr6(ns.outbound_addr6)
            if not self.enable_ipv6:
                self.warnings.append(
                    "WARNING: --outbound-addr6 has no effect without --enable-ipv6"
                )
        ipv6_prefix = parse_ipv6_prefix(ns.ipv6_prefix or DEFAULT_IPV6_PREFIX)
        if ns.ipv6_prefix is not None and not self.enable_ipv6:
            raise UsageError("--ipv6-prefix needs --enable-ipv6")
        for name in ns.dns_search:
            if not valid_domain(name):
                raise UsageError(f"invalid --dns-search {name!r}: not a domain name")
        dns_search = list(ns.dns_search)
        if not dns_search and self.enable_ipv6:
            dns_search = read_resolv_conf_search()
        self.publish = [parse_publish(p, self.enable_ipv6) for p in ns.publish]
        self.api_socket = ns.api_socket
        if self.api_socket is not None and len(os.fsencode(self.api_socket)) >= 108:
            raise UsageError("the specified API socket path is too long (>= 108)")
        self.enable_sandbox = ns.enable_sandbox or ns.create_sandbox
        self.enable_seccomp = ns.enable_seccomp
        if self.enable_seccomp:
            from .sandbox import SandboxError, _arch

            try:
                _arch()
            except SandboxError as exc:
                raise UsageError(str(exc)) from None
        upstreams = [parse_upstream(u) for u in ns.dns_upstream]
        self.upstreams_from = "command line" if upstreams else "/etc/resolv.conf"
        if not upstreams:
            upstreams = read_resolv_conf(ipv6=self.enable_ipv6)
        if ns.pcap is not None:
            try:
                with open(ns.pcap, "ab"):
                    pass
            except OSError as exc:
                raise UsageError(f"cannot write pcap file {ns.pcap}: {exc.strerror}") from None
        try:
            self.config = NetworkConfig(
                cidr=cidr,
                mtu=mtu,
                disable_host_loopback=ns.disable_host_loopback or ns.no_host_loopback,
                dns_upstreams=upstreams,
                pcap_path=ns.pcap,
                outbound_addr=self.outbound_addr,
                disable_dns=ns.disable_dns,
                enable_ipv6=self.enable_ipv6,
                ipv6_prefix=ipv6_prefix,
                outbound_addr6=self.outbound_addr6,
                dns_search=dns_search,
                busy_poll=busy_poll,
                **tcp_retransmission_from_env(os.environ),
                memory_budget=memory_budget,
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        guest = str(self.config.recommended_guest)
        # An IPv6 forward goes to "::": the guest's SLAAC address, once learned.
        self.publish = [
            (proto, addr, hp, "::" if ":" in addr else guest, gp)
            for proto, addr, hp, gp in self.publish
        ]

        # Positional arguments, as slirp4netns reads them.
        args = ns.args
        netns_type = ns.netns_type
        if netns_type not in (None, "pid", "path"):
            if netns_type == "tapfd":
                raise UsageError("--netns-type=tapfd is not supported yet")
            raise UsageError('--netns-type must be either "pid" or "path"')
        if ns.userns_path is not None and not os.path.exists(ns.userns_path):
            raise UsageError(f"userns path doesn't exist: {ns.userns_path}")
        self.userns_path = ns.userns_path
        if command is not None:
            if args:
                raise UsageError("PATH, PID or TAPNAME cannot be combined with -- COMMAND")
            if netns_type is not None or ns.userns_path is not None:
                raise UsageError(
                    "--netns-type and --userns-path cannot be combined with -- COMMAND"
                )
            if not command:
                raise UsageError("missing COMMAND after -- (see --help)")
            self.target = None  # made by the run mode
            self.tap = DEFAULT_TAP
            self.where = "network namespace of COMMAND"
            return
        if not args:
            raise UsageError("missing PATH, or PID and TAPNAME (see --help)")
        if len(args) > 2:
            # slirp4netns warns and goes on, for compatibility.
            print("WARNING: too many arguments", file=sys.stderr)
        if len(args) == 1 and netns_type is None:
            path = args[0]
            if path.isdigit() and not os.path.exists(path):
                raise UsageError(f"TAPNAME is required after the PID {path} (see --help)")
            if ns.userns_path is not None:
                raise UsageError("--userns-path needs the PID or PATH TAPNAME form")
            if not os.path.exists(path):
                raise UsageError(
                    f"namespace file {path} does not exist (create it first, e.g. touch {path})"
                )
            self.target = NewNamespace(path)
            self.tap = DEFAULT_TAP
            self.where = f"new network namespace, bound at {path}"
            return
        if len(args) == 1:
            raise UsageError("TAPNAME is required with --netns-type (see --help)")
        first, self.tap = args[0], args[1]
        if netns_type in (None, "pid"):
            try:
                pid = int(first, 10)
            except ValueError:
                pid = 0
            if pid <= 0:
                raise UsageError("PID must be a positive integer")
            userns = ns.userns_path or f"/proc/{pid}/ns/user"
            self.target = ExistingNamespace(f"/proc/{pid}/ns/net", userns)
            self.where = f"network namespace of PID {pid}"
        else:
            if not os.path.exists(first):
                raise UsageError(
                    "existing path expected when --netns-type=path: No such file or directory"
                )
            self.target = ExistingNamespace(first, ns.userns_path)
            self.where = f"network namespace at {first}"


def parse(argv: list[str]) -> tuple[str | None, Options | None]:
    """Returns (text to print and exit 0, None) or (None, options)."""
    command = None
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1 :]
    parser = _parser()
    ns = parser.parse_intermixed_args(argv)
    if ns.help:
        from pyslirp.backend import BACKENDS

        return USAGE.replace("BACKENDS", "|".join(BACKENDS)), None
    if ns.version:
        return version_text(), None
    return None, Options(ns, command)


# ---------------------------------------------------------------- banner
def banner(options: Options) -> str:
    config = options.config
    dhcp_end = config.dhcp_start + config.dhcp_pool_size - 1
    upstreams = ", ".join(f"{a}:{p}" for a, p in config.dns_upstreams) or "none"
    lines = [
        f"Starting slirp ({PROG}, backend {options.backend})",
        f"* MTU:             {config.mtu}",
        f"* Network:         {config.cidr.network_address}",
        f"* Netmask:         {config.cidr.netmask}",
        f"* Gateway:         {config.gateway}",
        f"* DNS:             {config.dns}",
        f"* DHCP begin:      {config.dhcp_start}",
        f"* DHCP end:        {dhcp_end}",
        f"* Recommended IP:  {config.recommended_guest}",
        f"* TAP:             {options.tap} in the {options.where}",
        f"* DNS upstreams:   {upstreams} (from {options.upstreams_from})",
    ]
    if config.enable_ipv6:
        lines += [
            f"* IPv6 prefix:     {config.ipv6_prefix} (the guest takes its address by SLAAC)",
            f"* IPv6 gateway:    {config.ipv6_gateway} (also fe80::2)",
            f"* IPv6 DNS:        {config.ipv6_dns}",
        ]
        if config.dns_search:
            lines.append(f"* DNS search:      {' '.join(config.dns_search)}")
        if config.outbound_addr6:
            lines.append(f"* Outbound IPv6:   {config.outbound_addr6}")
    if options.api_socket:
        lines.append(f"* API Socket:      {options.api_socket}")
    if config.outbound_addr:
        lines.append(f"* Outbound IPv4:   {config.outbound_addr}")
    if options.macaddress:
        lines.append(f"* MAC address:     {options.macaddress}")
    for proto, addr, host_port, guest, guest_port in options.publish:
        if ":" in addr:
            target = "the guest's IPv6 address" if guest == "::" else f"[{guest}]"
            source = f"[{addr}]:{host_port}"
        else:
            target, source = guest, f"{addr}:{host_port}"
        lines.append(f"* Publish:         {proto} {source} -> {target}:{guest_port}")
    if config.pcap_path:
        lines.append(f"* Pcap:            {config.pcap_path}")
    if config.disable_dns:
        lines.append(f"* DNS proxy:       disabled ({config.dns} answers port unreachable)")
    if not config.disable_host_loopback:
        lines.append(
            f"WARNING: 127.0.0.1:* on the host is accessible as {config.gateway} "
            "(set --disable-host-loopback to prohibit connecting to 127.0.0.1:*)"
        )
        if config.enable_ipv6:
            lines.append(
                f"WARNING: [::1]:* on the host is accessible as [{config.ipv6_gateway}] "
                "(set --disable-host-loopback to prohibit connecting to [::1]:*)"
            )
    if not config.dns_upstreams and not config.disable_dns:
        lines.append(f"WARNING: no DNS upstream: queries to {config.dns} will go unanswered")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ main
def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return 1


class SetupError(Exception):
    """A failure after the namespace is attached; one line for the user."""


def _preload(backend) -> None:
    """Import now what the loop may import later: after pivot_root the
    Python library is out of reach."""
    import pyslirp.nat.forward  # noqa: F401
    import pyslirp.pcap  # noqa: F401

    if backend.name == "libslirp":
        import pyslirp.libslirp  # noqa: F401


def _watch_exit_fd(backend, fd: int, request_stop) -> None:
    """-e: stop when the descriptor reports hang-up (or an error); data on
    it is read and ignored."""

    def on_ready(mask: int, now: float) -> None:
        poller = select.poll()
        poller.register(fd, 0)  # only POLLHUP, POLLERR, POLLNVAL are reported
        if poller.poll(0):
            logging.getLogger("pyslirp").info("exitfd event")
            backend.unregister(fd)
            request_stop()
            return
        try:
            if os.read(fd, 4096) == b"":
                backend.unregister(fd)
                request_stop()
        except OSError:
            pass

    backend.register(fd, 1, on_ready)


def _signal_ready(fd: int) -> None:
    try:
        while True:
            try:
                os.write(fd, b"1")
                break
            except InterruptedError:
                continue
    except OSError as exc:
        logging.getLogger("pyslirp").warning("ready-fd %d: %s", fd, exc.strerror)
    finally:
        os.close(fd)


def serve(options: Options, on_signal=None, on_ready=None) -> int:
    """Attach to options.target and carry its traffic until told to stop.

    ``on_signal(signum)`` may claim SIGINT/SIGTERM (return True) instead of
    stopping; ``on_ready(backend, request_stop)`` runs once everything is set
    up, before the sandbox and the ready fd (the run mode uses both)."""
    from pyslirp.nat.descriptors import raise_soft_limit

    from .namespace import LinkSetup, NewNamespace, StartupError, attach

    # Container runtimes start us with a soft RLIMIT_NOFILE of 1024: take the
    # hard limit, from which the flow tables are sized (pyslirp/nat/descriptors.py).
    raise_soft_limit()
    # Stop on SIGINT/SIGTERM through a pipe that the backend watches; a
    # signal during start-up makes the backend return at once.
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def request_stop() -> None:
        try:
            os.write(stop_w, b"s")
        except OSError:
            pass

    def handle_signal(signum, frame):
        if on_signal is not None and on_signal(signum):
            return
        request_stop()

    previous = {s: signal.signal(s, handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    config = options.config
    setup = LinkSetup(
        loopback_up=isinstance(options.target, NewNamespace) or options.configure,
        configure=options.configure,
        mtu=config.mtu,
        address=str(config.recommended_guest),
        prefix_len=config.cidr.prefixlen,
        gateway=str(config.gateway),
        mac=options.macaddress,
        report=not options.quiet,
        ipv6=config.enable_ipv6,
        offload=options.offload,
    )
    log = logging.getLogger("pyslirp")
    try:
        from pyslirp.backend import create_backend

        try:
            # Made before the namespace work, so that a backend that cannot
            # start (a missing library) leaves nothing to undo.
            backend = create_backend(options.backend, config)
        except Exception as exc:
            return _fail(str(exc).splitlines()[0] if str(exc) else repr(exc))
        for option, wanted in (
            ("outbound_addr", config.outbound_addr),
            ("disable_dns", config.disable_dns),
            ("enable_ipv6", config.enable_ipv6),
            ("outbound_addr6", config.outbound_addr6),
        ):
            if wanted and option not in backend.supported_options:
                backend.close()
                flag = "--" + option.replace("_", "-")
                return _fail(f"{flag} is not supported by the {backend.name} backend yet")
        try:
            attachment = attach(options.target, options.tap, setup)
        except StartupError as exc:
            backend.close()
            return _fail(str(exc))
        config.offload = attachment.offload
        api = None
        keeper = None
        slaac = None
        log_timer = None
        try:
            for line in options.warnings:
                print(line, file=sys.stderr if options.quiet else sys.stdout)
            if not options.quiet:
                sys.stdout.write(banner(options))
                sys.stdout.flush()
            _set_up(options, backend, attachment.tap_fd, stop_r, request_stop)
            log_timer = _serve_log_limits(backend)
            if options.api_socket is not None:
                from .api import Api, ApiError, ApiServer

                api = ApiServer(options.api_socket, Api(backend, config))
                try:
                    api.listen()
                except ApiError as exc:
                    raise SetupError(str(exc)) from None
                api.attach(backend)
            if attachment.netlink_fd >= 0:
                # -c -6: ready (and COMMAND) once the guest has done SLAAC.
                slaac = _watch_slaac(options, backend, attachment, request_stop, on_ready)
            elif on_ready is not None:
                on_ready(backend, request_stop)
            if options.enable_sandbox or options.enable_seccomp:
                keeper = _lock_down(options, backend, attachment, api)
            if options.ready_fd is not None and slaac is None:
                _signal_ready(options.ready_fd)
                options.ready_fd = None
            # What start-up made lives as long as the process: the cycle collector
            # need not look at it again (only connections come and go from here on).
            # Connections leave no cycles (see TcpNat._release), so reference
            # counting frees them; the collector is a safety net. It looks at
            # new objects after 20,000 rather than 700 of them, and at old ones
            # (thousands of TIME-WAIT connections) 50 and 5,000 times less
            # often than by default: it cost a few per cent of a connect/close run.
            if hasattr(gc, "freeze"):  # not in PyPy
                gc.freeze()
                gc.set_threshold(20000, 50, 100)
            backend.run(attachment.tap_fd, stop_r)
        except SetupError as exc:
            return _fail(str(exc))
        except Exception as exc:
            log.debug("backend failed", exc_info=True)
            return _fail(f"backend {options.backend} failed: {exc}")
        finally:
            if slaac is not None:
                slaac.close()
            if api is not None:
                api.close()
            attachment.close()
            backend.close()
            if log_timer is not None:
                log_timer.close()
            if keeper is not None:
                keeper.finish()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(stop_r)
        os.close(stop_w)
    return 0


def _serve_log_limits(backend):
    """The rate limit's summaries come when its interval ends (a timer in
    the loop); None where no limit is installed or the backend cannot."""
    from .ratelimit import installed, serve

    limiter = installed()
    if limiter is None:
        return None
    try:
        return serve(limiter, backend)
    except NotImplementedError:
        return None  # summaries then come with the next warning of the kind


def _watch_slaac(options: Options, backend, attachment, request_stop, on_ready):
    """Start watching the guest's IPv6 configuration; when it is done (or
    given up on), run ``on_ready`` and write the ready fd."""
    from .slaac import SlaacWatch

    config = options.config

    def done(ok: bool) -> None:
        if on_ready is not None:
            on_ready(backend, request_stop)
        if options.ready_fd is not None:
            _signal_ready(options.ready_fd)
            options.ready_fd = None

    fd, attachment.netlink_fd = attachment.netlink_fd, -1
    watch = SlaacWatch(backend, fd, config.ipv6_prefix, config.stack_config().ipv6_link_local, done)
    watch.start()
    return watch


def _set_up(options: Options, backend, tap_fd: int, stop_r: int, request_stop) -> None:
    backend.start(tap_fd, stop_r)
    for proto, addr, host_port, guest, guest_port in options.publish:
        try:
            backend.add_hostfwd(proto, addr, host_port, guest, guest_port)
        except OSError as exc:
            raise SetupError(
                f"cannot publish {proto} {addr}:{host_port}: {exc.strerror or exc}"
            ) from None
        except (ValueError, NotImplementedError) as exc:
            raise SetupError(f"cannot publish {proto} {addr}:{host_port}: {exc}") from None
    if options.exit_fd is not None:
        _watch_exit_fd(backend, options.exit_fd, request_stop)


def _lock_down(options: Options, backend, attachment, api):
    """--enable-sandbox and --enable-seccomp; returns the keeper that will
    clean up at exit what we may no longer touch."""
    from .sandbox import (
        Keeper,
        SandboxError,
        create_sandbox,
        enable_seccomp,
        join_user_namespace,
        resolv_conf_warning,
    )

    remove = None
    if api is not None and api._identity is not None:
        remove = (api.path, api._identity)
        api._identity = None
    keeper = None
    if attachment.mounted_path is not None or remove is not None:
        unmount = None
        if attachment.mounted_path is not None:
            unmount = (attachment.mounted_path, attachment.mounted_identity)
        keeper = Keeper(unmount, remove)
        attachment.mounted_path = None
    _preload(backend)
    try:
        if options.enable_sandbox:
            warning = resolv_conf_warning()
            if warning:
                print(warning, file=sys.stderr, flush=True)
            if os.geteuid() != 0:
                userns = getattr(options.target, "userns_path", None)
                if userns is None:
                    raise SandboxError("--enable-sandbox needs root or a target user namespace")
                join_user_namespace(userns)
            create_sandbox()
        if options.enable_seccomp:
            blocked = enable_seccomp()
            print(f"seccomp: The following syscalls are blocked: {' '.join(blocked)}", flush=True)
    except SandboxError as exc:
        raise SetupError(str(exc)) from None
    return keeper


def run(argv: list[str]) -> int:
    try:
        text, options = parse(argv)
    except UsageError as exc:
        return _fail(str(exc))
    if options is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return 0
    from .ratelimit import install

    handler = logging.StreamHandler(sys.stderr)
    install(handler)  # guest-triggered warnings: a few per kind per interval
    logging.basicConfig(
        level=options.log_level,
        handlers=[handler],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if options.command is not None:
        from .runmode import run_command

        return run_command(options)
    return serve(options)


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(sys.argv[1:] if argv is None else argv))
