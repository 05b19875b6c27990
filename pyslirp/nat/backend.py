"""The python backend, put together: ``build_loop`` makes the loop (which
makes the stack) and each service, sets them on the loop's fields and routes
the stack's events to them, here and nowhere else; ``PythonBackend`` serves
it behind the front end's Backend interface (pyslirp/backend.py).

Who hears what (``Loop.on_event``; each handler's ``on_error`` closes the
flow the event is about when it raises):

- UdpDatagramReceived: the UDP NAT, which hands DHCP to the DHCP server, DNS
  to the proxy, and asks its consumers first (the published ports' replies);
- IcmpEchoRequested: the ICMP relay;
- TcpConnectRequested, TcpDataReceived, TcpSendSpaceOpened,
  TcpConnectionReset, TcpConnectionClosed: the TCP NAT;
- TcpConnected (a connection we opened toward the guest): the published ports;
- MemoryPressureChanged: the loop itself (a log line).
"""

from __future__ import annotations

from pyslirp.backend import Backend
from pyslirp.config import NetworkConfig
from pyslirp.log import get_logger
from pyslirp.stack.events import (
    IcmpEchoRequested,
    TcpConnected,
    TcpConnectionClosed,
    TcpConnectionReset,
    TcpConnectRequested,
    TcpDataReceived,
    TcpSendSpaceOpened,
    UdpDatagramReceived,
)

from .loop import Loop
from .tcp import TcpNat
from .udp import UdpNat

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from pyslirp.pcap import PcapWriter

log = get_logger("pyslirp")


def build_loop(
    config: NetworkConfig,
    tap_fd: int,
    stop_fd: int | None = None,
    capture=None,
    link=None,
    recordings=None,
) -> Loop:
    """The python backend for one network: the loop on ``tap_fd`` (or on
    ``link``, a VM's socket: pyslirp/link.py; it stops when ``stop_fd`` is
    readable; frames are written to ``capture``, a PcapWriter, if given)
    with every service wired in. With ``config.record_path``, ``recordings``
    (a pyslirp.record.RecordingFiles) gives the file its stack records to;
    without it that path alone."""
    loop = Loop(config, tap_fd, stop_fd, capture, link, recordings)
    loop.udp = udp = UdpNat(loop)
    loop.tcp = tcp = TcpNat(loop)
    # The others are made when first needed (Loop.on_first_use), with their
    # module: the first DHCP request, DNS query or ping, the first published
    # port (or a stats or list_connections request).
    loop.on_first_use("dhcp", lambda: _dhcp_server(loop))
    loop.on_first_use("dns", lambda: _dns_proxy(loop), timed=True)
    loop.on_first_use("icmp", lambda: _icmp_relay(loop), timed=True)
    loop.on_first_use("forwards", lambda: _forwards(loop), timed=True)

    loop.on_event(UdpDatagramReceived, udp.on_datagram, on_error=udp.on_error)
    loop.on_event(
        IcmpEchoRequested,
        lambda event, now: loop.icmp.on_echo(event, now),
        on_error=lambda event, exc, now: loop.icmp.on_error(event, exc, now),
    )
    # Quiet: these only move data or open and end flows; the TCP NAT calls
    # timers_changed itself when it sets a deadline (a host connect that
    # waits, a host socket lingering after the close), as the proxy does for
    # a DNS query over TCP. A connection's open and close then cost no pass
    # over every service's next_deadline.
    loop.on_event(
        TcpConnectRequested, tcp.on_connect_requested, quiet=True, on_error=tcp.on_error
    )
    loop.on_event(TcpDataReceived, tcp.on_data, quiet=True, on_error=tcp.on_error)
    loop.on_event(TcpSendSpaceOpened, tcp.on_send_space, quiet=True, on_error=tcp.on_error)
    loop.on_event(TcpConnectionReset, tcp.on_reset, quiet=True, on_error=tcp.on_error)
    loop.on_event(TcpConnectionClosed, tcp.on_closed, quiet=True, on_error=tcp.on_error)
    # Only a published port opens connections toward the guest.
    loop.on_event(
        TcpConnected, lambda event, now: loop.forwards.on_tcp_connected(event, now),
        on_error=tcp.on_error,
    )
    # Their timers (next_deadline, handle_timer), after the loop's own call_at.
    loop.services.extend([udp, tcp])

    budget = loop.descriptors
    log.info(
        "descriptors: limit %d, %d open at start, %d reserved: %d for flows "
        "(udp %d, tcp %d, ping %d)",
        budget.limit,
        budget.limit - budget.reserve - budget.capacity,
        budget.reserve,
        budget.capacity,
        udp.max_flows,
        tcp.max_flows,
        budget.table_size(config.max_ping_sockets),  # IcmpRelay's, made at the first ping
    )
    return loop


def _dhcp_server(loop: Loop):
    from .dhcp import DhcpServer

    server = DhcpServer(loop.config)
    server.tracer = loop.tracer  # a server without a loop: told the trace here
    return server


def _dns_proxy(loop: Loop):
    from .dns import DnsProxy

    return DnsProxy(loop)


def _icmp_relay(loop: Loop):
    from .icmp import IcmpRelay

    return IcmpRelay(loop)


def _forwards(loop: Loop):
    from .forward import Forwards

    return Forwards(loop, loop.tcp, loop.udp)


class PythonBackend(Backend):
    name = "python"
    supported_options = frozenset({"outbound_addr", "disable_dns", "enable_ipv6", "outbound_addr6"})

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__(config)
        self.loop: Loop | None = None
        self._capture: PcapWriter | None = None
        # With a link: what the front end asked of the loop (extra
        # descriptors, forwards), made again in the next VM's loop.
        self._extra: dict[int, tuple] = {}
        self._forwards: dict[int, tuple] = {}
        self._guest_left = False
        self._started_at = 0.0
        self._tracer = None  # --trace: a JsonTracer, closed with the backend
        self._recordings = None  # --record: a RecordingFiles, a file per VM

    def start(self, tap_fd: int, stop_fd: int) -> None:
        if self.loop is not None:
            return
        self._capture = None
        if self.config.pcap_path:
            from pyslirp.pcap import PcapWriter  # --pcap only

            self._capture = PcapWriter(self.config.pcap_path)
        self._stop_fd = stop_fd
        if self.link is not None:
            self.link.on_disconnect = self._on_guest_left
        if self.config.record_path:
            from pyslirp.record import RecordingFiles  # --record only

            self._recordings = RecordingFiles(self.config.record_path, self.config.record_limit)
        self.loop = build_loop(
            self.config, tap_fd, stop_fd, self._capture, self.link, self._recordings
        )
        self._started_at = self.loop.now()  # for stats' uptime
        if self.config.trace_path:
            from pyslirp.trace import open_tracer  # json: only when tracing

            self._tracer = open_tracer(self.config.trace_path, self._frame_index())
            self.loop.set_tracer(self._tracer)

    def _frame_index(self):
        """With --pcap, a drop in the trace names its guest frame by pcap
        index: the loop writes each guest frame to the capture just before
        the stack handles it, so the count written is that frame's index."""
        capture = self._capture
        if capture is None:
            return None
        return lambda: capture.frames

    def run(self, tap_fd: int, stop_fd: int) -> None:
        self.start(tap_fd, stop_fd)
        try:
            while True:
                self.loop.run()
                if not self._guest_left or not self.link.reconnect:
                    break
                self._next_guest()
        finally:
            self.close()

    def _on_guest_left(self) -> None:
        self._guest_left = True
        self.loop.stop()

    def _next_guest(self) -> None:
        """The VM went away: its flows close with its loop, and the next VM
        gets a new loop (stack, NAT, leases) with the same extra descriptors
        and forwards (renumbered from 1, in the order they were added)."""
        self._guest_left = False
        old, self.loop = self.loop, None
        old.close()
        self.loop = loop = build_loop(
            self.config, -1, self._stop_fd, self._capture, self.link, self._recordings
        )
        if self._tracer is not None:
            loop.set_tracer(self._tracer)
        for fd, (events, handler) in self._extra.items():
            loop.register(fd, events, handler)
        forwards, self._forwards = self._forwards, {}
        for args in forwards.values():
            try:
                self._forwards[loop.forwards.add(*args)] = args
            except OSError as exc:
                log.warning("cannot publish %s %s:%s again: %s", args[0], args[1], args[2], exc)

    def close(self) -> None:
        loop, self.loop = self.loop, None
        if loop is not None:
            loop.close()
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.close()
        tracer, self._tracer = self._tracer, None
        if tracer is not None:
            tracer.close()
        recordings, self._recordings = self._recordings, None
        if recordings is not None:
            recordings.close()

    def _started(self) -> Loop:
        if self.loop is None:
            raise RuntimeError("the python backend has not started")
        return self.loop

    def register(self, fd: int, events: int, handler) -> None:
        self._started().register(fd, events, handler)
        self._extra[fd] = (events, handler)

    def unregister(self, fd: int) -> None:
        self._started().unregister(fd)
        self._extra.pop(fd, None)

    def add_hostfwd(self, proto, host_addr, host_port, guest_addr, guest_port) -> int:
        args = (proto, host_addr, host_port, guest_addr, guest_port)
        forward_id = self._started().forwards.add(*args)
        self._forwards[forward_id] = args
        return forward_id

    def remove_hostfwd(self, forward_id: int) -> None:
        self._started().forwards.remove(forward_id)
        self._forwards.pop(forward_id, None)

    def list_hostfwd(self) -> list[dict]:
        forwards = self._started().made("forwards")
        return forwards.entries() if forwards is not None else []

    def list_connections(self) -> list[dict]:
        from .forward import list_connections

        loop = self._started()
        return list_connections(loop, loop.now())

    def stats(self) -> dict:
        """The API's stats: every counter, drops by reason, memory, host
        descriptors, flows per kind against their limits, uptime."""
        loop = self._started()
        stack, budget, descriptors = loop.stack, loop.stack.budget, loop.descriptors
        # The services made on first use are not made for a question about
        # them: one not made yet has counted nothing and holds no flow.
        icmp, dns, forwards = loop.made("icmp"), loop.made("dns"), loop.made("forwards")
        services = {
            "stack": stack.counters,
            "loop": loop.counters,
            "tcp": loop.tcp.counters,
            "udp": loop.udp.counters,
            "icmp": icmp.counters if icmp is not None else {},
            "dns": dns.counters if dns is not None else {},
            "forwards": forwards.counters if forwards is not None else {},
            "descriptors": descriptors.counters,
        }
        drops = dict(stack.drops)
        if dns is not None:
            drops.update(dns.drops)  # their reasons begin with "dns-"
        return {
            "backend": self.name,
            "uptime": round(loop.now() - self._started_at, 3),
            "counters": {name: dict(counters) for name, counters in services.items()},
            "drops": drops,
            "memory": {
                "held": budget.held,
                "limit": budget.limit,
                "peak": max(budget.peak, budget.held),
                "pressure": budget.pressure,
                "refused": budget.refused,
            },
            "descriptors": {
                "open": descriptors.open,
                "limit": descriptors.capacity,
                "peak": descriptors.peak,
                "rlimit": descriptors.limit,
            },
            "flows": {
                "tcp": len(loop.tcp.flows),
                "udp": len(loop.udp.flows),
                "udp-forward": len(forwards.udp_clients) if forwards is not None else 0,
                "ping": len(icmp.flows) if icmp is not None else 0,
                "dns-upstream": dns.open_sockets if dns is not None else 0,
            },
            "flow_limits": {
                "tcp": loop.tcp.max_flows,
                "udp": loop.udp.max_flows,
                "ping": descriptors.table_size(loop.config.max_ping_sockets),
            },
            "unsupported": [],
        }

    def held_bytes(self) -> int:
        """Bytes charged to the memory budget now (the stack's budget.held)."""
        return self._started().stack.budget.held
