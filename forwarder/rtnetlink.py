"""The few rtnetlink requests the namespace set-up makes, on a plain socket.

pyroute2 imports its whole package (about 220 ms of start-up on our
machines) for what is here five short messages: set a link up, its MTU and
MAC address, add an IPv4 address, add a default route. Read first: RFC 3549
(Netlink) and rtnetlink(7) for the message layouts.
"""

from __future__ import annotations

import _socket
import errno
import os
import struct

# <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_addr.h> (also for forwarder.slaac)
NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
IFF_UP = 0x1
IFLA_ADDRESS = 1
IFLA_MTU = 4
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_FLAGS = 8
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
RTA_OIF = 4
RTA_GATEWAY = 5
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst len, src len, tos, table, ...
RTATTR = struct.Struct("=HH")  # length, type


class NetlinkError(OSError):
    """The kernel refused a request (``errno`` is its error)."""


def _attr(kind: int, value: bytes) -> bytes:
    length = RTATTR.size + len(value)
    return RTATTR.pack(length, kind) + value + bytes(-length % 4)


class Rtnl:
    """One NETLINK_ROUTE socket in the current network namespace."""

    def __init__(self) -> None:
        self.sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, kind: int, flags: int, body: bytes) -> None:
        self.seq += 1
        header = NLMSGHDR.pack(
            NLMSGHDR.size + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK, self.seq, 0
        )
        self.sock.send(header + body)
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset + NLMSGHDR.size <= len(data):
                length, mtype, _flags, seq, _pid = NLMSGHDR.unpack_from(data, offset)
                if length < NLMSGHDR.size:
                    raise NetlinkError(errno.EPROTO, "short netlink message")
                if mtype == NLMSG_ERROR and seq == self.seq:
                    (code,) = struct.unpack_from("=i", data, offset + NLMSGHDR.size)
                    if code:
                        raise NetlinkError(-code, os.strerror(-code))
                    return
                offset += (length + 3) & ~3

    def link_set(
        self, index: int, up: bool = False, mtu: int | None = None, address: bytes | None = None
    ) -> None:
        attrs = b""
        if mtu is not None:
            attrs += _attr(IFLA_MTU, struct.pack("=I", mtu))
        if address is not None:
            attrs += _attr(IFLA_ADDRESS, address)
        change = IFF_UP if up else 0
        body = IFINFOMSG.pack(_socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, change)
        self._request(RTM_NEWLINK, 0, body + attrs)

    def addr_add(self, index: int, address: str, prefix_len: int) -> None:
        packed = _socket.inet_aton(address)
        body = IFADDRMSG.pack(_socket.AF_INET, prefix_len, 0, RT_SCOPE_UNIVERSE, index)
        body += _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
        self._request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)

    def default_route_add(self, gateway: str, index: int) -> None:
        body = RTMSG.pack(
            _socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0
        )
        body += _attr(RTA_GATEWAY, _socket.inet_aton(gateway))
        body += _attr(RTA_OIF, struct.pack("=I", index))
        self._request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body)
