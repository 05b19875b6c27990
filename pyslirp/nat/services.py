"""Wires the host-side services into a loop."""

from __future__ import annotations

from pyslirp.stack.events import IcmpEchoRequested, UdpDatagramReceived

from .dhcp import DhcpServer
from .dns import DnsProxy
from .icmp import IcmpRelay
from .tcp import TcpNat
from .udp import UdpNat


def install(loop) -> None:
    loop.dhcp = DhcpServer(loop.config)
    loop.dns = DnsProxy(loop)
    loop.udp = UdpNat(loop, loop.dhcp, loop.dns)
    loop.icmp = IcmpRelay(loop)
    loop.on_event(UdpDatagramReceived, loop.udp.on_datagram, on_error=loop.udp.on_error)
    loop.on_event(IcmpEchoRequested, loop.icmp.on_echo, on_error=loop.icmp.on_error)
    loop.services.extend([loop.udp, loop.dns, loop.icmp])
    # --disable-dns: TCP to the DNS address is refused like any other port.
    loop.tcp = TcpNat(loop, None if loop.config.disable_dns else loop.dns)
    loop.services.append(loop.tcp)
