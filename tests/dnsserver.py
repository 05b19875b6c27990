"""A small authoritative DNS server on 127.0.0.1 for tests (UDP and TCP).

    with DnsServer(records={"example.test.": "192.0.2.7"}) as dns:
        ...  # ask 127.0.0.1:dns.port
        assert ("example.test.", 1) in dns.queries

Names in ``records`` are answered with an A record (an IPv6 value: AAAA);
a known name asked for another type gets an empty NOERROR answer; any other
name gets NXDOMAIN. ``delay`` holds every answer back that many seconds,
``silent`` never answers (a dead resolver that swallows queries),
``truncate_udp`` answers over UDP with TC set and no records so that clients
retry over TCP, ``rcode`` answers everything with that rcode (e.g. 5, REFUSED).
``forge`` sends, before each real UDP answer, forgeries that carry the
address ``FORGED`` (RFC 5452's attacks): the wrong id, no question (QDCOUNT
0), another question, and the right answer from another port (127.0.0.1)
and from another address (127.0.0.2, the server's port); give ``delay`` so
that the real answer surely comes last. ``peers`` lists the (address, port)
each UDP query came from.
The server runs in one thread with one selector; it never resolves anything
itself.
"""

import contextlib
import heapq
import ipaddress
import selectors
import socket
import struct
import threading
import time

import dpkt

BIND_ATTEMPTS = 20  # ephemeral UDP ports tried until TCP can take the same number
MAX_TCP_CLIENTS = 64
FORGED = "203.0.113.66"  # what a forged answer claims
FORGERIES = 5  # datagrams sent per query with ``forge``
JOIN_TIMEOUT = 5.0


class DnsServer:
    def __init__(
        self,
        records: dict | None = None,
        delay: float = 0.0,
        silent: bool = False,
        truncate_udp: bool = False,
        rcode: int | None = None,
        ttl: int = 60,
        forge: bool = False,
    ) -> None:
        self.records = {k.lower().rstrip(".") + ".": v for k, v in (records or {}).items()}
        self.delay = delay
        self.silent = silent
        self.truncate_udp = truncate_udp
        self.rcode = rcode
        self.ttl = ttl
        self.forge = forge
        self.peers: list[tuple[str, int]] = []  # the source of each UDP query
        self.queries: list[tuple[str, int]] = []  # (qname with final dot, qtype)
        self.transports: list[str] = []  # "udp" or "tcp", one per query
        self.udp, self.tcp = self._bind()
        self.port = self.udp.getsockname()[1]
        self._forgers = []
        if forge:
            other_port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            other_port.bind(("127.0.0.1", 0))
            other_addr = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            other_addr.bind(("127.0.0.2", self.port))
            self._forgers = [other_port, other_addr]
        self._stop_r, self._stop_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    @staticmethod
    def _bind():
        for _ in range(BIND_ATTEMPTS):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind(("127.0.0.1", udp.getsockname()[1]))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            return udp, tcp
        raise RuntimeError("no port free for both UDP and TCP")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stop_w.send(b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=JOIN_TIMEOUT)
        for sock in (self.udp, self.tcp, self._stop_r, self._stop_w, *self._forgers):
            sock.close()
        if self.error is not None:
            raise self.error

    @property
    def address(self) -> str:
        """The upstream as ``--dns-upstream`` takes it."""
        return f"127.0.0.1:{self.port}"

    # ----------------------------------------------------------------- serving
    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.udp, selectors.EVENT_READ, "udp")
        sel.register(self.tcp, selectors.EVENT_READ, "listen")
        sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        buffers: dict[socket.socket, bytes] = {}
        self._later: list = []  # heap of (due, seq, socket, peer or None, data)
        self._seq = 0
        try:
            while True:
                later = self._later
                timeout = max(0.0, later[0][0] - time.monotonic()) if later else None
                for key, _mask in sel.select(timeout):
                    if key.data == "stop":
                        return
                    if key.data == "udp":
                        data, peer = self.udp.recvfrom(65535)
                        with self._lock:
                            self.peers.append(peer)
                        if self.forge:
                            self._send_forgeries(data, peer)
                        self._schedule(self._answer(data, "udp"), self.udp, peer)
                    elif key.data == "listen":
                        conn, _ = self.tcp.accept()
                        if len(buffers) >= MAX_TCP_CLIENTS:
                            conn.close()
                            continue
                        buffers[conn] = b""
                        sel.register(conn, selectors.EVENT_READ, "conn")
                    else:
                        self._read_tcp(key.fileobj, buffers, sel)
                now = time.monotonic()
                while later and later[0][0] <= now:
                    _due, _seq, sock, peer, data = heapq.heappop(later)
                    with contextlib.suppress(OSError):
                        if peer is None:
                            sock.sendall(data)
                        else:
                            sock.sendto(data, peer)
        except BaseException as exc:
            self.error = exc
        finally:
            for conn in buffers:
                conn.close()
            sel.close()

    def _schedule(self, answer: bytes | None, sock: socket.socket, peer) -> None:
        if answer is None:
            return
        if peer is None:  # TCP: two-byte length prefix (RFC 1035 4.2.2)
            answer = struct.pack("!H", len(answer)) + answer
        self._seq += 1
        heapq.heappush(self._later, (time.monotonic() + self.delay, self._seq, sock, peer, answer))

    def _read_tcp(self, conn: socket.socket, buffers: dict, sel) -> None:
        try:
            chunk = conn.recv(65535)
        except OSError:
            chunk = b""
        if not chunk:
            sel.unregister(conn)
            del buffers[conn]
            conn.close()
            return
        buf = buffers[conn] + chunk
        while len(buf) >= 2:
            size = struct.unpack_from("!H", buf)[0]
            if len(buf) < 2 + size:
                break
            message, buf = buf[2 : 2 + size], buf[2 + size :]
            self._schedule(self._answer(message, "tcp"), conn, None)
        buffers[conn] = buf

    def _send_forgeries(self, data: bytes, peer) -> None:
        try:
            query = dpkt.dns.DNS(data)
        except (dpkt.UnpackError, IndexError, struct.error):
            return
        if query.qr != dpkt.dns.DNS_Q or not query.qd:
            return
        question = query.qd[0]

        def forged(qid=query.id, qd=(question,), name=question.name) -> bytes:
            reply = dpkt.dns.DNS(id=qid, qr=dpkt.dns.DNS_R, rd=query.rd, ra=1, aa=1)
            reply.qd = list(qd)
            rr = dpkt.dns.DNS.RR(name=name, type=dpkt.dns.DNS_A, cls=dpkt.dns.DNS_IN, ttl=60)
            rr.rdata = rr.ip = ipaddress.ip_address(FORGED).packed
            reply.an = [rr]
            reply.ns = []
            reply.ar = []
            return bytes(reply)

        other = dpkt.dns.DNS.Q(name="forged." + question.name, type=question.type, cls=question.cls)
        other_port, other_addr = self._forgers
        with contextlib.suppress(OSError):
            self.udp.sendto(forged(qid=query.id ^ 1), peer)
            self.udp.sendto(forged(qd=()), peer)
            self.udp.sendto(forged(qd=(other,), name=other.name), peer)
            other_port.sendto(forged(), peer)
            other_addr.sendto(forged(), peer)

    def _answer(self, data: bytes, transport: str) -> bytes | None:
        try:
            query = dpkt.dns.DNS(data)
        except (dpkt.UnpackError, IndexError, struct.error):
            return None
        if query.qr != dpkt.dns.DNS_Q or not query.qd:
            return None
        question = query.qd[0]
        name = question.name.lower().rstrip(".") + "."
        with self._lock:
            self.queries.append((name, question.type))
            self.transports.append(transport)
        if self.silent:
            return None
        reply = dpkt.dns.DNS(
            id=query.id, qr=dpkt.dns.DNS_R, opcode=query.opcode, rd=query.rd, ra=1, aa=1
        )
        reply.qd = [question]
        reply.an = []
        reply.ns = []
        reply.ar = []
        value = self.records.get(name)
        if self.rcode is not None:
            reply.rcode = self.rcode
        elif transport == "udp" and self.truncate_udp:
            reply.tc = 1
        elif value is None:
            reply.rcode = dpkt.dns.DNS_RCODE_NXDOMAIN
        else:
            addr = ipaddress.ip_address(value)
            rtype = dpkt.dns.DNS_A if addr.version == 4 else dpkt.dns.DNS_AAAA
            if question.type == rtype:
                rr = dpkt.dns.DNS.RR(
                    name=question.name, type=rtype, cls=dpkt.dns.DNS_IN, ttl=self.ttl
                )
                rr.rdata = addr.packed
                if rtype == dpkt.dns.DNS_A:
                    rr.ip = addr.packed
                else:
                    rr.ip6 = addr.packed
                reply.an = [rr]
        return bytes(reply)
