"""-c with -6: wait until the guest has configured IPv6 by itself.

The guest's kernel takes its address and default route from our router
advertisements (SLAAC); the ready fd (and the run mode's COMMAND) should wait
for that, as they wait for the IPv4 configuration. The namespace child opens
a NETLINK_ROUTE socket inside the namespace, subscribed to IPv6 address and
route changes, and hands it over with the TAP; here, served by the backend's
loop, it is asked for the current addresses and routes and then listened to
until an address in the prefix that is no longer tentative and a default
route via fe80::2 are both there.

Netlink by hand (rtnetlink(7)): a few fixed structures, so that the long-lived
process needs no netlink library (and nothing to import after the sandbox).

The time limit is a timerfd served by the same loop, not a timer thread
(forwarder.timerfd says why): the watch starts before the sandbox.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from pyslirp.backend import READ
from pyslirp.log import get_logger

from .rtnetlink import (
    IFA_ADDRESS,
    IFA_F_DADFAILED,
    IFA_F_TENTATIVE,
    IFA_FLAGS,
    IFADDRMSG,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSGHDR,
    RTA_GATEWAY,
    RTATTR,
    RTM_GETADDR,
    RTM_GETROUTE,
    RTM_NEWADDR,
    RTM_NEWROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMSG,
)
from .timerfd import TimerFd

log = get_logger("pyslirp")

GROUPS = RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
WAIT_TIMEOUT = 10.0  # seconds before the ready fd is written anyway


def open_watch_socket() -> socket.socket:
    """In the namespace: the netlink socket to hand over (non-blocking)."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
    )
    sock.bind((0, GROUPS))
    sock.setblocking(False)
    return sock


def _attributes(data: bytes, offset: int, end: int):
    while offset + RTATTR.size <= end:
        length, kind = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size or offset + length > end:
            return
        yield kind, data[offset + RTATTR.size : offset + length]
        offset += (length + 3) & ~3


class SlaacWatch:
    """Calls ``on_done(ok)`` once: True when the guest has its address and
    default route, False after ``timeout`` seconds."""

    def __init__(self, backend, fd: int, prefix: str, router: bytes, on_done):
        self.backend = backend
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.prefix = ipaddress.IPv6Network(prefix)  # NetworkConfig.ipv6_prefix
        self.router = router
        self.on_done = on_done
        self.address: str | None = None
        self.route = False
        self.done = False
        self._dumping = RTM_GETADDR
        self._timer: TimerFd | None = None

    def start(self, timeout: float = WAIT_TIMEOUT) -> None:
        self._timer = TimerFd()
        self._timer.arm(timeout)
        self.backend.register(self.sock.fileno(), READ, self._readable)
        self.backend.register(self._timer.fileno(), READ, self._timed_out)
        self._request(RTM_GETADDR, IFADDRMSG.pack(socket.AF_INET6, 0, 0, 0, 0))

    def _request(self, kind: int, body: bytes) -> None:
        header = NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, kind, 0)
        try:
            self.sock.send(header + body)
        except OSError as exc:
            log.warning("IPv6 configuration watch: %s", exc)

    def _readable(self, mask: int, now: float) -> None:
        for _ in range(64):
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ENOBUFS: events were lost; ask again
                self._dumping = RTM_GETADDR
                self._request(RTM_GETADDR, IFADDRMSG.pack(socket.AF_INET6, 0, 0, 0, 0))
                continue
            self._messages(data)
            if self.done:
                return
        if self.address is not None and self.route:
            self._finish(True)

    def _messages(self, data: bytes) -> None:
        offset = 0
        while offset + NLMSGHDR.size <= len(data):
            length, kind, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, offset)
            if length < NLMSGHDR.size or offset + length > len(data):
                return
            body = offset + NLMSGHDR.size
            end = offset + length
            if kind == RTM_NEWADDR and end - body >= IFADDRMSG.size:
                self._address(data, body, end)
            elif kind == RTM_NEWROUTE and end - body >= RTMSG.size:
                self._route(data, body, end)
            elif kind == NLMSG_DONE and self._dumping == RTM_GETADDR:
                self._dumping = RTM_GETROUTE
                self._request(RTM_GETROUTE, RTMSG.pack(socket.AF_INET6, 0, 0, 0, 0, 0, 0, 0, 0))
            offset += (length + 3) & ~3

    def _address(self, data: bytes, body: int, end: int) -> None:
        family, _plen, flags, _scope, _index = IFADDRMSG.unpack_from(data, body)
        if family != socket.AF_INET6:
            return
        address = None
        for kind, value in _attributes(data, body + IFADDRMSG.size, end):
            if kind == IFA_ADDRESS and len(value) == 16:
                address = ipaddress.IPv6Address(value)
            elif kind == IFA_FLAGS and len(value) >= 4:
                flags = struct.unpack_from("=I", value)[0]
        if address is None or address not in self.prefix:
            return
        if not flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
            self.address = str(address)

    def _route(self, data: bytes, body: int, end: int) -> None:
        family, dst_len, *_rest = RTMSG.unpack_from(data, body)
        if family != socket.AF_INET6 or dst_len != 0:
            return
        for kind, value in _attributes(data, body + RTMSG.size, end):
            if kind == RTA_GATEWAY and value == self.router:
                self.route = True

    def _timed_out(self, mask: int, now: float) -> None:
        if not self.done:
            log.warning(
                "IPv6: the guest has not configured itself by SLAAC in %.0f s "
                "(address %s, default route %s); going on",
                WAIT_TIMEOUT,
                self.address or "missing",
                "present" if self.route else "missing",
            )
            self._finish(False)

    def _finish(self, ok: bool) -> None:
        if self.done:
            return
        self.done = True
        for fd in (self.sock.fileno(), self._timer.fileno()):
            self.backend.unregister(fd)
        self._close_fds()
        if ok:
            log.info("IPv6: the guest has %s and a default route via fe80::2", self.address)
        self.on_done(ok)

    def close(self) -> None:
        """At exit, when the guest never finished."""
        if not self.done:
            self.done = True
            self._close_fds()

    def _close_fds(self) -> None:
        self.sock.close()
        if self._timer is not None:
            self._timer.close()
