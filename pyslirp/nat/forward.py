"""Port forwarding: host sockets that carry traffic into the guest.

A forward listens on HOST_ADDR:HOST_PORT on the host, for TCP or UDP, and
relays what arrives to GUEST_ADDR:GUEST_PORT inside the virtual network
(slirp4netns's ``add_hostfwd``). Forwards are added and removed while the
loop runs; removing one closes its host socket and leaves established TCP
connections alone, as libslirp does.

Who the guest sees: the client's own address and port, so that a server in
the guest can log and filter by it. Clients the guest could not answer
directly (the host's loopback, 0.0.0.0, or an address inside the virtual
network itself) appear as the gateway, with the client's port, or a free
port when that one is taken (libslirp shows loopback clients as the gateway
too, and every other client as well; keeping the real address is ours).

UDP: one listening socket per forward and no socket per client. Each client
(address, port) gets a flow keyed, on the guest side, by the 4-tuple the
guest's replies carry, so a reply goes back to the client that asked, from
the forward's own host port. Flows expire after ``udp_idle_timeout``; their
number is bounded by ``max_udp_flows``.

TCP: an accepted client socket becomes a connection the stack opens toward
the guest (``TcpLayer.connect``); once the guest answers (``TcpConnected``)
the TCP NAT relays both directions exactly as for guest-initiated flows
(``TcpFlow``), with the same flow control and the same endings.

Descriptors: an accepted client takes one of ``loop.descriptors`` (the least
recently used UDP flow makes room if need be); with none left it is reset at
once. When ``accept()`` itself fails for want of descriptors (EMFILE,
ENFILE), the waiting client is taken off with a spare descriptor and reset
(``AcceptGuard``), so the level-triggered listener does not spin; failing
that, or when a listener's handler raises, the listener rests for
``accept_pause`` seconds.

IPv6 (our extension of slirp4netns's API): a forward whose host address is
IPv6 (``[::1]:8080``, a V6ONLY socket) goes to an IPv6 guest address: one
in the prefix, or ``::``, which means the guest's own address as the stack
learned it from neighbour discovery and its traffic (SLAAC picks it, so it
is not known in advance); until then its clients are refused. Host and
guest addresses are of one family: no translation between the two.
"""

from __future__ import annotations

import errno
import itertools
import socket

from pyslirp.log import get_logger
from pyslirp.settings import Settings

from .addressing import endpoint
from .descriptors import AcceptGuard
from .tcp import TCP_NODELAY

log = get_logger("pyslirp.forward")

READ = 1  # selectors.EVENT_READ
PROTOCOLS = ("tcp", "udp")
LISTEN_BACKLOG = 128
ACCEPT_BATCH = 64  # connections accepted per wake-up, for fairness
RECV_BATCH = 64  # datagrams read per forward per wake-up
# Ports tried for a client whose own port is taken on the guest side (the
# Linux default ephemeral range, net.ipv4.ip_local_port_range).
EPHEMERAL_FIRST, EPHEMERAL_LAST = 32768, 60999
PORT_ATTEMPTS = 32
SWEEP_INTERVAL = 1.0
AUTO_GUEST6 = bytes(16)  # "::": the guest's learned IPv6 address


class Forward(Settings):
    id: int
    proto: str
    host_addr: str
    host_port: int
    guest_addr: str
    guest_port: int
    guest: bytes  # guest_addr packed (AUTO_GUEST6: the learned IPv6 address)
    sock: socket.socket
    opened: int = 0  # TCP connections or UDP flows made through it

    def entry(self) -> dict:
        """As slirp4netns's list_hostfwd shows it (same keys, same order)."""
        return {
            "id": self.id,
            "proto": self.proto,
            "host_addr": self.host_addr,
            "host_port": self.host_port,
            "guest_addr": self.guest_addr,
            "guest_port": self.guest_port,
        }


class UdpForwardFlow:
    """One client of a UDP forward."""

    __slots__ = (
        "forward",
        "client",
        "guest",
        "src",
        "src_port",
        "opened_at",
        "last_active",
        "bytes_to_guest",
        "bytes_from_guest",
    )

    def __init__(self, forward: Forward, client, guest, src: bytes, src_port: int, now: float):
        self.forward = forward
        self.client = client  # (address string, port) on the host
        self.guest = guest  # the guest address it goes to
        self.src = src  # the source the guest sees
        self.src_port = src_port
        self.opened_at = now
        self.last_active = now
        self.bytes_to_guest = 0
        self.bytes_from_guest = 0

    @property
    def guest_key(self) -> tuple:
        """The 4-tuple of the guest's replies: (guest, guest port, src, src port)."""
        return (self.guest, self.forward.guest_port, self.src, self.src_port)


def validate(config, proto, host_addr, host_port, guest_addr, guest_port) -> None:
    """ValueError naming the first bad argument (its name is the message's
    first word, as slirp4netns's API reports it)."""
    if proto not in PROTOCOLS:
        raise ValueError(f"proto must be tcp or udp, not {proto!r}")
    family = family_of_text(host_addr)
    if family is None:
        raise ValueError(f"host_addr {host_addr!r} is not an IPv4 or IPv6 address")
    if family == socket.AF_INET6 and not config.enable_ipv6:
        raise ValueError(f"host_addr {host_addr} is IPv6, and IPv6 is not enabled")
    for name, port in (("host_port", host_port), ("guest_port", guest_port)):
        if type(port) is not int or not 1 <= port <= 65535:
            raise ValueError(f"{name} must be from 1 to 65535, not {port!r}")
    if family == socket.AF_INET6:
        try:
            guest = socket.inet_pton(socket.AF_INET6, guest_addr)
        except (OSError, TypeError):
            raise ValueError(f"guest_addr {guest_addr!r} is not an IPv6 address") from None
        stack = config.stack_config()
        if guest != AUTO_GUEST6 and (
            not stack.in_prefix6(guest)
            or guest in (stack.ipv6_prefix, stack.ipv6_gateway, stack.ipv6_dns)
        ):
            raise ValueError(
                f"guest_addr {guest_addr} is not a guest address in {config.ipv6_prefix} (or ::)"
            )
        return
    try:
        guest = socket.inet_pton(socket.AF_INET, guest_addr)
    except (OSError, TypeError):
        raise ValueError(f"guest_addr {guest_addr!r} is not an IPv4 address") from None
    stack = config.stack_config()
    if not stack.in_network(guest) or guest in (
        stack.network,
        stack.broadcast,
        stack.gateway,
        stack.dns,
    ):
        raise ValueError(f"guest_addr {guest_addr} is not a guest address in {config.cidr}")


def family_of_text(addr) -> int | None:
    """AF_INET or AF_INET6 for an address string; None if it is neither."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, addr)
        except (OSError, TypeError):
            continue
        return family
    return None


class Forwards:
    """Every forward of one loop: add, remove, list, and the relaying.

    Forwarded TCP connections are relayed by the TCP NAT (``tcp``, which
    adopts them); the guest's replies to UDP clients reach ``on_udp_datagram``
    as a consumer of the UDP NAT (``udp.add_consumer``), added with the
    first UDP forward. The loop routes TcpConnected to ``on_tcp_connected``.
    """

    def __init__(self, loop, tcp, udp) -> None:
        self.loop = loop
        self.tcp = tcp  # the TCP NAT
        self.udp = udp  # the UDP NAT
        self.stack = loop.stack
        self.config = loop.config
        stack_config = self.stack.config
        self.gateway = stack_config.gateway
        self.gateway6 = stack_config.ipv6_gateway
        self._in_network = stack_config.in_network
        self._in_prefix6 = stack_config.in_prefix6
        self.random = loop.config.random
        self.forwards: dict[int, Forward] = {}
        self._ids = itertools.count(1)
        self.udp_flows: dict[tuple, UdpForwardFlow] = {}  # by guest_key
        self.udp_clients: dict[tuple, UdpForwardFlow] = {}  # by (forward id, client)
        self.tcp_flows: dict = {}  # TcpFlow -> forward id, for list_connections
        self.counters = {
            "udp-flows-opened": 0,
            "udp-flows-expired": 0,
            "udp-flows-refused": 0,
            "tcp-connections-opened": 0,
            "tcp-connections-refused": 0,
            "listener-paused": 0,
        }
        self._sweep_at: float | None = None
        self._udp_consumer = False  # on_udp_datagram added to the UDP NAT's consumers
        self.guard = AcceptGuard("published ports", loop.limiter)

    # ------------------------------------------------------------ commands
    def add(self, proto, host_addr, host_port, guest_addr, guest_port) -> int:
        """Listen on the host and forward to the guest; the new id.

        ValueError for a bad argument; OSError when the host socket cannot be
        bound (EADDRINUSE for a busy port, EACCES for a privileged one)."""
        validate(self.config, proto, host_addr, host_port, guest_addr, guest_port)
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        family = family_of_text(host_addr)
        sock = socket.socket(family, kind)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if proto == "tcp":
                # A restarted forwarder must get its port back while old
                # connections sit in TIME-WAIT; a listener still conflicts.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host_addr, host_port))
            if proto == "tcp":
                sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        forward = Forward(
            next(self._ids),
            proto,
            host_addr,
            host_port,
            guest_addr,
            guest_port,
            socket.inet_pton(family, guest_addr),
            sock,
        )
        self.forwards[forward.id] = forward
        if proto == "udp" and not self._udp_consumer:
            # From now on the guest's datagrams may be replies to our clients.
            self.udp.add_consumer(self.on_udp_datagram)
            self._udp_consumer = True
        self._listen(forward)
        log.info(
            "forward %d: %s %s:%d -> %s:%d",
            forward.id,
            proto,
            host_addr,
            host_port,
            guest_addr,
            guest_port,
        )
        return forward.id

    def _listen(self, forward: Forward) -> None:
        if forward.proto == "tcp":
            handler = lambda mask, now, f=forward: self._accept(f, now)  # noqa: E731
        else:
            handler = lambda mask, now, f=forward: self._udp_read(f, now)  # noqa: E731
        self.loop.register(
            forward.sock,
            READ,
            handler,
            on_error=lambda exc, now, f=forward: self._pause(f, now),
        )

    def _pause(self, forward: Forward, now: float) -> None:
        """Stop polling a listener for ``accept_pause`` seconds: its accept()
        fails for want of descriptors, or its handler raised (the loop's
        barrier). Clients wait in the kernel's backlog meanwhile."""
        self.loop.unregister(forward.sock)
        self.counters["listener-paused"] += 1

        def resume(now: float) -> None:
            if self.forwards.get(forward.id) is forward:
                self._listen(forward)

        self.loop.call_at(now + self.config.accept_pause, resume)

    def remove(self, forward_id: int) -> None:
        """Stop forwarding; KeyError if there is no such forward. Established
        TCP connections carry on; the forward's UDP flows end with it."""
        forward = self.forwards.pop(forward_id)
        self.loop.unregister(forward.sock)
        forward.sock.close()
        if forward.proto == "udp":
            for key, flow in list(self.udp_clients.items()):
                if flow.forward is forward:
                    self._drop_udp(key, flow)
        log.info("forward %d removed", forward_id)

    def entries(self) -> list[dict]:
        return [forward.entry() for forward in self.forwards.values()]

    # ------------------------------------------------------------ addresses
    def _guest_of(self, forward: Forward) -> bytes | None:
        """The guest address a forward goes to now (None: not learned yet)."""
        if forward.guest == AUTO_GUEST6:
            return self.stack.guest_address6
        return forward.guest

    def _guest_source(self, client_addr: str, client_port: int, taken) -> tuple | None:
        """The (address, port) the guest sees for a client; None if no port
        is free. ``taken(src, port)`` says whether a pair is in use."""
        if ":" in client_addr:
            addr = socket.inet_pton(socket.AF_INET6, client_addr.split("%")[0])
            # Loopback, unspecified, link-local (another link's) or inside
            # the prefix: the guest could not answer it, so the gateway.
            if (
                addr[:15] == bytes(15)
                or (addr[0] == 0xFE and addr[1] & 0xC0 == 0x80)
                or self._in_prefix6(addr)
            ):
                addr = self.gateway6
        else:
            addr = socket.inet_aton(client_addr)
            if addr[0] in (0, 127) or self._in_network(addr):
                addr = self.gateway
        if not taken(addr, client_port):
            return addr, client_port
        for _ in range(PORT_ATTEMPTS):
            # getrandbits alone, the one method the stack's source must have
            port = EPHEMERAL_FIRST + self.random.getrandbits(15)
            if port > EPHEMERAL_LAST:
                continue
            if not taken(addr, port):
                return addr, port
        return None

    # ------------------------------------------------------------ UDP
    def on_udp_datagram(self, event, now: float) -> bool:
        """A guest datagram, as the UDP NAT's consumer: True if it is a reply
        to one of our clients (sent on to it), False for the NAT's."""
        flow = self.udp_flows.get((event.src, event.src_port, event.dst, event.dst_port))
        if flow is None:
            return False
        flow.last_active = now
        flow.bytes_from_guest += len(event.payload)
        try:
            flow.forward.sock.sendto(event.payload, flow.client)
        except BlockingIOError:
            self.stack.drops["forward-udp-host-buffer-full"] += 1
        except OSError as exc:
            self.stack.drops[f"forward-udp-sendto-{errno.errorcode.get(exc.errno, exc.errno)}"] += 1
        return True

    def _udp_read(self, forward: Forward, now: float) -> None:
        sock = forward.sock
        send_udp = self.stack.send_udp
        for _ in range(RECV_BATCH):
            try:
                data, client = sock.recvfrom(65535)
            except BlockingIOError:
                return
            except OSError:
                continue  # an error queued on the socket; the next read goes on
            flow = self.udp_clients.get((forward.id, client))
            if flow is None:
                flow = self._udp_open(forward, client, now)
                if flow is None:
                    continue
            flow.last_active = now
            flow.bytes_to_guest += len(data)
            send_udp(flow.src, flow.src_port, flow.guest, forward.guest_port, data, now)

    def _udp_open(self, forward: Forward, client, now: float):
        if len(self.udp_clients) >= self.config.max_udp_flows:
            self.expire(now)
        if len(self.udp_clients) >= self.config.max_udp_flows:
            self.counters["udp-flows-refused"] += 1
            return None
        guest, gport = self._guest_of(forward), forward.guest_port
        if guest is None:
            self.counters["udp-flows-refused"] += 1
            log.info("forward %d: the guest's IPv6 address is not known yet", forward.id)
            return None
        flows = self.udp_flows
        source = self._guest_source(
            client[0], client[1], lambda src, port: (guest, gport, src, port) in flows
        )
        if source is None:
            self.counters["udp-flows-refused"] += 1
            return None
        flow = UdpForwardFlow(forward, client, guest, source[0], source[1], now)
        flows[flow.guest_key] = flow
        self.udp_clients[(forward.id, client)] = flow
        forward.opened += 1
        self.counters["udp-flows-opened"] += 1
        log.info(
            "forward %d: udp client %s:%d appears as %s",
            forward.id,
            client[0],
            client[1],
            endpoint(source[0], source[1]),
        )
        if self._sweep_at is None:
            self._sweep_at = now + SWEEP_INTERVAL
        return flow

    def _drop_udp(self, client_key, flow: UdpForwardFlow) -> None:
        del self.udp_clients[client_key]
        self.udp_flows.pop(flow.guest_key, None)

    def expire(self, now: float) -> None:
        timeout = self.config.udp_idle_timeout
        for key, flow in list(self.udp_clients.items()):
            if now - flow.last_active >= timeout:
                self._drop_udp(key, flow)
                self.counters["udp-flows-expired"] += 1

    # ------------------------------------------------------------ TCP
    def _accept(self, forward: Forward, now: float) -> None:
        nat = self.tcp
        descriptors = self.loop.descriptors
        for _ in range(ACCEPT_BATCH):
            try:
                sock, client = forward.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: shed a client, or rest
                if self.guard.accept_failed(forward.sock, exc, now):
                    self._pause(forward, now)
                return
            if not descriptors.acquire():  # evicts an idle UDP flow first
                self.counters["tcp-connections-refused"] += 1
                _reset(sock)
                continue
            try:
                connected = self._connect_guest(nat, forward, sock, client, now)
            except BaseException:
                descriptors.release()
                _reset(sock)
                raise
            if not connected:
                descriptors.release()
                self.counters["tcp-connections-refused"] += 1
                _reset(sock)

    def _connect_guest(self, nat, forward: Forward, sock, client, now: float) -> bool:
        """Open the guest side of an accepted client; False to refuse it."""
        if len(nat.flows) >= self.config.tcp_max_connections:
            log.warning(
                "forward %d: %d connections open, client refused", forward.id, len(nat.flows)
            )
            return False
        tcp = nat.tcp
        guest, gport = self._guest_of(forward), forward.guest_port
        if guest is None:
            log.info("forward %d: the guest's IPv6 address is not known yet", forward.id)
            return False
        connections = tcp.connections
        source = self._guest_source(
            client[0], client[1], lambda src, port: (guest, gport, src, port) in connections
        )
        if source is None:
            return False
        conn = tcp.connect(source[0], source[1], guest, gport, now)
        if conn is None:  # the connection table is full
            return False
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_NODELAY, 1)
        except OSError:
            pass
        # The client is connected already; reading it starts once the guest
        # has answered (on_tcp_connected), so its bytes wait in the kernel.
        flow = nat.adopt(conn, sock, client)
        self.tcp_flows[flow] = forward.id
        forward.opened += 1
        self.counters["tcp-connections-opened"] += 1
        log.info(
            "forward %d: tcp client %s:%d appears as %s",
            forward.id,
            client[0],
            client[1],
            endpoint(source[0], source[1]),
        )
        if len(self.tcp_flows) > 2 * len(nat.flows) + 64:
            self._prune_tcp()
        return True

    def on_tcp_connected(self, event, now: float) -> None:
        """The guest accepted a forwarded connection: relay both ways."""
        flow = event.conn.user
        if flow is None or flow not in self.tcp_flows or flow.closed:
            return
        self.tcp.start_relay(flow)

    def _prune_tcp(self) -> None:
        for flow in [f for f in self.tcp_flows if f.closed]:
            del self.tcp_flows[flow]

    # ------------------------------------------------------------ inventory
    def connections(self, now: float) -> list[dict]:
        """The UDP flows of forwards (TCP ones are listed with the TCP NAT)."""
        out = []
        for flow in self.udp_clients.values():
            fwd = flow.forward
            out.append(
                {
                    "proto": "udp",
                    "forward": fwd.id,
                    "guest": endpoint(flow.guest, fwd.guest_port),
                    "host": _host_endpoint(flow.client),
                    "seen_as": endpoint(flow.src, flow.src_port),
                    "state": "open",
                    "bytes_from_guest": flow.bytes_from_guest,
                    "bytes_to_guest": flow.bytes_to_guest,
                    "age": round(now - flow.opened_at, 3),
                    "idle": round(now - flow.last_active, 3),
                }
            )
        return out

    # ------------------------------------------------------------ timers
    def next_deadline(self):
        return self._sweep_at

    def handle_timer(self, now: float) -> None:
        self.expire(now)
        self._sweep_at = now + SWEEP_INTERVAL if self.udp_clients else None

    def close(self) -> None:
        for forward_id in list(self.forwards):
            self.remove(forward_id)
        self.guard.close()


def _reset(sock: socket.socket) -> None:
    """Close a client socket with a RST."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()


def _host_endpoint(sockaddr) -> str:
    """A host socket address (v4 or v6 tuple) as address:port text."""
    if ":" in sockaddr[0]:
        return f"[{sockaddr[0]}]:{sockaddr[1]}"
    return f"{sockaddr[0]}:{sockaddr[1]}"


def list_connections(loop, now: float) -> list[dict]:
    """Every flow the python backend carries, for the API's list_connections:
    UDP NAT flows, TCP connections (guest-opened and forwarded) and the UDP
    flows of forwards. Bytes are payload bytes; ages and idle times seconds.
    TCP entries carry the connection's RTT, RTO, windows and so on as well
    (TcpConnection.info)."""
    out = []
    for flow in loop.udp.flows.values():
        try:
            host = flow.sock.getsockname()
        except OSError:
            host = ("?", 0)
        out.append(
            {
                "proto": "udp",
                "flow": flow.name,
                "guest": endpoint(flow.guest, flow.guest_port),
                "host": _host_endpoint(host),
                "state": "open",
                "bytes_from_guest": flow.bytes_from_guest,
                "bytes_to_guest": flow.bytes_to_guest,
                "age": round(now - flow.opened_at, 3),
                "idle": round(now - flow.last_active, 3),
            }
        )
    forwarded = loop.forwards.tcp_flows
    for flow in list(loop.tcp.flows):
        conn = flow.conn
        state = conn.state.name.replace("_", "-")  # RFC 9293 spelling: SYN-SENT
        entry = {
            "proto": "tcp",
            "flow": conn.describe(),
            "guest": endpoint(conn.remote, conn.remote_port),
            "host": _host_endpoint(flow.host),
            "state": "CONNECTING" if flow.connecting else state,
            "bytes_from_guest": conn.bytes_in,
            "bytes_to_guest": conn.bytes_out,
            "idle": round(max(0.0, now - conn.last_rx), 3),
            "age": round(max(0.0, now - flow.opened_at), 3),
        }
        entry.update(conn.info())
        forward_id = forwarded.get(flow)
        if forward_id is not None:
            entry["forward"] = forward_id
            entry["seen_as"] = endpoint(conn.local, conn.local_port)
        out.append(entry)
    out.extend(loop.forwards.connections(now))
    return out
