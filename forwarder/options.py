"""The command line: pyslirp-forwarder [OPTION]... PATH | PID TAPNAME | -- COMMAND.

Every slirp4netns 1.2 option is accepted with its spelling, default and (where
it has one) error wording, so that rootlesskit and podman can run us in its
place; ours sit beside them. ``parse`` turns the arguments into ``Options``
(or the text of --help or --version); a bad command line raises
``UsageError``, with one line for the user, before anything is set up.

``Options`` is made in steps, in the order that decides which error a
command line with several mistakes gets (slirp4netns's order where it has
one): the modes, the descriptors, the network, the addresses, IPv6, the
services, the DNS upstreams (from /etc/resolv.conf unless given), the pcap
file, the NetworkConfig, and last the target (PATH, PID TAPNAME or COMMAND).
"""

from __future__ import annotations

import _socket
import fcntl
import os
import struct
import sys
from types import SimpleNamespace

from pyslirp.nat.compat import if_nametoindex
from pyslirp.settings import Settings

from .errors import PROG, UsageError

DEFAULT_CIDR = "10.0.2.0/24"
DEFAULT_TAP = "tap0"
NETWORK_PREFIX_MIN = 1
# The recommended guest address is network + 100, so a /26 or longer has no
# room for it; slirp4netns refuses those too.
NETWORK_PREFIX_MAX = 25
LOG_LEVELS = ("debug", "info", "warning", "error")
# Patterns for re, imported where one is used: it costs 7 ms at start-up,
# and the plain mode parses only --cidr and the sizes (see _digits).
_PUBLISH_FORM = (
    r"^(?:(?P<addr>[^:/\[\]]+):)?(?P<host>\d{1,5}):(?P<guest>\d{1,5})(?:/(?P<proto>[a-z]+))?$"
)
_PUBLISH6_FORM = (
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
--trace=FILE             write a JSON line for every decision the stack takes
                         to FILE (- for stderr; python backend)
--record=FILE            record everything that crosses the stack's boundary
                         to FILE, for pyslirp replay (python backend)
--record-limit=SIZE      stop recording when FILE reaches SIZE (K, M, G
                         suffixes, binary; default=0: no limit)
--metrics=[ADDR:]PORT    serve counters in the Prometheus text format over
                         HTTP on ADDR (default ADDR=127.0.0.1)
--dns-upstream=ADDR[:PORT]
                         resolver for the DNS proxy (repeatable;
                         default=every nameserver in /etc/resolv.conf)
--log-level=LEVEL        [debug|info|warning|error] (default=warning)
--socket=PATH            serve a virtual machine instead of a namespace: listen
                         on a UNIX socket at PATH for QEMU's -netdev stream
                         (no PATH, PID or TAPNAME then)
--socket-type=TYPE       ([stream|dgram], default=stream; dgram: -netdev dgram)
--one-off                with --socket: exit when the VM disconnects
-h, --help               show this help and exit
-v, --version            show version and exit
"""


class _Parser:
    """The part of argparse that the command line uses, in the same words:
    ``add_argument`` with a store (the default), ``store_true`` or
    ``append`` action, one positional list, and ``parse_intermixed_args``.
    Long options take ``--opt=VALUE`` or ``--opt VALUE``; short ones
    ``-r VALUE``, ``-rVALUE`` or ``-r=VALUE``, and flags combine (``-c6``).
    argparse itself, its gettext look-ups and the shutil that its help
    formatter imports cost 5 to 15 ms of every start (bench/startup.py)."""

    def __init__(self) -> None:
        self._actions: dict[str, tuple[str, str, str]] = {}  # flag: (dest, action, all its flags)
        self._defaults: dict[str, object] = {}
        self._positional: str | None = None

    def add_argument(
        self, *flags: str, action: str | None = None, default=None, nargs=None, help=None
    ):
        if action not in (None, "store_true", "append") or nargs not in (None, "*"):
            # Values are checked by Options's steps, with slirp4netns's words.
            raise NotImplementedError(f"{flags[0]}: action={action!r}, nargs={nargs!r}")
        if not flags[0].startswith("-"):  # the positional list (nargs="*")
            self._positional = flags[0]
            self._defaults[flags[0]] = []
            return
        dest = next((f for f in flags if f.startswith("--")), flags[0]).lstrip("-")
        dest = dest.replace("-", "_")
        self._defaults[dest] = False if action == "store_true" else default
        for flag in flags:
            self._actions[flag] = (dest, action or "store", "/".join(flags))

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")

    def parse_intermixed_args(self, argv: list[str]):
        values = {
            dest: list(default) if isinstance(default, list) else default
            for dest, default in self._defaults.items()
        }
        unknown: list[str] = []
        args = iter(argv)
        for arg in args:
            if arg.startswith("--") and len(arg) > 2:
                flag, equals, value = arg.partition("=")
                found = self._actions.get(flag)
                if found is None:
                    unknown.append(arg)
                    continue
                self._take(values, found, value if equals else None, args)
            elif arg.startswith("-") and len(arg) > 1:
                for at in range(1, len(arg)):  # -c6, -r3, -r=3
                    found = self._actions.get("-" + arg[at])
                    if found is None:
                        unknown.append(arg)
                        break
                    if found[1] != "store_true":
                        rest = arg[at + 1 :]
                        rest = rest[1:] if rest.startswith("=") else rest
                        self._take(values, found, rest or None, args)
                        break
                    values[found[0]] = True
            elif self._positional is not None:
                values[self._positional].append(arg)
            else:
                unknown.append(arg)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return SimpleNamespace(**values)

    def _take(self, values: dict, found: tuple, value: str | None, args) -> None:
        dest, action, names = found
        if action == "store_true":
            if value is not None:
                self.error(f"argument {names}: ignored explicit argument '{value}'")
            values[dest] = True
            return
        if value is None:
            value = next(args, None)
            if value is None or (value.startswith("-") and value != "-"):
                self.error(f"argument {names}: expected one argument")
        if action == "append":
            values[dest].append(value)
        else:
            values[dest] = value


def _parser() -> _Parser:
    p = _Parser()
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
    p.add_argument("--trace", default=None)
    p.add_argument("--record", default=None)
    p.add_argument("--record-limit", default="0")
    p.add_argument("--metrics", default=None)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--socket", default=None)
    p.add_argument("--socket-type", default=None)
    p.add_argument("--one-off", action="store_true")
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


def parse_size(text: str, flag: str, least: int) -> int:
    """A size: bytes, or K, M, G (powers of 1024), at least ``least``."""
    given = text.strip().upper()
    number, suffix = (given[:-1], given[-1]) if given.endswith(("K", "M", "G")) else (given, "")
    size = int(number) * _SIZE_SUFFIXES[suffix] if _digits(number, 15) else None
    if size is None or size < least:
        floor = f"at least {least >> 20}M" if least else "a size"
        raise UsageError(f"{flag} must be {floor} (bytes, or with K, M or G), not {text!r}")
    return size


def parse_memory_budget(text: str) -> int:
    """--memory-budget: bytes, or K, M, G (powers of 1024)."""
    return parse_size(text, "--memory-budget", MIN_MEMORY_BUDGET)


def parse_metrics(text: str) -> tuple[str, int]:
    """--metrics=[ADDR:]PORT: a host address (loopback by default; an IPv6
    one in brackets) and a TCP port."""
    import ipaddress

    addr, sep, port = text.rpartition(":")
    if not sep:
        addr = "127.0.0.1"
    addr = addr[1:-1] if addr.startswith("[") and addr.endswith("]") else addr
    try:
        ipaddress.ip_address(addr)
        number = int(port, 10)
    except ValueError:
        number = -1
    if not 1 <= number <= 65535:
        raise UsageError(f"--metrics must be [ADDR:]PORT with an IP address, not {text!r}")
    return addr, number


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


def _digits(text: str, most: int) -> bool:
    """1 to ``most`` ASCII digits (a regular expression's ``\\d{1,most}``)."""
    return 0 < len(text) <= most and text.isascii() and text.isdigit()


def parse_cidr(text: str) -> str:
    """slirp4netns's checks and messages; the network as text (without
    ipaddress, which the default path does not import)."""
    dotted, slash, prefix_text = text.partition("/")
    parts = dotted.split(".")
    if not (slash and len(parts) == 4 and all(_digits(p, 3) for p in parts)):
        raise UsageError(f"invalid CIDR: {text}")
    if not _digits(prefix_text, 2):
        raise UsageError(f"invalid CIDR: {text}")
    # as ipaddress: each part 0-255, and no leading zero (an octal reading)
    if any(int(p) > 255 or (len(p) > 1 and p[0] == "0") for p in parts):
        raise UsageError(f"invalid network address: {dotted}")
    prefix = int(prefix_text)
    if not NETWORK_PREFIX_MIN <= prefix <= NETWORK_PREFIX_MAX:
        raise UsageError(f"prefix length needs to be {NETWORK_PREFIX_MIN}-{NETWORK_PREFIX_MAX}")
    network = f"{dotted}/{prefix}"
    from pyslirp.config import parse_network

    try:
        parse_network(network, _socket.AF_INET)
    except ValueError:
        raise UsageError(
            "CIDR needs to be a network address like 10.0.2.0/24, not like 10.0.2.100/24"
        ) from None
    return network


def parse_upstream(text: str) -> tuple[str, int]:
    """ADDR[:PORT], with an IPv6 ADDR bare or as [ADDR]:PORT."""
    import ipaddress

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
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        ifreq = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("16s16x", name.encode()))
    except OSError:
        return None
    finally:
        sock.close()
    return _socket.inet_ntoa(ifreq[20:24])


def parse_outbound_addr(text: str) -> str:
    import ipaddress

    try:
        address = str(ipaddress.IPv4Address(text))
    except ValueError:
        address = interface_ipv4(text)
    if address is None:
        raise UsageError("outbound-addr has to be valid ipv4 address or interface name.")
    _can_bind(_socket.AF_INET, address, "--outbound-addr")
    return address


def _can_bind(family: int, address: str, option: str) -> None:
    """UsageError unless a UDP socket can be bound to ``address`` now."""
    sock = _socket.socket(family, _socket.SOCK_DGRAM)
    try:
        sock.bind((address, 0))
    except OSError as exc:
        raise UsageError(f"{option} {address}: {exc.strerror}") from None
    finally:
        sock.close()


def interface_ipv6(name: str) -> str | None:
    """A global IPv6 address of interface ``name`` (from /proc/net/if_inet6)."""
    import ipaddress

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
    import ipaddress

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
    _can_bind(_socket.AF_INET6, address, "--outbound-addr6")
    return address


def parse_ipv6_prefix(text: str) -> str:
    """--ipv6-prefix: a /64 (bare address or PREFIX/64), or "random"; as text."""
    import ipaddress

    if text == "random":
        # RFC 4193 3.2: fd00::/8, a 40-bit random global ID, subnet 0.
        global_id = os.urandom(5)
        return str(ipaddress.IPv6Network((b"\xfd" + global_id + bytes(10), 64)))
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
    return str(network)


def parse_publish(text: str, ipv6: bool = False) -> tuple[str, str, int, int]:
    """-p [HOST_ADDR:]HOST_PORT:GUEST_PORT[/tcp|/udp] -> (proto, addr, host, guest);
    with ``ipv6``, HOST_ADDR may be [IPv6]."""
    form = "expected [HOST_ADDR:]HOST_PORT:GUEST_PORT[/tcp|/udp], e.g. 8080:80/tcp"
    v6 = text.startswith("[") or text.count(":") > 2
    if v6 and not ipv6:
        raise UsageError(f"invalid --publish {text!r}: IPv6 host addresses need --enable-ipv6")
    import re

    match = re.match(_PUBLISH6_FORM if v6 else _PUBLISH_FORM, text)
    if not match:
        if v6:
            form = "expected [IPv6]:HOST_PORT:GUEST_PORT[/tcp|/udp], e.g. [::1]:8080:80"
        raise UsageError(f"invalid --publish {text!r}: {form}")
    proto = match.group("proto") or "tcp"
    if proto not in ("tcp", "udp"):
        raise UsageError(f"invalid --publish {text!r}: the protocol must be tcp or udp")
    addr = match.group("addr") or "0.0.0.0"
    family = _socket.AF_INET6 if v6 else _socket.AF_INET
    try:
        _socket.inet_pton(family, addr)
    except OSError:
        kind = "IPv6" if v6 else "IPv4"
        raise UsageError(f"invalid --publish {text!r}: {addr!r} is not an {kind} address") from None
    host_port, guest_port = int(match.group("host")), int(match.group("guest"))
    for port in (host_port, guest_port):
        if not 1 <= port <= 65535:
            raise UsageError(f"invalid --publish {text!r}: ports are 1 to 65535")
    return proto, addr, host_port, guest_port


# --------------------------------------------------------------- options
class VmSocket(Settings):
    """--socket: serve one VM at a time on a UNIX socket (pyslirp/link.py)."""

    path: str
    kind: str  # "stream" (QEMU -netdev stream) or "dgram" (-netdev dgram)
    one_off: bool  # exit when the VM disconnects, rather than wait for the next


class Options:
    """The validated command line.

    Besides the fields that the steps below set, ``config`` is the
    NetworkConfig for the backend; ``target`` is what to attach to (None
    in the run mode, which makes it), ``tap`` its TAP's name and ``where``
    the words for it in the banner."""

    def __init__(self, ns, command: list[str] | None = None) -> None:
        self.warnings: list[str] = []
        self.command = command
        self.enable_ipv6 = ns.enable_ipv6
        self._read_modes(ns)
        self._read_fds(ns)
        network = self._read_network(ns)
        self._read_addresses(ns)
        network.update(self._read_ipv6(ns))
        self._read_services(ns)
        network["dns_upstreams"] = self._read_upstreams(ns)
        self._probe_pcap(ns)
        network.update(self._read_study(ns))
        self._make_config(ns, network)
        self._resolve_target(ns)

    # Each step reads a group of options from ``ns`` (_Parser's namespace),
    # raises UsageError for the first bad one, and sets fields of ``self``
    # or returns NetworkConfig's arguments.
    def _read_modes(self, ns) -> None:
        """--target-type, the deprecated spellings, -c, --backend and --log-level."""
        from pyslirp.backend import BACKENDS

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
        self.configure = ns.configure or self.command is not None
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
        self.quiet = self.command is not None and self.log_level not in ("DEBUG", "INFO")

    def _read_fds(self, ns) -> None:
        """-e and -r: open descriptors."""
        self.exit_fd = parse_fd(ns.exit_fd, "exit-fd")
        self.ready_fd = parse_fd(ns.ready_fd, "ready-fd")

    def _read_network(self, ns) -> dict:
        """-m, --busy-poll, --memory-budget and --cidr."""
        return {
            "mtu": parse_mtu(ns.mtu),
            "busy_poll": parse_busy_poll(ns.busy_poll),
            "memory_budget": parse_memory_budget(ns.memory_budget),
            "cidr": parse_cidr(ns.cidr),
        }

    def _read_addresses(self, ns) -> None:
        """--macaddress (only with -c), --outbound-addr and --outbound-addr6
        (which must be addresses of this host)."""
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

    def _read_ipv6(self, ns) -> dict:
        """--ipv6-prefix and --dns-search (by default the search line of
        /etc/resolv.conf, with -6)."""
        from pyslirp.config import DEFAULT_IPV6_PREFIX, read_resolv_conf_search, valid_domain

        ipv6_prefix = DEFAULT_IPV6_PREFIX
        if ns.ipv6_prefix is not None:
            ipv6_prefix = parse_ipv6_prefix(ns.ipv6_prefix)
        if ns.ipv6_prefix is not None and not self.enable_ipv6:
            raise UsageError("--ipv6-prefix needs --enable-ipv6")
        for name in ns.dns_search:
            if not valid_domain(name):
                raise UsageError(f"invalid --dns-search {name!r}: not a domain name")
        dns_search = list(ns.dns_search)
        if not dns_search and self.enable_ipv6:
            dns_search = read_resolv_conf_search()
        return {"ipv6_prefix": ipv6_prefix, "dns_search": dns_search}

    def _read_services(self, ns) -> None:
        """-p, -a, --enable-sandbox and --enable-seccomp (known for this machine)."""
        self.publish = [parse_publish(p, self.enable_ipv6) for p in ns.publish]
        self.api_socket = ns.api_socket
        if self.api_socket is not None and len(os.fsencode(self.api_socket)) >= 108:
            raise UsageError("the specified API socket path is too long (>= 108)")
        self.enable_sandbox = ns.enable_sandbox or ns.create_sandbox
        self.enable_seccomp = ns.enable_seccomp
        if self.enable_seccomp:
            from .sandbox import SandboxError, seccomp_arch

            try:
                seccomp_arch()
            except SandboxError as exc:
                raise UsageError(str(exc)) from None

    def _read_upstreams(self, ns) -> list:
        """--dns-upstream, or every nameserver of /etc/resolv.conf."""
        from pyslirp.config import read_resolv_conf

        upstreams = [parse_upstream(u) for u in ns.dns_upstream]
        self.upstreams_from = "command line" if upstreams else "/etc/resolv.conf"
        if not upstreams:
            upstreams = read_resolv_conf(ipv6=self.enable_ipv6)
        return upstreams

    def _probe_pcap(self, ns) -> None:
        """--pcap: the file can be written (made empty if new, never truncated)."""
        if ns.pcap is not None:
            try:
                with open(ns.pcap, "ab"):
                    pass
            except OSError as exc:
                raise UsageError(f"cannot write pcap file {ns.pcap}: {exc.strerror}") from None

    def _read_study(self, ns) -> dict:
        """--trace, --record, --record-limit and --metrics (python backend;
        the files can be written)."""
        for flag, value in (("--trace", ns.trace), ("--record", ns.record)):
            if value is not None and self.backend != "python":
                raise UsageError(f"{flag} needs --backend=python")
        for what, path, mode in (("trace", ns.trace, 0o666), ("recording", ns.record, 0o600)):
            if path is not None and path != "-":
                try:  # a new recording is private from the start, as record.py makes it
                    os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode))
                except OSError as exc:
                    raise UsageError(f"cannot write {what} file {path}: {exc.strerror}") from None
        if ns.record == "-":
            raise UsageError("--record needs a file, not -")
        record_limit = parse_size(ns.record_limit, "--record-limit", 0)
        self.metrics = parse_metrics(ns.metrics) if ns.metrics is not None else None
        return {"trace_path": ns.trace, "record_path": ns.record, "record_limit": record_limit}

    def _make_config(self, ns, network: dict) -> None:
        """The NetworkConfig (its own checks become UsageErrors), and the
        forwards' guest addresses from it."""
        from pyslirp.config import NetworkConfig

        try:
            self.config = NetworkConfig(
                **network,
                disable_host_loopback=ns.disable_host_loopback or ns.no_host_loopback,
                pcap_path=ns.pcap,
                outbound_addr=self.outbound_addr,
                disable_dns=ns.disable_dns,
                enable_ipv6=self.enable_ipv6,
                outbound_addr6=self.outbound_addr6,
                **tcp_retransmission_from_env(os.environ),
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        guest = str(self.config.recommended_guest)
        # An IPv6 forward goes to "::": the guest's SLAAC address, once learned.
        self.publish = [
            (proto, addr, hp, "::" if ":" in addr else guest, gp)
            for proto, addr, hp, gp in self.publish
        ]

    def _resolve_target(self, ns) -> None:
        """The positional arguments, as slirp4netns reads them, with
        --netns-type and --userns-path; or -- COMMAND."""
        netns_type = ns.netns_type
        if netns_type not in (None, "pid", "path"):
            if netns_type == "tapfd":
                raise UsageError("--netns-type=tapfd is not supported yet")
            raise UsageError('--netns-type must be either "pid" or "path"')
        if ns.userns_path is not None and not os.path.exists(ns.userns_path):
            raise UsageError(f"userns path doesn't exist: {ns.userns_path}")
        self.userns_path = ns.userns_path
        if ns.socket is not None:
            self._socket_target(ns)
        elif ns.socket_type is not None or ns.one_off:
            raise UsageError("--socket-type and --one-off need --socket")
        elif self.command is not None:
            self._run_mode_target(ns)
        elif not ns.args:
            raise UsageError("missing PATH, or PID and TAPNAME (see --help)")
        else:
            if len(ns.args) > 2:
                # slirp4netns warns and goes on, for compatibility.
                print("WARNING: too many arguments", file=sys.stderr)
            if len(ns.args) == 1 and netns_type is None:
                self._new_namespace_target(ns, ns.args[0])
            elif len(ns.args) == 1:
                raise UsageError("TAPNAME is required with --netns-type (see --help)")
            else:
                self._existing_target(ns, ns.args[0], ns.args[1])

    def _socket_target(self, ns) -> None:
        """--socket=PATH: a VM's network card over a UNIX socket."""
        from pyslirp.link import KINDS

        if ns.args or self.command is not None:
            raise UsageError("--socket cannot be combined with PATH, PID, TAPNAME or -- COMMAND")
        if ns.netns_type is not None or ns.userns_path is not None or ns.configure:
            raise UsageError(
                "--socket cannot be combined with --netns-type, --userns-path or --configure"
            )
        kind = ns.socket_type or "stream"
        if kind not in KINDS:
            raise UsageError(
                f"invalid --socket-type {kind!r} (choose from {', '.join(KINDS)})"
            )
        if not ns.socket or len(os.fsencode(ns.socket)) >= 108:
            raise UsageError("the specified socket path is empty or too long (>= 108)")
        self.target = VmSocket(ns.socket, kind, ns.one_off)
        # -p goes to the VM's address: the first lease, as in QEMU's -netdev
        # user (nothing sets 10.0.2.100 in a VM, as -c does in a namespace).
        leased = str(self.config.dhcp_start)
        recommended = str(self.config.recommended_guest)
        self.publish = [
            (proto, addr, hp, leased if guest == recommended else guest, gp)
            for proto, addr, hp, guest, gp in self.publish
        ]
        self.tap = None
        self.offload = False  # QEMU's stream carries no virtio header
        self.where = f"a VM on the {kind} socket {ns.socket}"

    def _run_mode_target(self, ns) -> None:
        """-- COMMAND: the run mode makes the namespace (forwarder.runmode)."""
        if ns.args:
            raise UsageError("PATH, PID or TAPNAME cannot be combined with -- COMMAND")
        if ns.netns_type is not None or ns.userns_path is not None:
            raise UsageError("--netns-type and --userns-path cannot be combined with -- COMMAND")
        if not self.command:
            raise UsageError("missing COMMAND after -- (see --help)")
        self.target = None
        self.tap = DEFAULT_TAP
        self.where = "network namespace of COMMAND"

    def _new_namespace_target(self, ns, path: str) -> None:
        """PATH: a new network namespace, bind-mounted on PATH."""
        from .namespace import NewNamespace

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

    def _existing_target(self, ns, first: str, tap: str) -> None:
        """PID TAPNAME, or PATH TAPNAME with --netns-type=path."""
        from .namespace import ExistingNamespace

        self.tap = tap
        if ns.netns_type in (None, "pid"):
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
