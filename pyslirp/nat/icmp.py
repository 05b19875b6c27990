"""ICMP echo relay through host ping sockets.

Read first: RFC 792 (echo and the errors), RFC 1122 section 3.2.2.6 (echo),
icmp(7) on Linux "ping sockets" and ``net.ipv4.ping_group_range``.

The stack answers echo requests to its own addresses (gateway, DNS) itself.
Echo requests to any other address reach ``IcmpRelay.on_echo`` and leave the
host through an unprivileged ICMP socket, ``socket(AF_INET, SOCK_DGRAM,
IPPROTO_ICMP)``. The kernel puts the socket's own identifier (its "port") in
every request and hands the socket only the replies that carry it, so each
(guest address, guest identifier) pair gets a socket of its own and every
reply goes back with the guest's identifier; sequence number and payload pass
unchanged. A socket serves any number of destinations, lives while the guest
pings, and is closed after ``ping_idle_timeout`` seconds without traffic; at
most ``max_ping_sockets`` are open (the least recently used one makes room).

The request leaves with the guest's TTL less one (this relay is a hop), so
that traceroute-style probes expire where they would. ICMP errors the host's
network returns for our requests (net/host unreachable, fragmentation needed,
TTL exceeded) arrive through IP_RECVERR and are passed on to the guest, from
the address that sent them, quoting the guest's own request. Errors the host
reports at once (no route, a prohibiting route) become the matching
destination-unreachable message.

The address map decides what may be pinged: another address inside the
virtual network has nobody behind it (ICMP host unreachable), and 0/8,
127/8 and multicast destinations get ICMP net unreachable.

IPv6 works the same way through ``socket(AF_INET6, SOCK_DGRAM,
IPPROTO_ICMPV6)`` (the same sysctl governs both): echo requests to fd00::2,
fe80::2 and fd00::3 are the stack's, others leave with the guest's hop limit
less one, and ICMPv6 destination unreachable, packet too big and time
exceeded come back through IPV6_RECVERR. The NAT side names errors in ICMP
(v4) terms for both families; the stack sends the ICMPv6 equivalent.

Where the host does not permit ping sockets -- the gid of this process lies
outside ``net.ipv4.ping_group_range`` (the kernel default is "1 0", nobody),
so ``socket()`` fails with EACCES or EPERM -- every echo request to an outside
address is answered with ICMP destination unreachable, code 13
(communication administratively prohibited), which ping prints as "Packet
filtered", and one warning names the sysctl. Nothing is sent to the host's
network then; pings to the gateway and DNS addresses still work.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections import Counter

from pyslirp.log import get_logger
from pyslirp.stack import icmpv4, icmpv6, ipv4, ipv6
from pyslirp.stack.names import address_text

from .addressing import AddressMap, to_text
from .udp import ICMPV6_AS_V4, IPV6_RECVERR, SO_EE_ORIGIN_ICMP6

log = get_logger("pyslirp.icmp")

IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
# struct sock_extended_err: errno, origin, type, code, pad, info, data
_EXTENDED_ERR = struct.Struct("=IBBBBII")
# struct sockaddr_in (SO_EE_OFFENDER follows sock_extended_err): family, port, address
_SOCKADDR_IN = struct.Struct("=H2s4s")
_SOCKADDR_IN6 = struct.Struct("=H2s4s16s")  # family, port, flow info, address
SO_EE_ORIGIN_ICMP = 2
_ECHO = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence
PING_SYSCTL = "net.ipv4.ping_group_range"
RECV_BATCH = 64  # datagrams per socket per wake-up, for fairness
QUOTES_KEPT = 16  # recent requests per socket kept to quote in ICMP errors
# Errors a sendto() reports at once, as the destination-unreachable code to answer.
_SEND_ERRORS = {
    errno.ENETUNREACH: icmpv4.NET_UNREACHABLE,
    errno.EHOSTUNREACH: icmpv4.HOST_UNREACHABLE,
    errno.EACCES: icmpv4.ADMIN_PROHIBITED,
    errno.EPERM: icmpv4.ADMIN_PROHIBITED,
}
_RELAYED_ERRORS = frozenset({icmpv4.DEST_UNREACHABLE, icmpv4.TIME_EXCEEDED})


def _relayed_error(level: int, kind: int, origin: int, icmp_type: int, code: int):
    """An ICMP or ICMPv6 error worth relaying, as ICMP (v4) (type, code)."""
    if level == socket.IPPROTO_IPV6 and kind == IPV6_RECVERR and origin == SO_EE_ORIGIN_ICMP6:
        return ICMPV6_AS_V4.get((icmp_type, code))
    if (level, kind, origin) == (socket.SOL_IP, IP_RECVERR, SO_EE_ORIGIN_ICMP):
        return (icmp_type, code) if icmp_type in _RELAYED_ERRORS else None
    return None


def open_ping_socket(bind_addr: str = "0.0.0.0", family: int = socket.AF_INET) -> socket.socket:
    """A non-blocking ping socket with IP_RECVERR (IPV6_RECVERR), bound to a
    fresh identifier (on ``bind_addr``: --outbound-addr or --outbound-addr6)."""
    kind = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK  # no fcntl per flow
    if family == socket.AF_INET6:
        sock = socket.socket(socket.AF_INET6, kind, socket.IPPROTO_ICMPV6)
    else:
        sock = socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
        sock.bind((bind_addr, 0))
    except OSError:
        sock.close()
        raise
    return sock


def ping_group_range() -> str:
    try:
        with open("/proc/sys/net/ipv4/ping_group_range") as f:
            return " ".join(f.read().split())
    except OSError:
        return "unknown"


class PingFlow:
    """One host ping socket, standing for one (guest address, identifier)."""

    __slots__ = (
        "guest",
        "guest_ident",
        "host_ident",
        "last_active",
        "quotes",
        "relay",
        "sock",
        "ttl",
    )

    def __init__(self, relay, sock, guest: bytes, guest_ident: int, now: float) -> None:
        self.relay = relay
        self.sock = sock
        self.guest = guest
        self.guest_ident = guest_ident
        self.host_ident = sock.getsockname()[1]
        self.last_active = now
        self.ttl = 0  # the IP_TTL last set on the socket; 0: the host's default
        self.quotes: dict[int, bytes] = {}  # sequence -> the guest's request, to quote

    @property
    def name(self) -> str:
        """``icmp guest>* id N``: one host socket for the guest's identifier,
        whatever it pings, so the peer is a wildcard (as UdpFlow.name)."""
        return f"icmp {address_text(self.guest)}>* id {self.guest_ident}"

    def on_ready(self, mask: int, now: float) -> None:
        self.relay.read_flow(self, now)

    def fail(self, exc: Exception, now: float) -> None:
        """The loop's barrier: this socket's handler raised; close it."""
        self.relay.close_flow(self)


class IcmpRelay:
    def __init__(self, loop, open_socket=open_ping_socket) -> None:
        self.loop = loop
        self.stack = loop.stack
        self.config = loop.config
        self.addresses = AddressMap(loop.config)
        self.open_socket = open_socket
        self.flows: dict[tuple[bytes, int], PingFlow] = {}
        self.counters: Counter = Counter()
        self._warned_not_permitted = False
        self.descriptors = loop.descriptors  # host descriptors, shared with UDP and TCP
        self.max_flows = self.descriptors.table_size(self.config.max_ping_sockets)

    # ------------------------------------------------------------ guest -> host
    def on_echo(self, event, now: float) -> None:
        """Relay one IcmpEchoRequested event."""
        stack = self.stack
        host = self.addresses.to_host(event.dst)
        if isinstance(host, int):
            self.counters["refused-by-address"] += 1
            stack.send_icmp_error(icmpv4.DEST_UNREACHABLE, host, event.packet, now)
            return
        flow = self.flows.get((event.src, event.ident))
        if flow is None:
            flow = self._open(event, now)
            if flow is None:
                return
        flow.last_active = now
        ttl = max(1, event.ttl - 1)
        v6 = len(event.src) == 16
        if ttl != flow.ttl:
            if v6:
                flow.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
            else:
                flow.sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            flow.ttl = ttl
        quotes = flow.quotes
        quotes.pop(event.sequence, None)
        quotes[event.sequence] = event.packet
        if len(quotes) > QUOTES_KEPT:
            del quotes[next(iter(quotes))]
        # The kernel fills in the identifier and the checksum.
        request = icmpv6.ECHO_REQUEST if v6 else icmpv4.ECHO_REQUEST
        message = _ECHO.pack(request, 0, 0, 0, event.sequence) + event.payload
        try:
            flow.sock.sendto(message, (host, 0))
        except BlockingIOError:
            stack.drops["icmp-host-buffer-full"] += 1
            return
        except OSError as exc:
            code = _SEND_ERRORS.get(exc.errno)
            if code is not None:
                self.counters["send-refused"] += 1
                stack.send_icmp_error(icmpv4.DEST_UNREACHABLE, code, event.packet, now)
            else:
                stack.drops[f"icmp-sendto-{errno.errorcode.get(exc.errno, exc.errno)}"] += 1
            return
        self.counters["echo-requests"] += 1

    def _open(self, event, now: float):
        if len(self.flows) >= self.config.max_ping_sockets:
            self.expire(now)
        if len(self.flows) >= self.config.max_ping_sockets:
            oldest = min(self.flows, key=lambda key: self.flows[key].last_active)
            self._trace(now, "icmp.flow-evicted", self.flows[oldest], "the table is full")
            self._close(oldest)
            self.counters["sockets-evicted"] += 1
        descriptors = self.descriptors
        if not descriptors.acquire():
            self.counters["sockets-refused"] += 1
            self._trace_refused(now, event, "no descriptor for it")
            self.stack.send_icmp_error(
                icmpv4.DEST_UNREACHABLE, icmpv4.ADMIN_PROHIBITED, event.packet, now
            )
            return None
        try:
            if len(event.src) == 16:
                bind_addr = self.config.outbound_addr6 or "::"
                sock = self.open_socket(bind_addr, socket.AF_INET6)
            else:
                sock = self.open_socket(self.config.outbound_addr or "0.0.0.0")
        except OSError as exc:
            self.counters["sockets-refused"] += 1
            descriptors.release()
            self._trace_refused(now, event, f"cannot open a ping socket: {exc}")
            if exc.errno in (errno.EACCES, errno.EPERM):
                if not self._warned_not_permitted:
                    self._warned_not_permitted = True
                    log.warning(
                        "ping sockets are not permitted for gid %d (sysctl %s = %s): "
                        "echo requests to outside addresses are answered with ICMP "
                        "'administratively prohibited'",
                        os.getgid(),
                        PING_SYSCTL,
                        ping_group_range(),
                    )
            else:  # EMFILE, ENFILE, ENOBUFS: refuse this one, keep the others
                log.warning("cannot open a ping socket: %s", exc)
            self.stack.send_icmp_error(
                icmpv4.DEST_UNREACHABLE, icmpv4.ADMIN_PROHIBITED, event.packet, now
            )
            return None
        flow = PingFlow(self, sock, event.src, event.ident, now)
        self.flows[(event.src, event.ident)] = flow
        self.loop.register(sock, 1, flow.on_ready, on_error=flow.fail)
        self.counters["sockets-opened"] += 1
        log.info("%s opened (host id %d)", flow.name, flow.host_ident)
        tracer = self.loop.tracer
        if tracer is not None:
            tracer(
                now,
                "icmp.flow-created",
                flow.name,
                f"ping socket opened (host id {flow.host_ident}) for {to_text(event.dst)}",
                host_ident=flow.host_ident,
                peer=to_text(event.dst),
            )
        return flow

    def _trace(self, now: float, event: str, flow: PingFlow, why: str) -> None:
        tracer = self.loop.tracer
        if tracer is not None:
            tracer(now, event, flow.name, f"ping socket closed: {why}", reason=why)

    def _trace_refused(self, now: float, event, why: str) -> None:
        tracer = self.loop.tracer
        if tracer is not None:
            tracer(
                now,
                "icmp.flow-refused",
                f"icmp {address_text(event.src)}>* id {event.ident}",
                f"echo refused: {why}; ICMP prohibited sent",
                reason=why,
            )

    # ------------------------------------------------------------ host -> guest
    def read_flow(self, flow: PingFlow, now: float) -> None:
        stack = self.stack
        reply_type = icmpv6.ECHO_REPLY if len(flow.guest) == 16 else icmpv4.ECHO_REPLY
        for _ in range(RECV_BATCH):
            try:
                data, addr = flow.sock.recvfrom(65535)
            except BlockingIOError:
                break
            except OSError:  # an error is queued: read it below
                break
            if len(data) < _ECHO.size:
                continue
            icmp_type, _code, _csum, _ident, sequence = _ECHO.unpack_from(data)
            if icmp_type != reply_type:
                continue
            flow.last_active = now
            self.counters["echo-replies"] += 1
            stack.send_echo_reply(
                self.addresses.to_guest(addr[0]),
                flow.guest,
                flow.guest_ident,
                sequence,
                data[_ECHO.size :],
                now,
            )
        self._read_errors(flow, now)

    def _read_errors(self, flow: PingFlow, now: float) -> None:
        """Pass the ICMP errors queued on the socket on to the guest."""
        for _ in range(RECV_BATCH):
            try:
                data, ancdata, _flags, addr = flow.sock.recvmsg(
                    _ECHO.size, 512, socket.MSG_ERRQUEUE
                )
            except OSError:  # EAGAIN: the queue is empty
                return
            for level, kind, cdata in ancdata:
                if len(cdata) < 16:
                    continue
                _errno, origin, icmp_type, code, _pad, info, _ = _EXTENDED_ERR.unpack_from(cdata)
                error = _relayed_error(level, kind, origin, icmp_type, code)
                if error is None:
                    continue
                icmp_type, code = error
                self._relay_error(flow, data, cdata, addr, icmp_type, code, info, now)

    def _relay_error(self, flow, data, cdata, addr, icmp_type, code, info, now) -> None:
        # The sender of the error (SO_EE_OFFENDER), else the destination itself.
        sender = addr[0] if addr else None
        if len(cdata) >= _EXTENDED_ERR.size + _SOCKADDR_IN.size:
            family, _port, raw = _SOCKADDR_IN.unpack_from(cdata, _EXTENDED_ERR.size)
            if family == socket.AF_INET:
                sender = socket.inet_ntoa(raw)
            elif family == socket.AF_INET6 and len(cdata) >= (
                _EXTENDED_ERR.size + _SOCKADDR_IN6.size
            ):
                raw6 = _SOCKADDR_IN6.unpack_from(cdata, _EXTENDED_ERR.size)[3]
                sender = socket.inet_ntop(socket.AF_INET6, raw6)
        if sender is None:
            return
        sequence = _ECHO.unpack_from(data)[4] if len(data) >= _ECHO.size else None
        quote = flow.quotes.get(sequence)
        if quote is None:
            if sequence is None or not addr:
                return
            quote = self._synthetic_quote(flow, self.addresses.to_guest(addr[0]), sequence)
        frag_needed = (icmp_type, code) == (icmpv4.DEST_UNREACHABLE, icmpv4.FRAGMENTATION_NEEDED)
        mtu = info if frag_needed else 0
        self.counters["errors-relayed"] += 1
        self.stack.send_icmp_error(
            icmp_type, code, quote, now, mtu=mtu, src=self.addresses.to_guest(sender)
        )

    @staticmethod
    def _synthetic_quote(flow: PingFlow, dst: bytes, sequence: int) -> bytes:
        """The start of a request the guest sent, when it is no longer kept."""
        if len(flow.guest) == 16:
            head = ipv6.header(flow.guest, dst, icmpv6.PROTOCOL, _ECHO.size)
            return head + _ECHO.pack(icmpv6.ECHO_REQUEST, 0, 0, flow.guest_ident, sequence)
        head = ipv4.header(flow.guest, dst, ipv4.PROTO_ICMP, _ECHO.size, 0)
        return head + _ECHO.pack(icmpv4.ECHO_REQUEST, 0, 0, flow.guest_ident, sequence)

    # ------------------------------------------------------------ timers
    def next_deadline(self):
        if not self.flows:
            return None
        oldest = min(flow.last_active for flow in self.flows.values())
        return oldest + self.config.ping_idle_timeout

    def handle_timer(self, now: float) -> None:
        self.expire(now)

    def timer_failed(self, exc: Exception, now: float) -> None:
        """The loop's barrier: the sweep raised; close what it was closing,
        and anything stale, so that the deadline moves on."""
        timeout = self.config.ping_idle_timeout
        for flow in [f for f in self.flows.values() if now - f.last_active >= timeout]:
            self.close_flow(flow)

    def on_error(self, event, exc: Exception, now: float) -> None:
        """The echo handler raised: close that guest identifier's socket and
        tell the guest (ICMP administratively prohibited)."""
        flow = self.flows.get((event.src, event.ident))
        if flow is not None:
            self.close_flow(flow)
        self.stack.send_icmp_error(
            icmpv4.DEST_UNREACHABLE, icmpv4.ADMIN_PROHIBITED, event.packet, now
        )

    def close_flow(self, flow: PingFlow) -> None:
        self.counters["sockets-failed"] += 1
        key = (flow.guest, flow.guest_ident)
        if self.flows.get(key) is flow:
            self._close(key)
        elif flow.sock.fileno() >= 0:  # half closed when it failed
            self.loop.unregister(flow.sock)
            flow.sock.close()
            self.descriptors.release()

    def expire(self, now: float) -> None:
        timeout = self.config.ping_idle_timeout
        for key in [k for k, f in self.flows.items() if now - f.last_active >= timeout]:
            self._trace(now, "icmp.flow-expired", self.flows[key], f"idle {timeout:g}s")
            self._close(key)
            self.counters["sockets-expired"] += 1

    def _close(self, key) -> None:
        flow = self.flows.pop(key)
        self.loop.unregister(flow.sock)
        flow.sock.close()
        self.descriptors.release()
        log.info("%s closed", flow.name)  # the name the trace gives it

    def close(self) -> None:
        for key in list(self.flows):
            self._close(key)
