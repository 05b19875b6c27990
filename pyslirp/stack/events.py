"""Events the stack hands to the NAT side, named in the past tense.

Addresses are raw bytes (4 or 16 long), so the NAT side is neutral to the
address family. Each is a slotted Record with an ``__init__`` of its own
(a dataclass costs about a millisecond a class when the module loads).
"""

from __future__ import annotations

from pyslirp.settings import Record


class UdpDatagramReceived(Record):
    """A guest datagram for the NAT side; ``packet`` is the IP header and the
    start of the datagram, for ICMP errors."""

    __slots__ = ("src", "src_port", "dst", "dst_port", "payload", "src_mac", "packet")

    def __init__(
        self,
        src: bytes,
        src_port: int,
        dst: bytes,
        dst_port: int,
        payload: bytes,
        src_mac: bytes,
        packet: bytes,
    ) -> None:
        self.src = src
        self.src_port = src_port
        self.dst = dst
        self.dst_port = dst_port
        self.payload = payload
        self.src_mac = src_mac
        self.packet = packet


class IcmpEchoRequested(Record):
    """An echo request to an address the stack does not answer itself."""

    __slots__ = ("src", "dst", "ident", "sequence", "payload", "ttl", "packet")

    def __init__(
        self,
        src: bytes,
        dst: bytes,
        ident: int,
        sequence: int,
        payload: bytes,
        ttl: int,
        packet: bytes,
    ) -> None:
        self.src = src
        self.dst = dst
        self.ident = ident
        self.sequence = sequence
        self.payload = payload
        self.ttl = ttl
        self.packet = packet


# TCP. ``conn`` is the stack's TcpConnection (addresses in conn.remote,
# conn.remote_port for the guest and conn.local, conn.local_port for the
# address it talks to); the NAT side keeps its own state in ``conn.user``.


class TcpConnectRequested(Record):
    """A guest SYN to a new destination: answer with tcp.accept or tcp.refuse."""

    __slots__ = ("conn",)

    def __init__(self, conn: object) -> None:
        self.conn = conn


class TcpConnected(Record):
    """A connection we opened toward the guest (tcp.connect) is established."""

    __slots__ = ("conn",)

    def __init__(self, conn: object) -> None:
        self.conn = conn


class TcpDataReceived(Record):
    """Bytes (conn.rx) or the guest's FIN (conn.guest_fin) wait for the NAT side.

    Sent when there was nothing waiting before; read with tcp.consume."""

    __slots__ = ("conn",)

    def __init__(self, conn: object) -> None:
        self.conn = conn


class TcpSendSpaceOpened(Record):
    """The guest acknowledged data, so tcp.send takes bytes again."""

    __slots__ = ("conn",)

    def __init__(self, conn: object) -> None:
        self.conn = conn


class TcpConnectionReset(Record):
    """The connection is gone abnormally: the guest reset it, it timed out,
    or the guest refused our SYN. The NAT side should reset its socket."""

    __slots__ = ("conn", "reason")

    def __init__(self, conn: object, reason: str) -> None:
        self.conn = conn
        self.reason = reason


class TcpConnectionClosed(Record):
    """Both directions finished normally (TIME-WAIT or CLOSED)."""

    __slots__ = ("conn",)

    def __init__(self, conn: object) -> None:
        self.conn = conn


class MemoryPressureChanged(Record):
    """The memory budget (budget.py) passed its pressure mark (``entered``)
    or fell back below its relief mark: once per crossing, for the log."""

    __slots__ = ("entered", "held", "limit")

    def __init__(self, entered: bool, held: int, limit: int) -> None:
        self.entered = entered
        self.held = held
        self.limit = limit
