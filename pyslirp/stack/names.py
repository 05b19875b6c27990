"""How a flow is named, the same way in the logs, the trace and the API.

A flow's name is its protocol, the guest's end and the end the guest talks
to: ``tcp 10.0.2.100:46634>93.184.216.34:443``, ``udp
[fd00::100]:5353>[2001:db8::1]:53``, ``icmp 10.0.2.100>10.0.2.2 id 7`` (an
echo flow has an identifier, not ports).
"""

from __future__ import annotations


def address_text(addr: bytes) -> str:
    """A raw address (4 or 16 bytes) as text, IPv6 compressed (RFC 5952)."""
    if len(addr) == 4:
        return f"{addr[0]}.{addr[1]}.{addr[2]}.{addr[3]}"
    import ipaddress  # for IPv6 names only: 0.4 MB a forwarder without -6 does without

    return str(ipaddress.IPv6Address(bytes(addr)))


def endpoint(addr: bytes, port: int) -> str:
    """address:port, with brackets around an IPv6 address."""
    if len(addr) == 16:
        return f"[{address_text(addr)}]:{port}"
    return f"{address_text(addr)}:{port}"


def flow_name(proto: str, guest: bytes, guest_port: int, peer: bytes, peer_port: int) -> str:
    """``proto guest:port>peer:port``."""
    return f"{proto} {endpoint(guest, guest_port)}>{endpoint(peer, peer_port)}"


def echo_flow_name(guest: bytes, peer: bytes, ident: int) -> str:
    """An ICMP echo flow: ``icmp guest>peer id N``."""
    return f"icmp {address_text(guest)}>{address_text(peer)} id {ident}"
