"""The overlapping-GSO attack from inside a guest namespace, through the TAP.

Run in the namespace (``nsenter --net=PATH python3 -m tests.gso_attack``):
a raw AF_PACKET socket on tap0 makes ``--connections`` TCP handshakes with
hand-made frames (from an address the namespace's kernel does not own, so
it stays out of the way), then on each connection sends one full segment
and after it segments of MTU size that start 1 KiB short of their length
before RCV.NXT: each brings 1 KiB of new data and a whole frame to keep.
It prints one JSON line of what it did and, if ``--hold``, waits for its
stdin to close before it exits, so that the connections stay open (the
host peer never reads) while the forwarder's memory is measured.
"""

import argparse
import json
import select
import socket
import struct
import sys
import time

from tests.tcp_craft import ACK, PSH, RST, SYN, syn_options, tcp_frame

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
MAC = bytes.fromhex("0200000000aa")
ADDR = bytes([10, 0, 2, 123])
GATEWAY = bytes([10, 0, 2, 2])
GATEWAY_MAC = bytes.fromhex("52550a000202")


class Flow:
    def __init__(self, port: int) -> None:
        self.port = port
        self.isn = 1_000_000 * (port % 1000)
        self.our = 0  # the forwarder's ISS + 1, once known
        self.acked = 0  # data bytes acknowledged
        self.window = 0
        self.sent = 0  # segments sent
        self.stalled = 0  # segments sent since acked last moved
        self.last_acked = 0
        self.done = False


def frame(flow: Flow, dst_port: int, offset: int, flags: int, payload=b"", options=b"") -> bytes:
    return tcp_frame(
        MAC, GATEWAY_MAC, ADDR, GATEWAY, flow.port, dst_port, flow.isn + 1 + offset,
        flow.our, flags, payload, window=0xFFFF, options=options,
    )  # fmt: skip


def read_frames(sock, flows: dict, dst_port: int, wait: float) -> None:
    """Take in the forwarder's segments for our flows for up to ``wait``
    seconds (returns at the first quiet moment after the first frame)."""
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return
        while True:
            try:
                data, addr = sock.recvfrom(70000, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if addr[2] == PACKET_OUTGOING or len(data) < 54 or data[12:14] != b"\x08\x00":
                continue
            if data[23] != 6 or data[26:30] != GATEWAY or data[30:34] != ADDR:
                continue
            at = 14 + (data[14] & 0x0F) * 4
            sport, dport, seq, ack, _doff, flags, window = struct.unpack_from(
                "!HHIIBBH", data, at
            )
            flow = flows.get(dport)
            if flow is None or sport != dst_port:
                continue
            if flags & RST:
                flow.done = True
            elif flags & SYN:
                flow.our = seq + 1
                flow.window = window
            else:
                flow.acked = max(flow.acked, (ack - flow.isn - 1) & 0xFFFFFFFF)
                flow.window = window << 5  # the forwarder's scale for its 1 MiB buffer
        wait = 0.0
        deadline = min(deadline, time.monotonic() + 0.001)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--segments", type=int, default=3000)  # per connection, at most
    ap.add_argument("--stall", type=int, default=100)  # sends without progress: done
    ap.add_argument("--mtu", type=int, default=65520)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--hold", action="store_true")
    args = ap.parse_args()
    size = args.mtu - 40  # no TCP options after the SYN
    stream = bytes(i % 251 for i in range(2 * 1024 * 1024 + size))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind(("tap0", 0))
    flows = {50000 + i: Flow(50000 + i) for i in range(args.connections)}
    deadline = time.monotonic() + args.seconds
    for flow in flows.values():  # handshakes
        for _attempt in range(5):
            sock.send(frame(flow, args.port, -1, SYN, options=syn_options(size, 7)))
            read_frames(sock, flows, args.port, 1.0)
            if flow.our:
                break
        if not flow.our:
            flow.done = True
            continue
        sock.send(frame(flow, args.port, 0, ACK))
        sock.send(frame(flow, args.port, 0, ACK | PSH, stream[:size]))  # honest, full
        flow.sent = 1
    read_frames(sock, flows, args.port, 0.05)
    while time.monotonic() < deadline:
        busy = [f for f in flows.values() if not f.done and f.our]
        if not busy:
            break
        for flow in busy:
            if flow.acked != flow.last_acked:
                flow.last_acked = flow.acked
                flow.stalled = 0
            if flow.sent >= args.segments or flow.window < 1024 or flow.stalled > args.stall:
                flow.done = True
                continue
            flow.stalled += 1
            start = max(flow.acked - (size - 1024), 0)
            sock.send(frame(flow, args.port, start, ACK | PSH, stream[start : start + size]))
            flow.sent += 1
        read_frames(sock, flows, args.port, 0.005)
    report = {
        "connections": sum(1 for f in flows.values() if f.our),
        "segments": sum(f.sent for f in flows.values()),
        "acked": sum(f.acked for f in flows.values()),
        "frame_bytes": sum(f.sent for f in flows.values()) * (size + 54),
    }
    print(json.dumps(report), flush=True)
    if args.hold:
        sys.stdin.read()  # until the test closes our stdin
    for flow in flows.values():
        if flow.our:
            sock.send(frame(flow, args.port, flow.acked, RST | ACK))
    sock.close()


if __name__ == "__main__":
    main()
