"""Events the stack hands to the NAT side, named in the past tense.

Addresses are raw bytes (4 or 16 long), so the NAT side is neutral to the
address family.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyslirp._compat import SLOTS


@dataclass(**SLOTS)
class UdpDatagramReceived:
    src: bytes
    src_port: int
    dst: bytes
    dst_port: int
    payload: bytes
    src_mac: bytes
    packet: bytes  # the IP header and the start of the datagram, for ICMP errors


@dataclass(**SLOTS)
class IcmpEchoRequested:
    """An echo request to an address the stack does not answer itself."""

    src: bytes
    dst: bytes
    ident: int
    sequence: int
    payload: bytes
    ttl: int
    packet: bytes


# TCP. ``conn`` is the stack's TcpConnection (addresses in conn.remote,
# conn.remote_port for the guest and conn.local, conn.local_port for the
# address it talks to); the NAT side keeps its own state in ``conn.user``.


@dataclass(**SLOTS)
class TcpConnectRequested:
    """A guest SYN to a new destination: answer with tcp.accept or tcp.refuse."""

    conn: object


@dataclass(**SLOTS)
class TcpConnected:
    """A connection we opened toward the guest (tcp.connect) is established."""

    conn: object


@dataclass(**SLOTS)
class TcpDataReceived:
    """Bytes (conn.rx) or the guest's FIN (conn.guest_fin) wait for the NAT side.

    Sent when there was nothing waiting before; read with tcp.consume."""

    conn: object


@dataclass(**SLOTS)
class TcpSendSpaceOpened:
    """The guest acknowledged data, so tcp.send takes bytes again."""

    conn: object


@dataclass(**SLOTS)
class TcpConnectionReset:
    """The connection is gone abnormally: the guest reset it, it timed out,
    or the guest refused our SYN. The NAT side should reset its socket."""

    conn: object
    reason: str


@dataclass(**SLOTS)
class TcpConnectionClosed:
    """Both directions finished normally (TIME-WAIT or CLOSED)."""

    conn: object


@dataclass(**SLOTS)
class MemoryPressureChanged:
    """The memory budget (budget.py) passed its pressure mark (``entered``)
    or fell back below its relief mark: once per crossing, for the log."""

    entered: bool
    held: int
    limit: int
