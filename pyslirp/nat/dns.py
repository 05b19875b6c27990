"""DNS proxy at the virtual DNS address (10.0.2.3:53 by default).

Read first: RFC 1035 section 4.1 (the message format; rcode 2 is SERVFAIL),
RFC 5452 (measures against forged answers: section 9.1, a random id and a
random source port per query; section 9, believe an answer only if it comes
from the address and port asked, to the port asked from, with the id and
the question asked), RFC 7766 (DNS over TCP, which shares this engine).

One pending-query engine, ``resolve(payload, now, callback)``, serves every
transport: the UDP path (``query``) gives it a callback that sends the answer
to the guest, and DNS over TCP gives it one that writes to the guest's
connection. The answer is handed back with the guest's own id.

Each upstream query goes out from a UDP socket of its own, bound to port 0
(the kernel picks a random ephemeral port; on --outbound-addr or
--outbound-addr6 unless the upstream is on loopback), with a 16-bit id from
``secrets``, and the socket is closed as soon as the query is answered,
times out, fails over or is cancelled. The socket is not connected, so that
every datagram reaching it is seen and one from anywhere but the upstream
asked is counted. An answer is believed only if it comes from the upstream's
address and port, is a response (QR), carries our id, has QDCOUNT 1 and
the question asked (the name without regard to ASCII case, RFC 4343; type
and class equal); anything else is dropped and counted
(``dns-answer-wrong-source``, ``-truncated``, ``-not-response``,
``-wrong-id``, ``-qdcount``, ``-question``) and the socket keeps waiting
for the real answer. A guest query without exactly one parseable question
cannot be checked that way and gets a SERVFAIL of our own at once.

At most ``config.dns_max_sockets`` upstream sockets are open at once; a
query that finds none free waits in a queue (``dns-queued``) and is sent
when one closes. Queries waiting for an upstream and in that queue together
are at most ``config.dns_max_pending``; past that, SERVFAIL at once. Each
waiting query's bytes are charged to the stack's memory budget (a refused
charge: SERVFAIL at once) and released when it ends, however it ends.

Upstreams (``config.dns_upstreams``, IPv4 or IPv6) are asked one at a time,
starting with the one that answered last. An upstream is given
``config.dns_upstream_timeout`` seconds; a timeout, an ICMP error (port or
host unreachable, read from the socket's error queue, IP_RECVERR) or an
answer of SERVFAIL, NOTIMP or REFUSED moves the query to the next upstream
(from a new socket), as the glibc stub resolver does. When every upstream
has failed the guest gets the last such answer if there was one, else a
SERVFAIL of our own.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections import Counter, deque

from pyslirp.backend import READ
from pyslirp.log import get_logger
from pyslirp.stack.names import flow_name

log = get_logger("pyslirp.dns")

HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
HEADER_LEN = 12
FLAG_QR = 0x8000
FLAG_OPCODE = 0x7800
FLAG_RD = 0x0100
FLAG_RA = 0x0080
RCODE_MASK = 0x000F
SERVFAIL = 2
NOTIMP = 4
REFUSED = 5
# Answers that say "this server cannot help", not "the name does not exist".
_TRY_NEXT_RCODES = frozenset((SERVFAIL, NOTIMP, REFUSED))
DNS_PORT = 53
MAX_MESSAGE = 65535  # RFC 1035 4.2.2 / EDNS: the largest DNS message
RECV_BATCH = 16  # datagrams read per upstream socket per wake-up, for fairness

IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
_EE_ERRNO = struct.Struct("=I")  # first field of struct sock_extended_err


def question_of(message) -> bytes | None:
    """The raw bytes of the first question (name, type, class), or None if
    the message has none or it does not parse."""
    if len(message) < HEADER_LEN or message[4:6] == b"\0\0":
        return None
    i, end = HEADER_LEN, len(message)
    for _ in range(128):  # a name has at most 127 labels (255 bytes)
        if i >= end:
            return None
        length = message[i]
        if length == 0:
            i += 1
            break
        if length > 63:  # a compression pointer cannot precede the question
            return None
        i += 1 + length
    else:
        return None
    if i + 4 > end or i - HEADER_LEN > 255:
        return None
    return bytes(message[HEADER_LEN : i + 4])


def question_text(question: bytes | None) -> str:
    """A question (question_of's bytes) as text for the trace and logs:
    'example.com. A' ('type 65' for types without a name here)."""
    if not question:
        return "(no question)"
    labels = []
    i = 0
    while question[i]:
        length = question[i]
        labels.append(question[i + 1 : i + 1 + length].decode("ascii", "backslashreplace"))
        i += 1 + length
    qtype = int.from_bytes(question[i + 1 : i + 3], "big")
    return ".".join(labels) + ". " + _TYPE_NAMES.get(qtype, f"type {qtype}")


_TYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA"}


def servfail(query: bytes) -> bytes:
    """RFC 1035 rcode 2 for ``query``: its id, opcode, RD and question."""
    guest_id, flags = struct.unpack_from("!HH", query, 0)
    question = question_of(query)
    flags = FLAG_QR | (flags & (FLAG_OPCODE | FLAG_RD)) | FLAG_RA | SERVFAIL
    head = HEADER.pack(guest_id, flags, 1 if question else 0, 0, 0, 0)
    return head + question if question else head


def _same_question(a: bytes | None, b: bytes | None) -> bool:
    if a is None or b is None:
        return a is b
    # Names compare without regard to ASCII case (RFC 4343); type and class exactly.
    return a[:-4].lower() == b[:-4].lower() and a[-4:] == b[-4:]


class DnsQuery:
    """One guest query on its way: the handle ``resolve`` returns."""

    __slots__ = (
        "_proxy",
        "callback",
        "charged",
        "deadline_at",
        "done",
        "fallback",
        "first",
        "flow",
        "guest_id",
        "payload",
        "question",
        "queued",
        "sock",
        "tried",
        "upstream",
        "upstream_id",
    )

    def __init__(self, proxy, payload: bytes, callback, flow: str | None = None) -> None:
        self._proxy = proxy
        self.flow = flow  # the guest's flow that asked (names.flow_name), for the trace
        self.payload = payload
        self.callback = callback
        self.guest_id = payload[:2]
        self.question = question_of(payload)
        self.first = 0  # index of the first upstream asked
        self.tried = 0  # how many upstreams have been asked
        self.upstream = None  # the upstream asked now, from ``sock``
        self.sock = None
        self.upstream_id = 0
        self.deadline_at = 0.0
        self.fallback = None  # an upstream's SERVFAIL/REFUSED, kept for the end
        self.charged = 0  # bytes held in the memory budget for this query
        self.queued = False  # waiting in DnsProxy._queued for a socket
        self.done = False

    def cancel(self) -> None:
        """Forget the query; its callback will not be called."""
        self._proxy.cancel(self)


class Upstream:
    __slots__ = ("address", "family", "index", "loopback", "sockaddr")

    def __init__(self, index: int, address: str, port: int) -> None:
        addr = ipaddress.ip_address(address)  # "fe80::1%eth0" keeps its scope
        self.index = index
        self.address = str(addr)
        self.family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        self.loopback = addr.is_loopback
        self.sockaddr = (self.address, port)

    def __repr__(self) -> str:
        if self.family == socket.AF_INET6:
            return f"[{self.address}]:{self.sockaddr[1]}"
        return f"{self.address}:{self.sockaddr[1]}"


class DnsProxy:
    def __init__(self, loop) -> None:
        self.loop = loop
        self.config = loop.config
        self.budget = loop.stack.budget
        self.address = loop.config.host_bytes(3)  # 10.0.2.3
        self.upstreams = [
            Upstream(i, addr, port) for i, (addr, port) in enumerate(self.config.dns_upstreams)
        ]
        # --outbound-addr and --outbound-addr6: what upstream sockets bind to.
        self.bind_addr = (self.config.outbound_addr or "0.0.0.0", 0)
        self.bind_addr6 = (self.config.outbound_addr6 or "::", 0)
        self.preferred = 0  # the upstream that answered last
        # Every query waiting for an upstream, in the order of its deadline:
        # all deadlines are "sent + dns_upstream_timeout", so the order in
        # which queries were (re)sent is the order of their deadlines.
        self._waiting: dict[DnsQuery, None] = {}
        # Queries waiting for a socket (dns_max_sockets were open), in order.
        self._queued: deque[DnsQuery] = deque()
        self._starting = False  # _start_queued is running (no recursion)
        self.open_sockets = 0  # upstream sockets open now
        self.drops: Counter = Counter()
        self.counters: Counter = Counter()

    def in_flight(self) -> list:
        """The queries sent upstream and waiting for its answer, each on a
        socket of its own, oldest first."""
        return list(self._waiting)

    # ---------------------------------------------------------- the guest side
    def query(
        self, guest: bytes, guest_port: int, payload: bytes, now: float, dst: bytes | None = None
    ) -> None:
        """A datagram from the guest to the DNS address (``dst``: the one it
        was sent to, 10.0.2.3 or fd00::3), port 53."""
        source = dst or self.address

        def answer(response: bytes, now: float) -> None:
            self.loop.stack.send_udp(source, DNS_PORT, guest, guest_port, response, now)

        flow = None
        if self.loop.tracer is not None:
            flow = flow_name("udp", guest, guest_port, source, DNS_PORT)
        self.resolve(payload, now, answer, flow)

    def resolve(self, payload, now: float, callback, flow: str | None = None) -> DnsQuery | None:
        """Start resolving the DNS message ``payload``.

        Returns None if it is not a query (shorter than a header, or QR set):
        it is counted and dropped and ``callback`` is never called. Otherwise
        ``callback(response, now)`` is called exactly once, unless the
        returned handle is cancelled first; it may be called before
        ``resolve`` returns (SERVFAIL when nothing can be asked).
        """
        payload = bytes(payload)
        if len(payload) < HEADER_LEN:
            self.drops["dns-query-truncated"] += 1
            return None
        if payload[2] & (FLAG_QR >> 8):
            self.drops["dns-query-is-response"] += 1
            return None
        query = DnsQuery(self, payload, callback, flow)
        self.counters["dns-queries"] += 1
        if not self.upstreams:
            self.counters["dns-servfail-no-upstream"] += 1
            self._trace_query(now, query, "dns.servfail", "no-upstream")
            self._finish(query, servfail(payload), now)
        elif query.question is None or payload[4:6] != b"\0\1":
            # RFC 5452 9: an answer is checked against the one question asked.
            self.counters["dns-servfail-no-question"] += 1
            self._trace_query(now, query, "dns.servfail", "no-question")
            self._finish(query, servfail(payload), now)
        elif len(self._waiting) + len(self._queued) >= self.config.dns_max_pending:
            self.counters["dns-servfail-pending-full"] += 1
            self._trace_query(now, query, "dns.servfail", "pending-full")
            self._finish(query, servfail(payload), now)
        elif not self.budget.charge(len(payload)):
            self.counters["dns-servfail-memory"] += 1
            self._trace_query(now, query, "dns.servfail", "memory")
            self._finish(query, servfail(payload), now)
        else:
            query.charged = len(payload)
            query.first = self.preferred
            if self.open_sockets >= self.config.dns_max_sockets or self._queued:
                self.counters["dns-queued"] += 1
                query.queued = True
                self._queued.append(query)
            else:
                self._ask_next(query, now)
        return query

    def cancel(self, query: DnsQuery) -> None:
        if not query.done:
            self._unlink(query)
            self._release(query)
            query.done = True
            if self._queued:  # a socket may have freed: handle_timer starts them
                self.loop.timers_changed()

    # ----------------------------------------------------------- the engine
    def _ask_next(self, query: DnsQuery, now: float) -> None:
        """Send ``query`` to the next upstream it has not tried; answer the
        guest if none is left."""
        count = len(self.upstreams)
        while query.tried < count:
            upstream = self.upstreams[(query.first + query.tried) % count]
            query.tried += 1
            if self._send(query, upstream, now):
                return
        self.counters["dns-all-upstreams-failed"] += 1
        if query.fallback:
            self._trace_query(now, query, "dns.gave-up", "the last error answer passed on")
        else:
            self._trace_query(now, query, "dns.gave-up", "SERVFAIL")
        self._finish(query, query.fallback or servfail(query.payload), now)

    def _send(self, query: DnsQuery, upstream: Upstream, now: float) -> bool:
        sock = self._open(query, upstream)
        if sock is None:
            return False
        # RFC 5452 9.2: unpredictable (os.urandom, as secrets would, without
        # secrets' import of hmac and OpenSSL: 3 ms at start-up)
        new_id = int.from_bytes(os.urandom(2), "big")
        query.upstream = upstream
        query.upstream_id = new_id
        try:
            sock.sendto(new_id.to_bytes(2, "big") + query.payload[2:], upstream.sockaddr)
        except OSError as exc:
            self.counters[f"dns-upstream-send-{errno.errorcode.get(exc.errno, exc.errno)}"] += 1
            self._close_socket(query)
            query.upstream = None
            return False
        query.deadline_at = now + self.config.dns_upstream_timeout
        self._waiting[query] = None
        if self.loop.tracer is not None:
            self._trace(
                now,
                query,
                "dns.upstream",
                f" asked of {upstream!r} (upstream {query.tried} of {len(self.upstreams)})",
                upstream=repr(upstream),
                attempt=query.tried,
            )
        self.loop.timers_changed()  # a query over TCP comes through a quiet handler
        return True

    def _open(self, query: DnsQuery, upstream: Upstream):
        """A fresh socket for one query to ``upstream``, on a port the kernel
        picks at random (RFC 5452 9.2), registered with the loop."""
        try:
            # Non-blocking from the start: no fcntl per query.
            sock = socket.socket(upstream.family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        except OSError as exc:  # EMFILE/ENFILE: this upstream fails for now
            self.counters["dns-socket-failed"] += 1
            log.warning("cannot open a socket for DNS upstream %r: %s", upstream, exc)
            return None
        try:
            if upstream.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
                bind_addr = ("::", 0) if upstream.loopback else self.bind_addr6
            else:
                sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
                bind_addr = ("0.0.0.0", 0) if upstream.loopback else self.bind_addr
            sock.bind(bind_addr)  # port 0: a random ephemeral port
        except OSError as exc:  # --outbound-addr gone from the host, say
            self.counters["dns-socket-failed"] += 1
            log.info("cannot bind a socket for DNS upstream %r: %s", upstream, exc)
            sock.close()
            return None
        query.sock = sock
        self.open_sockets += 1
        self.loop.register(
            sock,
            READ,
            lambda mask, now: self._on_readable(query, now),
            on_error=lambda exc, now: self._socket_failed(query, now),
        )
        return sock

    def _socket_failed(self, query: DnsQuery, now: float) -> None:
        """The loop's barrier: reading this query's socket raised. Close it
        and ask the next upstream, as after a timeout."""
        if query.sock is not None and not query.done:
            self._fail(query, "dns-upstream-failed", now)

    def _close_socket(self, query: DnsQuery) -> None:
        sock = query.sock
        if sock is not None:
            query.sock = None
            self.open_sockets -= 1
            self.loop.forget(sock)
            sock.close()

    def _fail(self, query: DnsQuery, reason: str, now: float) -> None:
        upstream = query.upstream
        self.counters[reason] += 1
        log.info("DNS upstream %r: %s, trying the next", upstream, reason)
        if self.loop.tracer is not None:
            self._trace(
                now,
                query,
                "dns.failover",
                f": upstream {upstream!r} {reason[4:]}, trying the next",
                upstream=repr(upstream),
                reason=reason[4:],
            )
        self._unlink(query)
        self._ask_next(query, now)

    def _unlink(self, query: DnsQuery) -> None:
        self._close_socket(query)
        query.upstream = None
        self._waiting.pop(query, None)
        if query.queued:
            query.queued = False
            self._queued.remove(query)

    def _trace(self, now: float, query: DnsQuery, event: str, tail: str, **fields) -> None:
        """A dns.* trace line: the query's question and guest flow, then ``tail``."""
        text = question_text(query.question)
        self.loop.tracer(now, event, query.flow, text + tail, question=text, **fields)

    def _trace_query(self, now: float, query: DnsQuery, event: str, reason: str) -> None:
        if self.loop.tracer is not None:
            self._trace(now, query, event, f": {reason}", reason=reason)

    def _reject(self, query: DnsQuery, reason: str, now: float) -> None:
        """A datagram on a query's socket that is not its answer: dropped."""
        self.drops[reason] += 1
        if self.loop.tracer is not None:
            self._trace(
                now,
                query,
                "dns.rejected",
                f": datagram from {query.upstream!r} rejected: {reason[4:]}",
                upstream=repr(query.upstream),
                reason=reason[4:],
            )

    def _release(self, query: DnsQuery) -> None:
        """Give the query's bytes back to the budget, once."""
        if query.charged:
            self.budget.release(query.charged)
            query.charged = 0

    def _finish(self, query: DnsQuery, response: bytes, now: float) -> None:
        self._unlink(query)
        self._release(query)
        query.done = True
        query.callback(response, now)
        if self._queued:
            self._start_queued(now)

    def _start_queued(self, now: float) -> None:
        """Send queued queries while sockets are free. Not re-entered: a
        query that ends at once (every upstream failing) comes back through
        _finish, and the loop here goes on with the next."""
        if self._starting:
            return
        self._starting = True
        try:
            queued = self._queued
            limit = self.config.dns_max_sockets
            while queued and self.open_sockets < limit:
                query = queued.popleft()
                query.queued = False
                self._ask_next(query, now)
        finally:
            self._starting = False

    # ---------------------------------------------------------- upstream side
    def _on_readable(self, query: DnsQuery, now: float) -> None:
        sock = query.sock
        if sock is None:
            return
        upstream = query.upstream
        for _ in range(RECV_BATCH):
            try:
                data, addr = sock.recvfrom(MAX_MESSAGE)
            except BlockingIOError:
                break
            except OSError:
                # ECONNREFUSED and friends: the details are in the error queue.
                self._drain_errors(query, now, everything=True)
                return
            if addr[:2] != upstream.sockaddr:
                self._reject(query, "dns-answer-wrong-source", now)
                continue
            if self._on_answer(query, data, now):
                return  # the query is over and its socket closed
        # An error queued after the socket error was read still makes the
        # socket ready; empty the queue so that it does not wake us forever.
        self._drain_errors(query, now)

    def _on_answer(self, query: DnsQuery, data: bytes, now: float) -> bool:
        """One datagram from the upstream asked: True if it ended the query
        (here or on the next upstream), False if it was dropped."""
        if len(data) < HEADER_LEN:
            self._reject(query, "dns-answer-truncated", now)
            return False
        upstream_id, flags = struct.unpack_from("!HH", data, 0)
        if not flags & FLAG_QR:
            self._reject(query, "dns-answer-not-response", now)
            return False
        if upstream_id != query.upstream_id:
            self._reject(query, "dns-answer-wrong-id", now)
            return False
        if data[4:6] != b"\0\1":
            self._reject(query, "dns-answer-qdcount", now)
            return False
        if not _same_question(query.question, question_of(data)):
            self._reject(query, "dns-answer-question", now)
            return False
        response = query.guest_id + data[2:]
        upstream = query.upstream
        if flags & RCODE_MASK in _TRY_NEXT_RCODES and query.tried < len(self.upstreams):
            query.fallback = response
            self._fail(query, f"dns-upstream-rcode-{flags & RCODE_MASK}", now)
            return True
        self.preferred = upstream.index
        self.counters["dns-answers"] += 1
        if self.loop.tracer is not None:
            self._trace(
                now,
                query,
                "dns.answer",
                f": answer from {upstream!r} accepted (rcode {flags & RCODE_MASK})",
                upstream=repr(upstream),
                rcode=flags & RCODE_MASK,
            )
        self._finish(query, response, now)
        return True

    def _drain_errors(self, query: DnsQuery, now: float, everything: bool = False) -> None:
        """Move the query to the next upstream if an ICMP error names it.

        The error queue hands back the datagram the error is about, whose
        first two bytes are our id. Without one (``everything``: the socket
        reported an error but no queued datagram names the query), the
        query moves on all the same.
        """
        sock = query.sock
        named = False
        for _ in range(RECV_BATCH):
            try:
                data, ancdata, _flags, _addr = sock.recvmsg(MAX_MESSAGE, 512, socket.MSG_ERRQUEUE)
            except OSError:  # EAGAIN: the queue is empty
                break
            err = 0
            for _level, _kind, cdata in ancdata:
                if len(cdata) >= _EE_ERRNO.size:
                    err = _EE_ERRNO.unpack_from(cdata)[0]
            if err == errno.EMSGSIZE:
                continue  # path MTU news, not a dead upstream
            if len(data) >= 2 and int.from_bytes(data[:2], "big") == query.upstream_id:
                named = True
                break
        if named or everything:
            self._fail(query, "dns-upstream-unreachable", now)

    # ------------------------------------------------------------------ timer
    def next_deadline(self):
        if self._queued and self.open_sockets < self.config.dns_max_sockets:
            return 0.0  # a cancelled query freed a socket: start the queue now
        for query in self._waiting:
            return query.deadline_at
        return None

    def handle_timer(self, now: float) -> None:
        waiting = self._waiting
        for _ in range(len(waiting)):
            query = next(iter(waiting), None)
            if query is None or query.deadline_at > now:
                break
            self._fail(query, "dns-upstream-timeout", now)
        if self._queued:
            self._start_queued(now)

    def close(self) -> None:
        for query in [*self._waiting, *self._queued]:
            self._unlink(query)
            self._release(query)
            query.done = True
        self._waiting.clear()
        self._queued.clear()
