"""The floor under our forwarder: a relay that does only what it must.

    python3 bench/floor.py [the forwarder's options] PID|PATH TAP

runs the forwarder's own front end (namespace, TAP with offloads, address,
route, ready fd) with its event loop replaced by ``relay`` below, which
carries request/response and connect/close TCP between the guest and the
host with the same system calls per connection as the python backend
(one TAP read per frame, ``socket``, two ``setsockopt``, two ``connect``,
``epoll_ctl``, ``shutdown``, ``recv``, ``close``, a ``writev`` per frame)
and as little Python as it takes to answer a well-behaved guest: no
checksum or sequence checks, no timers, no retransmission, no window, no
options but the MSS. It polls as the python backend's loop does (busy
polling for ``--busy-poll`` µs before it sleeps). Frames it does not relay
(ARP, neighbour discovery) go to the real stack.

It is a measuring stick, not a forwarder: ``bench/run.py --backend
python-floor`` runs it beside the others (tests rr and cc only), and the
distance from its CPU per transaction or connection to the python
backend's is what our stack, NAT and loop cost above what any Python
relay making those calls must spend. Nothing here is used by pyslirp.
"""

import os
import select
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyslirp.nat import loop as loop_module  # noqa: E402
from pyslirp.stack import checksum, ipv4, tcp, virtio  # noqa: E402
from pyslirp.stack.tcp import ACK, FIN, PSH, RST, SYN  # noqa: E402

MASK = 0xFFFFFFFF
VNET = virtio.HEADER_LEN
IP_AT = VNET + 14  # the IPv4 header in a frame read from the TAP
TCP_AT = IP_AT + 20  # the TCP header (no IP options: others go to the stack)
_IN = struct.Struct("!HHIIBB")  # ports, sequence, acknowledgment, offset, flags
_TCP = struct.Struct("!HHIIBBHHH")
_MSS = struct.Struct("!HH")


class Flow:
    """One relayed connection: the host socket and the two sequence numbers."""

    __slots__ = (
        "sock",
        "guest",
        "guest_port",
        "port",
        "mac",
        "pseudo",
        "rcv_nxt",
        "snd_nxt",
        "fins",
    )

    def __init__(self, sock, guest, guest_port, port, mac, pseudo, rcv_nxt, snd_nxt) -> None:
        self.sock = sock
        self.guest = guest
        self.guest_port = guest_port
        self.port = port
        self.mac = mac
        self.pseudo = pseudo  # the pseudo-header's sum of addresses and protocol
        self.rcv_nxt = rcv_nxt  # the guest's next sequence number
        self.snd_nxt = snd_nxt  # ours
        self.fins = 0  # 1: the guest's FIN came, 2: ours went


def relay(loop) -> None:
    """Loop.run's stand-in (see the module's docstring)."""
    if not loop.vnet:
        raise SystemExit("bench/floor.py needs the TAP's offloads (not --no-offload)")
    stack = loop.stack
    gateway = stack.config.gateway
    gateway_mac = stack.gateway_mac
    mss = stack.config.mtu - 40
    tap, stop_fd, epoll = loop.tap_fd, loop.stop_fd, loop.epoll
    flows: dict = {}  # (guest address, guest port, port) -> Flow
    by_fd: dict = {}  # host socket's fd -> key
    headers = {n: virtio.tcp_header(14, 20, n, virtio.GSO_NONE, 0) for n in (20, 24)}
    isn = 1

    def send(flow, flags, payload=b"", seq=None) -> None:
        options = _MSS.pack(0x0204, mss) if flags & SYN else b""
        length = 20 + len(options) + len(payload)
        pseudo = flow.pseudo + length
        head = _TCP.pack(
            flow.port,
            flow.guest_port,
            flow.snd_nxt if seq is None else seq,
            flow.rcv_nxt,
            (20 + len(options)) << 2,
            flags,
            65535,
            pseudo % 0xFFFF,  # the guest's kernel completes it (NEEDS_CSUM)
            0,
        )
        ip = ipv4.header(gateway, flow.guest, tcp.PROTOCOL, length, 0, flags_offset=ipv4.FLAG_DF)
        frame = flow.mac + gateway_mac + b"\x08\x00" + ip + head + options + payload
        os.writev(tap, (headers[20 + len(options)], frame))

    def close_host(flow) -> None:
        """Both directions are done on the host: the socket goes (no epoll_ctl)."""
        if flow.sock is not None:
            by_fd.pop(flow.sock.fileno(), None)
            flow.sock.close()
            flow.sock = None

    def forget(key, flow) -> None:
        close_host(flow)
        del flows[key]

    def guest_segment(data) -> None:
        nonlocal isn
        port, dport, seq, ack, offset, flags = _IN.unpack_from(data, TCP_AT)
        key = (data[IP_AT + 12 : IP_AT + 16], port, dport)
        flow = flows.get(key)
        if flags & RST:
            if flow is not None:
                forget(key, flow)
            return
        if flags & SYN:
            if flow is not None:  # repeated: answer again
                send(flow, SYN | ACK, seq=(flow.snd_nxt - 1) & MASK)
                return
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.connect_ex(("127.0.0.1", dport))  # loopback: done inside connect()
            isn = (isn + 64007) & MASK
            pseudo = checksum.partial_sum(gateway + key[0]) + tcp.PROTOCOL
            mac = data[VNET + 6 : VNET + 12]
            flow = Flow(sock, key[0], port, dport, mac, pseudo, seq + 1, isn)
            if sock.connect_ex(("127.0.0.1", dport)) not in (0, 106):  # EISCONN
                send(flow, RST | ACK)
                sock.close()
                return
            flows[key] = flow
            by_fd[sock.fileno()] = key
            epoll.register(sock.fileno(), select.EPOLLIN)
            send(flow, SYN | ACK)
            flow.snd_nxt = (isn + 1) & MASK
            return
        if flow is None:
            return
        payload = data[TCP_AT + (offset >> 4) * 4 :]
        if payload and flow.sock is not None:
            flow.sock.send(payload)
            flow.rcv_nxt = (seq + len(payload)) & MASK
        if flags & FIN and not flow.fins & 1:
            flow.fins |= 1
            flow.rcv_nxt = (flow.rcv_nxt + 1) & MASK
            if flow.fins & 2:  # ours went first: acknowledge theirs
                send(flow, ACK)
                close_host(flow)  # its close() sends the FIN
            else:
                flow.sock.shutdown(socket.SHUT_WR)
        if flow.fins == 3 and ack == flow.snd_nxt:
            forget(key, flow)

    def host_readable(fd) -> None:
        key = by_fd.get(fd)
        if key is None:
            return
        flow = flows[key]
        try:
            data = flow.sock.recv(65536)
        except OSError:
            send(flow, RST | ACK)
            forget(key, flow)
            return
        if data:
            for at in range(0, len(data), mss):
                piece = data[at : at + mss]
                send(flow, PSH | ACK, piece)
                flow.snd_nxt = (flow.snd_nxt + len(piece)) & MASK
            return
        if flow.fins & 1:  # the guest's FIN went on already
            close_host(flow)
        else:  # keep the socket for the guest's FIN, unwatched
            epoll.unregister(fd)
            del by_fd[fd]
        send(flow, FIN | ACK)
        flow.snd_nxt = (flow.snd_nxt + 1) & MASK
        flow.fins |= 2

    busy = loop.config.busy_poll  # as the python backend's loop: spin, then sleep

    def wait() -> list:
        ready = epoll.poll(0)
        limit = time.monotonic() + busy
        while not ready and time.monotonic() < limit:
            ready = epoll.poll(0)
        return ready or epoll.poll()

    while True:
        for fd, _events in wait():
            if fd == tap:
                for _ in range(64):
                    try:
                        data = os.read(tap, 70000)
                    except BlockingIOError:
                        break
                    if (
                        data[VNET + 12 : VNET + 14] == b"\x08\x00"
                        and data[IP_AT] == 0x45
                        and data[IP_AT + 9] == 6
                        and data[IP_AT + 16 : IP_AT + 20] == gateway
                    ):
                        guest_segment(data)
                    else:  # ARP, neighbour discovery...: the stack answers
                        now = time.monotonic()
                        stack.receive_vnet_frame(data, now)
                        stack.drain_events()
                        loop.flush(now)
            elif fd == stop_fd:
                return
            else:
                host_readable(fd)


if __name__ == "__main__":
    loop_module.Loop.run = relay
    from forwarder.cli import main

    main()
