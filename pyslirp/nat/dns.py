"""DNS proxy at the virtual DNS address (10.0.2.3:53 by default).

Read first: RFC 1035 section 4.1 (the message format; rcode 2 is SERVFAIL),
RFC 5452 section 9 (what a forwarder checks before it believes an answer),
RFC 7766 (DNS over TCP, which will share this engine).

One pending-query engine, ``resolve(payload, now, callback)``, serves every
transport: the UDP path (``query``) gives it a callback that sends the answer
to the guest, and DNS over TCP can give it one that writes to the guest's
connection. Each query gets a fresh random id for the upstream (from
``config.random``), so guests that pick the same id never collide, and the
answer is handed back with the guest's own id.

Upstreams (``config.dns_upstreams``, IPv4 or IPv6) are asked one at a time,
starting with the one that answered last. An upstream is given
``config.dns_upstream_timeout`` seconds; a timeout, an ICMP error (port or
host unreachable, seen on the upstream's connected socket) or an answer of
SERVFAIL, NOTIMP or REFUSED moves the query to the next upstream, as the
glibc stub resolver does. When every upstream has failed the guest gets the
last such answer if there was one, else a SERVFAIL of our own. At most
``config.dns_max_pending`` queries wait at once; past that, SERVFAIL at once.

Not done: one connected socket per upstream means one host source port per
upstream for the life of the proxy, so spoofing protection rests on the
16-bit random id and the question check (RFC 5452 section 9.2 would also
randomise the port per query). Upstreams are normally the host's own
resolver, where that is an acceptable trade against a socket per query.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import selectors
import socket
import struct
from collections import Counter

log = logging.getLogger("pyslirp.dns")

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
RECV_BATCH = 64  # answers read per upstream socket per wake-up, for fairness
ID_ATTEMPTS = 64  # random picks for a free upstream id before giving up

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
        "deadline_at",
        "done",
        "fallback",
        "first",
        "guest_id",
        "payload",
        "question",
        "tried",
        "upstream",
        "upstream_id",
    )

    def __init__(self, proxy, payload: bytes, callback) -> None:
        self._proxy = proxy
        self.payload = payload
        self.callback = callback
        self.guest_id = payload[:2]
        self.question = question_of(payload)
        self.first = 0  # index of the first upstream asked
        self.tried = 0  # how many upstreams have been asked
        self.upstream = None
        self.upstream_id = 0
        self.deadline_at = 0.0
        self.fallback = None  # an upstream's SERVFAIL/REFUSED, kept for the end
        self.done = False

    def cancel(self) -> None:
        """Forget the query; its callback will not be called."""
        self._proxy.cancel(self)


class Upstream:
    __slots__ = ("address", "family", "index", "pending", "sock", "sockaddr")

    def __init__(self, index: int, address: str, port: int) -> None:
        addr = ipaddress.ip_address(address)  # "fe80::1%eth0" keeps its scope
        self.index = index
        self.address = str(addr)
        self.family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        self.sockaddr = (self.address, port)
        self.sock = None
        self.pending: dict[int, DnsQuery] = {}  # upstream id -> query

    def __repr__(self) -> str:
        if self.family == socket.AF_INET6:
            return f"[{self.address}]:{self.sockaddr[1]}"
        return f"{self.address}:{self.sockaddr[1]}"


class DnsProxy:
    def __init__(self, loop) -> None:
        self.loop = loop
        self.config = loop.config
        self.random = loop.config.random
        self.address = loop.config.dns.packed
        self.upstreams = [
            Upstream(i, addr, port) for i, (addr, port) in enumerate(self.config.dns_upstreams)
        ]
        self.preferred = 0  # the upstream that answered last
        # Every query waiting for an upstream, in the order of its deadline:
        # all deadlines are "sent + dns_upstream_timeout", so the order in
        # which queries were (re)sent is the order of their deadlines.
        self._waiting: dict[DnsQuery, None] = {}
        self.drops: Counter = Counter()
        self.counters: Counter = Counter()

    # ---------------------------------------------------------- the guest side
    def query(
        self, guest: bytes, guest_port: int, payload: bytes, now: float, dst: bytes | None = None
    ) -> None:
        """A datagram from the guest to the DNS address (``dst``: the one it
        was sent to, 10.0.2.3 or fd00::3), port 53."""
        source = dst or self.address

        def answer(response: bytes, now: float) -> None:
            self.loop.stack.send_udp(source, DNS_PORT, guest, guest_port, response, now)

        self.resolve(payload, now, answer)

    def resolve(self, payload, now: float, callback) -> DnsQuery | None:
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
        query = DnsQuery(self, payload, callback)
        self.counters["dns-queries"] += 1
        if not self.upstreams:
            self.counters["dns-servfail-no-upstream"] += 1
            self._finish(query, servfail(payload), now)
        elif len(self._waiting) >= self.config.dns_max_pending:
            self.counters["dns-servfail-pending-full"] += 1
            self._finish(query, servfail(payload), now)
        else:
            query.first = self.preferred
            self._ask_next(query, now)
        return query

    def cancel(self, query: DnsQuery) -> None:
        if not query.done:
            self._unlink(query)
            query.done = True

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
        self._finish(query, query.fallback or servfail(query.payload), now)

    def _send(self, query: DnsQuery, upstream: Upstream, now: float) -> bool:
        sock = upstream.sock or self._open(upstream)
        if sock is None:
            return False
        pending = upstream.pending
        for _ in range(ID_ATTEMPTS):
            new_id = self.random.getrandbits(16)
            if new_id not in pending:
                break
        else:
            self.drops["dns-no-free-id"] += 1
            return False
        try:
            sock.send(new_id.to_bytes(2, "big") + query.payload[2:])
        except OSError as exc:
            # A refusal reported for an earlier datagram surfaces here (and
            # this one is not sent): the upstream is not there.
            self.counters[f"dns-upstream-send-{errno.errorcode.get(exc.errno, exc.errno)}"] += 1
            self._drain_errors(upstream, now)
            return False
        query.upstream = upstream
        query.upstream_id = new_id
        query.deadline_at = now + self.config.dns_upstream_timeout
        pending[new_id] = query
        self._waiting[query] = None
        self.loop.timers_changed()  # a query over TCP comes through a quiet handler
        return True

    def _open(self, upstream: Upstream):
        """The upstream's connected socket: the kernel then delivers only its
        answers and reports its ICMP errors to us."""
        try:
            sock = socket.socket(upstream.family, socket.SOCK_DGRAM)
        except OSError as exc:  # EMFILE/ENFILE: this upstream fails for now
            log.warning("cannot open a socket for DNS upstream %r: %s", upstream, exc)
            return None
        try:
            sock.setblocking(False)
            if upstream.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
            sock.connect(upstream.sockaddr)
        except OSError as exc:  # no route to it, say
            log.info("DNS upstream %r unreachable: %s", upstream, exc)
            sock.close()
            return None
        upstream.sock = sock
        self.loop.register(
            sock,
            selectors.EVENT_READ,
            lambda mask, now: self._on_readable(upstream, now),
            on_error=lambda exc, now: self._close_upstream(upstream),
        )
        return sock

    def _close_upstream(self, upstream: Upstream) -> None:
        """The loop's barrier: reading this upstream's socket raised. Close
        it (the next query opens a new one); the queries waiting on it time
        out and move to the next upstream as usual."""
        sock, upstream.sock = upstream.sock, None
        self.counters["dns-upstream-failed"] += 1
        if sock is not None:
            self.loop.unregister(sock)
            sock.close()

    def _fail(self, query: DnsQuery, reason: str, now: float) -> None:
        upstream = query.upstream
        self.counters[reason] += 1
        log.info("DNS upstream %r: %s, trying the next", upstream, reason)
        self._unlink(query)
        self._ask_next(query, now)

    def _unlink(self, query: DnsQuery) -> None:
        upstream = query.upstream
        if upstream is not None:
            if upstream.pending.get(query.upstream_id) is query:
                del upstream.pending[query.upstream_id]
            query.upstream = None
        self._waiting.pop(query, None)

    def _finish(self, query: DnsQuery, response: bytes, now: float) -> None:
        self._unlink(query)
        query.done = True
        query.callback(response, now)

    # ---------------------------------------------------------- upstream side
    def _on_readable(self, upstream: Upstream, now: float) -> None:
        sock = upstream.sock
        if sock is None:
            return
        for _ in range(RECV_BATCH):
            try:
                data, addr = sock.recvfrom(MAX_MESSAGE)
            except BlockingIOError:
                break
            except OSError:
                # ECONNREFUSED and friends: the details are in the error queue.
                self._drain_errors(upstream, now, everything=True)
                continue
            if addr[:2] != upstream.sockaddr:  # cannot happen on a connected socket
                self.drops["dns-response-wrong-source"] += 1
                continue
            self._on_response(upstream, data, now)
        # An error queued after the socket error was read still makes the
        # socket ready; empty the queue so that it does not wake us forever.
        self._drain_errors(upstream, now)

    def _on_response(self, upstream: Upstream, data: bytes, now: float) -> None:
        if len(data) < HEADER_LEN:
            self.drops["dns-response-truncated"] += 1
            return
        upstream_id, flags = struct.unpack_from("!HH", data, 0)
        if not flags & FLAG_QR:
            self.drops["dns-response-not-response"] += 1
            return
        query = upstream.pending.get(upstream_id)
        if query is None:
            self.drops["dns-response-unmatched"] += 1
            return
        if data[4:6] != b"\0\0" and not _same_question(query.question, question_of(data)):
            self.drops["dns-response-question-mismatch"] += 1
            return
        response = query.guest_id + data[2:]
        if flags & RCODE_MASK in _TRY_NEXT_RCODES and query.tried < len(self.upstreams):
            query.fallback = response
            self._fail(query, f"dns-upstream-rcode-{flags & RCODE_MASK}", now)
            return
        self.preferred = upstream.index
        self.counters["dns-answers"] += 1
        self._finish(query, response, now)

    def _drain_errors(self, upstream: Upstream, now: float, everything: bool = False) -> None:
        """Move the queries that an ICMP error names to the next upstream.

        The error queue hands back the datagram the error is about, whose
        first two bytes are our id. Without one (``everything``: the socket
        reported an error but no queued datagram names a query), every query
        waiting at this upstream moves on.
        """
        sock = upstream.sock
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
            query = None
            if len(data) >= 2:
                query = upstream.pending.get(int.from_bytes(data[:2], "big"))
            if query is not None:
                named = True
                self._fail(query, "dns-upstream-unreachable", now)
        if everything and not named:
            for query in list(upstream.pending.values()):
                self._fail(query, "dns-upstream-unreachable", now)

    # ------------------------------------------------------------------ timer
    def next_deadline(self):
        for query in self._waiting:
            return query.deadline_at
        return None

    def handle_timer(self, now: float) -> None:
        waiting = self._waiting
        for _ in range(len(waiting)):
            query = next(iter(waiting), None)
            if query is None or query.deadline_at > now:
                return
            self._fail(query, "dns-upstream-timeout", now)

    def close(self) -> None:
        for upstream in self.upstreams:
            if upstream.sock is not None:
                self.loop.unregister(upstream.sock)
                upstream.sock.close()
                upstream.sock = None
            upstream.pending.clear()
        for query in self._waiting:
            query.done = True
        self._waiting.clear()
