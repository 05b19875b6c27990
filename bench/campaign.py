"""A campaign of hostile frames into one stack, in-process.

    python3 bench/campaign.py                 # 1,000,000 frames, seed 1
    python3 bench/campaign.py --frames 50000 --seed 7

Every wire format the stack parses goes in, in both address families:
Ethernet, ARP, IPv4 (options, fragments), IPv6 (extension headers,
fragments), ICMP, ICMPv6 and neighbour discovery, UDP, TCP, and the virtio
header of an offloading TAP; as frames captured from Linux, frames built
with hostile field values, and mutations of both (bit flips, header bytes
set to edge values, truncation, junk appended, fragment fields), half of
them with checksums repaired so that the damage reaches the deeper layers.
Among them live TCP connections in both families carry data both ways with
the right sequence numbers, are closed and reopened, so that mutated
segments meet real state.

At the end it prints the internal errors (must be 0), the drops by reason,
the counters, and what the stack still holds (connections, bytes charged to
the memory budget, reassembly, ARP and ND queues); it exits 1 on an internal
error or a bound broken. tests/test_campaign.py runs a short campaign.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyslirp.stack import checksum, ipv4, ipv6, tcp, udp, virtio  # noqa: E402
from pyslirp.stack.config import (
    StackConfig,  # noqa: E402
    TcpConfig,  # noqa: E402
)
from pyslirp.stack.events import TcpConnectRequested, TcpDataReceived  # noqa: E402
from pyslirp.stack.interface import Stack  # noqa: E402
from pyslirp.stack.tcp_connection import TcpState  # noqa: E402
from tests import guest_frames, ipv6_frames  # noqa: E402
from tests.test_fuzz import mutate, repair_checksums, seed_frames  # noqa: E402

GUEST_MAC = bytes.fromhex("020000000064")
GW_MAC = bytes.fromhex("52550a000202")
GW6_MAC = bytes.fromhex("525600000002")
GUEST4 = bytes([10, 0, 2, 100])
GUEST6 = ipv6_frames.GUEST_GLOBAL
PEERS4 = [bytes([198, 51, 100, 7]), bytes([10, 0, 2, 2]), bytes([203, 0, 113, 9])]
PEERS6 = [bytes.fromhex("20010db8" + "0" * 23 + "7"), bytes.fromhex("fd00" + "0" * 26 + "02")]
E = 14
ETH4 = GW_MAC + GUEST_MAC + b"\x08\x00"
ETH6 = GW6_MAC + GUEST_MAC + b"\x86\xdd"
MASK = 0xFFFFFFFF
# Live connections the scripted guest keeps open at once.
LIVE_CONNECTIONS = 24


def tcp_frame(src, dst, sport, dport, seq, ack, flags, payload=b"", window=0xFFFF, options=b""):
    """A guest frame, right in every checksum (an input, so built with our
    emitters for speed: the campaign checks robustness, not encoding)."""
    segment = tcp.emit(src, dst, sport, dport, seq & MASK, ack & MASK, flags, window, options,
                       payload)  # fmt: skip
    if len(src) == 4:
        return ETH4 + ipv4.header(src, dst, tcp.PROTOCOL, len(segment), 1, 64, ipv4.FLAG_DF) + (
            segment
        )
    return ETH6 + ipv6.header(src, dst, tcp.PROTOCOL, len(segment)) + segment


def repair6(frame: bytearray) -> None:
    """Fix the transport checksum of an IPv6 frame with no extension header."""
    if len(frame) < E + 48 or frame[12:14] != b"\x86\xdd":
        return
    size = int.from_bytes(frame[E + 4 : E + 6], "big")
    proto = frame[E + 6]
    if len(frame) < E + 40 + size or proto not in (6, 17, 58):
        return
    at = {6: 16, 17: 6, 58: 2}[proto]
    if size < at + 2:
        return
    body = frame[E + 40 : E + 40 + size]
    body[at : at + 2] = b"\0\0"
    total = checksum.pseudo_header_sum(
        bytes(frame[E + 8 : E + 24]), bytes(frame[E + 24 : E + 40]), proto, size
    ) + checksum.partial_sum(body)
    frame[E + 40 + at : E + 40 + at + 2] = (checksum.finish(total) or 0xFFFF).to_bytes(2, "big")


def repair_tcp4(frame: bytearray) -> None:
    repair_checksums(frame)
    if len(frame) < E + 40 or frame[12:14] != b"\x08\x00" or frame[E + 9] != 6:
        return
    hl = (frame[E] & 0x0F) * 4
    total = int.from_bytes(frame[E + 2 : E + 4], "big")
    if hl < 20 or total < hl + 20 or len(frame) < E + total:
        return
    body = frame[E + hl : E + total]
    body[16:18] = b"\0\0"
    sum_ = checksum.pseudo_header_sum(
        bytes(frame[E + 12 : E + 16]), bytes(frame[E + 16 : E + 20]), 6, len(body)
    ) + checksum.partial_sum(body)
    frame[E + hl + 16 : E + hl + 18] = checksum.finish(sum_).to_bytes(2, "big")


def seeds6() -> list[bytes]:
    """IPv6 frames from Linux and a few built: ND, echo, UDP, fragments,
    extension headers."""
    out = [
        ipv6_frames.MLD_REPORT_UNSPECIFIED,
        ipv6_frames.DAD_SOLICITATION,
        ipv6_frames.ROUTER_SOLICITATION,
        ipv6_frames.ECHO_TO_GATEWAY,
    ]
    for name in dir(ipv6_frames):
        value = getattr(ipv6_frames, name)
        if name.isupper() and isinstance(value, bytes) and len(value) > 54 and value not in out:
            out.append(value)
    dns6 = bytes.fromhex("fd00" + "0" * 26 + "03")
    for dst in (PEERS6[0], dns6):
        datagram = udp.emit(GUEST6, dst, 40000, 53, b"\x12\x34\x01\x00\x00\x01" + bytes(20))
        out.append(ETH6 + ipv6.header(GUEST6, dst, udp.PROTOCOL, len(datagram)) + datagram)
    big = udp.emit(GUEST6, PEERS6[0], 40001, 9, bytes(3000))
    for packet in ipv6.fragment(GUEST6, PEERS6[0], udp.PROTOCOL, big, 77, 1280):
        out.append(ETH6 + packet)
    # Hop-by-hop with an unknown option of each action, a routing header.
    for kind in (0x1E, 0x5E, 0x9E, 0xDE):
        ext = bytes((17, 0, kind, 4)) + bytes(4)
        datagram = udp.emit(GUEST6, PEERS6[0], 40002, 9, b"opt")
        out.append(ETH6 + ipv6.header(GUEST6, PEERS6[0], 0, 8 + len(datagram)) + ext + datagram)
    routing = bytes((17, 0, 0, 1)) + bytes(4)
    datagram = udp.emit(GUEST6, PEERS6[0], 40003, 9, b"rt")
    out.append(ETH6 + ipv6.header(GUEST6, PEERS6[0], 43, 8 + len(datagram)) + routing + datagram)
    return out


class Guest:
    """The scripted guest's live TCP connections (both families)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.conns: dict = {}  # (src, sport, dst, dport) -> [guest seq, conn or None]
        self.next_port = 20000
        self.opened = 0

    def syn(self) -> bytes:
        v6 = self.rng.random() < 0.5
        src = GUEST6 if v6 else GUEST4
        dst = self.rng.choice(PEERS6 if v6 else PEERS4)
        self.next_port = 20000 + (self.next_port - 19999) % 40000
        key = (src, self.next_port, dst, self.rng.choice((80, 443, 22)))
        isn = self.rng.getrandbits(32)
        self.conns[key] = [isn + 1, None]
        self.opened += 1
        options = tcp.build_options(1460, 7, True, (self.rng.getrandbits(32), 0))
        return tcp_frame(src, key[2], key[1], key[3], isn, 0, tcp.SYN, b"", 64240, options)

    def segment(self) -> bytes | None:
        """In-order data, a plain ACK, a FIN or a RST on a live connection."""
        live = [(key, entry) for key, entry in self.conns.items() if entry[1] is not None]
        if not live:
            return None
        key, entry = self.rng.choice(live)
        conn = entry[1]
        src, sport, dst, dport = key
        if conn.state is TcpState.CLOSED:
            del self.conns[key]
            return None
        pick = self.rng.random()
        ack = conn.snd_nxt  # what the stack has sent: acknowledge all of it
        seq = entry[0]
        if pick < 0.03:
            del self.conns[key]
            return tcp_frame(src, dst, sport, dport, seq, ack, tcp.RST | tcp.ACK)
        if pick < 0.06:
            entry[0] = (seq + 1) & MASK
            return tcp_frame(src, dst, sport, dport, seq, ack, tcp.FIN | tcp.ACK)
        payload = self.rng.randbytes(self.rng.choice((0, 1, 100, 1400))) if pick < 0.8 else b""
        entry[0] = (seq + len(payload)) & MASK
        return tcp_frame(src, dst, sport, dport, seq, ack, tcp.ACK | tcp.PSH, payload)

    def handshake_ack(self, conn) -> bytes:
        key = (conn.remote, conn.remote_port, conn.local, conn.local_port)
        entry = self.conns.get(key)
        seq = entry[0] if entry else conn.irs + 1
        return tcp_frame(conn.remote, conn.local, conn.remote_port, conn.local_port, seq,
                         conn.iss + 1, tcp.ACK)  # fmt: skip


def vnet_wrap(rng: random.Random, frame: bytes) -> bytes:
    """A virtio header before the frame: plain, NEEDS_CSUM, GSO, or junk."""
    pick = rng.random()
    if pick < 0.4:
        head = virtio.NO_OFFLOAD
    elif pick < 0.7:
        head = virtio.HEADER.pack(virtio.F_NEEDS_CSUM, 0, 0, 0, 34, 16)
    elif pick < 0.9:
        gso = rng.choice((virtio.GSO_TCPV4, virtio.GSO_TCPV6, virtio.GSO_UDP, 0x85))
        head = virtio.HEADER.pack(virtio.F_NEEDS_CSUM, gso, 54, rng.choice((0, 1, 1448)), 34, 16)
    else:
        head = rng.randbytes(10)
    return head + frame


def run_campaign(frames: int, seed: int = 1, progress=None) -> dict:
    """Feed ``frames`` frames; return the result (see the module docstring)."""
    rng = random.Random(seed)
    tcp_config = TcpConfig(max_connections=256, receive_buffer=256 * 1024)
    config = StackConfig(ipv6=True, guest_probe_delays=(), tcp=tcp_config)
    stack = Stack(config, random.Random(seed + 1))
    layer = stack.tcp
    stack.learn_neighbor(GUEST6, GUEST_MAC)
    seeds4 = seed_frames() + [guest_frames.ARP_REQUEST]
    v6 = seeds6()
    guest = Guest(rng)
    conns: list = []
    kinds: Counter = Counter()
    now = 1.0
    out_frames = 0
    delivered = 0  # bytes from the guest's live connections taken by the NAT side
    started = time.monotonic()
    for i in range(frames):
        pick = rng.random()
        frame = None
        if pick < 0.04:
            if len(guest.conns) >= LIVE_CONNECTIONS:  # forget SYNs never answered
                guest.conns = {k: e for k, e in guest.conns.items() if e[1] is not None}
            if len(guest.conns) < LIVE_CONNECTIONS:
                frame, kind = guest.syn(), "tcp-syn"
        elif pick < 0.20:
            frame, kind = guest.segment(), "tcp-live"
            if frame is not None and rng.random() < 0.3:
                mutated = bytearray(frame)
                at = rng.randrange(E + 20, min(len(mutated), E + 80))
                mutated[at] = rng.randrange(256)
                (repair6 if mutated[12:14] == b"\x86\xdd" else repair_tcp4)(mutated)
                frame, kind = bytes(mutated), "tcp-live-mutated"
        if frame is None:
            if pick < 0.55:
                frame, kind = mutate(rng, seeds4), "ipv4-mutated"
            else:
                frame = bytearray(mutate(rng, v6))
                if rng.random() < 0.5:
                    repair6(frame)
                frame, kind = bytes(frame), "ipv6-mutated"
        kinds[kind] += 1
        if rng.random() < 0.05:
            stack.receive_vnet_frame(vnet_wrap(rng, frame), now)
        else:
            stack.receive_frame(frame, now)
        event = stack.next_event()
        while event is not None:
            if isinstance(event, TcpConnectRequested):
                conn = event.conn
                if rng.random() < 0.85:
                    layer.accept(conn, now)
                    key = (conn.remote, conn.remote_port, conn.local, conn.local_port)
                    entry = guest.conns.get(key)
                    if entry is not None:
                        entry[1] = conn
                        conns.append(conn)
                        stack.receive_frame(guest.handshake_ack(conn), now)
                else:
                    layer.refuse(conn, now, icmp_code=rng.choice((None, 1, 13)))
                    guest.conns.pop((conn.remote, conn.remote_port, conn.local, conn.local_port),
                                    None)  # fmt: skip
            elif isinstance(event, TcpDataReceived):
                conn = event.conn
                delivered += conn.rx_bytes
                if conn.rx_bytes:
                    layer.consume(conn, conn.rx_bytes, now)
            event = stack.next_event()
        if i % 5 == 0 and conns:
            # The NAT side: data toward the guest, now and then a close.
            conn = rng.choice(conns)
            if conn.state is TcpState.CLOSED:
                conns.remove(conn)
            elif rng.random() < 0.02:
                layer.close(conn, now)
            else:
                layer.send(conn, rng.randbytes(rng.choice((10, 1000, 6000))), now)
        if i % 11 == 0:
            dst = rng.choice((GUEST4, GUEST6, bytes([10, 0, 2, 15])))
            src = bytes([10, 0, 2, 3]) if len(dst) == 4 else config.ipv6_dns
            stack.send_udp(src, 53, dst, 4000, rng.randbytes(rng.randrange(2000)), now)
        if i % 40 == 0:
            now += rng.choice((0.001, 0.01, 0.2, 1.0, 5.0))
            deadline = stack.get_timer()
            if deadline is not None and deadline <= now:
                stack.handle_timer(now)
        if i % 4 == 0:
            out_frames += len(stack.vnet_frames_to_send(now))
        if progress and i and i % 100_000 == 0:
            progress(f"{i} frames, {time.monotonic() - started:.0f} s, "
                     f"{stack.drops['internal-error']} internal errors")  # fmt: skip
        if stack.drops["internal-error"] and progress:
            progress(f"internal error at frame {i}: {stack.last_internal_error}")
            break
    # The end: let every timer run out (TIME-WAIT, reassembly, ARP, ND).
    for conn in list(layer.connections.values()):
        layer.abort(conn, now)
    for _ in range(200):
        now += 30.0
        stack.handle_timer(now)
        stack.frames_to_send(now)
        while stack.next_event() is not None:
            pass
    return {
        "frames": frames,
        "seconds": round(time.monotonic() - started, 1),
        "kinds": dict(kinds),
        "internal_errors": stack.drops["internal-error"],
        "last_internal_error": stack.last_internal_error,
        "drops": dict(stack.drops.most_common()),
        "counters": dict((stack.counters + layer.counters).most_common()),
        "tcp_bytes_delivered": delivered,
        "connections_opened": guest.opened,
        "connections_left": len(layer.connections),
        "frames_out": out_frames,
        "held_bytes": stack.budget.held,
        "held_by": stack.memory_held(),
        "peak_held_bytes": stack.budget.peak,
        "reassembly_datagrams": len(stack.reassembler),
        "arp_pending": len(stack.arp_pending),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    result = run_campaign(args.frames, args.seed, progress=lambda text: print(text, flush=True))
    print(f"frames: {result['frames']} in {result['seconds']} s; kinds: {result['kinds']}")
    print(f"internal errors: {result['internal_errors']} {result['last_internal_error']}")
    print(f"connections opened: {result['connections_opened']}, "
          f"left at the end: {result['connections_left']}")  # fmt: skip
    print(f"frames out: {result['frames_out']}; "
          f"TCP bytes from the guest delivered: {result['tcp_bytes_delivered']}")  # fmt: skip
    print(f"held at the end: {result['held_bytes']} bytes {result['held_by']}, "
          f"peak {result['peak_held_bytes']}; reassembly {result['reassembly_datagrams']}, "
          f"ARP pending {result['arp_pending']}")  # fmt: skip
    print("drops by reason:")
    for reason, count in result["drops"].items():
        print(f"  {count:9d} {reason}")
    print("counters:")
    for name, count in result["counters"].items():
        print(f"  {count:9d} {name}")
    bad = result["internal_errors"] or result["held_bytes"] or result["connections_left"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
