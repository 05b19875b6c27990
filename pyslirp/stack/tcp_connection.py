"""One TCP connection toward the guest: the RFC 9293 state machine.

Read first: RFC 9293 section 3.10 (event processing, followed here step by
step), RFC 6298 (retransmission timer), RFC 5681 and RFC 6582 (congestion
control, fast retransmit, NewReno recovery), RFC 5961 (blind RST, SYN and ACK
injection), RFC 7323 (window scale, timestamps, PAWS), RFC 1122 4.2.3.6
(keep-alive), RFC 6191 (reusing a TIME_WAIT connection).

A connection never touches a device: it updates its fields from one parsed
segment and asks its layer (tcp_layer.TcpLayer) to emit segments and to queue
events. Time is the ``now`` argument; timers are deadlines (``*_at``).

Not supported, on purpose: SACK (we neither send nor use SACK blocks; the
guest's SACK-permitted is ignored), urgent data (delivered inline as normal
bytes), TCP Fast Open (data on a SYN is not acknowledged, the guest resends
it), ECN.
"""

from __future__ import annotations

import enum
from collections import deque

from .budget import held_size
from .events import TcpConnected, TcpDataReceived, TcpSendSpaceOpened
from .names import flow_name
from .tcp import ACK, FIN, PSH, RST, SYN, URG

MASK = 0xFFFFFFFF
HALF = 0x80000000
# Guest payloads shorter than this are copied (and merged up to
# MERGED_CHUNK) rather than kept as views of their frames. A longer one is
# kept as a view only if it is at least half its frame (an honest segment
# is nearly all of it): a view keeps the whole frame alive and is charged
# to the memory budget as such, so a small piece of a large frame (a
# segment that overlaps what came before) is copied instead, and what a
# connection holds stays within twice what its window counts.
SMALL_SEGMENT = 1024
MERGED_CHUNK = 65536


class TcpState(enum.IntEnum):
    """RFC 9293 3.3.2. An IntEnum: it hashes in C, which the hot path's set
    membership tests notice (Enum's __hash__ is Python code)."""

    CLOSED = 0
    LISTEN = 1  # a guest SYN is recorded; the host connection is being made
    SYN_SENT = 2
    SYN_RECEIVED = 3
    ESTABLISHED = 4
    FIN_WAIT_1 = 5
    FIN_WAIT_2 = 6
    CLOSE_WAIT = 7
    CLOSING = 8
    LAST_ACK = 9
    TIME_WAIT = 10

    @property
    def rfc_name(self) -> str:
        return self.name.replace("_", "-")


CLOSED = TcpState.CLOSED
LISTEN = TcpState.LISTEN
SYN_SENT = TcpState.SYN_SENT
SYN_RECEIVED = TcpState.SYN_RECEIVED
ESTABLISHED = TcpState.ESTABLISHED
FIN_WAIT_1 = TcpState.FIN_WAIT_1
FIN_WAIT_2 = TcpState.FIN_WAIT_2
CLOSE_WAIT = TcpState.CLOSE_WAIT
CLOSING = TcpState.CLOSING
LAST_ACK = TcpState.LAST_ACK
TIME_WAIT = TcpState.TIME_WAIT

# States in which data from the guest is accepted (RFC 9293 3.10.7.4, seventh).
RECEIVING = frozenset({ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2})
# States in which our data and FIN may still be (re)transmitted.
SENDING = frozenset({ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, CLOSING, LAST_ACK})
# States after the guest's FIN: its direction is finished.
GUEST_FINISHED = frozenset({CLOSE_WAIT, CLOSING, LAST_ACK, TIME_WAIT})
# States the NAT side may still send data in.
OPEN_FOR_SEND = frozenset({LISTEN, SYN_SENT, SYN_RECEIVED, ESTABLISHED, CLOSE_WAIT})


class SendBuffer:
    """Bytes for the guest from SND.UNA on, as the chunks they came in.

    Appending keeps the chunk (small ones are merged); acknowledged bytes are
    dropped from the front; a segment inside one chunk is a view, not a
    copy. A bytearray would copy all it holds whenever it grows after its
    front was cut."""

    __slots__ = ("chunks", "offset", "size")

    MERGE = 4096  # chunks smaller than this are joined on append

    def __init__(self) -> None:
        self.chunks: deque = deque()
        self.offset = 0  # into chunks[0]
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, data) -> None:
        size = len(data)
        if not size:
            return
        chunks = self.chunks
        if size < self.MERGE and chunks and len(chunks[-1]) < self.MERGE:
            chunks[-1] = b"".join((chunks[-1], data))
        else:
            chunks.append(bytes(data))
        self.size += size

    def held(self) -> int:
        """Bytes the chunks keep alive (the front one whole)."""
        return self.size + self.offset

    def drop(self, count: int) -> int:
        """Forget ``count`` acknowledged bytes at the front; returns how
        many bytes that let go of (whole chunks only)."""
        if count >= self.size:
            freed = self.size + self.offset
            self.chunks.clear()
            self.offset = self.size = 0
            return freed
        self.size -= count
        chunks = self.chunks
        count += self.offset
        freed = 0
        while count >= len(chunks[0]):
            size = len(chunks.popleft())
            count -= size
            freed += size
        self.offset = count
        return freed

    def view(self, start: int, end: int):
        """Bytes [start, end) counted from SND.UNA (a view when it can)."""
        start += self.offset
        end += self.offset
        first = self.chunks[0]
        if end <= len(first):  # within the first chunk (all of a small reply)
            if start == 0 and end == len(first):
                return first
            return memoryview(first)[start:end]
        parts = []
        for chunk in self.chunks:
            size = len(chunk)
            if start >= size:
                start -= size
                end -= size
                continue
            if end <= size:
                piece = memoryview(chunk)[start:end]
                if not parts:
                    return piece
                parts.append(piece)
                break
            parts.append(memoryview(chunk)[start:])
            start = 0
            end -= size
        return b"".join(parts)


def seq_lt(a: int, b: int) -> bool:
    """a comes before b in sequence space (RFC 1982 serial arithmetic)."""
    return 0 < ((b - a) & MASK) < HALF


def seq_le(a: int, b: int) -> bool:
    return ((b - a) & MASK) < HALF


class TcpConnection:
    """The guest is the remote end; we are the local end, speaking for the
    host (``local`` is the address the guest connects to).

    Data from the guest waits in ``rx`` (a deque of bytes-like chunks,
    ``rx_bytes`` long) until the NAT side consumes it; ``guest_fin`` tells
    that the guest's FIN follows the last byte. Data for the guest waits in
    ``snd_buf`` from SND.UNA on, acknowledged bytes are cut from its front.
    ``user`` is for the NAT side.

    ``sink``, when the NAT side sets one, takes in-order bytes directly:
    ``sink(data)`` returns how many of them it took (0 to all), never raises
    and never calls back into the stack. A predicted segment's text (see
    ``predicted``) goes to it when nothing waits in ``rx``; whatever it does
    not take waits in ``rx`` as usual, with a TcpDataReceived.
    """

    __slots__ = (
        "layer",
        "key",
        "local",
        "local_port",
        "remote",
        "remote_port",
        "serial",
        "state",
        "user",
        # frame template (see TcpLayer.emit)
        "eth",
        "addrs",
        "ip_sum",
        "tcp_sum",
        "pseudo_sum",
        "mss_limit",
        # send sequence variables (RFC 9293 3.3.1)
        "iss",
        "snd_una",
        "snd_nxt",
        "snd_max",
        "snd_wnd",
        "snd_wl1",
        "snd_wl2",
        "max_snd_wnd",
        "snd_buf",
        "snd_limit",
        "send_blocked",
        "close_requested",
        "fin_seq",
        "fin_acked",
        # receive sequence variables
        "irs",
        "rcv_nxt",
        "rcv_adv",
        "rcv_limit",
        "rx",
        "rx_bytes",
        "rx_notified",
        "guest_fin",
        "ooo",
        "ooo_bytes",
        "ooo_fin",
        # options
        "mss",
        "guest_mss",
        "ws_enabled",
        "snd_wscale",
        "rcv_wscale",
        "ts_enabled",
        "ts_recent",
        "ts_offset",
        "ts_sampled",
        "sack_permitted",
        "syn_packet",
        # RFC 6298 and RFC 5681 state
        "srtt",
        "rttvar",
        "rto",
        "rtt_seq",
        "rtt_time",
        "rtx_at",
        "retries",
        "persisting",
        "cwnd",
        "ssthresh",
        "bytes_acked",
        "dupacks",
        "recover",
        "in_recovery",
        "recover_by_timeout",
        # other timers
        "wait_at",
        "last_rx",
        "keepalive_probes",
        "heap_at",
        # bookkeeping
        "ack_pending",
        "dupacks_owed",
        "ack_sent",
        "delack_at",
        "delack_limit",
        "dirty",
        "rcv_sws",
        "bytes_in",
        "bytes_out",
        "retransmits",
        "end_notified",
        "sink",
    )

    def __init__(self, layer, key, local, local_port, remote, remote_port, serial, now):
        config = layer.config
        self.layer = layer
        self.key = key
        self.local = local
        self.local_port = local_port
        self.remote = remote
        self.remote_port = remote_port
        self.serial = serial
        self.state = CLOSED
        self.user = None
        # The frame template: eth (None until the guest's MAC is known) and
        # addrs here; ip_sum, tcp_sum and pseudo_sum, with mss_limit,
        # ts_offset and rcv_sws, are set by TcpLayer._new_connection.
        self.eth = None
        self.addrs = local + remote
        self.iss = 0
        self.snd_una = self.snd_nxt = self.snd_max = 0
        self.snd_wnd = 0
        self.snd_wl1 = self.snd_wl2 = 0
        self.max_snd_wnd = 0
        self.snd_buf = SendBuffer()
        self.snd_limit = config.send_buffer
        self.send_blocked = False
        self.close_requested = False
        self.fin_seq = None
        self.fin_acked = False
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_adv = 0
        self.rcv_limit = config.receive_buffer
        self.rx = deque()
        self.rx_bytes = 0
        self.rx_notified = False
        self.guest_fin = False
        self.ooo = []  # [(seq, bytes-like)] sorted by seq, bounded by config
        self.ooo_bytes = 0
        self.ooo_fin = None
        self.mss = 536  # RFC 9293 3.7.1: the default when no MSS option came
        self.guest_mss = 536
        self.ws_enabled = False
        self.snd_wscale = 0
        self.rcv_wscale = 0
        self.ts_enabled = False
        self.ts_recent = 0
        self.ts_sampled = 0  # the last TSecr an RTT sample was taken from
        self.sack_permitted = False
        self.syn_packet = b""
        self.srtt = None
        self.rttvar = 0.0
        self.rto = config.initial_rto
        self.rtt_seq = None
        self.rtt_time = 0.0
        self.rtx_at = None
        self.retries = 0
        self.persisting = False
        self.cwnd = 0
        self.ssthresh = 1 << 30
        self.bytes_acked = 0
        self.dupacks = 0
        self.recover = 0
        self.in_recovery = False
        self.recover_by_timeout = False  # RECOVER was set by a timeout, not fast recovery
        self.wait_at = None
        self.last_rx = now
        self.keepalive_probes = 0
        self.heap_at = None
        self.ack_pending = False
        self.dupacks_owed = 0  # wire segments that arrived out of order since the last ACK
        self.ack_sent = 0
        self.delack_at = None
        self.delack_limit = 0  # two full-sized guest segments (set with the MSS by the layer)
        self.dirty = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.retransmits = 0
        self.end_notified = False
        self.sink = None

    def __repr__(self) -> str:
        return (
            f"<TcpConnection {self.describe()} {self.state.rfc_name} "
            f"snd_una={self.snd_una} snd_nxt={self.snd_nxt} rcv_nxt={self.rcv_nxt}>"
        )

    def describe(self) -> str:
        """The flow's name (names.flow_name): 'tcp guest:port>peer:port'."""
        return flow_name("tcp", self.remote, self.remote_port, self.local, self.local_port)

    # ------------------------------------------------------------ helpers
    def send_space(self) -> int:
        """What the send buffer may still take (TcpLayer.send_space, without
        marking the connection as waiting)."""
        space = self.snd_limit - self.snd_buf.size
        room = self.layer.budget.window_room()
        return space if space < room else room

    def ts_value(self, now: float) -> int:
        """Our TSval: milliseconds plus a per-connection offset (RFC 7323 5.4)."""
        return (int(now * 1000) + self.ts_offset) & MASK

    def in_flight(self) -> int:
        return (self.snd_nxt - self.snd_una) & MASK

    def info(self) -> dict:
        """What ``ss -ti`` shows, for the API and ``pyslirp top`` (read only):
        RFC 6298's SRTT, RTTVAR and RTO in seconds (SRTT None before the
        first sample), RFC 5681's cwnd and ssthresh, bytes in flight, our
        retransmissions, the guest's window (SND.WND) and ours, and the MSS
        we send with."""
        return {
            "srtt": None if self.srtt is None else round(self.srtt, 6),
            "rttvar": round(self.rttvar, 6),
            "rto": round(self.rto, 6),
            "cwnd": self.cwnd,
            "ssthresh": self.ssthresh,
            "in_flight": self.in_flight(),
            "retransmits": self.retransmits,
            "snd_wnd": self.snd_wnd,
            "rcv_wnd": self.receive_window(),
            "mss": self.mss,
        }

    def receive_window(self) -> int:
        """The window we would advertise now: free receive buffer, never
        moving the right edge left (RFC 9293 3.8.6.2.2 and 3.10.7.4), and
        under memory pressure no more than the budget has room for."""
        space = self.rcv_limit - self.rx_bytes
        budget = self.layer.budget
        if budget.held >= budget.pressure:
            room = budget.window_room()
            if space > room:
                space = room
        if space < 0:
            space = 0
        advertised = (self.rcv_adv - self.rcv_nxt) & MASK
        if advertised >= HALF:
            advertised = 0
        return space if space > advertised else advertised

    def window_field(self) -> int:
        """Window for the header, scaled (RFC 7323 2.2), updating RCV.ADV.

        Receiver silly window avoidance (RFC 9293 3.8.6.2.2): the right edge
        moves only when it can move by min(buffer/2, MSS). Under memory
        pressure the free space is what the budget has room for: the edge
        stops moving (it is never pulled back, RFC 1122 4.2.2.16), and what
        still arrives inside it is dropped if the budget cannot take it."""
        space = self.rcv_limit - self.rx_bytes
        budget = self.layer.budget
        if budget.held >= budget.pressure:
            room = budget.window_room()
            if space > room:
                space = room
        if space < 0:
            space = 0
        advertised = (self.rcv_adv - self.rcv_nxt) & MASK
        if advertised >= HALF:
            advertised = 0
        if space - advertised < self.rcv_sws:
            space = advertised
        shift = self.rcv_wscale
        field = space >> shift
        if field > 0xFFFF:
            field = 0xFFFF
        elif (field << shift) < advertised:
            field = (advertised + (1 << shift) - 1) >> shift  # never shrink
        self.rcv_adv = (self.rcv_nxt + (field << shift)) & MASK
        return field

    def set_rto_sample(self, rtt: float) -> None:
        """RFC 6298 section 2: smooth one round-trip sample into RTO."""
        config = self.layer.config
        if rtt < 0:
            return
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        rto = self.srtt + max(config.clock_granularity, 4 * self.rttvar)
        if rto < config.min_rto:
            rto = config.min_rto
        elif rto > config.max_rto:
            rto = config.max_rto
        self.rto = rto

    def mark(self) -> None:
        """Ask the layer to run ``output`` at the next flush."""
        if not self.dirty:
            self.dirty = True
            self.layer.dirty.append(self)

    def notify_readable(self) -> None:
        if not self.rx_notified:
            self.rx_notified = True
            self.layer.events.append(TcpDataReceived(self))

    # ------------------------------------------------------------ opening
    # The transitions of the opening handshakes, called by the layer (which
    # owns the table, the ISN and the options); those of the synchronized
    # states follow from segment_arrives, output and on_timer below.
    def syn_arrived(self, seq: int) -> None:
        """CLOSED -> LISTEN: a guest's SYN is recorded, the NAT side is asked
        to connect on the host (TcpConnectRequested). A repeated SYN with
        another sequence number restarts it."""
        self.state = LISTEN
        self.irs = seq
        self.rcv_nxt = (seq + 1) & MASK

    def host_connected(self, now: float) -> None:
        """LISTEN -> SYN-RECEIVED: the host connection is made (the NAT
        side's accept); our SYN-ACK goes, its retransmission timer runs."""
        self.state = SYN_RECEIVED
        layer = self.layer
        layer.send_syn_ack(self, now)
        self.rtx_at = now + self.rto
        layer.arm(self)

    def active_open(self, now: float) -> None:
        """CLOSED -> SYN-SENT: we open toward the guest (the layer's
        connect); our SYN goes, its retransmission timer runs."""
        self.state = SYN_SENT
        layer = self.layer
        layer.send_syn(self, now)
        self.rtx_at = now + self.rto
        layer.arm(self)

    def syn_ack_received(self, seq: int, ack: int, window: int, now: float) -> None:
        """SYN-SENT -> ESTABLISHED on the guest's SYN-ACK (RFC 9293
        3.10.7.3); its window is not scaled (RFC 7323 2.2). We ACK it."""
        self._established(seq, ack, window, now)
        self.ack_pending = True
        self.layer.events.append(TcpConnected(self))
        self.layer.arm(self)

    def simultaneous_open(self, now: float) -> None:
        """SYN-SENT -> SYN-RECEIVED on a SYN without ACK (RFC 9293
        3.10.7.3): our SYN-ACK goes."""
        self.state = SYN_RECEIVED
        self.layer.send_syn_ack(self, now)
        self.layer.arm(self)

    def closed(self) -> None:
        """Any state -> CLOSED: out of the layer's table (the layer's
        remove), every deadline gone."""
        self.state = CLOSED
        self.rtx_at = self.wait_at = self.delack_at = self.heap_at = None

    # ------------------------------------------------------------ ingress
    def segment_arrives(self, seg, now: float) -> None:
        """RFC 9293 3.10.7.4, step by step, for the synchronized states
        (and SYN-RECEIVED). The caller handles LISTEN and SYN-SENT."""
        layer = self.layer
        state = self.state
        flags = seg.flags
        seq = seg.seq
        payload = seg.payload
        self.last_rx = now
        self.keepalive_probes = 0

        # Header prediction: in-order data or a plain ACK in ESTABLISHED with
        # nothing unusual takes a shorter way (same outcome, fewer tests).
        if (
            state is ESTABLISHED
            and flags & (SYN | RST | URG | ACK) == ACK
            and layer.predict
            and self.predicted(seq, seg.ack, seg.window, seg.timestamp, payload, now, flags & FIN)
        ):
            return

        if state is SYN_RECEIVED and flags & (SYN | ACK | RST) == SYN:
            if seq == self.irs:  # our SYN-ACK was lost: send it again
                layer.send_syn_ack(self, now)
            return

        # RFC 7323 5.3 R1: PAWS, drop a segment older than TS.Recent.
        ts = seg.timestamp
        if (
            self.ts_enabled
            and ts is not None
            and not flags & RST
            and ((ts[0] - self.ts_recent) & MASK) >= HALF
        ):
            layer.counters["tcp-paws-rejected"] += 1
            self.ack_pending = True
            self.mark()
            return

        # First: is the segment acceptable?
        rcv_nxt = self.rcv_nxt
        plen = len(payload)
        seg_len = plen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        wnd = self.receive_window()
        offset = (seq - rcv_nxt) & MASK
        if seg_len == 0:
            acceptable = offset == 0 or offset < wnd
        elif wnd == 0:
            acceptable = False
        else:
            acceptable = offset < wnd or ((offset + seg_len - 1) & MASK) < wnd
        text_allowed = True
        if not acceptable:
            if wnd == 0 and offset == 0:
                # RFC 9293: with a zero window still take ACKs and RSTs; the
                # text is dropped (and the ACK tells the guest the window).
                text_allowed = False
                self.ack_pending = True
                self.mark()
            else:
                if not flags & RST:
                    layer.counters["tcp-out-of-window"] += 1
                    if state is TIME_WAIT and flags & FIN:
                        self.wait_at = now + layer.config.time_wait_timeout
                    self.ack_pending = True
                    self.mark()
                    layer.arm(self)
                return

        # Second: RST (RFC 5961 3.2: exact match resets, else challenge ACK).
        if flags & RST:
            if offset == 0:
                layer.connection_reset(self, "reset by guest", now)
            else:
                layer.challenge_ack(self, now)
            return

        # Fourth: SYN in a synchronized state (RFC 5961 4.2): challenge ACK.
        if flags & SYN:
            layer.challenge_ack(self, now)
            return

        # Fifth: ACK.
        if not flags & ACK:
            return
        ack = seg.ack
        if state is SYN_RECEIVED:
            if seq_lt(self.snd_una, ack) and seq_le(ack, self.snd_max):
                self._established(seq, ack, seg.window << self.snd_wscale, now)
                state = ESTABLISHED
            else:
                layer.send_reset(self.local, self.local_port, self.remote, self.remote_port, ack)
                return
        una = self.snd_una
        # (seq_lt and seq_le written out on this path: a call each costs more
        # than the test.)
        if 0 < ((ack - self.snd_max) & MASK) < HALF:  # seq_lt(SND.MAX, ack)
            # Acknowledges what we never sent: answer with an ACK, drop.
            layer.counters["tcp-ack-too-new"] += 1
            self.ack_pending = True
            self.mark()
            return
        if 0 < ((una - self.max_snd_wnd - ack) & MASK) < HALF:  # seq_lt(ack, una - max window)
            # RFC 5961 5.2: too old to be anything but an injection.
            layer.counters["tcp-ack-too-old"] += 1
            layer.challenge_ack(self, now)
            return
        window = seg.window << self.snd_wscale
        if ack != una:
            if ((ack - una) & MASK) < HALF:  # seq_lt(una, ack), as they differ
                self._new_ack(ack, ts if self.ts_enabled else None, now)
        elif self.persisting:
            # RFC 1122 4.2.2.17 (RFC 9293 3.8.6.1): a guest that answers our
            # zero-window probes is kept however long its window stays shut,
            # as Linux does; only a silent one runs out of retries.
            self.retries = 0
        elif seg_len == 0 and window == self.snd_wnd and self.snd_max != una:
            self._duplicate_ack(now)
        self._update_window(seq, ack, window)
        if self.fin_acked:
            state = self.state
            if state is FIN_WAIT_1:
                self.state = state = FIN_WAIT_2
            elif state is CLOSING:
                self.enter_time_wait(now)
                return
            elif state is LAST_ACK:
                layer.connection_closed(self, now)
                return

        # RFC 7323 4.3: remember the guest's timestamp for our echoes.
        if ts is not None and self.ts_enabled and ((rcv_nxt - seq) & MASK) < HALF:
            self.ts_recent = ts[0]

        # Seventh: segment text.
        if plen:
            delay = False
            if text_allowed and self.state in RECEIVING:
                start = seq
                data = payload
                if offset >= HALF:  # begins before RCV.NXT: cut what we have
                    cut = (rcv_nxt - seq) & MASK
                    data = data[cut:]
                    start = rcv_nxt
                    offset = 0
                room = wnd - offset
                trimmed = len(data) > room
                if trimmed:
                    data = data[:room]
                    flags &= ~FIN  # the FIN lies beyond the window
                if data:
                    if offset == 0:
                        if not self._deliver(data):
                            self.memory_refused()
                            flags &= ~FIN  # it follows bytes we did not take
                        elif self.ooo:
                            self._drain_ooo(now)
                        elif not trimmed:
                            # RFC 1122 4.2.3.2 and RFC 5681 4.2: delay the ACK
                            # of in-order data, so that an answer can carry
                            # it, but ACK every second full-sized segment.
                            delay = ((self.rcv_nxt - self.ack_sent) & MASK) < self.delack_limit
                    else:
                        self._queue_ooo(start, data)
                        # RFC 5681 4.2: one duplicate ACK per segment that
                        # arrives out of order, as the guest's wire would
                        # have carried it (a GSO frame is many segments).
                        self.dupacks_owed += (len(data) + self.mss - 1) // self.mss
            else:
                flags &= ~FIN
            if delay and not flags & FIN:
                layer.delay_ack(self, now)
            else:
                self.ack_pending = True
                self.mark()

        # Eighth: FIN.
        if flags & FIN:
            self.ack_pending = True
            self.mark()
            fin_at = (seq + plen) & MASK
            if fin_at == self.rcv_nxt:
                self._fin_received(now)
            elif seq_lt(self.rcv_nxt, fin_at):
                self.ooo_fin = fin_at
        layer.arm(self)

    def predicted(self, seq: int, ack: int, window: int, ts, payload, now, fin=0) -> bool:
        """Header prediction (Van Jacobson's, as in RFC 9293 3.10.7.4 taken
        in the order it would take them), for a segment in ESTABLISHED with
        no flag but ACK and perhaps FIN (the caller checks both): the next
        in-order data or a plain ACK, the timestamp newer than TS.Recent, an
        ACK within what we sent and text that fits the window. Such a segment
        is handled here at once and True returned; anything else returns
        False having changed nothing, for segment_arrives. ``window`` is the
        header's field (unscaled), ``ts`` (TSval, TSecr), ``fin`` the FIN
        flag (the in-order FIN closes the guest's side at once)."""
        if seq != self.rcv_nxt or self.ooo:
            return False
        if self.ts_enabled:
            if ts is None or ((ts[0] - self.ts_recent) & MASK) >= HALF:
                return False
        elif ts is not None:
            return False
        una = self.snd_una
        if ((ack - una) & MASK) > ((self.snd_max - una) & MASK):
            return False
        plen = len(payload)
        if plen > self.rcv_limit - self.rx_bytes:
            advertised = (self.rcv_adv - seq) & MASK
            if advertised >= HALF or plen > advertised:
                return False
        # The text is acceptable: with a sink and nothing queued before it,
        # it goes to the host now, ahead of the ACK's bookkeeping below,
        # which neither depends on it nor it on that (the request of a
        # request/response leaves a few microseconds sooner).
        taken = 0
        if plen and self.sink is not None and not self.rx:
            taken = self.sink(payload)
            if taken:
                self.rcv_nxt = (seq + taken) & MASK
                self.bytes_in += taken
                if taken < plen:
                    payload = payload[taken:]  # the rest waits in rx
        self.last_rx = now
        self.keepalive_probes = 0
        window <<= self.snd_wscale
        if ack != una:
            self._new_ack(ack, ts, now)
        elif self.persisting:
            self.retries = 0  # a probe answered (RFC 1122 4.2.2.17), as below
        elif plen == 0 and not fin and window == self.snd_wnd and self.snd_max != una:
            self._duplicate_ack(now)
        # The window, from the newest segment only: in order is not enough,
        # an earlier segment from further ahead may have set SND.WL1.
        self._update_window(seq, ack, window)
        if ts is not None:
            self.ts_recent = ts[0]
        if fin:  # in order after the text: ACK it now (_fin_received does)
            if plen > taken and not self._deliver(payload):
                self.memory_refused()  # the FIN too: it follows the text
            else:
                self._fin_received(now)
        elif plen:
            if plen > taken and not self._deliver(payload):
                self.memory_refused()
            elif ((self.rcv_nxt - self.ack_sent) & MASK) < self.delack_limit:
                if self.delack_at is None:
                    self.layer.delay_ack(self, now)
            else:
                self.ack_pending = True
                self.mark()
            if taken:  # as consume would have after delivering them
                self.layer.window_opened(self, now)
        # layer.arm, when it has something to do: of the deadlines only the
        # retransmission one may have moved, and only it can be new.
        rtx_at = self.rtx_at
        if rtx_at is not None and (self.heap_at is None or rtx_at < self.heap_at):
            self.layer.arm(self)
        return True

    def _plain_ack_taken(self, seq: int, ack: int, ts, now: float) -> bool:
        """Whether a plain ACK (no text, no flag but ACK) may skip
        segment_arrives in SYN-RECEIVED or LAST-ACK: in order, acknowledging
        all we sent and something new, and not older than TS.Recent (PAWS;
        the full path counts that). If so, the guest was heard from."""
        if seq != self.rcv_nxt or ack != self.snd_max or ack == self.snd_una or self.ooo:
            return False
        if ts is not None and ((ts[0] - self.ts_recent) & MASK) >= HALF:
            return False
        self.last_rx = now
        self.keepalive_probes = 0
        return True

    def handshake_acked(self, seq: int, ack: int, window: int, ts, now: float) -> bool:
        """segment_arrives for the plain ACK that ends a handshake in
        SYN-RECEIVED, acknowledging our SYN; False (nothing changed) for
        anything else. ``ts`` is None unless the connection uses timestamps."""
        if not self._plain_ack_taken(seq, ack, ts, now):
            return False
        self._established(seq, ack, window << self.snd_wscale, now)
        if ts is not None:
            self.ts_recent = ts[0]
        # layer.arm, when it has something to do: the retransmission
        # deadline is gone, the keep-alive one (two hours off) is usually
        # later than the heap's entry for our SYN-ACK.
        wait_at = self.wait_at
        if wait_at is not None and (self.heap_at is None or wait_at < self.heap_at):
            self.layer.arm(self)
        return True

    def last_acked(self, seq: int, ack: int, window: int, ts, now: float) -> bool:
        """segment_arrives for the plain ACK of our FIN in LAST-ACK: the
        connection is closed. False (nothing changed) otherwise."""
        if not self._plain_ack_taken(seq, ack, ts, now):
            return False
        if self.fin_seq == self.snd_una:
            # Nothing but our FIN was unacknowledged (the usual close): RFC
            # 9293 3.10.7.4 has the TCB deleted, no RTT sample, congestion
            # window or send window to update for a connection that is gone.
            self.snd_una = ack
            self.fin_acked = True
            self.layer.connection_closed(self, now)
            return True
        self._new_ack(ack, ts, now)
        self._update_window(seq, ack, window << self.snd_wscale)
        if self.fin_acked:  # SND.MAX is past our FIN: always
            self.layer.connection_closed(self, now)
            return True
        if ts is not None:
            self.ts_recent = ts[0]
        self.layer.arm(self)
        return True

    def _update_window(self, seq: int, ack: int, window: int) -> None:
        """RFC 9293 3.10.7.4, fifth, ESTABLISHED: take the window from the
        newest segment only (SND.WL1, SND.WL2)."""
        wl1 = self.snd_wl1
        # seq_lt(SND.WL1, seq) or (SND.WL1 == seq and seq_le(SND.WL2, ack))
        if 0 < ((seq - wl1) & MASK) < HALF or wl1 == seq and ((ack - self.snd_wl2) & MASK) < HALF:
            if window != self.snd_wnd:
                if window > self.snd_wnd:
                    self.mark()
                    if self.persisting:
                        self.persisting = False
                        self.rtx_at = None
                self.snd_wnd = window
                if window > self.max_snd_wnd:
                    self.max_snd_wnd = window
            self.snd_wl1 = seq
            self.snd_wl2 = ack

    def _established(self, seq: int, ack: int, window: int, now: float) -> None:
        """SYN-RECEIVED or SYN-SENT -> ESTABLISHED on the ACK of our SYN
        (``window``: the guest's window in bytes, scaled)."""
        self.snd_una = ack
        if 0 < ((ack - self.snd_nxt) & MASK) < HALF:  # seq_lt(SND.NXT, ack)
            self.snd_nxt = ack
        self.snd_wnd = self.max_snd_wnd = window
        self.snd_wl1 = seq
        self.snd_wl2 = ack
        self.state = ESTABLISHED
        if self.retries == 0:  # Karn: only a SYN-ACK sent once gives a sample
            self.set_rto_sample(now - self.rtt_time)
        self.retries = 0
        self.rtx_at = None
        idle = self.layer.config.keepalive_idle  # RFC 1122 4.2.3.6 (0: no keep-alive)
        if idle:
            self.wait_at = now + idle
        self.mark()  # data or a FIN may be waiting for this moment

    def _new_ack(self, ack: int, ts, now: float) -> None:
        """SND.UNA < SEG.ACK =< SND.MAX: new data acknowledged. ``ts`` is
        the segment's (TSval, TSecr) if the connection uses timestamps."""
        acked = (ack - self.snd_una) & MASK
        data_acked = acked
        if self.fin_seq is not None and 0 < ((ack - self.fin_seq) & MASK) < HALF:
            self.fin_acked = True
            data_acked -= 1
        if data_acked:
            self.layer.budget.held -= self.snd_buf.drop(data_acked)
            self.bytes_out += data_acked
        self.snd_una = ack
        if ack != self.snd_nxt and 0 < ((ack - self.snd_nxt) & MASK) < HALF:
            self.snd_nxt = ack
        # RTT: RFC 7323 4.1 from the echoed timestamp, else RFC 6298 with Karn.
        if ts is not None:  # ts_enabled: the caller has checked
            echo = ts[1]
            if echo and echo != self.ts_sampled:  # one sample per echoed TSval (ms)
                self.ts_sampled = echo
                self.set_rto_sample(((self.ts_value(now) - echo) & MASK) / 1000.0)
        elif self.rtt_seq is not None and seq_le(self.rtt_seq, ack):
            self.set_rto_sample(now - self.rtt_time)
            self.rtt_seq = None
        self.retries = 0
        # Congestion control: RFC 5681 section 3.1, RFC 6582 for recovery.
        if self.in_recovery:
            mss = self.mss
            if seq_le(self.recover, ack):
                self.in_recovery = False
                flight = self.in_flight()
                self.cwnd = min(self.ssthresh, max(flight, mss) + mss)
            else:  # partial ACK: the next hole is lost too
                self.layer.retransmit_first(self, now)
                cwnd = self.cwnd - acked + mss
                self.cwnd = cwnd if cwnd > mss else mss
        elif self.cwnd < self.ssthresh:
            cwnd = self.cwnd + acked  # slow start
            max_cwnd = self.layer.max_cwnd
            self.cwnd = cwnd if cwnd < max_cwnd else max_cwnd
        else:
            self.bytes_acked += acked
            if self.bytes_acked >= self.cwnd:
                self.bytes_acked -= self.cwnd
                cwnd = self.cwnd + self.mss
                max_cwnd = self.layer.max_cwnd
                self.cwnd = cwnd if cwnd < max_cwnd else max_cwnd
        self.dupacks = 0
        # RFC 6298 5.2 and 5.3.
        snd_max = self.snd_max
        self.rtx_at = None if ack == snd_max else now + self.rto
        self.persisting = False
        if self.send_blocked and self.snd_buf.size <= self.snd_limit * 3 // 4:
            self.send_blocked = False
            self.layer.events.append(TcpSendSpaceOpened(self))
        if (
            self.snd_nxt != snd_max
            or (snd_max - ack) & MASK < self.snd_buf.size
            or (self.close_requested and not self.fin_acked)
        ):
            self.mark()  # the window moved: more may go out

    def _duplicate_ack(self, now: float) -> None:
        """RFC 5681 3.2 with RFC 6582 (NewReno)."""
        self.dupacks += 1
        mss = self.mss
        if self.in_recovery:
            self.cwnd += mss  # each duplicate means one segment has left
            self.mark()
        elif self.dupacks == self.layer.config.dupack_threshold and (
            seq_lt(self.recover, self.snd_una)
            # RFC 6582 3.2 step 2 guards against duplicates that a timeout's
            # go-back-N resends provoke. After a fast recovery that ended
            # exactly at RECOVER there were none: duplicates there mean the
            # next segment is lost too (Linux's Reno takes them so as well),
            # and waiting for the timer instead stalls the connection.
            or (self.snd_una == self.recover and not self.recover_by_timeout)
        ):
            self.ssthresh = max(self.in_flight() // 2, 2 * mss)
            self.recover = self.snd_max
            self.recover_by_timeout = False
            self.in_recovery = True
            self.rtt_seq = None
            self.layer.counters["tcp-fast-retransmits"] += 1
            self.layer.retransmit_first(self, now)
            self.cwnd = self.ssthresh + 3 * mss
            self.rtx_at = now + self.rto

    def _deliver(self, data) -> bool:
        """Append in-order bytes to ``rx``, charged to the memory budget at
        what they keep alive; False (nothing changed) if it has no room."""
        n = len(data)
        rx = self.rx
        budget = self.layer.budget
        if n >= SMALL_SEGMENT:
            if type(data) is memoryview:
                cost = len(data.obj)
                if cost > n + n:  # a small part of a large frame: copy it
                    data = bytes(data)
                    cost = n
            else:
                cost = n
            held = budget.held + cost  # budget.charge, written out
            if held > budget.limit:
                return False
            budget.held = held
            rx.append(data)  # a view of the frame: no copy
        else:
            held = budget.held + n
            if held > budget.limit:
                return False
            budget.held = held
            if rx and type(rx[-1]) is bytearray and len(rx[-1]) < MERGED_CHUNK:
                rx[-1] += data
            else:
                # Copied: a view would keep its whole frame (and itself) alive,
                # hundreds of bytes for each byte of a tiny segment.
                rx.append(bytearray(data))
        self.rx_bytes += n
        self.bytes_in += n
        self.rcv_nxt = (self.rcv_nxt + n) & MASK
        if not self.rx_notified:  # notify_readable, inlined
            self.rx_notified = True
            self.layer.events.append(TcpDataReceived(self))
        return True

    def memory_refused(self) -> None:
        """In-window text the memory budget could not take: dropped and
        counted, and an ACK tells the guest what we have (it resends)."""
        layer = self.layer
        layer.budget.refused += 1
        layer.stack.drops["tcp-memory-budget"] += 1
        self.ack_pending = True
        self.mark()

    def _queue_ooo(self, start: int, data) -> None:
        """Keep an in-window segment that came early, bounded in count and,
        overlaps included, in bytes by the receive buffer; charged to the
        memory budget like in-order bytes (_deliver)."""
        ooo = self.ooo
        layer = self.layer
        if len(ooo) >= layer.config.max_out_of_order or self.ooo_bytes + len(data) > self.rcv_limit:
            layer.counters["tcp-ooo-dropped"] += 1
            return
        rcv_nxt = self.rcv_nxt
        offset = (start - rcv_nxt) & MASK
        i = len(ooo)
        while i and ((ooo[i - 1][0] - rcv_nxt) & MASK) > offset:
            i -= 1
        if i and ooo[i - 1][0] == start and len(ooo[i - 1][1]) >= len(data):
            layer.counters["tcp-ooo-duplicate"] += 1
            return
        n = len(data)
        if n < SMALL_SEGMENT or type(data) is memoryview and len(data.obj) > n + n:
            data = bytes(data)  # do not keep the whole frame for a part of it
        cost = held_size(data)
        if not layer.budget.charge(cost):
            layer.stack.drops["tcp-memory-budget"] += 1
            return
        ooo.insert(i, (start, data))
        self.ooo_bytes += n
        layer.counters["tcp-ooo-queued"] += 1

    def _drain_ooo(self, now: float) -> None:
        ooo = self.ooo
        budget = self.layer.budget
        while ooo:
            start, data = ooo[0]
            offset = (start - self.rcv_nxt) & MASK
            if offset >= HALF:  # starts before RCV.NXT: keep only the new tail
                end = (start + len(data) - self.rcv_nxt) & MASK
                del ooo[0]
                self.ooo_bytes -= len(data)
                budget.held -= held_size(data)
                # (The tail costs no more than the entry just let go.)
                if 0 < end < HALF and not self._deliver(data[len(data) - end :]):
                    self.memory_refused()
                    break
            elif offset == 0:
                del ooo[0]
                self.ooo_bytes -= len(data)
                budget.held -= held_size(data)
                if not self._deliver(data):
                    self.memory_refused()
                    break
            else:
                break
        if self.ooo_fin is not None and self.ooo_fin == self.rcv_nxt:
            self.ooo_fin = None
            self._fin_received(now)

    def drop_out_of_order(self) -> None:
        """Forget the out-of-order queue and what it was charged."""
        if self.ooo:
            self.layer.budget.held -= sum(held_size(data) for _start, data in self.ooo)
            self.ooo.clear()
        self.ooo_bytes = 0

    def _fin_received(self, now: float) -> None:
        self.rcv_nxt = (self.rcv_nxt + 1) & MASK
        self.drop_out_of_order()
        self.guest_fin = True
        self.ack_pending = True
        self.mark()
        self.notify_readable()
        state = self.state
        if state is ESTABLISHED or state is SYN_RECEIVED:
            self.state = CLOSE_WAIT
        elif state is FIN_WAIT_1:
            if self.fin_acked:
                self.enter_time_wait(now)
            else:
                self.state = CLOSING
        elif state is FIN_WAIT_2:
            self.enter_time_wait(now)

    def enter_time_wait(self, now: float) -> None:
        self.state = TIME_WAIT
        self.rtx_at = None
        self.persisting = False
        self.wait_at = now + self.layer.config.time_wait_timeout
        self.layer.time_wait_entered(self, now)

    # ------------------------------------------------------------ egress
    def output(self, now: float) -> None:
        """Send what the windows allow, the FIN when its turn comes, and an
        ACK if one is owed and nothing else carried it."""
        self.dirty = False
        layer = self.layer
        state = self.state
        owed = self.dupacks_owed
        if owed:
            self.dupacks_owed = 0
        if state is ESTABLISHED and not self.close_requested and layer.predict:
            # The common case in short: new bytes that fit one segment and
            # both windows, with nothing in flight to resend first. A copy
            # of what the general path below does for them, kept because
            # folding it costs 5% (bench/loop.py --opcodes --test rr: 2118
            # bytecodes per transaction, 2229 without it);
            # tests/test_tcp_prediction.py plays every conversation with it
            # (layer.predict) and without, and compares the frames.
            una = self.snd_una
            nxt = self.snd_nxt
            buffered = self.snd_buf.size
            sent_off = (nxt - una) & MASK
            n = buffered - sent_off
            if (
                0 < n <= self.mss
                and nxt == self.snd_max
                and buffered <= self.snd_wnd
                and buffered <= self.cwnd
            ):
                layer.emit(self, ACK | PSH, nxt, self.snd_buf.view(sent_off, buffered), now)
                nxt = (una + buffered) & MASK
                if self.rtt_seq is None and not self.ts_enabled:
                    self.rtt_seq = nxt
                    self.rtt_time = now
                self.snd_nxt = self.snd_max = nxt
                if self.rtx_at is None or self.persisting:
                    self.persisting = False
                    rtx_at = self.rtx_at = now + self.rto
                    if self.heap_at is None or rtx_at < self.heap_at:  # layer.arm's test
                        layer.arm(self)
                self.ack_pending = False
                return
        if (
            self.close_requested
            and self.fin_seq is None
            and (state is CLOSE_WAIT or state is ESTABLISHED)
            and not self.snd_buf.size
            and self.snd_una == self.snd_nxt == self.snd_max
            and layer.predict
        ):
            # The usual close: nothing left to send or resend but our FIN.
            # What the general path below does for it, in short (as the
            # shortcut above, compared with it by tests/test_tcp_prediction.py).
            una = self.snd_una
            layer.emit(self, ACK | FIN, una, b"", now)
            nxt = self.snd_nxt = self.snd_max = (una + 1) & MASK
            self._fin_sent(una)
            if self.rtt_seq is None and not self.ts_enabled:
                self.rtt_seq = nxt
                self.rtt_time = now
            if self.rtx_at is None or self.persisting:
                self.persisting = False
                self.rtx_at = now + self.rto
            self.ack_pending = False
            layer.arm(self)
            return
        sent = False
        if state in SENDING:
            buf = self.snd_buf
            una = self.snd_una
            old_nxt = self.snd_nxt
            buffered = buf.size
            sent_off = (old_nxt - una) & MASK
            win = self.snd_wnd if self.snd_wnd < self.cwnd else self.cwnd
            mss = self.mss
            # With TAP offloads, one frame carries many MSS pieces (to a known
            # neighbour: IPv4's cached Ethernet header, IPv6's ND entry).
            seg = mss
            if layer.offload and (self.eth or layer.gso_neighbour(self)):
                seg = layer.gso_payload // mss * mss
            closing = self.close_requested and not self.fin_acked
            emit = layer.emit
            while sent_off < buffered and sent_off < win:
                n = buffered - sent_off
                if n > seg:
                    n = seg
                if n > win - sent_off:
                    n = win - sent_off
                    # Sender SWS avoidance (RFC 9293 3.8.6.2.1): no small
                    # window-limited segment while others are in flight.
                    if n < mss and sent_off:
                        break
                end = sent_off + n
                if end == buffered:
                    flags = ACK | PSH | FIN if closing else ACK | PSH
                else:
                    flags = ACK
                emit(self, flags, (una + sent_off) & MASK, buf.view(sent_off, end), now)
                sent_off = end + 1 if flags & FIN else end
                sent = True
            if closing and sent_off == buffered:
                emit(self, ACK | FIN, (una + buffered) & MASK, b"", now)
                sent_off = buffered + 1
                sent = True
            if sent:
                nxt = (una + sent_off) & MASK
                if sent_off > buffered and self.fin_seq is None:
                    self._fin_sent((una + buffered) & MASK)
                if old_nxt == self.snd_max:  # new data: time it (Karn: never a resend)
                    if self.rtt_seq is None and not self.ts_enabled:
                        self.rtt_seq = nxt
                        self.rtt_time = now
                elif seq_lt(self.snd_max, nxt):
                    self.rtt_seq = None
                self.snd_nxt = nxt
                if seq_lt(self.snd_max, nxt):
                    self.snd_max = nxt
                if self.rtx_at is None or self.persisting:
                    self.persisting = False
                    self.rtx_at = now + self.rto
            elif self.snd_wnd == 0 and sent_off < buffered and self.rtx_at is None:
                # RFC 9293 3.8.6.1: probe the zero window.
                self.persisting = True
                self.rtx_at = now + self.rto
        if self.ack_pending:
            if not sent:
                # At SND.MAX, the highest sequence number sent, as Linux does
                # (tcp_acceptable_seq): after a timeout SND.NXT is pulled back
                # to resend (go back N), and an ACK carrying that older number
                # lies before the guest's RCV.NXT, where RFC 9293 3.10.7.4
                # has it dropped unread; data both ways then stalls for good.
                seq = self.snd_max
                layer.emit(self, ACK, seq, b"", now)
                # The guest counts duplicate ACKs toward fast retransmit
                # (RFC 5681 3.2): one per segment it sent out of order, not
                # one per batch of them that we read in one wake-up.
                burst = layer.config.dupack_burst
                for _ in range(1, owed if owed < burst else burst):
                    layer.emit(self, ACK, seq, b"", now)
            self.ack_pending = False
        layer.arm(self)

    def _fin_sent(self, fin_seq: int) -> None:
        self.fin_seq = fin_seq
        state = self.state
        if state is ESTABLISHED:
            self.state = FIN_WAIT_1
        elif state is CLOSE_WAIT:
            self.state = LAST_ACK

    # ------------------------------------------------------------ timers
    def on_timer(self, now: float) -> None:
        if self.rtx_at is not None and self.rtx_at <= now:
            self.rtx_at = None
            self._retransmission_timeout(now)
        if self.state is CLOSED:
            return
        if self.wait_at is not None and self.wait_at <= now:
            self.wait_at = None
            if self.state is TIME_WAIT:
                self.layer.connection_closed(self, now)
            else:
                self.layer.keepalive_due(self, now)

    def _retransmission_timeout(self, now: float) -> None:
        layer = self.layer
        config = layer.config
        state = self.state
        self.retries += 1
        if state is SYN_RECEIVED or state is SYN_SENT:
            limit = config.syn_retries
        else:
            limit = config.max_retransmits
        if self.retries > limit:
            layer.abort(self, now, "timeout")
            return
        self.rto = min(self.rto * 2, config.max_rto)  # RFC 6298 5.5
        if self.persisting:
            # A zero-window probe: an old sequence number elicits an ACK that
            # carries the guest's current window (what Linux sends too).
            layer.counters["tcp-window-probes"] += 1
            layer.emit(self, ACK, (self.snd_una - 1) & MASK, b"", now)
            self.rtx_at = now + self.rto
            layer.arm(self)
            return
        self.retransmits += 1
        layer.counters["tcp-timeouts"] += 1
        if state is SYN_RECEIVED:
            layer.send_syn_ack(self, now)
            self.rtx_at = now + self.rto
            layer.arm(self)
            return
        if state is SYN_SENT:
            layer.send_syn(self, now)
            self.rtx_at = now + self.rto
            layer.arm(self)
            return
        # RFC 5681 section 3.1 eq. 4 and the loss window; go back N.
        mss = self.mss
        self.ssthresh = max(self.in_flight() // 2, 2 * mss)
        self.cwnd = mss
        self.in_recovery = False
        self.recover = self.snd_max
        self.recover_by_timeout = True
        self.dupacks = 0
        self.rtt_seq = None
        self.snd_nxt = self.snd_una
        self.output(now)
