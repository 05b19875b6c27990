"""Events the stack hands to the NAT side, named in the past tense.

Addresses are raw bytes (4 or 16 long), so the NAT side is neutral to the
address family.
"""

from dataclasses import dataclass


@dataclass(slots=True)
class UdpDatagramReceived:
    src: bytes
    src_port: int
    dst: bytes
    dst_port: int
    payload: bytes
    src_mac: bytes
    packet: bytes  # the IP header and the start of the datagram, for ICMP errors


@dataclass(slots=True)
class IcmpEchoRequested:
    """An echo request to an address the stack does not answer itself."""

    src: bytes
    dst: bytes
    ident: int
    sequence: int
    payload: bytes
    ttl: int
    packet: bytes
