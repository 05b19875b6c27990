"""The stack's decision trace (--trace, docs/trace.md): traced subclasses.

With tracing off the stack runs its own classes and pays nothing, not even
an ``is not None`` test: ``Stack.set_tracer`` turns tracing on by switching
the Stack, its TcpLayer and every connection to the subclasses here, which
watch the decisions (a state assigned, a timer that fires, a window that
closes) around the plain methods and report them to the tracer; and by
installing ``TracingCounter`` as ``stack.drops``, so that every drop is
reported where it is counted. ``set_tracer(None)`` switches back.

The cause of a TCP state transition is whatever the stack was handling when
the state was assigned: a guest segment (its flags and numbers), a timer, or
a command of the NAT side. The traced layer keeps it in ``trace_cause``
while it hands control to the plain code; the ``state`` property reads it.

These subclasses reach the plain classes' methods by name (private ones
included): a change of those signatures is a change here, which
tests/test_trace.py catches.
"""

from __future__ import annotations

from collections import Counter

from . import ipv4
from .ipv6_layer import Ipv6Layer
from .names import address_text
from .tcp import ACK, FIN, PSH, RST, SYN, URG
from .tcp_connection import (
    CLOSE_WAIT,
    CLOSED,
    CLOSING,
    ESTABLISHED,
    FIN_WAIT_1,
    FIN_WAIT_2,
    LAST_ACK,
    LISTEN,
    SYN_RECEIVED,
    SYN_SENT,
    TIME_WAIT,
    TcpConnection,
)
from .tcp_layer import TcpLayer

_FLAG_LETTERS = ((SYN, "S"), (FIN, "F"), (RST, "R"), (PSH, "P"), (ACK, "A"), (URG, "U"))

# The step of RFC 9293 3.10 that takes each transition (CLOSED ones depend
# on the cause: see _rfc_step).
_RFC_STEPS = {
    (CLOSED, LISTEN): "RFC 9293 3.10.7.2 (SYN in LISTEN)",
    (LISTEN, LISTEN): "RFC 9293 3.10.7.2 (SYN in LISTEN)",
    (LISTEN, SYN_RECEIVED): "RFC 9293 3.10.7.2 (SYN in LISTEN: SYN-ACK sent)",
    (CLOSED, SYN_SENT): "RFC 9293 3.10.1 (active OPEN)",
    (SYN_SENT, ESTABLISHED): "RFC 9293 3.10.7.3 (fourth: SYN-ACK)",
    (SYN_SENT, SYN_RECEIVED): "RFC 9293 3.10.7.3 (fourth: SYN, simultaneous open)",
    (SYN_RECEIVED, ESTABLISHED): "RFC 9293 3.10.7.4 (fifth: ACK of our SYN)",
    (ESTABLISHED, FIN_WAIT_1): "RFC 9293 3.10.4 (CLOSE: our FIN sent)",
    (CLOSE_WAIT, LAST_ACK): "RFC 9293 3.10.4 (CLOSE: our FIN sent)",
    (ESTABLISHED, CLOSE_WAIT): "RFC 9293 3.10.7.4 (eighth: FIN)",
    (SYN_RECEIVED, CLOSE_WAIT): "RFC 9293 3.10.7.4 (eighth: FIN)",
    (FIN_WAIT_1, CLOSING): "RFC 9293 3.10.7.4 (eighth: FIN)",
    (FIN_WAIT_1, TIME_WAIT): "RFC 9293 3.10.7.4 (eighth: FIN, our FIN acked)",
    (FIN_WAIT_2, TIME_WAIT): "RFC 9293 3.10.7.4 (eighth: FIN)",
    (FIN_WAIT_1, FIN_WAIT_2): "RFC 9293 3.10.7.4 (fifth: ACK of our FIN)",
    (CLOSING, TIME_WAIT): "RFC 9293 3.10.7.4 (fifth: ACK of our FIN)",
    (LAST_ACK, CLOSED): "RFC 9293 3.10.7.4 (fifth: ACK of our FIN)",
    (TIME_WAIT, CLOSED): "RFC 9293 3.10.8 (time-wait timeout)",
}


def flags_text(flags: int) -> str:
    """TCP flags as letters (S F R P A U), e.g. 'SA', 'FA', 'PA'."""
    return "".join(letter for bit, letter in _FLAG_LETTERS if flags & bit) or "none"


def segment_cause(flags: int, seq: int, ack: int, length: int) -> tuple:
    """A guest segment, as a transition's cause: kept as numbers, made text
    (cause_text) only if the segment changes the state."""
    return (flags, seq, ack, length)


def cause_text(cause) -> str:
    """A cause as the trace writes it: a segment as 'segment FA seq=..
    ack=.. len=..', anything else as it is ('command' if there is none)."""
    if cause.__class__ is tuple:
        flags, seq, ack, length = cause
        return f"segment {flags_text(flags)} seq={seq} ack={ack} len={length}"
    return cause or "command"


def _rfc_step(old, new, cause: str) -> str:
    step = _RFC_STEPS.get((old, new))
    if step is not None:
        return step
    if new is CLOSED:
        if cause.startswith("segment") and "R" in cause.split()[1]:
            return "RFC 9293 3.10.7.4 (second: RST)"
        if cause.startswith("timer"):
            return "RFC 9293 3.10.8 (retransmission or keep-alive timeout)"
        return "RFC 9293 3.10.5 (ABORT)"
    return "RFC 9293 3.10"


class TracingCounter(Counter):
    """``stack.drops`` while tracing: each increment is counted as before and
    reported as a ``drop`` event, with the pcap index of the guest frame
    being handled (``stack.trace_frame``) when there is one."""

    def __init__(self, stack, counts=()) -> None:
        super().__init__(counts)
        self.stack = stack

    def __setitem__(self, reason, value) -> None:
        added = value - self.get(reason, 0)
        super().__setitem__(reason, value)
        stack = self.stack
        tracer = stack.tracer
        if tracer is not None and added > 0:
            tracer(
                stack.trace_now,
                "drop",
                stack.trace_flow,
                f"dropped: {reason}" + (f" ({added})" if added > 1 else ""),
                reason=reason,
                count=added,
                frame=stack.trace_frame,
            )


# ---------------------------------------------------------------- TCP
_STATE_SLOT = TcpConnection.state  # the slot's descriptor


def _get_state(conn):
    return _STATE_SLOT.__get__(conn, TcpConnection)


def _set_state(conn, new) -> None:
    old = _STATE_SLOT.__get__(conn, TcpConnection)
    _STATE_SLOT.__set__(conn, new)
    if old is new:
        return
    layer = conn.layer
    stack = layer.stack
    tracer = stack.tracer
    if tracer is None:
        return
    cause = cause_text(layer.trace_cause)
    tracer(
        stack.trace_now,
        "tcp.state",
        conn.describe(),
        f"{old.rfc_name} -> {new.rfc_name} on {cause}",
        old=old.rfc_name,
        new=new.rfc_name,
        cause=cause,
        rfc=_rfc_step(old, new, cause),
    )


class TracedTcpConnection(TcpConnection):
    """A TcpConnection that reports its decisions (no new slots, so that a
    live connection can switch class both ways)."""

    __slots__ = ()

    state = property(_get_state, _set_state)

    def trace_event(self, event: str, msg: str, **fields) -> None:
        """Report ``event`` about this connection (the tracer's call, with its flow)."""
        stack = self.layer.stack
        tracer = stack.tracer
        if tracer is not None:
            tracer(stack.trace_now, event, self.describe(), msg, **fields)

    def _with_cause(self, cause, call, *args):
        layer = self.layer
        outer = layer.trace_cause
        layer.trace_cause = cause
        try:
            return call(*args)
        finally:
            layer.trace_cause = outer

    # -- segments
    def segment_arrives(self, seg, now: float) -> None:
        cause = segment_cause(seg.flags, seg.seq, seg.ack, len(seg.payload))
        self._with_cause(cause, super().segment_arrives, seg, now)

    def predicted(self, seq, ack, window, ts, payload, now, fin=0) -> bool:
        cause = segment_cause(ACK | (FIN if fin else 0), seq, ack, len(payload))
        return self._with_cause(cause, super().predicted, seq, ack, window, ts, payload, now, fin)

    def handshake_acked(self, seq, ack, window, ts, now) -> bool:
        cause = segment_cause(ACK, seq, ack, 0)
        return self._with_cause(cause, super().handshake_acked, seq, ack, window, ts, now)

    def last_acked(self, seq, ack, window, ts, now) -> bool:
        cause = segment_cause(ACK, seq, ack, 0)
        return self._with_cause(cause, super().last_acked, seq, ack, window, ts, now)

    def syn_arrived(self, seq: int) -> None:
        self._with_cause(segment_cause(SYN, seq, 0, 0), super().syn_arrived, seq)

    def syn_ack_received(self, seq, ack, window, now) -> None:
        cause = segment_cause(SYN | ACK, seq, ack, 0)
        self._with_cause(cause, super().syn_ack_received, seq, ack, window, now)

    def simultaneous_open(self, now: float) -> None:
        cause = segment_cause(SYN, self.irs, 0, 0)
        self._with_cause(cause, super().simultaneous_open, now)

    # -- timers
    def on_timer(self, now: float) -> None:
        if self.rtx_at is not None and self.rtx_at <= now:
            cause = "timer persist" if self.persisting else "timer retransmission"
        elif self.state is TIME_WAIT:
            cause = "timer time-wait"
        else:
            cause = "timer keep-alive"
        self._with_cause(cause, super().on_timer, now)

    def _retransmission_timeout(self, now: float) -> None:
        state = self.state
        persisting = self.persisting
        seq = self.snd_una
        super()._retransmission_timeout(now)
        if self.state is CLOSED:
            return  # gave up: the state's transition says so
        if persisting:
            reason = "probe"
            msg = f"zero-window probe {self.retries}, next in {self.rto:g}s"
        elif state is SYN_RECEIVED or state is SYN_SENT:
            reason = "syn"
            msg = f"{'SYN-ACK' if state is SYN_RECEIVED else 'SYN'} resent (timeout)"
        else:
            reason = "rto"
            msg = f"retransmission timeout: resending from {seq}, RTO now {self.rto:g}s"
        self.trace_event(
            "tcp.retransmit", msg, reason=reason, seq=seq, retries=self.retries, rto=self.rto
        )
        if reason == "rto":
            self.trace_event(
                "tcp.congestion",
                f"timeout: cwnd {self.cwnd}, ssthresh {self.ssthresh}",
                what="timeout",
                cwnd=self.cwnd,
                ssthresh=self.ssthresh,
            )

    # -- congestion and recovery
    def _duplicate_ack(self, now: float) -> None:
        before = self.in_recovery
        super()._duplicate_ack(now)
        if self.in_recovery and not before:
            self.trace_event(
                "tcp.retransmit",
                f"fast retransmit from {self.snd_una} after {self.dupacks} duplicate ACKs",
                reason="fast-retransmit",
                seq=self.snd_una,
                retries=self.retries,
                rto=self.rto,
            )
            self.trace_event(
                "tcp.congestion",
                f"fast recovery entered: cwnd {self.cwnd}, ssthresh {self.ssthresh}",
                what="recovery-entered",
                cwnd=self.cwnd,
                ssthresh=self.ssthresh,
                recover=self.recover,
            )

    def _new_ack(self, ack: int, ts, now: float) -> None:
        before = self.in_recovery
        super()._new_ack(ack, ts, now)
        if not before:
            return
        if self.in_recovery:
            self.trace_event(
                "tcp.retransmit",
                f"partial ACK {ack}: resending from it (NewReno)",
                reason="partial-ack",
                seq=ack,
                retries=self.retries,
                rto=self.rto,
            )
        else:
            self.trace_event(
                "tcp.congestion",
                f"fast recovery left at {ack}: cwnd {self.cwnd}",
                what="recovery-left",
                cwnd=self.cwnd,
                ssthresh=self.ssthresh,
                recover=self.recover,
            )

    # -- windows
    def _update_window(self, seq: int, ack: int, window: int) -> None:
        before = self.snd_wnd
        super()._update_window(seq, ack, window)
        after = self.snd_wnd
        if (before == 0) != (after == 0):
            if after:
                msg = f"guest's window opened: {after}"
            else:
                msg = "guest's window closed (zero window)"
            self.trace_event(
                "tcp.window",
                msg,
                side="guest",
                window=after,
                zero=not after,
            )

    def window_field(self) -> int:
        field = super().window_field()
        zeros = self.layer.trace_zero_windows
        if not field:
            if self not in zeros:
                zeros.add(self)
                self.trace_event(
                    "tcp.window",
                    f"our window closed (zero window), {self.rx_bytes} bytes unread",
                    side="ours",
                    window=0,
                    zero=True,
                )
        elif self in zeros:
            zeros.discard(self)
            window = field << self.rcv_wscale
            self.trace_event(
                "tcp.window", f"our window opened: {window}", side="ours", window=window, zero=False
            )
        return field

    def closed(self) -> None:
        super().closed()
        self.layer.trace_zero_windows.discard(self)


class TracedTcpLayer(TcpLayer):
    """The TcpLayer while tracing: the NAT side's commands and the timers
    name themselves as causes; new connections are TracedTcpConnections."""

    # Set by Stack.set_tracer on the instance: trace_cause (None, a str or a
    # segment_cause tuple)
    # and trace_zero_windows (the connections whose window we shut).

    def _new_connection(self, key, local, local_port, remote, remote_port, now):
        conn = super()._new_connection(key, local, local_port, remote, remote_port, now)
        conn.__class__ = TracedTcpConnection
        return conn

    def _command(self, cause, call, *args):
        outer = self.trace_cause
        self.trace_cause = cause
        try:
            return call(*args)
        finally:
            self.trace_cause = outer

    def _now(self, now: float) -> None:
        self.stack.trace_now = now

    def accept(self, conn, now: float) -> None:
        self._now(now)
        self._command("host connected (accept)", super().accept, conn, now)

    def refuse(self, conn, now: float, icmp_code=None) -> None:
        self._now(now)
        how = "RST" if icmp_code is None else f"ICMP unreachable code {icmp_code}"
        outer = self.trace_cause
        cause = outer if outer else f"host connection failed (refuse: {how})"
        self._command(cause, super().refuse, conn, now, icmp_code)

    def close(self, conn, now: float) -> None:
        self._now(now)
        self._command(self.trace_cause or "host closed (close)", super().close, conn, now)

    def abort(self, conn, now: float, reason=None) -> None:
        self._now(now)
        cause = self.trace_cause
        if reason is not None:
            cause = f"{cause_text(cause) if cause else 'abort'}: {reason}"
        self._command(cause or "host reset (abort)", super().abort, conn, now, reason)

    def connect(self, local, local_port, remote, remote_port, now: float):
        self._now(now)
        return self._command(
            "forwarded port connects (connect)",
            super().connect,
            local,
            local_port,
            remote,
            remote_port,
            now,
        )

    def flush(self, now: float) -> None:
        self._now(now)
        self._command(self.trace_cause or "output: our FIN sent", super().flush, now)

    def handle_timer(self, now: float) -> None:
        self._now(now)
        super().handle_timer(now)

    def consume(self, conn, count: int, now: float) -> None:
        self._now(now)
        super().consume(conn, count, now)

    def send(self, conn, data, now: float, at_once: bool = False) -> int:
        self._now(now)
        return super().send(conn, data, now, at_once)

    def _listen_arrives(self, conn, seg, now: float) -> None:
        cause = segment_cause(seg.flags, seg.seq, seg.ack, len(seg.payload))
        self._command(cause, super()._listen_arrives, conn, seg, now)

    def _syn_sent_arrives(self, conn, seg, now: float) -> None:
        cause = segment_cause(seg.flags, seg.seq, seg.ack, len(seg.payload))
        self._command(cause, super()._syn_sent_arrives, conn, seg, now)

    def keepalive_due(self, conn, now: float) -> None:
        probes = conn.keepalive_probes
        super().keepalive_due(conn, now)
        if conn.keepalive_probes > probes:
            conn.trace_event(
                "tcp.keepalive",
                f"keep-alive probe {conn.keepalive_probes}",
                probes=conn.keepalive_probes,
            )


class TracedIpv6Layer(Ipv6Layer):
    """The Ipv6Layer while tracing: neighbour discovery's requests and
    answers (their retries and giving up are seen by the traced Stack's
    timer)."""

    def _solicit(self, target: bytes, now: float) -> None:
        super()._solicit(target, now)
        tracer = self.stack.tracer
        pending = self.pending.get(target)
        # The first solicitation for a waiting packet (not a retry, an RA's, a probe's).
        if tracer is not None and pending is not None and pending.attempts == 1:
            tracer(
                now,
                "nd.request",
                None,
                f"who has {address_text(target)}? (a packet waits for its MAC)",
                addr=address_text(target),
            )

    def _learn(self, addr: bytes, mac: bytes, now: float) -> None:
        pending = self.pending.get(addr)
        queued = len(pending.packets) if pending is not None else 0
        super()._learn(addr, mac, now)
        stack = self.stack
        if pending is not None and addr not in self.pending and stack.tracer is not None:
            stack.tracer(
                stack.trace_now,
                "nd.resolved",
                None,
                f"{address_text(addr)} is at {_mac_text(mac)}, {queued} packets sent",
                addr=address_text(addr),
                mac=_mac_text(mac),
                queued=queued,
            )


def switch_on(stack) -> None:
    """Install the traced classes on ``stack`` (Stack.set_tracer)."""
    stack.trace_now = 0.0  # the time of what the stack handles now
    stack.trace_frame = None  # the pcap index of the guest frame it handles
    stack.trace_flow = None  # the flow a drop concerns, where known
    if not isinstance(stack, StackTracing):
        stack.__class__ = _traced_stack_class(type(stack))
    layer = stack.tcp
    if type(layer) is TcpLayer:
        layer.__class__ = TracedTcpLayer
    layer.trace_cause = None
    layer.trace_zero_windows = set()
    for conn in layer.connections.values():
        if type(conn) is TcpConnection:
            conn.__class__ = TracedTcpConnection
    if type(stack.ipv6) is Ipv6Layer:
        stack.ipv6.__class__ = TracedIpv6Layer
    if type(stack.drops) is not TracingCounter:
        stack.drops = TracingCounter(stack, stack.drops)


def switch_off(stack) -> None:
    """Back to the plain classes (Stack.set_tracer(None))."""
    if isinstance(stack, StackTracing):
        stack.__class__ = _PLAIN[type(stack)]
    layer = stack.tcp
    if type(layer) is TracedTcpLayer:
        layer.__class__ = TcpLayer
    for conn in (*layer.connections.values(), *layer.unread):
        if type(conn) is TracedTcpConnection:
            conn.__class__ = TcpConnection
    if type(stack.ipv6) is TracedIpv6Layer:
        stack.ipv6.__class__ = Ipv6Layer
    if type(stack.drops) is TracingCounter:
        stack.drops = Counter(stack.drops)


# ---------------------------------------------------------------- the Stack
# The traced class of each Stack class, and back (interface.py imports this
# module, so the Stack is a base given at run time, not imported here).
_TRACED: dict = {}
_PLAIN: dict = {}


def _traced_stack_class(plain: type) -> type:
    traced = _TRACED.get(plain)
    if traced is None:
        traced = _TRACED[plain] = type("TracedStack", (StackTracing, plain), {})
        _PLAIN[traced] = plain
    return traced


class StackTracing:
    """Mixed into the Stack while tracing (TracedStack): it remembers
    ``now`` and the pcap index of the frame it handles (for drops), and
    reports ARP resolution and memory pressure. (No __slots__: with an
    empty one the mixed class's layout differs from the Stack's, and a live
    stack could not switch class.)"""

    def _frame_index(self):
        # A plain function is a tracer too: only JsonTracer knows frames.
        index = getattr(self.tracer, "frame_index", None)
        return index() if index is not None else None

    def receive_frame(self, frame, now: float) -> None:
        self.trace_now = now
        self.trace_frame = self._frame_index()
        try:
            super().receive_frame(frame, now)
        finally:
            self.trace_frame = None

    def receive_vnet_frame(self, data, now: float) -> None:
        self.trace_now = now
        self.trace_frame = self._frame_index()
        try:
            super().receive_vnet_frame(data, now)
        finally:
            self.trace_frame = None

    def vnet_frames_to_send(self, now: float) -> list:
        self.trace_now = now
        return super().vnet_frames_to_send(now)

    def send_ip(self, src, dst, protocol, payload, now, dst_mac=None, ttl=ipv4.DEFAULT_TTL) -> None:
        self.trace_now = now
        super().send_ip(src, dst, protocol, payload, now, dst_mac, ttl)

    def handle_timer(self, now: float) -> None:
        """The timers of ARP and neighbour discovery, then what became of
        each address that waited: asked again, or given up."""
        self.trace_now = now
        tables = [(self.arp_pending, "arp.retry", "arp.unresolved")]
        if self.ipv6 is not None:
            tables.append((self.ipv6.pending, "nd.retry", "nd.unresolved"))
        before = [{a: (p.attempts, len(p.packets)) for a, p in t.items()} for t, _, _ in tables]
        super().handle_timer(now)
        for (table, retry, gave_up), waited in zip(tables, before):
            for addr, (attempts, queued) in waited.items():
                waiting = table.get(addr)
                if waiting is not None:
                    if waiting.attempts > attempts:  # asked again
                        self._trace_retry(retry, addr, waiting.attempts, queued)
                elif self.neighbour_mac(addr) is None:
                    self._trace_neighbour(gave_up, addr, attempts, queued)

    def _trace_neighbour(self, event, addr, attempts, dropped) -> None:
        what = "ARP" if event.startswith("arp") else "neighbour discovery"
        self.tracer(
            self.trace_now,
            event,
            None,
            f"{what} for {address_text(addr)} gave up after {attempts} requests, "
            f"{dropped} packets dropped",
            addr=address_text(addr),
            attempts=attempts,
            dropped=dropped,
        )

    def _trace_retry(self, event, addr, attempt, queued) -> None:
        what = "ARP request" if event.startswith("arp") else "neighbour solicitation"
        self.tracer(
            self.trace_now,
            event,
            None,
            f"who has {address_text(addr)}? ({what} {attempt}, {queued} packets wait)",
            addr=address_text(addr),
            attempt=attempt,
            queued=queued,
        )

    def send_packet(self, dst, packet, now, dst_mac=None) -> None:
        new = dst_mac is None and dst not in self.arp_pending
        super().send_packet(dst, packet, now, dst_mac)
        if new and dst in self.arp_pending:
            self.tracer(
                now,
                "arp.request",
                None,
                f"who has {address_text(dst)}? (a packet waits for its MAC)",
                addr=address_text(dst),
            )

    def _learn(self, addr, mac, now) -> None:
        pending = self.arp_pending.get(addr)
        queued = len(pending.packets) if pending is not None else 0
        super()._learn(addr, mac, now)
        if pending is not None and addr not in self.arp_pending:
            self.tracer(
                self.trace_now,
                "arp.resolved",
                None,
                f"{address_text(addr)} is at {_mac_text(mac)}, {queued} packets sent",
                addr=address_text(addr),
                mac=_mac_text(mac),
                queued=queued,
            )

    def check_memory_pressure(self) -> None:
        before = self.budget.pressed
        super().check_memory_pressure()
        budget = self.budget
        if budget.pressed != before:
            self.tracer(
                self.trace_now,
                "memory.pressure",
                None,
                (
                    f"memory budget under pressure: {budget.held} of {budget.limit} bytes"
                    if budget.pressed
                    else f"memory pressure over: {budget.held} of {budget.limit} bytes"
                ),
                entered=budget.pressed,
                held=budget.held,
                limit=budget.limit,
            )


def _mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)
