"""TCP NAT: each guest connection relayed onto one host socket.

A guest SYN reaches us as TcpConnectRequested. We connect a non-blocking host
socket to the mapped address (10.0.2.2 is the host's 127.0.0.1) and answer
the stack once the connect finishes: accept (the guest gets SYN-ACK), or
refuse with a RST (ECONNREFUSED) or an ICMP destination unreachable
(unreachable networks and hosts, a connect that timed out, a firewall).
Repeated guest SYNs are absorbed by the stack, so there is one host
connection per guest connection.

Flow control both ways without growing memory: guest bytes wait in the
stack's receive buffer until the host socket takes them (its free space is
the window the guest sees); host bytes are read only as far as the stack's
send buffer has room, and reading stops until the guest acknowledges.

Closing: the guest's FIN becomes shutdown(SHUT_WR) once its bytes are out;
the host's EOF becomes our FIN after the buffered bytes; a reset either way
becomes a reset the other way (SO_LINGER 0 makes close() send RST). A host
socket is closed as soon as both directions are finished or either side
reset, so no host socket outlives its connection.

DNS over TCP to the DNS address (RFC 7766) is answered here through the DNS
proxy's engine, with no host socket.

Descriptors: each host socket is one of ``loop.descriptors``. A guest SYN
that finds none free (after the least recently used UDP flow was closed to
make room) is answered with a RST, and only that connection is refused.
"""

from __future__ import annotations

import _socket
import errno
import itertools
import mmap
import struct

from pyslirp.log import INFO, WARNING, get_logger
from pyslirp.stack import icmpv4
from pyslirp.stack.tcp_connection import CLOSED

from .addressing import AddressMap, family_of
from .descriptors import EXHAUSTED

log = get_logger("pyslirp.tcp")

READ = 1  # selectors.EVENT_READ
WRITE = 2  # selectors.EVENT_WRITE
DNS_PORT = 53
# Bytes read from a host socket per wake-up, into one reused buffer: a
# fresh recv(n) would make malloc map and unmap n bytes every call. The
# buffer is an anonymous mapping, so a page costs memory only once a read
# has reached it (a zeroed bytearray is resident from the start: 256 KiB of
# an idle forwarder's RSS).
RECV_MAX = 256 * 1024
SENDMSG_MAX = 64  # chunks handed to one sendmsg (IOV_MAX is 1024)
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
TCP_NODELAY = _socket.TCP_NODELAY
_STREAM_NONBLOCK = _socket.SOCK_STREAM | _socket.SOCK_NONBLOCK

# What a failed host connect becomes for the guest: None is a RST.
CONNECT_ERRORS = {
    errno.ECONNREFUSED: None,
    errno.ENETUNREACH: icmpv4.NET_UNREACHABLE,
    errno.EHOSTUNREACH: icmpv4.HOST_UNREACHABLE,
    errno.EHOSTDOWN: icmpv4.HOST_UNREACHABLE,
    errno.ETIMEDOUT: icmpv4.HOST_UNREACHABLE,
    errno.EACCES: icmpv4.ADMIN_PROHIBITED,
    errno.EPERM: icmpv4.ADMIN_PROHIBITED,
}


class TcpFlow:
    """The host side of one guest connection."""

    __slots__ = (
        "nat",
        "conn",
        "sock",
        "host",
        "mask",
        "connecting",
        "connect_at",
        "host_eof",
        "shut_wr",
        "closed",
        "ended",
        "opened_at",
        "error",
    )

    def __init__(self, nat, conn, sock, host) -> None:
        self.nat = nat
        self.conn = conn
        self.sock = sock
        self.host = host  # (address, port) on the host
        self.mask = 0
        self.connecting = True
        self.connect_at = 0.0
        self.host_eof = False
        self.shut_wr = False
        self.closed = False  # the host socket is closed
        self.ended = False  # the stack's connection ended, as far as we are concerned
        self.opened_at = nat.loop.now()  # for the API's "age"
        self.error = None  # what the sink's send raised, for write_host to report

    def take(self, data) -> int:
        """The connection's sink (TcpConnection.sink): guest bytes straight
        to the host socket, as many as it takes now. The rest waits in the
        stack for write_host, which also meets any error again (kept here
        so that it reports the first one)."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            self.error = exc
            return 0

    def on_ready(self, mask: int, now: float) -> None:
        nat = self.nat
        if self.connecting:
            nat.connect_finished(self, now)
            return
        if mask & WRITE:
            nat.write_host(self, now)
        if mask & READ and not self.closed:
            nat.read_host(self, now)

    def fail(self, exc: Exception, now: float) -> None:
        """The loop's barrier: this flow's handler raised; reset it."""
        self.nat.fail_connection(self.conn, now, self)


class DnsTcpSession:
    """DNS over TCP (RFC 7766 section 8: two-byte length, then the message),
    answered through the DNS proxy's engine. Queries may be pipelined; at
    most ``MAX_PENDING`` wait at once, further bytes wait in the window."""

    MAX_PENDING = 16

    __slots__ = ("nat", "conn", "buffer", "pending", "closed", "busy")

    def __init__(self, nat, conn) -> None:
        self.nat = nat
        self.conn = conn
        self.buffer = bytearray()  # at most one message and one chunk
        self.pending: list = []
        self.closed = False
        self.busy = False  # answers may come back from inside resolve()

    def readable(self, now: float) -> None:
        if self.busy or self.closed:
            return  # the outer call goes on with the new state
        self.busy = True
        try:
            conn = self.conn
            tcp = self.nat.tcp
            while not self.closed:
                self._parse(now)
                if not conn.rx or len(self.pending) >= self.MAX_PENDING:
                    break
                chunk = conn.rx[0]
                self.buffer += chunk
                tcp.consume(conn, len(chunk), now)
            if not self.closed and not conn.rx and conn.guest_fin and not self.pending:
                tcp.close(conn, now)
        finally:
            self.busy = False

    def _parse(self, now: float) -> None:
        buffer = self.buffer
        while len(buffer) >= 2 and len(self.pending) < self.MAX_PENDING and not self.closed:
            size = int.from_bytes(buffer[:2], "big")
            if len(buffer) < 2 + size:
                return
            message = bytes(buffer[2 : 2 + size])
            del buffer[: 2 + size]
            holder = []
            flow = self.conn.describe() if self.nat.loop.tracer is not None else None
            query = self.nat.loop.dns.resolve(
                message, now, lambda r, t, h=holder: self._answer(h, r, t), flow
            )
            if query is not None and not query.done:
                holder.append(query)
                self.pending.append(query)

    def _answer(self, holder, response: bytes, now: float) -> None:
        if self.closed:
            return
        if holder and holder[0] in self.pending:
            self.pending.remove(holder[0])
        message = len(response).to_bytes(2, "big") + response
        tcp = self.nat.tcp
        if tcp.send(self.conn, message, now) < len(message):
            tcp.abort(self.conn, now)  # the guest does not read its answers
            self.close()
            return
        self.readable(now)

    def close(self) -> None:
        self.closed = True
        for query in self.pending:
            query.cancel()
        self.pending.clear()
        if self.conn.user is self:
            self.conn.user = None  # no cycle left for the garbage collector


class TcpNat:
    def __init__(self, loop) -> None:
        self.loop = loop
        self.stack = loop.stack
        self.config = loop.config
        # --disable-dns: TCP to the DNS address is refused like any other port.
        self.dns_enabled = not loop.config.disable_dns
        self.tcp = loop.stack.tcp  # configured by NetworkConfig.stack_config
        self.addresses = AddressMap(loop.config)
        self.flows: set[TcpFlow] = set()
        self._recv_buffer = memoryview(mmap.mmap(-1, RECV_MAX))
        # Connecting flows in the order of their deadlines (all deadlines are
        # "started + tcp_connect_timeout").
        self._connecting: dict[TcpFlow, None] = {}
        # Flows whose connection ended in the stack while the host socket
        # still has guest bytes to take: deadline by which it must (the
        # TIME-WAIT timeout), so a host peer that never reads holds nothing.
        self._lingering: dict[TcpFlow, float] = {}
        self.counters = {
            "connections-opened": 0,
            "connections-refused": 0,
            "connections-unreachable": 0,
            "connections-timed-out": 0,
            "connections-limited": 0,
            "connections-failed": 0,  # a handler raised: reset by the loop's barrier
            "dns-sessions": 0,
        }
        self.descriptors = loop.descriptors
        # The table's size: the configured one, or what the descriptors allow.
        self.max_flows = self.descriptors.table_size(loop.config.tcp_max_connections)
        self._timed_out = None  # the flow handle_timer is ending (for timer_failed)

    # ------------------------------------------------------------ opening
    def on_connect_requested(self, event, now: float) -> None:
        conn = event.conn
        tcp = self.tcp
        dst, port = conn.local, conn.local_port
        if self.addresses.is_dns(dst):
            if port == DNS_PORT and self.dns_enabled:
                conn.user = DnsTcpSession(self, conn)
                self.counters["dns-sessions"] += 1
                tcp.accept(conn, now)
            else:
                self._trace_refused(conn, now, "no service on that port of the DNS address")
                tcp.refuse(conn, now)
            return
        host = self.addresses.to_host(dst)
        if isinstance(host, int):
            self.counters["connections-unreachable"] += 1
            self._trace_refused(conn, now, f"address not reachable (ICMP code {host})")
            tcp.refuse(conn, now, icmp_code=host)
            return
        if len(self.flows) >= self.config.tcp_max_connections:
            self.counters["connections-limited"] += 1
            log.warning("%s refused: %d connections open", conn.describe(), len(self.flows))
            self._trace_refused(conn, now, f"{len(self.flows)} connections open (the limit)")
            tcp.refuse(conn, now)
            return
        descriptors = self.descriptors
        if not descriptors.acquire():  # evicts the oldest UDP flow first
            self._limited(conn, now, "no descriptor left")
            return
        try:
            # Non-blocking from the start (no ioctl(FIONBIO) per connection),
            # and the C socket type: socket.socket's Python layer (makefile,
            # reference-counted close) would cost three calls a connection.
            sock = _socket.socket(family_of(dst), _STREAM_NONBLOCK)
        except OSError as exc:
            # EMFILE or ENFILE though the budget had room: make room once.
            sock = None
            if exc.errno in EXHAUSTED and descriptors.evict():
                try:
                    sock = _socket.socket(family_of(dst), _STREAM_NONBLOCK)
                except OSError as again:
                    exc = again
            if sock is None:  # refuse this one (RST), keep the others
                descriptors.release()
                self._limited(conn, now, f"cannot open a socket: {exc}")
                return
        sock.setsockopt(_socket.IPPROTO_TCP, TCP_NODELAY, 1)
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)
        v6 = ":" in host
        outbound = self.config.outbound_addr6 if v6 else self.config.outbound_addr
        if outbound and not host.startswith("127.") and host != "::1":
            try:  # --outbound-addr: the source address toward the outside
                sock.bind((outbound, 0))
            except OSError as exc:
                log.warning("%s refused: cannot bind %s: %s", conn.describe(), outbound, exc)
                self._trace_refused(conn, now, f"cannot bind {outbound}: {exc}")
                sock.close()
                descriptors.release()
                tcp.refuse(conn, now)
                return
        flow = TcpFlow(self, conn, sock, (host, port))
        conn.user = flow
        self.flows.add(flow)
        err = sock.connect_ex(flow.host)
        if err == errno.EINPROGRESS and (host.startswith("127.") or host == "::1"):
            # A loopback handshake is done inside connect(): ask again, and
            # answer the guest in this wake-up (no EPOLLOUT round, no MOD).
            again = sock.connect_ex(flow.host)
            if again in (0, errno.EISCONN):
                self._connected(flow, now)
                return
            if again not in (errno.EALREADY, errno.EINPROGRESS):
                self._connect_failed(flow, again, now)
                return
        if err in (errno.EINPROGRESS, errno.EAGAIN, 0):
            flow.connect_at = now + self.config.tcp_connect_timeout
            self._connecting[flow] = None
            self.loop.timers_changed()  # our event is quiet (build_loop)
            self._set_mask(flow, WRITE)
        else:
            self._connect_failed(flow, err, now)

    def adopt(self, conn, sock, client) -> TcpFlow:
        """Relay ``sock``, a host client already connected (a published
        port's), over ``conn``, a connection the stack opens toward the
        guest. The client is read only from ``start_relay`` on, once the
        guest has answered: until then its bytes wait in the kernel."""
        flow = TcpFlow(self, conn, sock, client)
        flow.connecting = False
        conn.user = flow
        self.flows.add(flow)
        return flow

    def start_relay(self, flow: TcpFlow) -> None:
        """The guest accepted an adopted connection: relay both ways."""
        self._relay(flow)

    def _limited(self, conn, now: float, why: str) -> None:
        self.counters["connections-limited"] += 1
        self.loop.limiter.log(
            WARNING,
            "tcp-limited",
            now,
            "%s refused: %s (%d connections open)",
            conn.describe(),
            why,
            len(self.flows),
        )
        self._trace_refused(conn, now, why)
        self.tcp.refuse(conn, now)

    def _trace_refused(self, conn, now: float, why: str) -> None:
        tracer = self.loop.tracer
        if tracer is not None:
            tracer(
                now,
                "tcp.host-refused",
                conn.describe(),
                f"not connected on the host: {why}",
                reason=why,
                flows=len(self.flows),
            )

    def connect_finished(self, flow: TcpFlow, now: float) -> None:
        err = flow.sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
        if err == errno.EINPROGRESS:
            return
        self._connecting.pop(flow, None)
        if err:
            self._connect_failed(flow, err, now)
            return
        self._connected(flow, now)

    def _connected(self, flow: TcpFlow, now: float) -> None:
        """The host connection is up: the guest gets its SYN-ACK."""
        flow.connecting = False
        conn = flow.conn
        self.counters["connections-opened"] += 1
        if log.isEnabledFor(INFO):  # describe() is not free: once per connection
            log.info("%s opened (host %s:%d)", conn.describe(), *flow.host)
        tracer = self.stack.tracer  # loop.tracer without the property's call: once a connection
        if tracer is not None:
            tracer(
                now,
                "tcp.host-connect",
                conn.describe(),
                f"host {_host_text(flow.host)} connected",
                result="connected",
                host=_host_text(flow.host),
                errno=None,
            )
        self.tcp.accept(conn, now)
        self._relay(flow)

    def _relay(self, flow: TcpFlow) -> None:
        """Relay both ways: read the host socket, and let the stack hand
        in-order guest bytes straight to it (the flow's sink)."""
        self._set_mask(flow, READ)
        if self.tcp.direct_delivery:
            flow.conn.sink = flow.take

    def _connect_failed(self, flow: TcpFlow, err: int, now: float) -> None:
        conn = flow.conn
        code = CONNECT_ERRORS.get(err)
        if err == errno.ETIMEDOUT:
            self.counters["connections-timed-out"] += 1
        elif code is None:
            self.counters["connections-refused"] += 1
        else:
            self.counters["connections-unreachable"] += 1
        log.info("%s failed: host %s:%d: %s", conn.describe(), *flow.host, os_strerror(err))
        tracer = self.loop.tracer
        if tracer is not None:
            result = (
                "timed-out"
                if err == errno.ETIMEDOUT
                else "refused"
                if code is None
                else "unreachable"
            )
            answer = "RST" if code is None else f"ICMP unreachable code {code}"
            tracer(
                now,
                "tcp.host-connect",
                conn.describe(),
                f"host {_host_text(flow.host)} {result} ({os_strerror(err)}): "
                f"{answer} to the guest",
                result=result,
                host=_host_text(flow.host),
                errno=os_strerror(err),
            )
        self._release(flow)
        self.tcp.refuse(conn, now, icmp_code=code)
        conn.user = None  # both ends are done (see _release)

    # ------------------------------------------------------------ guest -> host
    def on_data(self, event, now: float) -> None:
        user = event.conn.user
        if user is None:
            return
        if type(user) is TcpFlow:
            if not user.mask & WRITE and not user.closed:
                self.write_host(user, now)
        elif not user.closed:
            user.readable(now)

    def write_host(self, flow: TcpFlow, now: float) -> None:
        conn = flow.conn
        rx = conn.rx
        sock = flow.sock
        tcp = self.tcp
        while rx:
            if len(rx) == 1:
                chunk = rx[0]
                wanted = len(chunk)
                try:
                    sent = sock.send(chunk)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    self._host_reset(flow, flow.error or exc, now)
                    return
            else:
                chunks = list(itertools.islice(rx, SENDMSG_MAX))
                wanted = sum(map(len, chunks))
                try:
                    sent = sock.sendmsg(chunks)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    self._host_reset(flow, flow.error or exc, now)
                    return
            tcp.consume(conn, sent, now)
            if sent < wanted:
                self._set_mask(flow, flow.mask | WRITE)
                return
        if flow.mask & WRITE:
            self._set_mask(flow, flow.mask & ~WRITE)
        if conn.guest_fin and not flow.shut_wr:
            flow.shut_wr = True
            if not flow.host_eof:  # else the close() just below sends the FIN
                try:
                    sock.shutdown(_socket.SHUT_WR)
                except OSError:
                    pass
            self._maybe_finished(flow, now)

    # ------------------------------------------------------------ host -> guest
    def read_host(self, flow: TcpFlow, now: float) -> None:
        conn = flow.conn
        tcp = self.tcp
        space = tcp.send_space(conn)
        if space <= 0:
            self._set_mask(flow, flow.mask & ~READ)  # TcpSendSpaceOpened resumes
            return
        buffer = self._recv_buffer
        try:
            size = flow.sock.recv_into(buffer[:space] if space < RECV_MAX else buffer)
        except BlockingIOError:
            return
        except OSError as exc:
            self._host_reset(flow, exc, now)
            return
        if size:
            # At once: the next read of this socket is in another wake-up.
            tcp.send(conn, buffer[:size], now, at_once=True)
            return
        flow.host_eof = True
        if not flow.shut_wr:  # else _maybe_finished closes the socket: no epoll_ctl
            self._set_mask(flow, flow.mask & ~READ)
        tcp.close(conn, now)
        self._maybe_finished(flow, now)

    def on_send_space(self, event, now: float) -> None:
        flow = event.conn.user
        if type(flow) is TcpFlow and not flow.closed and not flow.host_eof:
            self._set_mask(flow, flow.mask | READ)

    # ------------------------------------------------------------ endings
    def _host_reset(self, flow: TcpFlow, exc: OSError, now: float) -> None:
        """The host peer reset (or the socket broke): reset the guest too."""
        conn = flow.conn
        self._log_end(flow, f"reset by host ({os_strerror(exc.errno)})")
        self._release(flow)
        self.tcp.abort(conn, now)
        conn.user = None  # both ends are done (see _release)

    def on_reset(self, event, now: float) -> None:
        user = event.conn.user
        if user is None:
            return
        if type(user) is not TcpFlow:
            user.close()
            return
        user.ended = True
        if not user.closed:
            self._log_end(user, event.reason)
            self._release(user, reset=True)
        event.conn.user = None  # both ends are done (see _release)

    def on_closed(self, event, now: float) -> None:
        """Both FINs are acknowledged: the byte counts are final."""
        user = event.conn.user
        if type(user) is TcpFlow:
            user.ended = True
            self._log_end(user, "closed")
            if not user.closed:
                self._maybe_finished(user, now)
            if not user.closed:
                self._lingering[user] = now + self.config.tcp_time_wait_timeout
                self.loop.timers_changed()  # our event is quiet (build_loop)
            else:
                event.conn.user = None  # both ends are done (see _release)
        elif user is not None:
            user.close()

    def _maybe_finished(self, flow: TcpFlow, now: float) -> None:
        """Both directions done: the host socket has nothing left to do (the
        stack may still be delivering its last bytes to the guest)."""
        if flow.host_eof and flow.shut_wr and not flow.closed:
            self._release(flow)

    def _log_end(self, flow: TcpFlow, how: str) -> None:
        conn = flow.conn
        if not log.isEnabledFor(INFO):
            return
        log.info(
            "%s %s: %d bytes from the guest, %d bytes to the guest",
            conn.describe(),
            how,
            conn.bytes_in,
            conn.bytes_out,
        )

    def _release(self, flow: TcpFlow, reset: bool = False) -> None:
        if flow.closed:
            return
        flow.closed = True
        flow.conn.sink = None  # the socket goes: what comes later waits in rx
        self.flows.discard(flow)
        self._connecting.pop(flow, None)
        self._lingering.pop(flow, None)
        if flow.mask:
            self.loop.forget(flow.sock)  # closed below
            flow.mask = 0
        if reset and not flow.connecting:
            try:
                flow.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        flow.sock.close()
        self.descriptors.release()
        if flow.conn.state is CLOSED:  # guest bytes left unread go too
            self.tcp.release_received(flow.conn)
        # The connection and its flow point at each other: once both are
        # done, the link goes, and reference counting frees them at once
        # rather than the cycle collector later (a connect/close run made
        # it a few per cent of our CPU).
        if flow.ended:
            flow.conn.user = None

    def _set_mask(self, flow: TcpFlow, mask: int) -> None:
        if mask == flow.mask or flow.closed:
            return
        if not flow.mask:
            # Quiet: a flow's handler only moves data or ends the flow,
            # which never makes a deadline earlier.
            self.loop.register(flow.sock, mask, flow.on_ready, quiet=True, on_error=flow.fail)
        elif not mask:
            self.loop.unregister(flow.sock)
        else:
            self.loop.modify(flow.sock, mask, flow.on_ready)
        flow.mask = mask

    # ------------------------------------------------------------ timers
    def next_deadline(self):
        if not self._connecting and not self._lingering:
            return None
        deadline = None
        for flow in self._connecting:
            deadline = flow.connect_at
            break
        for linger_at in self._lingering.values():
            if deadline is None or linger_at < deadline:
                deadline = linger_at
            break
        return deadline

    def handle_timer(self, now: float) -> None:
        connecting = self._connecting
        while connecting:
            flow = next(iter(connecting))
            if flow.connect_at > now:
                break
            del connecting[flow]
            self._timed_out = flow
            self._connect_failed(flow, errno.ETIMEDOUT, now)
        lingering = self._lingering
        while lingering:
            flow, linger_at = next(iter(lingering.items()))
            if linger_at > now:
                break
            del lingering[flow]
            self._timed_out = flow
            log.info("%s: the host did not take the last bytes, reset", flow.conn.describe())
            self._release(flow, reset=True)
        self._timed_out = None

    # ------------------------------------------------------------ the barrier
    def fail_connection(self, conn, now: float, flow=None) -> None:
        """A handler raised while serving ``conn``: close the host socket
        (with a RST) and reset the guest's connection."""
        self.counters["connections-failed"] += 1
        user = conn.user if flow is None else flow
        try:
            if type(user) is TcpFlow:
                self._release(user, reset=True)
            elif user is not None:
                user.close()  # a DNS session
        finally:
            conn.user = None
            self.tcp.abort(conn, now)

    def on_error(self, event, exc: Exception, now: float) -> None:
        """The loop's barrier for the TCP events: reset that connection."""
        self.fail_connection(event.conn, now)

    def timer_failed(self, exc: Exception, now: float) -> None:
        flow, self._timed_out = self._timed_out, None
        if flow is not None:
            self.fail_connection(flow.conn, now, flow)

    def close(self) -> None:
        for flow in list(self.flows):
            self._release(flow, reset=True)


def _host_text(host: tuple) -> str:
    """(address text, port) as address:port, an IPv6 address in brackets."""
    address, port = host[0], host[1]
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def os_strerror(err) -> str:
    try:
        return errno.errorcode.get(err, str(err))
    except TypeError:
        return str(err)
