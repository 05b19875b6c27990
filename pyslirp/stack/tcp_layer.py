"""The stack's TCP layer: the connection table, demultiplexing, emission of
segments toward the guest, the timer heap, and the commands of the NAT side.

Read first: RFC 9293 3.10.7.1 (segments for no connection), RFC 6528 (ISN),
RFC 6928 (initial window), RFC 5961 section 7 (challenge ACK rate limit).

Commands (each takes ``now``): ``accept``, ``refuse``, ``send`` (returns how
many bytes were taken), ``consume`` (the NAT side has passed on that many
bytes of ``conn.rx``), ``close`` (our FIN after the buffered data), ``abort``
(RST), and ``connect`` for connections we open toward the guest.
"""

from __future__ import annotations

import heapq
import struct
from collections import Counter, deque

try:
    # What hashlib.blake2b is in CPython, without hashlib's load of OpenSSL
    # (_hashlib: 2 to 6 ms of every start, for no digest we use).
    from _blake2 import blake2b
except ImportError:  # another interpreter
    from hashlib import blake2b

from . import checksum, ethernet, icmpv4, ipv4, tcp, virtio
from .budget import held_size
from .config import TcpConfig  # noqa: F401 - its home was here
from .events import (
    TcpConnectionClosed,
    TcpConnectionReset,
    TcpConnectRequested,
    TcpSendSpaceOpened,
)
from .tcp import ACK, FIN, PSH, RST, SYN, URG
from .tcp_connection import (
    CLOSE_WAIT,
    CLOSED,
    ESTABLISHED,
    FIN_WAIT_2,
    LAST_ACK,
    LISTEN,
    MASK,
    OPEN_FOR_SEND,
    RECEIVING,
    SYN_RECEIVED,
    SYN_SENT,
    TIME_WAIT,
    TcpConnection,
    seq_le,
    seq_lt,
)

# IPv4 and TCP headers of one segment in one pack (40 bytes): version/IHL,
# TOS, total length, ID, flags, TTL, protocol, header checksum, both
# addresses, then the TCP header.
_PACKET4 = struct.Struct("!BBHHHBBH8sHHIIBBHHH")
_SEGMENT = struct.Struct("!HHIIBBHHH")  # the TCP header alone (IPv6 segments)
_TS_SUM = 0x0101 + 0x080A  # the NOP NOP kind length words of that option
_IP_FIXED_SUM = 0x4500 + 0x4000 + ((ipv4.DEFAULT_TTL << 8) | ipv4.PROTO_TCP)
_DF = 0x4000
_TTL = ipv4.DEFAULT_TTL
# receive_fast reads a frame's Ethernet, IPv4 and TCP headers with one unpack
# from the source MAC on: source MAC, EtherType, version/IHL, total length,
# flags/fragment offset, TTL, protocol, both addresses, then TCP's ports,
# sequence and acknowledgment numbers, data offset, flags and window.
_FAST4 = struct.Struct("!6sHBxHxxHBBxx4s4sHHIIBBH")
_from_bytes = int.from_bytes
_TS_BLOCK = struct.Struct("!III")  # NOP NOP kind length, TSval, TSecr
# The whole head of a segment with timestamps toward the guest (66 bytes):
# the Ethernet header, then IPv4 (total length, ID, checksum, addresses; the
# rest fixed) and TCP (ports, sequence and acknowledgment numbers, flags,
# window, checksum) with the timestamps option. TcpLayer.emit's common case.
_FRAME4_TS = struct.Struct("!14sBxHHHBBH8sHHIIBBHHxxIII")
_TS_WORD = 0x0101080A
# Our SYN-ACK's options with timestamps and window scaling (syn_options):
# MSS (kind 2, length 4), NOP NOP TS (kind 8, length 10), NOP WS (kind 3, length 3).
_SYN_TS_WS = struct.Struct("!HHIIII")
# A whole SYN-ACK with those options (74 bytes): _FRAME4_TS's fields up to
# the TCP checksum (urgent pointer 0), then _SYN_TS_WS's options.
_SYN_ACK4 = struct.Struct("!14sBxHHHBBH8sHHIIBBHHxxHHIIII")
_MSS_HEAD = 0x0204
_WS_WORD = 0x01030300  # NOP, kind 3, length 3, then the shift
# The 4-tuple as RFC 6528's F hashes it: local address and port, remote
# address and port.
_ISN4 = struct.Struct("!4sH4sH")
_ISN6 = struct.Struct("!16sH16sH")
# Linux's SYN options (tcp.parse_options' common case): MSS, SACK permitted,
# timestamps, then NOP and window scale as one word.
_SYN_LINUX = struct.Struct("!HHHHIII")
_MIN_MSS = 48  # Linux's TCP_MIN_SND_MSS: a guest cannot make us send less


def _ip_checksum(conn, total: int, ident: int) -> int:
    """The IPv4 header checksum of a segment toward the guest: the sum of
    its fixed words and addresses is precomputed (``conn.ip_sum``)."""
    s = (conn.ip_sum + total + ident) % 0xFFFF
    return (~s) & 0xFFFF if s else 0


def _tcp_checksum(conn, flags, seq, ack, window, header_len, tcp_len, options_sum, payload):
    """The whole TCP checksum of one segment toward the guest, from the
    connection's precomputed sum of the pseudo-header and ports
    (``conn.tcp_sum``), the header's fields, its options' sum and the
    payload (IPv4 and IPv6 alike: RFC 8200 8.1)."""
    s = conn.tcp_sum + tcp_len + seq + ack + ((header_len << 10) | flags) + window + options_sum
    if tcp_len > header_len:
        s += checksum.partial_sum(payload)
    s %= 0xFFFF
    return (~s) & 0xFFFF if s else 0


class TcpLayer:
    """The Stack builds its own (``stack.tcp``), configured by
    ``StackConfig.tcp``."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.config = stack.config.tcp
        self.random = stack.random
        self.isn_key = stack.config.isn_key  # RFC 6528's secret (StackConfig)
        self._isn_hash = blake2b(digest_size=4, key=self.isn_key)  # fed nothing yet
        self.connections: dict[tuple, TcpConnection] = {}
        self.events = stack.events
        # Every byte a connection holds (rx, the out-of-order queue, snd_buf)
        # is charged to the stack's memory budget and released as it goes.
        self.budget = stack.budget
        # Connections gone from the table whose received bytes the NAT side
        # may still pass on (a graceful close): charged until it has, or
        # until it lets go (release_received).
        self.unread: dict[TcpConnection, None] = {}
        self.dirty: list[TcpConnection] = []
        self.counters: Counter = Counter()
        self.verify_checksum = self.config.verify_checksum
        # Header prediction in segment_arrives (TcpConnection.predicted) and
        # output's common case. Off, every segment takes the RFC's steps and
        # every output the general path: the reference a test compares the
        # shortcuts with (tests/test_tcp_prediction.py).
        self.predict = True
        # Whether the NAT side may give connections a sink (TcpConnection.sink).
        # A recording stack turns it off: its replay has no sink to feed.
        self.direct_delivery = True
        # Virtio offloads on the TAP (StackConfig.offload): segments of up to
        # gso_payload bytes (IPv4's 65535 less its header and TCP's with
        # timestamps), cut by the guest's kernel into MSS pieces.
        self.offload = stack.config.offload
        self.gso_payload = 65535 - 20 - 32 if self.offload else 0
        # The virtio_net_hdr of a segment that needs no GSO, by TCP header length.
        self._vnet_plain = {n: virtio.tcp_header(14, 20, n, virtio.GSO_NONE, 0) for n in (20, 32)}
        self.max_cwnd = 1 << 30
        # Timers. Retransmission and keep-alive/TIME-WAIT deadlines sit in a
        # heap, one live entry per connection (conn.heap_at); an entry whose
        # deadline went away or moved later stays and costs one early look
        # when it comes due, so a deadline that changes with every segment
        # costs no heap operation. Delayed ACKs all wait the same time, so
        # they sit in a FIFO in deadline order (the clock never goes back).
        self._heap: list = []
        self._delack: deque = deque()
        # No later than the earliest deadline (None: there is none), kept by
        # every push and made exact by get_timer: the loop's cheap question.
        self.wake_at = None
        self._serial = 0
        self._time_wait: deque = deque()
        self._challenge_second = -1
        self._challenge_count = 0
        # RFC 7323 2.3: the smallest shift that lets our buffer be advertised.
        shift = 0
        while (self.config.receive_buffer >> shift) > 0xFFFF and shift < tcp.MAX_WINDOW_SCALE:
            shift += 1
        self._rcv_wscale = shift

    # ------------------------------------------------------------ ingress
    def receive_fast(self, data, off: int, trusted: bool, gso: bool, now: float) -> bool:
        """Header prediction for a whole IPv4 frame at ``data[off:]``: an
        ACK-bearing segment (no SYN, RST or URG) of a synchronized connection
        that the full path would take without a second look (no IP options
        or fragments, a known source MAC, a valid checksum unless
        ``trusted``, the expected options) is handled here with one unpack;
        True if it was. In-order data and plain ACKs in ESTABLISHED go
        straight to TcpConnection.predicted, others to segment_arrives.
        False changes nothing: the caller takes the full path, which also
        counts whatever was wrong with the frame."""
        if len(data) < off + 54:
            return False
        (
            src_mac,
            ethertype,
            ver_ihl,
            total,
            frag,
            ttl,
            proto,
            src,
            dst,
            sport,
            dport,
            seq,
            ack,
            doff,
            flags,
            window,
        ) = _FAST4.unpack_from(data, off + 6)
        if (
            ethertype != 0x0800
            or ver_ihl != 0x45
            or proto != 6
            or frag & 0xBFFF
            or ttl <= 1
            or flags & (SYN | RST | URG | ACK) != ACK  # those take the full path...
            and flags & (SYN | RST | URG | ACK | FIN) != SYN  # ...but a plain SYN
        ):
            return False
        end = off + 14 + total
        if end > len(data) or (total > self.stack.config.mtu and not gso):
            return False
        key = (src, sport, dst, dport)
        conn = self.connections.get(key)
        if conn is None:
            if flags & SYN:
                return self._syn_fast(data, off, trusted, key, src_mac, total, doff, seq, now)
            return False
        if flags & SYN:  # a SYN for a known connection: the full path's business
            return False
        state = conn.state
        if state <= SYN_SENT:  # CLOSED, LISTEN or SYN-SENT: the full path's
            return False
        if self.stack.arp_cache.get(src) != src_mac:
            return False
        # The header checksum: a valid header's partial sum is 0, in
        # checksum.py's form of it (int.from_bytes modulo 0xFFFF) written
        # out, since 20 bytes need none of partial_sum's folding (a call
        # there costs twice this).
        if _from_bytes(data[off + 14 : off + 34], "big") % 0xFFFF:
            return False
        at = off + 34  # the TCP header
        if conn.ts_enabled:
            if doff >> 4 != 8 or total < 52:
                return False
            word, ts_val, ts_ecr = _TS_BLOCK.unpack_from(data, at + 20)
            if word != _TS_WORD:
                return False
            ts = (ts_val, ts_ecr)
            start = at + 32
        elif doff >> 4 == 5:
            ts = None
            start = at + 20
        else:
            return False
        if not trusted and self.verify_checksum:
            s = conn.pseudo_sum + total - 20
            if (s + checksum.partial_sum(memoryview(data)[at:end])) % 0xFFFF:
                return False
        payload = data[start:end] if end - start < 1024 else memoryview(data)[start:end]
        if state is ESTABLISHED:
            if conn.predicted(seq, ack, window, ts, payload, now, flags & FIN):
                return True
        elif end == start and not flags & FIN:  # a plain ACK, ending a handshake or a close
            if state is SYN_RECEIVED:
                if conn.handshake_acked(seq, ack, window, ts, now):
                    return True
            elif state is LAST_ACK and conn.last_acked(seq, ack, window, ts, now):
                return True
        # Not predicted (out of order, a FIN while closing...): the state
        # machine as receive_segment would call it, minus parsing.
        seg = tcp.TcpSegment(sport, dport, seq, ack, flags, window, 0, payload)
        seg.timestamp = ts
        conn.segment_arrives(seg, now)
        return True

    def _syn_fast(self, data, off, trusted, key, src_mac, total, doff, seq, now) -> bool:
        """receive_fast for a plain SYN of a new connection (no data, no
        table entry): the checks of the IPv4 and TCP parsers, then
        _no_connection's, without their objects."""
        src, sport, dst, dport = key
        header_len = (doff >> 4) * 4
        stack = self.stack
        if (
            header_len < 20
            or total != 20 + header_len  # data on a SYN: the full path
            or not sport
            or not dport
            or dst[0] >= 224
            or dst == stack.broadcast
            or stack.arp_cache.get(src) != src_mac
            or _from_bytes(data[off + 14 : off + 34], "big") % 0xFFFF  # as receive_fast
        ):
            return False
        at = off + 34  # the TCP header
        end = at + header_len
        if not trusted and self.verify_checksum:
            s = int.from_bytes(src, "big") + int.from_bytes(dst, "big") + 6 + header_len
            if (s + checksum.partial_sum(memoryview(data)[at:end])) % 0xFFFF:
                return False
        if header_len == 40:
            mss_head, mss, sack, ts_head, ts_val, _ecr, ws_head = _SYN_LINUX.unpack_from(
                data, at + 20
            )
            linux = (
                mss_head == 0x0204
                and sack == 0x0402
                and ts_head == 0x080A
                and ws_head >> 8 == 0x010303
            )
        else:
            linux = False
        if linux:  # Linux's SYN options: straight to the connection
            ws = ws_head & 0xFF
            if ws > tcp.MAX_WINDOW_SCALE:
                ws = tcp.MAX_WINDOW_SCALE
            sack = True
        else:  # another layout: the parser's (it may raise MalformedFrame, as in the full path)
            seg = tcp.TcpSegment(sport, dport, seq, 0, SYN, 0, 0, b"")
            if header_len > 20:
                tcp.parse_options(seg, memoryview(data)[at + 20 : end])
            mss, ws, ts_val, sack = seg.mss, seg.window_scale, seg.timestamp, seg.sack_permitted
            if ts_val is not None:
                ts_val = ts_val[0]
        # _no_connection for a SYN, as the full path would reach it: a full
        # table gives up its oldest TIME-WAIT entry, or the full path refuses.
        if len(self.connections) >= self.config.max_connections and not self._reclaim():
            return False
        self._syn_recorded(key, seq, mss, ws, ts_val, sack, bytes(data[off + 14 : at + 20]), now)
        return True

    def receive_segment(self, ip, packet, payload, now: float) -> None:
        seg = tcp.parse(payload, ip.src, ip.dst, self.verify_checksum)
        key = (ip.src, seg.src_port, ip.dst, seg.dst_port)
        conn = self.connections.get(key)
        if conn is not None:
            state = conn.state
            if state is LISTEN:
                self._listen_arrives(conn, seg, now)
                return
            if state is SYN_SENT:
                self._syn_sent_arrives(conn, seg, now)
                return
            if state is not TIME_WAIT or not self._reopens(conn, seg):
                conn.segment_arrives(seg, now)
                return
            self.remove(conn)
            self.counters["tcp-time-wait-reused"] += 1
        self._no_connection(ip, packet, seg, key, now)

    @staticmethod
    def _reopens(conn: TcpConnection, seg) -> bool:
        """A new SYN for a TIME-WAIT connection (RFC 1122 4.2.2.13, RFC 6191)."""
        if seg.flags & (SYN | ACK | RST) != SYN:
            return False
        if conn.ts_enabled and seg.timestamp is not None:
            return seq_lt(conn.ts_recent, seg.timestamp[0])
        return seq_lt(conn.rcv_nxt, seg.seq)

    def _no_connection(self, ip, packet, seg, key, now: float) -> None:
        """RFC 9293 3.10.7.1 (CLOSED) and 3.10.7.2 (LISTEN)."""
        flags = seg.flags
        if flags & RST:
            return
        if flags & ACK:
            self.counters["tcp-no-connection"] += 1
            self.send_reset(ip.dst, seg.dst_port, ip.src, seg.src_port, seg.ack)
            return
        if not flags & SYN:
            self.counters["tcp-no-connection"] += 1
            return
        if flags & FIN:
            self.counters["tcp-syn-fin"] += 1
            return
        if len(self.connections) >= self.config.max_connections and not self._reclaim():
            self.counters["tcp-refused-table-full"] += 1
            ack = (seg.seq + seg.length) & MASK
            self.send_reset(ip.dst, seg.dst_port, ip.src, seg.src_port, 0, ack)
            return
        ts = seg.timestamp
        self._syn_recorded(
            key,
            seg.seq,
            seg.mss,
            seg.window_scale,
            None if ts is None else ts[0],
            seg.sack_permitted,
            bytes(packet[: ip.header_len + tcp.HEADER_LEN]),
            now,
        )

    def _syn_recorded(self, key, seq, mss, window_scale, ts_val, sack, syn_packet, now) -> None:
        """A guest SYN for no connection, with room in the table (the end of
        _no_connection and of _syn_fast): LISTEN, and the NAT side is asked.
        Its options as _take_syn_options takes them; ``syn_packet``: its
        IPv4 and TCP headers, for an ICMP error's quote."""
        remote, remote_port, local, local_port = key
        conn = self._new_connection(key, local, local_port, remote, remote_port, now)
        conn.syn_arrived(seq)
        self._take_syn_options(conn, mss, window_scale, ts_val, sack)
        conn.syn_packet = syn_packet
        self.counters["tcp-connect-requests"] += 1
        self.events.append(TcpConnectRequested(conn))

    def _listen_arrives(self, conn: TcpConnection, seg, now: float) -> None:
        """The guest's SYN is recorded, the NAT side has not answered yet."""
        flags = seg.flags
        if flags & RST:
            if seg.seq == conn.rcv_nxt:
                self.connection_reset(conn, "reset by guest", now)
            return
        if flags & (SYN | ACK) == SYN:
            if seg.seq == conn.irs:
                self.counters["tcp-syn-repeated"] += 1
            else:  # a new attempt from the same port: answer that one
                conn.syn_arrived(seg.seq)
                ts = seg.timestamp
                self._take_syn_options(
                    conn,
                    seg.mss,
                    seg.window_scale,
                    None if ts is None else ts[0],
                    seg.sack_permitted,
                )

    def _syn_sent_arrives(self, conn: TcpConnection, seg, now: float) -> None:
        """RFC 9293 3.10.7.3, for connections we open toward the guest."""
        flags = seg.flags
        if flags & ACK and (seq_le(seg.ack, conn.iss) or seq_lt(conn.snd_nxt, seg.ack)):
            if not flags & RST:
                self.send_reset(conn.local, conn.local_port, conn.remote, conn.remote_port, seg.ack)
            return
        if flags & RST:
            if flags & ACK:
                self.connection_reset(conn, "refused by guest", now)
            return
        if not flags & SYN:
            return
        conn.irs = seg.seq
        conn.rcv_nxt = (seg.seq + 1) & MASK
        if seg.window_scale >= 0 and conn.ws_enabled:
            conn.snd_wscale = seg.window_scale
        else:
            conn.ws_enabled = False
            conn.snd_wscale = conn.rcv_wscale = 0
        if seg.timestamp is not None and conn.ts_enabled:
            conn.ts_recent = seg.timestamp[0]
        else:
            conn.ts_enabled = False
        conn.guest_mss = max(seg.mss or 536, _MIN_MSS)
        self._set_mss(conn)
        if flags & ACK:
            conn.syn_ack_received(seg.seq, seg.ack, seg.window, now)
        else:
            conn.simultaneous_open(now)

    # ------------------------------------------------------------ setup
    def _new_connection(self, key, local, local_port, remote, remote_port, now):
        self._serial += 1
        conn = TcpConnection(self, key, local, local_port, remote, remote_port, self._serial, now)
        mac = self.stack.neighbour_mac(remote)
        if mac is not None and len(remote) == 4:
            conn.eth = ethernet.header(mac, self.stack.gateway_mac, ethernet.ETHERTYPE_IPV4)
        both = int.from_bytes(local, "big") + int.from_bytes(remote, "big")
        conn.ip_sum = _IP_FIXED_SUM + both
        conn.tcp_sum = both + tcp.PROTOCOL + local_port + remote_port
        conn.pseudo_sum = both + tcp.PROTOCOL
        conn.ts_offset = self.random.getrandbits(32)
        # The largest payload per segment the MTU allows, without TCP
        # options: less the IPv4 and TCP headers (40 bytes), or IPv6's (60).
        limit = conn.mss_limit = self.stack.config.mtu - (40 if len(remote) == 4 else 60)
        half = conn.rcv_limit // 2
        conn.rcv_sws = half if half < limit else limit
        self.connections[key] = conn
        return conn

    def _take_syn_options(self, conn: TcpConnection, mss, window_scale, ts_val, sack) -> None:
        """A guest SYN's options: ``mss`` (0: none), ``window_scale`` (-1:
        none), ``ts_val`` its TSval (None: no timestamps), ``sack`` permitted."""
        config = self.config
        conn.guest_mss = max(mss or 536, _MIN_MSS)
        if window_scale >= 0 and config.window_scaling:
            conn.ws_enabled = True
            conn.snd_wscale = window_scale
            conn.rcv_wscale = self._rcv_wscale
        else:
            conn.ws_enabled = False
            conn.snd_wscale = conn.rcv_wscale = 0
        if ts_val is not None and config.timestamps:
            conn.ts_enabled = True
            conn.ts_recent = ts_val
        else:
            conn.ts_enabled = False
        conn.sack_permitted = sack

    def _set_mss(self, conn: TcpConnection) -> None:
        limit = conn.mss_limit
        mss = min(conn.guest_mss, limit)
        if conn.ts_enabled:
            mss -= 12
        conn.mss = mss
        if self.config.delayed_ack_timeout:  # ACK at least every second full segment
            conn.delack_limit = 2 * (limit - (12 if conn.ts_enabled else 0))
        # RFC 6928: the initial window.
        conn.cwnd = min(10 * mss, max(2 * mss, 14600))

    def initial_sequence_number(
        self, local: bytes, local_port: int, remote: bytes, remote_port: int, now: float
    ) -> int:
        """RFC 6528 section 3: ISN = M + F(localip, localport, remoteip,
        remoteport, secretkey), M a timer ticking every 4 microseconds (from
        ``now``), F a keyed hash (BLAKE2b, RFC 7693) of the 4-tuple. A new
        incarnation of a 4-tuple starts above where the old one began, and
        an observer of one connection learns nothing of another's ISN."""
        keyed = self._isn_hash.copy()  # a copy skips hashing the key block again
        four = _ISN4 if len(local) == 4 else _ISN6
        keyed.update(four.pack(local, local_port, remote, remote_port))
        digest = keyed.digest()
        return (int(now * 250_000) + int.from_bytes(digest, "big")) & MASK

    def _initial_sequence(self, conn: TcpConnection, now: float) -> None:
        conn.iss = self.initial_sequence_number(
            conn.local, conn.local_port, conn.remote, conn.remote_port, now
        )
        conn.snd_una = conn.iss
        conn.snd_nxt = conn.snd_max = (conn.iss + 1) & MASK
        conn.recover = conn.iss

    # ------------------------------------------------------------ commands
    def accept(self, conn: TcpConnection, now: float) -> None:
        """The host connection is made: answer the guest's SYN."""
        if conn.state is not LISTEN:
            return
        self._initial_sequence(conn, now)
        self._set_mss(conn)
        conn.host_connected(now)
        if conn.close_requested:
            conn.mark()

    def refuse(self, conn: TcpConnection, now: float, icmp_code: int | None = None) -> None:
        """The host connection failed: RST (refused), or ICMP destination
        unreachable with ``icmp_code`` quoting the guest's SYN."""
        if conn.state is not LISTEN:
            return
        self.remove(conn)
        conn.end_notified = True
        self.counters["tcp-refused"] += 1
        if icmp_code is None:
            self.send_reset(
                conn.local, conn.local_port, conn.remote, conn.remote_port, 0, conn.rcv_nxt
            )
        else:
            self.stack.send_icmp_error(icmpv4.DEST_UNREACHABLE, icmp_code, conn.syn_packet, now)

    def send_space(self, conn: TcpConnection) -> int:
        """How many bytes ``send`` would take now: the send buffer's free
        space, no more than the memory budget has room for (under pressure
        a share of what is left, at the limit nothing: the host peer waits
        on its own socket buffer). 0 marks the connection as waiting for
        TcpSendSpaceOpened."""
        if conn.close_requested or conn.state not in OPEN_FOR_SEND:
            return 0
        space = conn.snd_limit - conn.snd_buf.size
        budget = self.budget
        held = budget.held
        if held >= budget.pressure or space > budget.limit - held:  # else no call
            room = budget.window_room()
            if space > room:
                space = room
        if space <= 0:
            conn.send_blocked = True
            return 0
        return space

    def send(self, conn: TcpConnection, data, now: float, at_once: bool = False) -> int:
        """Queue bytes for the guest; returns how many were taken. They go
        out at the next flush, with what else comes for the connection
        until then (a close's FIN rides on the last segment); ``at_once``
        sends now, for a caller with nothing more to add in this wake-up
        (the reply of a request/response leaves sooner)."""
        if conn.close_requested or conn.state not in OPEN_FOR_SEND:
            return 0
        space = conn.snd_limit - conn.snd_buf.size
        budget = self.budget
        held = budget.held
        if held >= budget.pressure or space > budget.limit - held:  # as send_space
            room = budget.window_room()
            if space > room:
                space = room
        size = len(data)
        if size > space:
            conn.send_blocked = True
            if space <= 0:
                return 0
            data = memoryview(data)[:space]
            size = space
        budget.held += size  # budget.charge: within window_room, so within the limit
        conn.snd_buf.append(data)  # a copy: it holds just ``size`` bytes more
        if at_once and not conn.dirty:
            conn.output(now)
        else:
            conn.mark()
        return size

    def consume(self, conn: TcpConnection, count: int, now: float) -> None:
        """The NAT side passed ``count`` bytes from the front of conn.rx on."""
        if count <= 0:
            return
        rx = conn.rx
        freed = 0
        if count >= conn.rx_bytes:  # all of it (a request, say)
            if len(rx) == 1:
                head = rx[0]
                freed = len(head.obj) if type(head) is memoryview else len(head)
            else:
                freed = sum(map(held_size, rx))
            rx.clear()
            conn.rx_bytes = 0
        else:
            conn.rx_bytes -= count
            while count > 0 and rx:
                head = rx[0]
                size = len(head)
                if size <= count:
                    rx.popleft()
                    count -= size
                    freed += len(head.obj) if type(head) is memoryview else size
                else:
                    if type(head) is not memoryview:  # a copy: only the rest stays
                        freed += count
                    rx[0] = head[count:]
                    break
        budget = self.budget
        budget.held -= freed
        if budget.pressed and budget.held < budget.relief:
            self.stack.check_memory_pressure()
        if not rx:
            conn.rx_notified = False
            if conn.state is CLOSED:
                self.unread.pop(conn, None)
                return
        if conn.state in RECEIVING:
            self.window_opened(conn, now)

    def window_opened(self, conn: TcpConnection, now: float) -> None:
        """Bytes left the receive buffer (consume, or a sink took them):
        a window update when the right edge may move far enough to be
        worth a segment, at once if the guest is about to stall."""
        space = conn.rcv_limit - conn.rx_bytes
        advertised = (conn.rcv_adv - conn.rcv_nxt) & MASK
        if space - advertised >= conn.rcv_sws:  # a window update is worth a segment
            if advertised < conn.delack_limit or not self.config.delayed_ack_timeout:
                conn.ack_pending = True  # the guest is about to stall: now
                conn.mark()
            elif conn.delack_at is None:  # else with the next segment, or soon
                self.delay_ack(conn, now)

    def close(self, conn: TcpConnection, now: float) -> None:
        """No more data from the host: FIN once the buffered bytes are out."""
        if conn.close_requested:
            return
        conn.close_requested = True
        state = conn.state
        if state is LISTEN:
            self.refuse(conn, now)
        elif state is SYN_SENT:
            self.abort(conn, now)
        elif state is not CLOSED:
            conn.mark()

    def abort(self, conn: TcpConnection, now: float, reason: str | None = None) -> None:
        """Reset the connection (RFC 9293 3.10.5 ABORT). With a ``reason`` the
        stack itself gave up, and the NAT side gets TcpConnectionReset."""
        state = conn.state
        if state is CLOSED:
            return
        if state is LISTEN:
            self.refuse(conn, now)
        else:
            if state is not SYN_SENT and state is not TIME_WAIT:
                self.emit(conn, RST | ACK, conn.snd_nxt, b"", now)
            self.remove(conn, reset=True)
        self.counters["tcp-aborted"] += 1
        if reason is not None and not conn.end_notified:
            conn.end_notified = True
            self.events.append(TcpConnectionReset(conn, reason))
        conn.end_notified = True

    def connect(
        self, local: bytes, local_port: int, remote: bytes, remote_port: int, now: float
    ) -> TcpConnection | None:
        """Open a connection toward the guest (for port forwarding). None if
        that 4-tuple is in use or the table is full."""
        key = (remote, remote_port, local, local_port)
        if key in self.connections:
            return None
        if len(self.connections) >= self.config.max_connections and not self._reclaim():
            return None
        conn = self._new_connection(key, local, local_port, remote, remote_port, now)
        self._initial_sequence(conn, now)
        conn.ws_enabled = self.config.window_scaling
        conn.rcv_wscale = self._rcv_wscale if conn.ws_enabled else 0
        conn.ts_enabled = self.config.timestamps
        conn.active_open(now)
        return conn

    # ------------------------------------------------------------ endings
    def remove(self, conn: TcpConnection, reset: bool = False) -> None:
        """Out of the table, its buffers released: all of them after a
        ``reset`` or when nobody will read, else (a graceful close) the
        received bytes stay for the NAT side (``unread``)."""
        if self.connections.get(conn.key) is conn:
            del self.connections[conn.key]
        conn.closed()
        if conn.ooo:
            conn.drop_out_of_order()
        buf = conn.snd_buf
        if buf.size or buf.offset:
            self.budget.held -= buf.held()
            buf.drop(buf.size)
        if conn.rx:
            if reset or conn.user is None:
                self.release_received(conn)
            else:
                self.unread[conn] = None
        budget = self.budget
        if budget.pressed and budget.held < budget.relief:
            self.stack.check_memory_pressure()

    def release_received(self, conn: TcpConnection) -> None:
        """The NAT side will not pass on the rest of conn.rx (its host socket
        is gone): drop those bytes and what they were charged."""
        rx = conn.rx
        if rx:
            self.budget.held -= sum(map(held_size, rx))
            rx.clear()
            conn.rx_bytes = 0
        self.unread.pop(conn, None)

    def held_bytes(self) -> int:
        """What the connections hold, recounted from their buffers (for
        tests: the budget's share of TCP must equal it)."""
        total = 0
        for conn in (*self.connections.values(), *self.unread):
            total += sum(map(held_size, conn.rx))
            total += sum(held_size(data) for _start, data in conn.ooo)
            total += conn.snd_buf.held()
        return total

    def memory_relieved(self) -> None:
        """The budget left pressure: connections it held back hear so, the
        guest by a window update, the NAT side by TcpSendSpaceOpened."""
        for conn in self.connections.values():
            state = conn.state
            if state in RECEIVING:
                advertised = (conn.rcv_adv - conn.rcv_nxt) & MASK
                if conn.rcv_limit - conn.rx_bytes - advertised >= conn.rcv_sws:
                    conn.ack_pending = True
                    conn.mark()
            if (
                conn.send_blocked
                and state in OPEN_FOR_SEND
                and not conn.close_requested
                and conn.snd_buf.size < conn.snd_limit
            ):
                conn.send_blocked = False
                self.events.append(TcpSendSpaceOpened(conn))

    def connection_reset(self, conn: TcpConnection, reason: str, now: float) -> None:
        self.remove(conn, reset=True)
        self.counters["tcp-reset-by-guest"] += 1
        if not conn.end_notified:
            conn.end_notified = True
            self.events.append(TcpConnectionReset(conn, reason))

    def connection_closed(self, conn: TcpConnection, now: float) -> None:
        self.remove(conn)
        if not conn.end_notified:
            conn.end_notified = True
            self.events.append(TcpConnectionClosed(conn))

    def time_wait_entered(self, conn: TcpConnection, now: float) -> None:
        queue = self._time_wait
        # Entries that left TIME-WAIT (expired or reclaimed) go from the
        # front as new ones come: TIME-WAIT lasts the same for all, so the
        # queue holds about what is in TIME-WAIT now.
        while queue and queue[0].state is not TIME_WAIT:
            queue.popleft()
        queue.append(conn)
        self.arm(conn)
        if not conn.end_notified:
            conn.end_notified = True
            self.events.append(TcpConnectionClosed(conn))

    def _reclaim(self) -> bool:
        """Free the oldest TIME-WAIT entry for a new connection."""
        queue = self._time_wait
        while queue:
            conn = queue.popleft()
            if conn.state is TIME_WAIT:
                self.remove(conn)
                self.counters["tcp-time-wait-reclaimed"] += 1
                return True
        return False

    def keepalive_due(self, conn: TcpConnection, now: float) -> None:
        config = self.config
        if conn.state not in (ESTABLISHED, CLOSE_WAIT, FIN_WAIT_2):
            return  # retransmission timers bound the other states
        if conn.snd_nxt != conn.snd_una or conn.persisting:
            conn.wait_at = now + config.keepalive_idle
            return
        if conn.keepalive_probes == 0 and now - conn.last_rx < config.keepalive_idle:
            conn.wait_at = conn.last_rx + config.keepalive_idle
            return
        if conn.keepalive_probes >= config.keepalive_probes:
            self.abort(conn, now, "keep-alive timeout")
            return
        conn.keepalive_probes += 1
        self.counters["tcp-keepalive-probes"] += 1
        self.emit(conn, ACK, (conn.snd_una - 1) & MASK, b"", now)
        conn.wait_at = now + config.keepalive_interval

    def challenge_ack(self, conn: TcpConnection, now: float) -> None:
        """RFC 5961 3.2 and 4.2, limited in rate (section 7)."""
        second = int(now)
        if second != self._challenge_second:
            self._challenge_second = second
            self._challenge_count = 0
        if self._challenge_count >= self.config.challenge_ack_limit:
            self.counters["tcp-challenge-ack-limited"] += 1
            return
        self._challenge_count += 1
        self.counters["tcp-challenge-acks"] += 1
        conn.ack_pending = True
        conn.mark()

    # ------------------------------------------------------------ egress
    def emit(self, conn: TcpConnection, flags: int, seq: int, payload, now: float) -> None:
        """One segment with ACK = RCV.NXT, our window and timestamps."""
        window = conn.window_field()
        ack = conn.ack_sent = conn.rcv_nxt
        conn.delack_at = None
        eth = conn.eth
        if eth is not None and self.offload:
            # The common case: a TAP with virtio offloads, the guest's MAC
            # known. The TCP checksum is left to the guest's kernel (the
            # field holds the pseudo-header sum), and a segment longer than
            # the MSS goes as one GSO frame of MSS pieces.
            size = len(payload)
            stack = self.stack
            ident = stack.next_ip_ident()
            if conn.ts_enabled:
                header_len = 32
                total = 52 + size
                ip_sum = (conn.ip_sum + total + ident) % 0xFFFF  # _ip_checksum, inline
                frame = _FRAME4_TS.pack(
                    eth,
                    0x45,
                    total,
                    ident,
                    _DF,
                    _TTL,
                    6,  # TCP
                    (~ip_sum) & 0xFFFF if ip_sum else 0,
                    conn.addrs,
                    conn.local_port,
                    conn.remote_port,
                    seq,
                    ack,
                    0x80,  # 32 bytes of header
                    flags,
                    window,
                    (conn.pseudo_sum + total - 20) % 0xFFFF or 0xFFFF,
                    _TS_WORD,
                    (int(now * 1000) + conn.ts_offset) & MASK,  # conn.ts_value(now)
                    conn.ts_recent,
                )
            else:
                header_len = 20
                total = 40 + size
                pseudo = (conn.pseudo_sum + total - 20) % 0xFFFF or 0xFFFF
                frame = eth + self._headers4(conn, flags, seq, ack, window, 20, total, pseudo)
            if size:
                frame += payload
                if size > conn.mss:
                    vnet = virtio.tcp_header(14, 20, header_len, virtio.GSO_TCPV4, conn.mss)
                    self.counters["tcp-gso-out"] += 1
                    stack.out.append((vnet, frame))
                    return
            stack.out.append((self._vnet_plain[header_len], frame))
            return
        if conn.ts_enabled:
            ts_val = conn.ts_value(now)
            ts_ecr = conn.ts_recent
            options = _TS_BLOCK.pack(_TS_WORD, ts_val, ts_ecr)
            options_sum = _TS_SUM + ts_val + ts_ecr
        else:
            options = b""
            options_sum = 0
        self._frame(conn, flags, seq, ack, window, options, options_sum, payload, now)

    def _headers4(self, conn, flags, seq, ack, window, header_len, total, tcp_csum) -> bytes:
        """The IPv4 header and the fixed TCP header of one segment toward the
        guest (40 bytes; TCP options and payload follow)."""
        ident = self.stack.next_ip_ident()
        return _PACKET4.pack(
            0x45,
            0,
            total,
            ident,
            _DF,
            ipv4.DEFAULT_TTL,
            ipv4.PROTO_TCP,
            _ip_checksum(conn, total, ident),
            conn.addrs,
            conn.local_port,
            conn.remote_port,
            seq,
            ack,
            header_len << 2,
            flags,
            window,
            tcp_csum,
            0,
        )

    def gso_neighbour(self, conn: TcpConnection) -> bool:
        """An IPv6 connection whose guest's MAC is known (offloads apply)."""
        return len(conn.remote) == 16 and conn.remote in self.stack.ipv6.neighbors

    def _frame(self, conn, flags, seq, ack, window, options, options_sum, payload, now) -> None:
        if len(conn.remote) == 16:  # IPv6: conn.eth stays None, so every segment comes here
            self._frame6(conn, flags, seq, ack, window, options, options_sum, payload, now)
            return
        header_len = 20 + len(options)
        tcp_len = header_len + len(payload)
        csum = _tcp_checksum(
            conn, flags, seq, ack, window, header_len, tcp_len, options_sum, payload
        )
        head = self._headers4(conn, flags, seq, ack, window, header_len, 20 + tcp_len, csum)
        stack = self.stack
        eth = conn.eth
        if eth is not None:
            stack.out.append(b"".join((eth, head, options, payload)))
            return
        stack.send_packet(conn.remote, b"".join((head, options, payload)), now)
        mac = stack.neighbour_mac(conn.remote)
        if mac is not None:
            conn.eth = ethernet.header(mac, stack.gateway_mac, ethernet.ETHERTYPE_IPV4)

    def _frame6(self, conn, flags, seq, ack, window, options, options_sum, payload, now) -> None:
        """One segment over IPv6 (the checksum sums as for IPv4: RFC 8200 8.1)."""
        header_len = 20 + len(options)
        size = len(payload)
        tcp_len = header_len + size
        # With offloads, to a known neighbour (else ND first, and the packet
        # waits without offloads): the guest's kernel completes the checksum.
        mac = self.stack.ipv6.neighbors.get(conn.remote) if self.offload else None
        if mac is not None:
            csum = (conn.pseudo_sum + tcp_len) % 0xFFFF or 0xFFFF
        else:
            csum = _tcp_checksum(
                conn, flags, seq, ack, window, header_len, tcp_len, options_sum, payload
            )
        head = _SEGMENT.pack(
            conn.local_port,
            conn.remote_port,
            seq,
            ack,
            header_len << 2,
            flags,
            window,
            csum,
            0,
        )
        parts = (head, options, payload) if size else (head, options)
        if mac is None:
            self.stack.ipv6.send_segment(conn.local, conn.remote, parts, tcp_len, now)
            return
        gso = virtio.GSO_TCPV6 if size > conn.mss else virtio.GSO_NONE
        if gso:
            self.counters["tcp-gso-out"] += 1
        vnet = virtio.tcp_header(14, 40, header_len, gso, conn.mss)
        self.stack.ipv6.send_offload_segment(conn.local, conn.remote, mac, vnet, parts, tcp_len)

    def syn_options(self, conn: TcpConnection, now: float):
        """Our SYN's (or SYN-ACK's) options and the sum of their 16-bit words
        (modulo 0xFFFF, as checksum.partial_sum gives it)."""
        if conn.ts_enabled and conn.ws_enabled:
            # The common case (a Linux guest's SYN): tcp.build_options' layout
            # in one pack, its sum from the fields (2**16 = 1 modulo 0xFFFF,
            # so a 32-bit field adds as itself). The general path below is
            # the reference (tests/test_tcp_stack.py compares the two).
            mss = conn.mss_limit
            ts_val = conn.ts_value(now)
            ts_ecr = conn.ts_recent
            ws_word = _WS_WORD | conn.rcv_wscale
            options = _SYN_TS_WS.pack(_MSS_HEAD, mss, _TS_WORD, ts_val, ts_ecr, ws_word)
            return options, (_MSS_HEAD + mss + _TS_SUM + ts_val + ts_ecr + ws_word) % 0xFFFF
        options = tcp.build_options(
            mss=conn.mss_limit,
            window_scale=conn.rcv_wscale if conn.ws_enabled else -1,
            timestamp=(conn.ts_value(now), conn.ts_recent) if conn.ts_enabled else None,
        )
        return options, checksum.partial_sum(options)

    def send_syn_ack(self, conn: TcpConnection, now: float) -> None:
        window = min(conn.rcv_limit, 0xFFFF)  # RFC 7323 2.2: a SYN's window is not scaled
        room = self.budget.window_room()
        if window > room:  # under memory pressure: little or nothing
            window = room if room >= conn.rcv_sws else 0
        ack = conn.ack_sent = conn.rcv_nxt
        conn.rcv_adv = (ack + window) & MASK
        conn.rtt_time = now
        eth = conn.eth
        if eth is not None and conn.ts_enabled and conn.ws_enabled and self.predict:
            # The common case (a Linux guest, its MAC known; eth is set for
            # IPv4 only): the frame _frame would build from syn_options, in
            # one pack, both checksums whole from the precomputed sums
            # (tests/test_tcp_prediction.py compares it with _frame's).
            mss = conn.mss_limit
            ts_val = (int(now * 1000) + conn.ts_offset) & MASK  # conn.ts_value(now)
            ts_ecr = conn.ts_recent
            ws_word = _WS_WORD | conn.rcv_wscale
            seq = conn.iss
            ident = self.stack.next_ip_ident()
            s = (
                conn.tcp_sum
                + 40  # the TCP length: a 40-byte header, no payload
                + seq
                + ack
                + ((40 << 10) | SYN | ACK)
                + window
                + _MSS_HEAD
                + mss
                + _TS_SUM
                + ts_val
                + ts_ecr
                + ws_word
            ) % 0xFFFF
            self.stack.out.append(
                _SYN_ACK4.pack(
                    eth,
                    0x45,
                    60,  # total length
                    ident,
                    _DF,
                    _TTL,
                    6,  # TCP
                    _ip_checksum(conn, 60, ident),
                    conn.addrs,
                    conn.local_port,
                    conn.remote_port,
                    seq,
                    ack,
                    0xA0,  # 40 bytes of header
                    SYN | ACK,
                    window,
                    (~s) & 0xFFFF if s else 0,
                    _MSS_HEAD,
                    mss,
                    _TS_WORD,
                    ts_val,
                    ts_ecr,
                    ws_word,
                )
            )
            return
        options, options_sum = self.syn_options(conn, now)
        self._frame(conn, SYN | ACK, conn.iss, ack, window, options, options_sum, b"", now)

    def send_syn(self, conn: TcpConnection, now: float) -> None:
        options, options_sum = self.syn_options(conn, now)
        window = min(conn.rcv_limit, 0xFFFF)
        conn.rtt_time = now
        self._frame(conn, SYN, conn.iss, 0, window, options, options_sum, b"", now)

    def retransmit_first(self, conn: TcpConnection, now: float) -> None:
        """Resend the first unacknowledged segment (fast retransmit)."""
        buf = conn.snd_buf
        size = min(len(buf), conn.mss)
        conn.retransmits += 1
        if size:
            flags = ACK | PSH if size == len(buf) else ACK
            self.emit(conn, flags, conn.snd_una, buf.view(0, size), now)
        elif conn.fin_seq is not None and not conn.fin_acked:
            self.emit(conn, ACK | FIN, conn.snd_una, b"", now)

    def send_reset(
        self,
        src: bytes,
        src_port: int,
        dst: bytes,
        dst_port: int,
        seq: int,
        ack: int | None = None,
    ) -> None:
        """A RST for no connection (RFC 9293 3.10.7.1)."""
        flags = RST if ack is None else RST | ACK
        segment = tcp.emit(src, dst, src_port, dst_port, seq, ack or 0, flags, 0)
        self.counters["tcp-resets-out"] += 1
        self.stack.send_ip(src, dst, ipv4.PROTO_TCP, segment, 0.0)

    # ------------------------------------------------------------ the verbs
    def flush(self, now: float) -> None:
        dirty = self.dirty
        if not dirty:
            return
        self.dirty = []
        for conn in dirty:
            if conn.dirty:
                if conn.state is CLOSED:
                    conn.dirty = False
                else:
                    conn.output(now)

    def delay_ack(self, conn: TcpConnection, now: float) -> None:
        """ACK within delayed_ack_timeout unless a segment carries it sooner."""
        if conn.delack_at is None:
            at = conn.delack_at = now + self.config.delayed_ack_timeout
            self._delack.append((at, conn))
            wake = self.wake_at
            if wake is None or at < wake:
                self.wake_at = at

    def arm(self, conn: TcpConnection) -> None:
        """Make sure the heap holds an entry no later than the connection's
        next retransmission or keep-alive/TIME-WAIT deadline."""
        at = conn.rtx_at
        other = conn.wait_at
        if other is not None and (at is None or other < at):
            at = other
        if at is not None:
            current = conn.heap_at
            if current is None or at < current:
                conn.heap_at = at
                heap = self._heap
                heapq.heappush(heap, (at, conn.serial, conn))
                if len(heap) > 2 * len(self.connections) + 64:
                    self._compact_heap()
                wake = self.wake_at
                if wake is None or at < wake:
                    self.wake_at = at

    def _compact_heap(self) -> None:
        """Drop the entries that are no connection's live one (moved, or of
        a closed connection), so that the heap stays about as long as the
        table and keeps no closed connection alive until its old deadline
        (a keep-alive deadline is two hours away). Amortized over the pushes
        that made it twice that long, it costs O(1) each."""
        heap = [entry for entry in self._heap if entry[2].heap_at == entry[0]]
        heapq.heapify(heap)
        self._heap = heap

    def queue_lengths(self) -> dict:
        """A test hook: the lengths of the timer heap, the delayed-ACK FIFO
        and the TIME-WAIT queue (each must stay about as long as the table)."""
        return {
            "timers": len(self._heap),
            "delayed-acks": len(self._delack),
            "time-wait": len(self._time_wait),
        }

    def get_timer(self):
        """The earliest deadline, or one a little early (see __init__).
        Entries whose deadline went away are dropped on the way (remove()
        clears a closed connection's deadlines, so those go too)."""
        delack = self._delack
        at = None
        while delack:
            first = delack[0]
            if first[1].delack_at == first[0]:
                at = first[0]
                break
            delack.popleft()
        heap = self._heap
        while heap:
            first = heap[0]
            if first[2].heap_at == first[0]:
                if at is None or first[0] < at:
                    at = first[0]
                break
            heapq.heappop(heap)
        self.wake_at = at
        return at

    def handle_timer(self, now: float) -> None:
        delack = self._delack
        while delack and delack[0][0] <= now:
            at, conn = delack.popleft()
            if conn.delack_at == at:
                conn.delack_at = None
                conn.ack_pending = True
                conn.output(now)
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, _serial, conn = heapq.heappop(heap)
            if conn.heap_at != at:
                continue
            conn.heap_at = None
            conn.on_timer(now)
            if conn.state is not CLOSED:
                self.arm(conn)
        self.get_timer()  # wake_at: exact again
