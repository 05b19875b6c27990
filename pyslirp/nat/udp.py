"""UDP NAT: one host socket per guest source endpoint.

The mapping is endpoint-independent (RFC 4787 REQ-1): a guest (address,
port) keeps one unconnected host socket whatever it talks to, and replies
from any peer come back to it. ICMP errors about its datagrams arrive through
IP_RECVERR on that socket and are passed on to the guest.

Each flow holds a host descriptor. The table is an OrderedDict kept in the
order of last use (a datagram either way moves a flow to the end, O(1)), so
when descriptors run short (``loop.descriptors``: another flow, a TCP
connection or a ping socket wants one) the least recently used flow is
closed to make room: the guest sees its later replies lost, as after a NAT
timeout. A flow is refused (ICMP administratively prohibited) when the
table is at ``max_udp_flows`` (the old flows keep their mappings, RFC 4787)
or no descriptor can be had at all.
"""

from __future__ import annotations

import _socket
import errno
import struct
from collections import OrderedDict

from pyslirp.log import WARNING, get_logger
from pyslirp.stack import icmpv4

from .addressing import AddressMap, endpoint, to_text
from .descriptors import EXHAUSTED

log = get_logger("pyslirp.udp")

IP_RECVERR = getattr(_socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(_socket, "IPV6_RECVERR", 25)
SO_EE_ORIGIN_ICMP6 = 3
# ICMPv6 errors from the host's network, in the ICMP (v4) terms the stack
# takes for both families (it turns them back into ICMPv6 for the guest).
ICMPV6_AS_V4 = {
    (1, 0): (icmpv4.DEST_UNREACHABLE, icmpv4.NET_UNREACHABLE),
    (1, 1): (icmpv4.DEST_UNREACHABLE, icmpv4.ADMIN_PROHIBITED),
    (1, 3): (icmpv4.DEST_UNREACHABLE, icmpv4.HOST_UNREACHABLE),
    (1, 4): (icmpv4.DEST_UNREACHABLE, icmpv4.PORT_UNREACHABLE),
    (1, 5): (icmpv4.DEST_UNREACHABLE, icmpv4.ADMIN_PROHIBITED),  # source address failed policy
    (1, 6): (icmpv4.DEST_UNREACHABLE, icmpv4.ADMIN_PROHIBITED),  # reject route
    (2, 0): (icmpv4.DEST_UNREACHABLE, icmpv4.FRAGMENTATION_NEEDED),  # packet too big
    (3, 0): (icmpv4.TIME_EXCEEDED, 0),
    (3, 1): (icmpv4.TIME_EXCEEDED, 1),
}
# struct sock_extended_err: errno, origin, type, code, pad, info, data
_EXTENDED_ERR = struct.Struct("=IBBBBII")
SO_EE_ORIGIN_ICMP = 2
DNS_PORT = 53
DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68
RECV_BATCH = 64  # datagrams per socket per wake-up, for fairness
# Non-blocking from the start, as the TCP NAT's sockets: no fcntl per flow.
_DGRAM_NONBLOCK = _socket.SOCK_DGRAM | _socket.SOCK_NONBLOCK


def unreachable_error(level: int, kind: int, origin: int, icmp_type: int, code: int):
    """A destination-unreachable error from IP_RECVERR or IPV6_RECVERR, as
    ICMP (v4) (type, code); None for anything else."""
    if level == _socket.IPPROTO_IPV6 and kind == IPV6_RECVERR and origin == SO_EE_ORIGIN_ICMP6:
        error = ICMPV6_AS_V4.get((icmp_type, code))
        return error if error is not None and error[0] == icmpv4.DEST_UNREACHABLE else None
    if (level, kind, origin) == (_socket.SOL_IP, IP_RECVERR, SO_EE_ORIGIN_ICMP):
        return (icmp_type, code) if icmp_type == icmpv4.DEST_UNREACHABLE else None
    return None


class UdpFlow:
    __slots__ = (
        "guest",
        "guest_port",
        "idle_timeout",
        "last_active",
        "nat",
        "sock",
        "opened_at",
        "bytes_from_guest",
        "bytes_to_guest",
        "key",
    )

    def __init__(self, nat, sock, guest, guest_port, idle_timeout, now):
        self.nat = nat
        self.key = (guest, guest_port)
        self.sock = sock
        self.guest = guest
        self.guest_port = guest_port
        self.idle_timeout = idle_timeout
        self.last_active = now
        self.opened_at = now
        self.bytes_from_guest = 0  # payload bytes, for list_connections
        self.bytes_to_guest = 0

    @property
    def name(self) -> str:
        """``udp guest:port>*``: one mapping for every peer (RFC 4787
        endpoint-independent), so the peer's end is a wildcard."""
        return f"udp {endpoint(self.guest, self.guest_port)}>*"

    def on_ready(self, mask: int, now: float) -> None:
        self.nat.read_flow(self, now)

    def fail(self, exc: Exception, now: float) -> None:
        """The loop's barrier: this flow's handler raised; close the flow."""
        self.nat.close_flow(self, now)


class UdpNat:
    def __init__(self, loop) -> None:
        self.loop = loop  # its dhcp and dns serve what is sent to them
        self.stack = loop.stack
        self.config = loop.config
        self.addresses = AddressMap(loop.config)
        # (guest address, guest port) -> flow, least recently used first.
        self.flows: OrderedDict[tuple, UdpFlow] = OrderedDict()
        self.counters = {
            "flows-opened": 0,
            "flows-refused": 0,
            "flows-expired": 0,
            "flows-evicted": 0,
            "flows-failed": 0,
        }
        # The table's size: the configured one, or what the descriptors allow
        # (past that, descriptors.acquire() evicts the oldest flow).
        self.descriptors = loop.descriptors
        self.max_flows = self.descriptors.table_size(loop.config.max_udp_flows)
        self.descriptors.evictors.append(self.evict_oldest)
        self._expiring = None  # the flow handle_timer is closing (for timer_failed)
        self._sweep_at = None
        # --outbound-addr and --outbound-addr6: the address host sockets are bound to.
        self.bind_addr = (loop.config.outbound_addr or "0.0.0.0", 0)
        self.bind_addr6 = (loop.config.outbound_addr6 or "::", 0)
        self.dns_enabled = not loop.config.disable_dns
        # Other readers of the guest's datagrams, asked first (add_consumer).
        self.consumers: list = []
        self.dhcpv6 = None
        if loop.config.enable_ipv6:  # imported only with -6 (it and ndp: 1 ms of a start)
            from pyslirp.stack import ipv6

            from .dhcpv6 import CLIENT_PORT, SERVER_PORT, Dhcpv6Server

            self.dhcpv6 = Dhcpv6Server(loop.config)
            self.dhcpv6_ports = (SERVER_PORT, CLIENT_PORT)
            stack_config = loop.stack.config
            self.dhcpv6_addresses = (
                ipv6.ALL_DHCP_AGENTS,
                stack_config.ipv6_link_local,
                stack_config.ipv6_gateway,
            )

    # ------------------------------------------------------------ guest -> host
    def add_consumer(self, consumer) -> None:
        """Let another part see the guest's datagrams before the NAT:
        ``consumer(event, now)`` (an UdpDatagramReceived) returns True when
        the datagram was its own, which ends it there, or False to pass it
        on. Consumers are asked in the order added, for every datagram, so
        one is added only once it has flows (the published ports add theirs
        with the first UDP forward: the guest's replies to its clients). One
        that raises fails like the NAT's own handler (``on_error``)."""
        self.consumers.append(consumer)

    def on_datagram(self, event, now: float) -> None:
        if self.consumers:
            for consumer in self.consumers:
                if consumer(event, now):
                    return
        stack = self.stack
        dst, dport = event.dst, event.dst_port
        if dport == DHCP_SERVER_PORT and (
            dst == self.addresses.gateway or dst[0] == 255 or dst == stack.config.broadcast
        ):
            dhcp = self.loop.dhcp
            for reply, to_ip, to_mac in dhcp.handle(event.payload, event.src_mac, now):
                stack.send_udp(
                    self.addresses.gateway,
                    DHCP_SERVER_PORT,
                    to_ip,
                    DHCP_CLIENT_PORT,
                    reply,
                    now,
                    dst_mac=to_mac,
                )
            # An ACKed address needs no ARP before we send to it.
            while (lease := dhcp.next_event()) is not None:
                stack.learn_neighbor(lease.address, lease.mac)
            return
        if (
            self.dhcpv6 is not None
            and dport == self.dhcpv6_ports[0]
            and len(dst) == 16
            and dst in self.dhcpv6_addresses
        ):
            self._dhcpv6(event, now)
            return
        if self.addresses.is_dns(dst):
            if dport == DNS_PORT and self.dns_enabled:
                self.loop.dns.query(event.src, event.src_port, event.payload, now, dst)
            else:
                stack.send_icmp_error(
                    icmpv4.DEST_UNREACHABLE, icmpv4.PORT_UNREACHABLE, event.packet, now, src=dst
                )
            return
        if dst[0] == 255 or dst == stack.config.broadcast:
            stack.drops["udp-broadcast"] += 1
            return
        host = self.addresses.to_host(dst)
        if isinstance(host, int):
            stack.send_icmp_error(icmpv4.DEST_UNREACHABLE, host, event.packet, now)
            return
        key = (event.src, event.src_port)
        flow = self.flows.get(key)
        if flow is None:
            flow = self._open(event, now)
            if flow is None:
                return
        elif flow.last_active != now:  # once per wake-up is enough for the order
            self.flows.move_to_end(key)
        flow.last_active = now
        flow.bytes_from_guest += len(event.payload)
        try:
            flow.sock.sendto(event.payload, (host, dport))
        except BlockingIOError:
            stack.drops["udp-host-buffer-full"] += 1
        except OSError as exc:
            code = {
                errno.ENETUNREACH: icmpv4.NET_UNREACHABLE,
                errno.EHOSTUNREACH: icmpv4.HOST_UNREACHABLE,
                errno.ECONNREFUSED: icmpv4.PORT_UNREACHABLE,
            }.get(exc.errno)
            if code is not None:
                stack.send_icmp_error(icmpv4.DEST_UNREACHABLE, code, event.packet, now)
            else:
                stack.drops[f"udp-sendto-{errno.errorcode.get(exc.errno, exc.errno)}"] += 1

    def _dhcpv6(self, event, now: float) -> None:
        reply = self.dhcpv6.handle(event.payload)
        if reply is None:
            return
        # RFC 8415 18.3.10: from our link-local address unless asked at another.
        src = event.dst if event.dst[0] != 0xFF else self.dhcpv6_addresses[1]
        server_port, client_port = self.dhcpv6_ports
        self.stack.send_udp(src, server_port, event.src, event.src_port or client_port, reply, now)

    def _open(self, event, now: float):
        limit = self.config.max_udp_flows
        if len(self.flows) >= limit:
            self.expire(now)
        if len(self.flows) >= limit:
            return self._refuse(event, now, "the table is full")
        if not self.descriptors.acquire():  # evicts the oldest flow first
            return self._refuse(event, now, "no descriptor for it")
        v6 = len(event.src) == 16
        family = _socket.AF_INET6 if v6 else _socket.AF_INET
        try:
            try:
                sock = _socket.socket(family, _DGRAM_NONBLOCK)
            except OSError as exc:
                # EMFILE/ENFILE though the budget had room (descriptors
                # opened elsewhere): make room once and try again.
                if exc.errno not in EXHAUSTED or not self.descriptors.evict():
                    raise
                sock = _socket.socket(family, _DGRAM_NONBLOCK)
        except OSError as exc:  # refuse this flow, keep the others
            self.descriptors.release()
            return self._refuse(event, now, f"cannot open a socket: {exc}")
        if v6:
            sock.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 1)
            sock.setsockopt(_socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        else:
            sock.setsockopt(_socket.SOL_IP, IP_RECVERR, 1)
        bind_addr = self.bind_addr6 if v6 else self.bind_addr
        try:
            sock.bind(bind_addr)
        except OSError as exc:  # --outbound-addr gone from the host, or no port left
            sock.close()
            self.descriptors.release()
            self.counters["flows-refused"] += 1
            log.warning("cannot bind a UDP socket to %s: %s", bind_addr[0], exc)
            self.stack.send_icmp_error(
                icmpv4.DEST_UNREACHABLE, icmpv4.ADMIN_PROHIBITED, event.packet, now
            )
            return None
        timeout = (
            self.config.udp_dns_idle_timeout
            if event.dst_port == DNS_PORT
            else self.config.udp_idle_timeout
        )
        flow = UdpFlow(self, sock, event.src, event.src_port, timeout, now)
        self.flows[flow.key] = flow
        self.loop.register(sock, 1, flow.on_ready, on_error=flow.fail)
        self.counters["flows-opened"] += 1
        log.info("%s opened (host port %d)", flow.name, sock.getsockname()[1])
        if self._sweep_at is None:
            self._sweep_at = now + 1.0
        tracer = self.loop.tracer
        if tracer is not None:
            port = sock.getsockname()[1]
            tracer(
                now,
                "udp.flow-created",
                flow.name,
                f"flow opened on host port {port}, idle timeout {timeout:g}s",
                host_port=port,
                idle_timeout=timeout,
            )
        return flow

    def _refuse(self, event, now: float, why: str) -> None:
        self.counters["flows-refused"] += 1
        tracer = self.loop.tracer
        if tracer is not None:
            tracer(
                now,
                "udp.flow-refused",
                f"udp {endpoint(event.src, event.src_port)}>*",
                f"flow refused: {why} ({len(self.flows)} open); ICMP prohibited sent",
                reason=why,
                flows=len(self.flows),
            )
        self.loop.limiter.log(
            WARNING,
            "udp-refused",
            now,
            "udp flow %s:%d refused: %s (%d flows open)",
            to_text(event.src),
            event.src_port,
            why,
            len(self.flows),
        )
        self.stack.send_icmp_error(
            icmpv4.DEST_UNREACHABLE, icmpv4.ADMIN_PROHIBITED, event.packet, now
        )
        return None

    def evict_oldest(self) -> bool:
        """Close the least recently used flow (descriptors are short); False
        if there is none."""
        if not self.flows:
            return False
        key, flow = next(iter(self.flows.items()))
        self._close(key, flow)
        self.counters["flows-evicted"] += 1
        tracer = self.loop.tracer
        if tracer is not None:
            now = self.loop.now()
            tracer(
                now,
                "udp.flow-evicted",
                flow.name,
                f"flow closed for its descriptor (idle {now - flow.last_active:.1f}s, the oldest)",
                idle=round(now - flow.last_active, 3),
            )
        return True

    def close_flow(self, flow: UdpFlow, now: float) -> None:
        """A handler of this flow failed (the loop's barrier): close it."""
        self.counters["flows-failed"] += 1
        if self.flows.get(flow.key) is flow:
            self._close(flow.key, flow)
        else:  # half closed when it failed: make sure the socket goes
            self.loop.unregister(flow.sock)
            if flow.sock.fileno() >= 0:
                flow.sock.close()
                self.descriptors.release()

    def on_error(self, event, exc: Exception, now: float) -> None:
        """The datagram handler failed on ``event``: close the flow it came
        from and tell the guest (ICMP administratively prohibited)."""
        flow = self.flows.get((event.src, event.src_port))
        if flow is not None:
            self.close_flow(flow, now)
        self.stack.send_icmp_error(
            icmpv4.DEST_UNREACHABLE, icmpv4.ADMIN_PROHIBITED, event.packet, now
        )

    # ------------------------------------------------------------ host -> guest
    def read_flow(self, flow: UdpFlow, now: float) -> None:
        stack = self.stack
        for _ in range(RECV_BATCH):
            try:
                data, addr = flow.sock.recvfrom(65535)
            except BlockingIOError:
                return
            except OSError:
                self._read_error(flow, now)
                continue
            if flow.last_active != now:
                flow.last_active = now
                self.flows.move_to_end(flow.key)
            flow.bytes_to_guest += len(data)
            stack.send_udp(
                self.addresses.to_guest(addr[0]), addr[1], flow.guest, flow.guest_port, data, now
            )

    def _read_error(self, flow: UdpFlow, now: float) -> None:
        """Pass an ICMP error from the host's network on to the guest."""
        try:
            _data, ancdata, _flags, addr = flow.sock.recvmsg(512, 512, _socket.MSG_ERRQUEUE)
        except OSError:
            return
        for level, kind, cdata in ancdata:
            if len(cdata) < _EXTENDED_ERR.size:
                continue
            _errno, origin, icmp_type, code, _pad, info, _ = _EXTENDED_ERR.unpack_from(cdata)
            error = unreachable_error(level, kind, origin, icmp_type, code)
            if error is None:
                continue
            icmp_type, code = error
            peer = self.addresses.to_guest(addr[0])
            quote = self.stack.udp_quote(flow.guest, flow.guest_port, peer, addr[1])
            mtu = info if code == icmpv4.FRAGMENTATION_NEEDED else 0
            self.stack.send_icmp_error(icmp_type, code, quote, now, mtu=mtu, src=peer)

    # ------------------------------------------------------------ timers
    def next_deadline(self):
        return self._sweep_at

    def handle_timer(self, now: float) -> None:
        self._sweep_at = now + 1.0
        self.expire(now)
        self._sweep_at = now + 1.0 if self.flows else None

    def expire(self, now: float) -> None:
        for key, flow in list(self.flows.items()):
            if now - flow.last_active >= flow.idle_timeout:
                self._expiring = flow
                self._close(key, flow)
                self.counters["flows-expired"] += 1
                tracer = self.loop.tracer
                if tracer is not None:
                    tracer(
                        now,
                        "udp.flow-expired",
                        flow.name,
                        f"flow expired after {flow.idle_timeout:g}s idle",
                        idle_timeout=flow.idle_timeout,
                        bytes_from_guest=flow.bytes_from_guest,
                        bytes_to_guest=flow.bytes_to_guest,
                    )
        self._expiring = None

    def timer_failed(self, exc: Exception, now: float) -> None:
        """The loop's barrier: the sweep raised while closing a flow."""
        flow, self._expiring = self._expiring, None
        if flow is not None:
            self.close_flow(flow, now)

    def _close(self, key, flow: UdpFlow) -> None:
        del self.flows[key]
        self.loop.unregister(flow.sock)
        flow.sock.close()
        self.descriptors.release()
        log.info("%s closed", flow.name)  # the name the trace and the API give it

    def close(self) -> None:
        for key, flow in list(self.flows.items()):
            self._close(key, flow)
