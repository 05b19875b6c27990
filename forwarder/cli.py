"""The command line: pyslirp-forwarder [OPTION]... PATH | PID TAPNAME.

Options keep slirp4netns's spelling, defaults and (where it has one) error
wording. Every error is one line on stderr and exit status 1, and leaves no
mount, namespace or TAP behind.
"""

import argparse
import ipaddress
import logging
import os
import re
import signal
import sys

PROG = "pyslirp-forwarder"
DEFAULT_CIDR = "10.0.2.0/24"
DEFAULT_TAP = "tap0"
NETWORK_PREFIX_MIN = 1
# The recommended guest address is network + 100, so a /26 or longer has no
# room for it; slirp4netns refuses those too.
NETWORK_PREFIX_MAX = 25
LOG_LEVELS = ("debug", "info", "warning", "error")
_CIDR_FORM = re.compile(r"^((\d{1,3}\.){3}\d{1,3})/(\d{1,2})$")

USAGE = f"""\
Usage: {PROG} [OPTION]... PATH
       {PROG} [OPTION]... PID|PATH TAPNAME
User-mode networking for unprivileged network namespaces, in pure Python.

With one argument, create a network namespace with a TAP named {DEFAULT_TAP}
and bind-mount it on PATH (an existing file); enter it with nsenter --net=PATH.
With two, join the network namespace of PID (or of PATH with
--netns-type=path) and create TAPNAME there.

-c, --configure          bring up the interface
-m, --mtu=MTU            specify MTU (default=1500, max=65520)
--cidr=CIDR              specify network address CIDR (default={DEFAULT_CIDR})
--disable-host-loopback  prohibit connecting to 127.0.0.1:* on the host namespace
--netns-type=TYPE        specify network namespace type ([path|pid], default=pid)
--userns-path=PATH       specify user namespace path
--backend=NAME           specify the backend ([BACKENDS], default=python)
--pcap=FILE              write every frame to and from the TAP to FILE (pcap)
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
    p = _Parser(prog=PROG, add_help=False)
    p.add_argument("-c", "--configure", action="store_true")
    p.add_argument("-m", "--mtu", default="1500")
    p.add_argument("--cidr", default=DEFAULT_CIDR)
    p.add_argument("--disable-host-loopback", action="store_true")
    p.add_argument("--netns-type", default=None)
    p.add_argument("--userns-path", default=None)
    p.add_argument("--backend", default="python")
    p.add_argument("--pcap", default=None)
    p.add_argument("--dns-upstream", action="append", default=[])
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
    from pyslirp.nat.config import MAX_MTU, MIN_MTU

    try:
        mtu = int(text, 10)
    except ValueError:
        mtu = None
    if mtu is None or not MIN_MTU <= mtu <= MAX_MTU:
        raise UsageError(f"MTU must be an integer from {MIN_MTU} to {MAX_MTU}, not {text!r}")
    return mtu


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
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, "53"
    try:
        address = ipaddress.IPv4Address(host)
        port = int(port_text, 10)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise UsageError(
            f"invalid --dns-upstream {text!r}: expected IPv4ADDR[:PORT], e.g. 127.0.0.1:5353"
        ) from None
    return str(address), port


# --------------------------------------------------------------- options
class Options:
    """The validated command line."""

    def __init__(self, ns) -> None:
        from pyslirp.backend import BACKENDS
        from pyslirp.nat.config import NetworkConfig, read_resolv_conf

        from .namespace import ExistingNamespace, NewNamespace

        self.configure = ns.configure
        if ns.backend not in BACKENDS:
            raise UsageError(f"unknown backend {ns.backend!r} (available: {', '.join(BACKENDS)})")
        self.backend = ns.backend
        if ns.log_level.lower() not in LOG_LEVELS:
            raise UsageError(
                f"invalid --log-level {ns.log_level!r} (choose from {', '.join(LOG_LEVELS)})"
            )
        self.log_level = ns.log_level.upper()
        mtu = parse_mtu(ns.mtu)
        cidr = parse_cidr(ns.cidr)
        upstreams = [parse_upstream(u) for u in ns.dns_upstream]
        self.upstreams_from = "command line" if upstreams else "/etc/resolv.conf"
        if not upstreams:
            upstreams = read_resolv_conf()
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
                disable_host_loopback=ns.disable_host_loopback,
                dns_upstreams=upstreams,
                pcap_path=ns.pcap,
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None

        # Positional arguments, as slirp4netns reads them.
        args = ns.args
        netns_type = ns.netns_type
        if netns_type not in (None, "pid", "path"):
            if netns_type == "tapfd":
                raise UsageError("--netns-type=tapfd is not supported yet")
            raise UsageError('--netns-type must be either "pid" or "path"')
        if ns.userns_path is not None and not os.path.exists(ns.userns_path):
            raise UsageError(f"userns path doesn't exist: {ns.userns_path}")
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
    parser = _parser()
    ns = parser.parse_intermixed_args(argv)
    if ns.help:
        from pyslirp.backend import BACKENDS

        return USAGE.replace("BACKENDS", "|".join(BACKENDS)), None
    if ns.version:
        return version_text(), None
    return None, Options(ns)


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
    if config.pcap_path:
        lines.append(f"* Pcap:            {config.pcap_path}")
    if not config.disable_host_loopback:
        lines.append(
            f"WARNING: 127.0.0.1:* on the host is accessible as {config.gateway} "
            "(set --disable-host-loopback to prohibit connecting to 127.0.0.1:*)"
        )
    if not config.dns_upstreams:
        lines.append(f"WARNING: no DNS upstream: queries to {config.dns} will go unanswered")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ main
def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return 1


def run(argv: list[str]) -> int:
    from .namespace import LinkSetup, NewNamespace, StartupError, attach

    try:
        text, options = parse(argv)
    except UsageError as exc:
        return _fail(str(exc))
    if options is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return 0
    logging.basicConfig(
        level=options.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    # Stop on SIGINT/SIGTERM through a pipe that the backend watches; a
    # signal during start-up makes the backend return at once.
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def on_signal(signum, frame):
        try:
            os.write(stop_w, b"s")
        except OSError:
            pass

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    config = options.config
    setup = LinkSetup(
        loopback_up=isinstance(options.target, NewNamespace),
        configure=options.configure,
        mtu=config.mtu,
        address=str(config.recommended_guest),
        prefix_len=config.cidr.prefixlen,
        gateway=str(config.gateway),
    )
    try:
        from pyslirp.backend import create_backend

        try:
            # Made before the namespace work, so that a backend that cannot
            # start (a missing library) leaves nothing to undo.
            backend = create_backend(options.backend, config)
        except Exception as exc:
            return _fail(str(exc).splitlines()[0] if str(exc) else repr(exc))
        try:
            attachment = attach(options.target, options.tap, setup)
        except StartupError as exc:
            return _fail(str(exc))
        try:
            sys.stdout.write(banner(options))
            sys.stdout.flush()
            backend.run(attachment.tap_fd, stop_r)
        except Exception as exc:
            logging.getLogger("pyslirp").debug("backend failed", exc_info=True)
            return _fail(f"backend {options.backend} failed: {exc}")
        finally:
            attachment.close()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(stop_r)
        os.close(stop_w)
    return 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(sys.argv[1:] if argv is None else argv))
