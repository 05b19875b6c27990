"""The libslirp backend: the system's libslirp.so.0 behind our front end.

libslirp is the C stack that QEMU and slirp4netns use. We load it with cffi in
ABI mode (``dlopen``, no compiler at install) from declarations of its public
API that we write below, and drive it from a Python ``poll`` loop:

- frames the guest writes to the TAP go to ``slirp_input``; libslirp's
  ``send_packet`` callback writes its frames back to the TAP;
- before each sleep ``slirp_pollfds_fill`` names the host sockets libslirp
  wants watched (through our ``add_poll`` callback) and lowers the timeout to
  its TCP timers; after the sleep ``slirp_pollfds_poll`` is told what is ready;
- the timers libslirp creates (``timer_new``/``timer_new_opaque``) are kept
  as deadlines in a heap and fired from the loop.

How our NetworkConfig maps onto SlirpConfig: ``cidr`` gives vnetwork and
vnetmask, the gateway (.2) vhost, the DNS address (.3) vnameserver, .15
vdhcp_start; ``mtu`` gives if_mtu and if_mru (as slirp4netns does);
``disable_host_loopback``, ``outbound_addr`` (SlirpConfig 2) and ``disable_dns``
(SlirpConfig 3; as in slirp4netns, the DNS address then becomes an ordinary
outside address) map one to one; ``pcap_path`` is served by our loop.
``dns_upstreams`` cannot be honoured in general: libslirp sends every query for
the DNS address to the first nameserver of /etc/resolv.conf (its own parser,
re-read when the file changes), so upstreams other than that one are refused.
The limits in NetworkConfig (flows, timeouts, DHCP pool, batch) are the python
backend's; libslirp has its own fixed ones.

Versions: slirp_new needs libslirp 4.1. SlirpConfig version 2 (4.2) adds
outbound addresses, 3 (4.3) disable_dns, 4 (4.7) disable_dhcp with the
timer_new_opaque callback and slirp_handle_timer; hostxfwd exists from 4.5.
4.8 (config 5) adds only NC-SI fields and 4.9 (config 6) socket callbacks for
Windows; we use neither, so we ask for at most version 4.
"""

from __future__ import annotations

import errno
import heapq
import ipaddress
import itertools
import os
import re
import resource
import select
import socket
import struct
import threading
import time
from collections import deque
from concurrent.futures import Future

from pyslirp.backend import Backend
from pyslirp.config import NetworkConfig, read_resolv_conf
from pyslirp.log import get_logger
from pyslirp.tap import MAX_FRAME, write_tap

log = get_logger("pyslirp.libslirp")

LIBRARY = "libslirp.so.0"
GLIB = "libglib-2.0.so.0"  # libslirp's own dependency, for g_free
INSTALL_HINT = "apt-get install libslirp0"
MIN_VERSION = (4, 1)

# The subset of libslirp 4.7's public API that we use, declared for cffi.
# struct in6_addr is 16 bytes aligned to 4 in glibc (a union with uint32_t[4]).
CDEF = """
typedef struct Slirp Slirp;
struct in_addr { uint32_t s_addr; };
struct in6_addr { uint32_t s6_addr32[4]; };
struct sockaddr;
struct sockaddr_in {            /* Linux: sa_family_t is unsigned short */
    unsigned short sin_family;
    uint16_t sin_port;
    struct in_addr sin_addr;
    unsigned char sin_zero[8];
};
struct sockaddr_in6 {           /* Linux */
    unsigned short sin6_family;
    uint16_t sin6_port;
    uint32_t sin6_flowinfo;
    struct in6_addr sin6_addr;
    uint32_t sin6_scope_id;
};
typedef unsigned int socklen_t;

typedef ssize_t (*SlirpWriteCb)(const void *buf, size_t len, void *opaque);
typedef void (*SlirpTimerCb)(void *opaque);
typedef int (*SlirpAddPollCb)(int fd, int events, void *opaque);
typedef int (*SlirpGetREventsCb)(int idx, void *opaque);
typedef enum SlirpTimerId { SLIRP_TIMER_RA, SLIRP_TIMER_NUM } SlirpTimerId;

typedef struct SlirpCb {
    SlirpWriteCb send_packet;
    void (*guest_error)(const char *msg, void *opaque);
    int64_t (*clock_get_ns)(void *opaque);
    void *(*timer_new)(SlirpTimerCb cb, void *cb_opaque, void *opaque);
    void (*timer_free)(void *timer, void *opaque);
    void (*timer_mod)(void *timer, int64_t expire_time, void *opaque);
    void (*register_poll_fd)(int fd, void *opaque);
    void (*unregister_poll_fd)(int fd, void *opaque);
    void (*notify)(void *opaque);
    /* read by libslirp only when SlirpConfig.version >= 4 */
    void (*init_completed)(Slirp *slirp, void *opaque);
    void *(*timer_new_opaque)(SlirpTimerId id, void *cb_opaque, void *opaque);
} SlirpCb;

typedef struct SlirpConfig {
    uint32_t version;
    int restricted;
    bool in_enabled;
    struct in_addr vnetwork;
    struct in_addr vnetmask;
    struct in_addr vhost;
    bool in6_enabled;
    struct in6_addr vprefix_addr6;
    uint8_t vprefix_len;
    struct in6_addr vhost6;
    const char *vhostname;
    const char *tftp_server_name;
    const char *tftp_path;
    const char *bootfile;
    struct in_addr vdhcp_start;
    struct in_addr vnameserver;
    struct in6_addr vnameserver6;
    const char **vdnssearch;
    const char *vdomainname;
    size_t if_mtu;
    size_t if_mru;
    bool disable_host_loopback;
    bool enable_emu;
    /* version 2 */
    struct sockaddr_in *outbound_addr;
    struct sockaddr_in6 *outbound_addr6;
    /* version 3 */
    bool disable_dns;
    /* version 4 */
    bool disable_dhcp;
} SlirpConfig;

Slirp *slirp_new(const SlirpConfig *cfg, const SlirpCb *callbacks, void *opaque);
void slirp_cleanup(Slirp *slirp);
void slirp_pollfds_fill(Slirp *slirp, uint32_t *timeout, SlirpAddPollCb add_poll, void *opaque);
void slirp_pollfds_poll(Slirp *slirp, int select_error, SlirpGetREventsCb get_revents,
                        void *opaque);
void slirp_input(Slirp *slirp, const uint8_t *pkt, int pkt_len);
void slirp_handle_timer(Slirp *slirp, SlirpTimerId id, void *cb_opaque);
int slirp_add_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr, int host_port,
                      struct in_addr guest_addr, int guest_port);
int slirp_remove_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr, int host_port);
int slirp_add_hostxfwd(Slirp *slirp, const struct sockaddr *haddr, socklen_t haddrlen,
                       const struct sockaddr *gaddr, socklen_t gaddrlen, int flags);
int slirp_remove_hostxfwd(Slirp *slirp, const struct sockaddr *haddr, socklen_t haddrlen,
                          int flags);
char *slirp_connection_info(Slirp *slirp);
const char *slirp_version_string(void);
"""
GLIB_CDEF = "void g_free(void *mem);"

# SLIRP_POLL_* flags of libslirp.h
SLIRP_POLL_IN = 1 << 0
SLIRP_POLL_OUT = 1 << 1
SLIRP_POLL_PRI = 1 << 2
SLIRP_POLL_ERR = 1 << 3
SLIRP_POLL_HUP = 1 << 4
UINT32_MAX = 0xFFFFFFFF

_TO_POLL = (
    (SLIRP_POLL_IN, select.POLLIN),
    (SLIRP_POLL_OUT, select.POLLOUT),
    (SLIRP_POLL_PRI, select.POLLPRI),
)
_FROM_POLL = (
    (select.POLLIN, SLIRP_POLL_IN),
    (select.POLLOUT, SLIRP_POLL_OUT),
    (select.POLLPRI, SLIRP_POLL_PRI),
    (select.POLLERR, SLIRP_POLL_ERR),
    (select.POLLHUP, SLIRP_POLL_HUP),
)
# One table lookup per fd instead of bit tests per flag.
SLIRP_TO_POLL = [sum(p for s, p in _TO_POLL if i & s) for i in range(32)]
POLL_TO_SLIRP: dict[int, int] = {}


def poll_to_slirp(revents: int) -> int:
    flags = POLL_TO_SLIRP.get(revents)
    if flags is None:
        flags = sum(s for p, s in _FROM_POLL if revents & p)
        POLL_TO_SLIRP[revents] = flags
    return flags


class LibslirpUnavailable(RuntimeError):
    """libslirp (or cffi) cannot be loaded; the message is one line for the user."""


def parse_version(text: str) -> tuple[int, int, int]:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise LibslirpUnavailable(f"cannot read the libslirp version {text!r}")
    return int(match[1]), int(match[2]), int(match[3] or 0)


def config_version(version: tuple[int, int, int]) -> int:
    """The highest SlirpConfig version we fill that this libslirp knows."""
    if version >= (4, 7):
        return 4
    if version >= (4, 3):
        return 3
    if version >= (4, 2):
        return 2
    return 1


class Binding:
    """The loaded library: ffi, lib, version and what this version offers."""

    def __init__(self, library: str | None = None) -> None:
        library = library or LIBRARY
        try:
            import cffi
        except ImportError:
            raise LibslirpUnavailable(
                "the libslirp backend needs the cffi module: pip install cffi "
                "(or apt-get install python3-cffi)"
            ) from None
        ffi = cffi.FFI()
        ffi.cdef(CDEF)
        ffi.cdef(GLIB_CDEF)
        try:
            lib = ffi.dlopen(library)
        except OSError:
            raise LibslirpUnavailable(
                f"the libslirp backend needs {library}, which is not installed: {INSTALL_HINT}"
            ) from None
        self.ffi = ffi
        self.lib = lib
        self.version_string = ffi.string(lib.slirp_version_string()).decode("ascii", "replace")
        self.version = parse_version(self.version_string)
        if self.version < MIN_VERSION:
            raise LibslirpUnavailable(
                f"libslirp {self.version_string} is too old for the libslirp backend "
                f"(4.1 or newer needed): {INSTALL_HINT}"
            )
        self.config_version = config_version(self.version)
        self.has_handle_timer = _has_symbol(lib, "slirp_handle_timer")
        self.has_hostxfwd = _has_symbol(lib, "slirp_add_hostxfwd")
        try:
            self.glib = ffi.dlopen(GLIB)
        except OSError:
            self.glib = None


def _has_symbol(lib, name: str) -> bool:
    try:
        getattr(lib, name)
    except AttributeError:
        return False
    return True


_binding: Binding | None = None


def load() -> Binding:
    """Load libslirp once per process (cffi keeps it loaded anyway)."""
    global _binding
    if _binding is None:
        _binding = Binding()
    return _binding


def _in_addr(address: str) -> dict:
    # s_addr holds the address in network byte order, i.e. the packed bytes.
    return {"s_addr": struct.unpack("=I", ipaddress.IPv4Address(address).packed)[0]}


def _in6_addr(address) -> dict:  # text or 16 bytes
    return {"s6_addr32": list(struct.unpack("=4I", ipaddress.IPv6Address(address).packed))}


def check_dns_upstreams(config: NetworkConfig, resolv_conf: str = "/etc/resolv.conf") -> None:
    """Refuse DNS upstreams that libslirp would not use.

    libslirp forwards the guest's queries to the first IPv4 nameserver of
    /etc/resolv.conf on port 53 and never to another. The front end fills
    ``dns_upstreams`` from that file when --dns-upstream is not given, so the
    default passes; an explicit list passes only when libslirp would honour it.
    """
    if not config.dns_upstreams:
        return
    system = read_resolv_conf(resolv_conf, ipv6=getattr(config, "enable_ipv6", False))
    if config.dns_upstreams == system or (system and config.dns_upstreams == system[:1]):
        return
    given = ", ".join(f"{addr}:{port}" for addr, port in config.dns_upstreams)
    first = f"{system[0][0]}:53" if system else "none"
    raise ValueError(
        f"--dns-upstream {given} is not supported by the libslirp backend: libslirp always "
        f"asks the first nameserver of {resolv_conf} ({first}); use --backend=python"
    )


_CONNECTION = re.compile(
    r"^\s*(TCP|UDP|ICMP)\[([^\]]*)\]\s+(-?\d+)\s+(\S+)\s+(\d+|-)\s+(\S+)\s+(\d+|-)"
    r"\s+(\d+)\s+(\d+)\s*$"
)


def parse_connection_info(text: str, cidr: ipaddress.IPv4Network) -> list[dict]:
    """slirp_connection_info's table as dicts with the python backend's keys
    (proto, guest, host, state) and libslirp's extras (fd, queues).

    libslirp prints a guest-opened flow as guest -> destination, and a
    forwarded one as host socket -> guest: the side inside ``cidr`` is the
    guest. Listening forwards have state HOST_FORWARD; UDP and ICMP states
    are the seconds left before the flow expires."""
    out = []
    for line in text.splitlines():
        match = _CONNECTION.match(line)
        if match is None:
            continue
        proto, state, fd, src, src_port, dst, dst_port, recv_q, send_q = match.groups()
        source = src if src_port == "-" else f"{src}:{src_port}"
        destination = dst if dst_port == "-" else f"{dst}:{dst_port}"
        try:
            source_is_guest = ipaddress.IPv4Address(src) in cidr
        except ValueError:  # "*": an unbound listener
            source_is_guest = False
        guest, host = (source, destination) if source_is_guest else (destination, source)
        entry = {
            "proto": proto.lower(),
            "guest": guest,
            "host": host,
            "state": state,
            "fd": int(fd),
            "recv_queue": int(recv_q),
            "send_queue": int(send_q),
        }
        seconds = re.fullmatch(r"(-?\d+) sec", state)
        if seconds:
            entry["state"] = "open"
            entry["expires_in"] = int(seconds[1])
        out.append(entry)
    return out


class _Timer:
    __slots__ = ("cb", "cb_opaque", "timer_id", "expire_ms")

    def __init__(self, cb, cb_opaque, timer_id) -> None:
        self.cb = cb
        self.cb_opaque = cb_opaque
        self.timer_id = timer_id  # SlirpTimerId for timer_new_opaque timers, else None
        self.expire_ms: int | None = None


class LibslirpBackend(Backend):
    name = "libslirp"
    write_event = select.POLLOUT  # register() takes poll(2) masks here

    def __init__(self, config: NetworkConfig, binding: Binding | None = None) -> None:
        super().__init__(config)
        self.binding = binding or load()
        # --outbound-addr needs SlirpConfig version 2 (4.2), --disable-dns 3 (4.3).
        version = self.binding.config_version
        # IPv6 (in6_enabled) is there since 4.1; --outbound-addr6 needs version 2.
        self.supported_options = frozenset(
            name
            for name, needed in (
                ("outbound_addr", 2),
                ("disable_dns", 3),
                ("enable_ipv6", 1),
                ("outbound_addr6", 2),
            )
            if version >= needed
        )
        if not config.disable_dns:
            check_dns_upstreams(config)
        ffi = self.binding.ffi
        self.ffi = ffi
        self.lib = self.binding.lib
        self.counters: dict[str, int] = {
            "tap-write-dropped": 0,
            "guest-errors": 0,
            "frames-in": 0,
            "frames-out": 0,
        }
        self.tap_fd: int | None = None
        self._started_at = time.monotonic()  # for stats' uptime
        self.capture = None
        self._failure: BaseException | None = None
        # Poll state between slirp_pollfds_fill and slirp_pollfds_poll.
        self._poll_fds: list[int] = []
        self._poll_events: list[int] = []
        self._revents: dict[int, int] = {}
        # Timers: handle -> _Timer, and a heap of (expire_ms, seq, handle)
        # with stale entries skipped when popped.
        self._timers: dict[int, _Timer] = {}
        self._timer_heap: list[tuple[int, int, int]] = []
        self._timer_seq = itertools.count()
        self._timer_handles = itertools.count(1)
        # Host port forwards: id -> (is_udp, host_addr, host_port, guest_addr, guest_port)
        self._forwards: dict[int, tuple] = {}
        self._forward_ids = itertools.count(1)
        # Extra fds served by the loop (e.g. the API socket): fd -> (events, handler)
        self._extra: dict[int, tuple[int, object]] = {}
        # libslirp is not thread-safe: calls from other threads while the loop
        # runs are queued here and run by the loop, woken through a pipe.
        self._loop_thread: int | None = None
        self._calls: deque = deque()
        self._calls_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # With a link (--socket): frames for the VM, written once per turn,
        # and whether the VM went away (then a new instance for the next).
        self._outbox: list = []
        self._guest_left = False
        self._make_callbacks()
        self._slirp = self._new_slirp()

    # ------------------------------------------------------------ set-up
    def _make_callbacks(self) -> None:
        ffi = self.ffi
        # Every callback object is kept on self: libslirp holds raw pointers
        # to them, and a collected cffi callback would crash the process.
        self._cb_send = ffi.callback(
            "SlirpWriteCb", self._send_packet, error=-1, onerror=self._callback_error
        )
        self._cb_guest_error = ffi.callback(
            "void(*)(const char *, void *)", self._guest_error, onerror=self._callback_error
        )
        self._cb_clock = ffi.callback(
            "int64_t(*)(void *)", self._clock_get_ns, onerror=self._callback_error
        )
        self._cb_timer_new = ffi.callback(
            "void *(*)(SlirpTimerCb, void *, void *)",
            self.timer_new,
            onerror=self._callback_error,
        )
        self._cb_timer_free = ffi.callback(
            "void(*)(void *, void *)", self.timer_free, onerror=self._callback_error
        )
        self._cb_timer_mod = ffi.callback(
            "void(*)(void *, int64_t, void *)", self.timer_mod, onerror=self._callback_error
        )
        self._cb_register = ffi.callback("void(*)(int, void *)", self._ignore_fd)
        self._cb_unregister = ffi.callback("void(*)(int, void *)", self._ignore_fd)
        self._cb_notify = ffi.callback("void(*)(void *)", self._notify)
        self._cb_init_completed = ffi.callback("void(*)(Slirp *, void *)", self._init_completed)
        self._cb_timer_new_opaque = ffi.callback(
            "void *(*)(SlirpTimerId, void *, void *)",
            self.timer_new_opaque,
            onerror=self._callback_error,
        )
        self._cb_add_poll = ffi.callback(
            "SlirpAddPollCb", self._add_poll, error=-1, onerror=self._callback_error
        )
        self._cb_get_revents = ffi.callback(
            "SlirpGetREventsCb", self._get_revents, error=0, onerror=self._callback_error
        )
        callbacks = ffi.new("SlirpCb *")
        callbacks.send_packet = self._cb_send
        callbacks.guest_error = self._cb_guest_error
        callbacks.clock_get_ns = self._cb_clock
        callbacks.timer_new = self._cb_timer_new
        callbacks.timer_free = self._cb_timer_free
        callbacks.timer_mod = self._cb_timer_mod
        callbacks.register_poll_fd = self._cb_register
        callbacks.unregister_poll_fd = self._cb_unregister
        callbacks.notify = self._cb_notify
        callbacks.init_completed = self._cb_init_completed
        if self.binding.has_handle_timer:
            callbacks.timer_new_opaque = self._cb_timer_new_opaque
        self._callbacks = callbacks  # libslirp keeps this pointer for its lifetime

    def _new_slirp(self):
        config = self.config
        ffi = self.ffi
        cfg = ffi.new("SlirpConfig *")
        cfg.version = self.binding.config_version
        cfg.restricted = 0
        cfg.in_enabled = True
        cfg.vnetwork = _in_addr(config.network_address)
        cfg.vnetmask = _in_addr(config.netmask)
        cfg.vhost = _in_addr(config.gateway)
        cfg.vdhcp_start = _in_addr(config.dhcp_start)
        cfg.vnameserver = _in_addr(config.dns)
        # -6: libslirp's own IPv6 (RA, NDP, DHCPv6, ICMPv6 echo to its
        # addresses), on our prefix, gateway and DNS addresses.
        cfg.in6_enabled = bool(config.enable_ipv6)
        cfg.vprefix_addr6 = _in6_addr(config.ipv6_network)
        cfg.vprefix_len = 64  # NetworkConfig takes /64s only
        cfg.vhost6 = _in6_addr(config.ipv6_gateway)
        cfg.vnameserver6 = _in6_addr(config.ipv6_dns)
        cfg.if_mtu = config.mtu
        cfg.if_mru = config.mtu
        cfg.disable_host_loopback = config.disable_host_loopback
        cfg.enable_emu = False
        version = self.binding.config_version
        self._outbound = ffi.NULL
        if config.outbound_addr and version >= 2:
            # libslirp keeps this pointer: it lives as long as the backend.
            self._outbound = ffi.new("struct sockaddr_in *")
            self._outbound.sin_family = socket.AF_INET
            self._outbound.sin_addr = _in_addr(ipaddress.IPv4Address(config.outbound_addr))
            cfg.outbound_addr = self._outbound
        self._outbound6 = ffi.NULL
        if config.enable_ipv6 and config.outbound_addr6 and version >= 2:
            self._outbound6 = ffi.new("struct sockaddr_in6 *")
            self._outbound6.sin6_family = socket.AF_INET6
            self._outbound6.sin6_addr = _in6_addr(config.outbound_addr6)
            cfg.outbound_addr6 = self._outbound6
        if config.disable_dns and version >= 3:
            # Note libslirp's meaning: the DNS address is then an ordinary
            # outside address, as with slirp4netns --disable-dns.
            cfg.disable_dns = True
        self.slirp_config = cfg  # the SlirpConfig given to slirp_new (read by tests)
        slirp = self.lib.slirp_new(cfg, self._callbacks, ffi.NULL)
        if slirp == ffi.NULL:
            raise RuntimeError(
                f"libslirp {self.binding.version_string} refused the configuration "
                f"(network {config.cidr}, MTU {config.mtu})"
            )
        return slirp

    # ------------------------------------------------------- callbacks
    def _callback_error(self, exc_type, exc, tb) -> None:
        # An exception cannot cross the C frames: remember it, stop the loop.
        if self._failure is None:
            self._failure = exc if exc is not None else exc_type()

    def _send_packet(self, buf, length, opaque) -> int:
        frame = self.ffi.buffer(buf, length)[:]
        self.counters["frames-out"] += 1
        if self.capture is not None:
            self.capture.write(frame)
        if self.link is not None:  # a VM's socket: written in one batch per turn
            self._outbox.append(frame)
            return length
        if self.tap_fd is None:
            self.counters["tap-write-dropped"] += 1
            return length
        if not write_tap(self.tap_fd, frame):
            self.counters["tap-write-dropped"] += 1
        return length

    def _guest_error(self, msg, opaque) -> None:
        self.counters["guest-errors"] += 1
        log.info("libslirp: guest error: %s", self.ffi.string(msg).decode("utf-8", "replace"))

    @staticmethod
    def _clock_get_ns(opaque) -> int:
        return time.monotonic_ns()

    # libslirp's timer callbacks (SlirpCb's timer_new, timer_free, timer_mod),
    # and the loop's two timer steps: public, so that a test drives them
    # without libslirp.
    def timer_new(self, cb, cb_opaque, opaque):
        return self._add_timer(_Timer(cb, cb_opaque, None))

    def timer_new_opaque(self, timer_id, cb_opaque, opaque):
        return self._add_timer(_Timer(None, cb_opaque, timer_id))

    def _add_timer(self, timer: _Timer):
        handle = next(self._timer_handles)
        self._timers[handle] = timer
        return self.ffi.cast("void *", handle)

    def _timer_handle(self, timer) -> int:
        return int(self.ffi.cast("uintptr_t", timer))

    def timer_free(self, timer, opaque) -> None:
        self._timers.pop(self._timer_handle(timer), None)

    def timer_mod(self, timer, expire_ms, opaque) -> None:
        handle = self._timer_handle(timer)
        entry = self._timers.get(handle)
        if entry is None:
            return
        entry.expire_ms = expire_ms
        heapq.heappush(self._timer_heap, (expire_ms, next(self._timer_seq), handle))

    @staticmethod
    def _ignore_fd(fd, opaque) -> None:
        """register_poll_fd / unregister_poll_fd: we ask again before every poll."""

    @staticmethod
    def _notify(opaque) -> None:
        """The loop calls slirp_pollfds_fill before every sleep, so nothing to kick."""

    @staticmethod
    def _init_completed(slirp, opaque) -> None:
        """Nothing to do: slirp_new returns the same pointer."""

    def _add_poll(self, fd, events, opaque) -> int:
        self._poll_fds.append(fd)
        self._poll_events.append(events)
        return len(self._poll_fds) - 1

    def _get_revents(self, idx, opaque) -> int:
        revents = self._revents.get(self._poll_fds[idx])
        if not revents:
            return 0
        return poll_to_slirp(revents)

    # ------------------------------------------------------------ timers
    def next_timer_ms(self) -> int | None:
        """The earliest live deadline (milliseconds), if any."""
        heap = self._timer_heap
        timers = self._timers
        while heap:
            expire_ms, _, handle = heap[0]
            entry = timers.get(handle)
            if entry is not None and entry.expire_ms == expire_ms:
                return expire_ms
            heapq.heappop(heap)
        return None

    def run_timers(self, now_ms: int) -> None:
        """Fire every timer due at ``now_ms``, in deadline order."""
        heap = self._timer_heap
        while heap and heap[0][0] <= now_ms:
            expire_ms, _, handle = heapq.heappop(heap)
            entry = self._timers.get(handle)
            if entry is None or entry.expire_ms != expire_ms:
                continue
            entry.expire_ms = None  # one shot; libslirp re-arms with timer_mod
            if entry.timer_id is None:
                entry.cb(entry.cb_opaque)
            else:
                self.lib.slirp_handle_timer(self._slirp, entry.timer_id, entry.cb_opaque)

    # ------------------------------------------------------- extra fds
    def register(self, fd: int, events: int, handler) -> None:
        """Serve ``fd`` in the loop: ``handler(revents, now)`` on poll events
        (select.POLL* masks). The handler runs in the loop's thread and may call
        the backend's methods directly. Safe to call from any thread."""
        self._in_loop(self._extra.__setitem__, fd, (events, handler))

    def unregister(self, fd: int) -> None:
        self._in_loop(self._extra.pop, fd, None)

    # ------------------------------------------------------------ forwards
    def add_hostfwd(
        self, proto: str, host_addr: str, host_port: int, guest_addr: str, guest_port: int
    ) -> int:
        """Forward host_addr:host_port (tcp or udp) to guest_addr:guest_port; the id.

        Raises ValueError for bad arguments, OSError (EADDRINUSE) when the host
        port cannot be bound. Safe to call from any thread.
        """
        return self._in_loop(self._add_hostfwd, proto, host_addr, host_port, guest_addr, guest_port)

    def _add_hostfwd(self, proto, host_addr, host_port, guest_addr, guest_port) -> int:
        self._check_open()
        if proto not in ("tcp", "udp"):
            raise ValueError(f"proto must be tcp or udp, got {proto!r}")
        if ":" in str(host_addr):
            # libslirp's IPv6 forwards (slirp_add_hostxfwd) need the guest's
            # address up front; ours learn it. Not offered here.
            raise ValueError("IPv6 forwards are not supported by the libslirp backend")
        host = ipaddress.IPv4Address(host_addr)
        guest = ipaddress.IPv4Address(guest_addr)
        for port in (host_port, guest_port):
            if not 1 <= port <= 65535:
                raise ValueError(f"port must be between 1 and 65535, got {port}")
        if guest not in ipaddress.IPv4Network(self.config.cidr):
            raise ValueError(f"guest address {guest} is outside {self.config.cidr}")
        is_udp = int(proto == "udp")
        entry = (is_udp, host, host_port, guest, guest_port)
        if any(e[:3] == entry[:3] for e in self._forwards.values()):
            raise OSError(errno.EADDRINUSE, f"{proto} {host}:{host_port} is already forwarded")
        result = self.lib.slirp_add_hostfwd(
            self._slirp, is_udp, _in_addr(host), host_port, _in_addr(guest), guest_port
        )
        if result < 0:
            raise OSError(errno.EADDRINUSE, f"cannot listen on {proto} {host}:{host_port}")
        forward_id = next(self._forward_ids)
        self._forwards[forward_id] = entry
        return forward_id

    def remove_hostfwd(self, forward_id: int) -> None:
        """Stop forwarding (connections already made carry on); KeyError if unknown."""
        self._in_loop(self._remove_hostfwd, forward_id)

    def _remove_hostfwd(self, forward_id: int) -> None:
        self._check_open()
        is_udp, host, host_port, _, _ = self._forwards.pop(forward_id)
        if self.lib.slirp_remove_hostfwd(self._slirp, is_udp, _in_addr(host), host_port) < 0:
            log.warning("libslirp had no forward for %s:%d", host, host_port)

    def list_hostfwd(self) -> list[dict]:
        """The forwards in place, in the order they were added."""
        return self._in_loop(self._list_hostfwd)

    def _list_hostfwd(self) -> list[dict]:
        return [
            {
                "id": forward_id,
                "proto": "udp" if is_udp else "tcp",
                "host_addr": str(host),
                "host_port": host_port,
                "guest_addr": str(guest),
                "guest_port": guest_port,
            }
            for forward_id, (is_udp, host, host_port, guest, guest_port) in self._forwards.items()
        ]

    def connection_info(self) -> str:
        """libslirp's own table of sockets (slirp_connection_info)."""
        return self._in_loop(self._connection_info)

    def _connection_info(self) -> str:
        self._check_open()
        raw = self.lib.slirp_connection_info(self._slirp)
        if raw == self.ffi.NULL:
            return ""
        try:
            return self.ffi.string(raw).decode("utf-8", "replace")
        finally:
            if self.binding.glib is not None:
                self.binding.glib.g_free(raw)

    def list_connections(self) -> list[dict]:
        """Every socket libslirp holds, from slirp_connection_info."""
        cidr = ipaddress.IPv4Network(self.config.cidr)
        return parse_connection_info(self.connection_info(), cidr)

    def stats(self) -> dict:
        """What libslirp lets us count: our own counters around it (frames,
        guest errors), its sockets per protocol (slirp_connection_info), the
        process's descriptors, uptime. It keeps no drop counts, memory
        figures or flow limits that it would tell: those are "unsupported"."""
        flows: dict[str, int] = {}
        for entry in self.list_connections():
            if entry["state"] != "HOST_FORWARD":  # a published port's listener
                flows[entry["proto"]] = flows.get(entry["proto"], 0) + 1
        reply = {
            "backend": self.name,
            "uptime": round(time.monotonic() - self._started_at, 3),
            "counters": {"backend": dict(self.counters)},
            "flows": flows,
            "unsupported": ["drops", "memory", "flow_limits"],
        }
        try:  # the whole process's, as libslirp opens them unseen
            reply["descriptors"] = {
                "open": len(os.listdir("/proc/self/fd")),
                "rlimit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            }
        except OSError:  # no /proc (after the sandbox's pivot_root)
            reply["unsupported"].append("descriptors")
        return reply

    # ------------------------------------------------------ thread safety
    def _check_open(self) -> None:
        if self._slirp is None:
            raise RuntimeError("the libslirp backend has stopped")

    def _in_loop(self, function, *args):
        """Call ``function(*args)`` in the loop's thread (now, if that is us)."""
        with self._calls_lock:
            if self._loop_thread is None or self._loop_thread == threading.get_ident():
                direct = True
            else:
                direct = False
                future: Future = Future()
                self._calls.append((function, args, future))
        if direct:
            return function(*args)
        try:
            os.write(self._wake_w, b"c")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already
        return future.result(timeout=10)

    def _run_calls(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            with self._calls_lock:
                if not self._calls:
                    return
                function, args, future = self._calls.popleft()
            try:
                future.set_result(function(*args))
            except Exception as exc:
                future.set_exception(exc)

    def _fail_calls(self) -> None:
        with self._calls_lock:
            self._loop_thread = None
            calls, self._calls = self._calls, deque()
        for _, _, future in calls:
            future.set_exception(RuntimeError("the libslirp backend has stopped"))

    # ------------------------------------------------------------- running
    def start(self, tap_fd: int, stop_fd: int) -> None:
        """Open the pcap file and take the TAP; run() calls it if needed."""
        self._check_open()
        if self.tap_fd is not None:
            return
        from pyslirp.pcap import PcapWriter

        self.capture = PcapWriter(self.config.pcap_path) if self.config.pcap_path else None
        self.tap_fd = tap_fd
        os.set_blocking(tap_fd, False)

    def run(self, tap_fd: int, stop_fd: int) -> None:
        self.start(tap_fd, stop_fd)
        log.info(
            "libslirp %s (SlirpConfig version %d)",
            self.binding.version_string,
            self.binding.config_version,
        )
        with self._calls_lock:
            self._loop_thread = threading.get_ident()
        try:
            self._loop(tap_fd, stop_fd)
        finally:
            self._fail_calls()
            self.close()

    def _loop(self, tap_fd: int, stop_fd: int) -> None:
        ffi = self.ffi
        lib = self.lib
        slirp = self._slirp
        timeout = ffi.new("uint32_t *")
        poller = select.poll()
        registered: dict[int, int] = {}
        batch = self.config.tap_batch
        read = os.read
        slirp_input = lib.slirp_input
        from_buffer = ffi.from_buffer
        add_poll = self._cb_add_poll
        get_revents = self._cb_get_revents
        POLLIN = select.POLLIN
        wake_fd = self._wake_r
        link = self.link
        if link is not None:
            link.on_disconnect = self._on_guest_left
        # libslirp reads its clock (a process-wide "curtime") only in
        # slirp_pollfds_poll, and stamps new sockets with it in slirp_input.
        # Prime it now: a flow opened by the very first guest frame would
        # otherwise expire at once (created at time 0).
        self._poll_fds.clear()
        self._poll_events.clear()
        self._revents = {}
        timeout[0] = 0
        lib.slirp_pollfds_fill(slirp, timeout, add_poll, ffi.NULL)
        lib.slirp_pollfds_poll(slirp, 0, get_revents, ffi.NULL)
        while True:
            # What libslirp wants watched, and for how long we may sleep.
            self._poll_fds.clear()
            self._poll_events.clear()
            due = self.next_timer_ms()
            if due is None:
                timeout[0] = UINT32_MAX
            else:
                timeout[0] = max(0, min(UINT32_MAX - 1, due - time.monotonic_ns() // 1_000_000))
            lib.slirp_pollfds_fill(slirp, timeout, add_poll, ffi.NULL)
            wanted = {tap_fd: POLLIN, stop_fd: POLLIN, wake_fd: POLLIN}
            for fd, events in zip(self._poll_fds, self._poll_events):
                wanted[fd] = wanted.get(fd, 0) | SLIRP_TO_POLL[events & 31]
            for fd, (events, _) in self._extra.items():
                wanted[fd] = wanted.get(fd, 0) | events
            for fd in [fd for fd in registered if fd not in wanted]:
                del registered[fd]
                try:
                    poller.unregister(fd)
                except KeyError:
                    pass
            for fd, events in wanted.items():
                old = registered.get(fd)
                if old != events:
                    if old is None:
                        poller.register(fd, events)
                    else:
                        poller.modify(fd, events)
                    registered[fd] = events
            wait = None if timeout[0] == UINT32_MAX else timeout[0]
            select_error = 0
            try:
                ready = poller.poll(wait)
            except OSError:
                ready = []
                select_error = 1
            self._revents = revents = dict(ready)
            # The guest's frames first: slirp_pollfds_poll ends by sending what
            # waited for an ARP answer, which may have just arrived.
            if link is not None:
                if tap_fd in revents:
                    for frame in link.read_frames():
                        self.counters["frames-in"] += 1
                        if self.capture is not None:
                            self.capture.write(frame)
                        slirp_input(slirp, from_buffer("uint8_t[]", frame), len(frame))
                    if self._failure is not None:
                        raise self._failure
            elif tap_fd in revents:
                for _ in range(batch):
                    try:
                        frame = read(tap_fd, MAX_FRAME)
                    except (BlockingIOError, InterruptedError):
                        break
                    if not frame:
                        break
                    self.counters["frames-in"] += 1
                    if self.capture is not None:
                        self.capture.write(frame)
                    slirp_input(slirp, from_buffer("uint8_t[]", frame), len(frame))
                if self._failure is not None:
                    raise self._failure
            lib.slirp_pollfds_poll(slirp, select_error, get_revents, ffi.NULL)
            if self._failure is not None:
                raise self._failure
            if wake_fd in revents:
                self._run_calls()
            if self._extra:
                now = time.monotonic()
                for fd, (_, handler) in list(self._extra.items()):
                    mask = revents.get(fd)
                    if mask:
                        handler(mask, now)
            self.run_timers(time.monotonic_ns() // 1_000_000)
            if self._failure is not None:
                raise self._failure
            if self._outbox:
                outbox, self._outbox = self._outbox, []
                link.write_frames(outbox)
            if self.capture is not None:
                self.capture.flush()
            if stop_fd in revents:
                return
            if self._guest_left:
                if not link.reconnect:
                    return
                slirp = self._next_guest()

    def _on_guest_left(self) -> None:
        self._guest_left = True

    def _next_guest(self):
        """The VM went away: free the instance (closing its flows' sockets)
        and make a new one for the next VM, with the same forwards and ids."""
        self._guest_left = False
        self._outbox = []
        self.lib.slirp_cleanup(self._slirp)
        self._timers.clear()
        self._timer_heap.clear()
        self._slirp = slirp = self._new_slirp()
        for entry in self._forwards.values():
            is_udp, host, host_port, guest, guest_port = entry
            if self.lib.slirp_add_hostfwd(
                slirp, is_udp, _in_addr(host), host_port, _in_addr(guest), guest_port
            ) < 0:
                log.warning("cannot publish %s:%s again", host, host_port)
        self.lib.slirp_pollfds_poll(slirp, 0, self._cb_get_revents, self.ffi.NULL)
        return slirp

    def close(self) -> None:
        """Free the libslirp instance (closing its host sockets) and the pcap
        file; idempotent."""
        slirp, self._slirp = self._slirp, None
        if slirp is not None:
            self.lib.slirp_cleanup(slirp)
            os.close(self._wake_r)
            os.close(self._wake_w)
        self.tap_fd = None
        capture, self.capture = self.capture, None
        if capture is not None:
            capture.close()
        self._forwards.clear()
        self._timers.clear()
        self._timer_heap.clear()
