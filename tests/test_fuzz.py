"""Random and mutated frames into ``receive_frame``: nothing escapes, no
internal error is counted, every bound holds, and what the stack sends is
well formed.

Seeded and bounded: each test feeds a fixed number of frames (20,000 in the
main run) and takes a few seconds. Mutations that would only ever die at the
first checksum are followed by a checksum repair half of the time, so that
the deeper layers (reassembly, ICMP, UDP) see the damage too.
"""

import random
import struct

import pytest
from scapy.layers.inet import ICMP, IP, UDP, IPOption, fragment
from scapy.layers.l2 import ARP, Ether

from pyslirp.stack import checksum
from pyslirp.stack.config import StackConfig
from pyslirp.stack.interface import Stack
from tests.guest_frames import (
    ARP_REPLY,
    ARP_REQUEST,
    ECHO_TO_GATEWAY,
    ECHO_WITH_OPTIONS,
    UDP_FRAGMENTS,
    UDP_ONE_BYTE,
    UDP_TO_DNS,
)

GUEST = "10.0.2.100"
GUEST_MAC = "02:00:00:00:00:64"
GW_MAC = "52:55:0a:00:02:02"
E = 14


def guest(pkt, dst=GW_MAC) -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst=dst) / pkt)


def seed_frames() -> list[bytes]:
    seeds = [
        ARP_REQUEST,
        ARP_REPLY,
        ECHO_TO_GATEWAY,
        ECHO_WITH_OPTIONS,
        UDP_TO_DNS,
        UDP_ONE_BYTE,
        *UDP_FRAGMENTS,
        guest(IP(src=GUEST, dst="198.51.100.7", ttl=1) / UDP(dport=9) / b"ttl"),
        guest(IP(src=GUEST, dst="198.51.100.7", proto=47) / b"gre"),
        guest(IP(src=GUEST, dst="198.51.100.7", flags="DF") / ICMP() / bytes(1600)),
        guest(IP(src=GUEST, dst="10.0.2.255") / UDP(dport=67) / bytes(300), "ff:ff:ff:ff:ff:ff"),
        guest(IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67) / bytes(300)),
        guest(IP(src=GUEST, dst="198.51.100.7") / ICMP(type=3, code=1) / bytes(28)),
        guest(IP(src=GUEST, dst="10.0.2.3", options=IPOption(b"\x01" * 8)) / UDP() / b"o"),
        guest(IP(src="198.51.100.9", dst="10.0.2.2") / ICMP() / b"spoofed"),
        guest(ARP(op=1, hwsrc=GUEST_MAC, psrc="10.0.2.77", pdst="10.0.2.3"), "ff:ff:ff:ff:ff:ff"),
    ]
    big = IP(src=GUEST, dst="198.51.100.7", id=7) / UDP(dport=9) / bytes(5000)
    seeds += [guest(piece) for piece in fragment(big, fragsize=1000)]
    echo = IP(src=GUEST, dst="10.0.2.2", id=8) / ICMP() / bytes(3000)
    seeds += [guest(piece) for piece in fragment(echo, fragsize=512)]
    return seeds


def repair_checksums(frame: bytearray) -> None:
    """Make the IPv4 header (and, for an unfragmented UDP or ICMP packet, the
    transport) checksum right again after a mutation."""
    if len(frame) < E + 20 or frame[12:14] != b"\x08\x00":
        return
    hl = (frame[E] & 0x0F) * 4
    if hl < 20 or len(frame) < E + hl:
        return
    frame[E + 10 : E + 12] = b"\0\0"
    frame[E + 10 : E + 12] = checksum.checksum(frame[E : E + hl]).to_bytes(2, "big")
    total = int.from_bytes(frame[E + 2 : E + 4], "big")
    if total < hl or len(frame) < E + total or frame[E + 6] & 0x3F or frame[E + 7]:
        return
    body = frame[E + hl : E + total]
    proto = frame[E + 9]
    if proto == 1 and len(body) >= 8:
        body[2:4] = b"\0\0"
        frame[E + hl + 2 : E + hl + 4] = checksum.checksum(body).to_bytes(2, "big")
    elif proto == 17 and len(body) >= 8:
        length = int.from_bytes(body[4:6], "big")
        if 8 <= length <= len(body):
            body[6:8] = b"\0\0"
            total_sum = checksum.pseudo_header_sum(
                bytes(frame[E + 12 : E + 16]), bytes(frame[E + 16 : E + 20]), 17, length
            ) + checksum.partial_sum(body[:length])
            csum = checksum.finish(total_sum) or 0xFFFF
            frame[E + hl + 6 : E + hl + 8] = csum.to_bytes(2, "big")


def random_ipv4(rng: random.Random) -> bytes:
    """A well-formed IPv4 header with hostile field values."""
    ihl = rng.choice((5, 5, 5, 6, 15))
    payload = rng.randbytes(rng.choice((0, 1, 7, 8, 16, 64, 600, 1480)))
    total = ihl * 4 + len(payload)
    flags = rng.choice((0, 0x2000, 0x4000, 0x6000)) | rng.choice(
        (0, rng.randrange(0x2000), 0x1FFF, 1, 185)
    )
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        rng.randrange(256),
        total,
        rng.choice((1, 2, 3, rng.randrange(65536))),
        flags,
        rng.choice((0, 1, 2, 64, 255)),
        rng.choice((1, 6, 17, 17, 1, rng.randrange(256))),
        0,
        bytes([10, 0, 2, rng.choice((100, 15, 0, 255, rng.randrange(256)))]),
        rng.choice(
            (
                bytes([10, 0, 2, 2]),
                bytes([10, 0, 2, 3]),
                bytes([198, 51, 100, 7]),
                bytes([10, 0, 2, 255]),
                b"\xff\xff\xff\xff",
                bytes([224, 0, 0, 1]),
                rng.randbytes(4),
            )
        ),
    )
    frame = bytearray(bytes.fromhex(GW_MAC.replace(":", "")) + bytes.fromhex("020000000064"))
    frame += b"\x08\x00" + head + rng.randbytes((ihl - 5) * 4) + payload
    repair_checksums(frame)
    return bytes(frame)


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    choice = rng.random()
    if choice < 0.05:
        return rng.randbytes(rng.randrange(0, 200))
    if choice < 0.25:
        return random_ipv4(rng)
    frame = bytearray(rng.choice(seeds))
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(6)
        if op == 0 and frame:
            bit = rng.randrange(len(frame) * 8)
            frame[bit // 8] ^= 1 << (bit % 8)
        elif op == 1 and frame:
            # Header bytes matter most: aim there more often.
            limit = min(len(frame), rng.choice((E + 28, E + 64, len(frame))))
            frame[rng.randrange(limit)] = rng.choice((0, 0xFF, 1, 0x80, rng.randrange(256)))
        elif op == 2:
            del frame[rng.randrange(len(frame) + 1) :]
        elif op == 3:
            frame += rng.randbytes(rng.randrange(1, 40))
        elif op == 4 and len(frame) > 4:
            at = rng.randrange(len(frame) - 2)
            frame[at : at + 2] = rng.randbytes(2)
        elif op == 5 and len(frame) > E + 8:
            # A fragment field: offset and flags.
            frame[E + 6 : E + 8] = rng.randbytes(2)
    if rng.random() < 0.5:
        repair_checksums(frame)
    return bytes(frame)


def check_output(frames: list[bytes], mtu: int) -> None:
    for frame in frames:
        assert 14 < len(frame) <= 14 + mtu
        ethertype = frame[12:14]
        if ethertype == b"\x08\x06":
            assert len(frame) == 42
            continue
        assert ethertype == b"\x08\x00"
        hl = (frame[E] & 0x0F) * 4
        assert checksum.is_valid(frame[E : E + hl])
        assert int.from_bytes(frame[E + 2 : E + 4], "big") == len(frame) - E
        # Never an ICMP error to a broadcast, multicast or zero address.
        dst = frame[E + 16 : E + 20]
        if frame[E + 9] == 1 and frame[E + hl] in (3, 4, 5, 11, 12):
            assert dst not in (bytes(4), b"\xff\xff\xff\xff", bytes([10, 0, 2, 255]))
            assert dst[0] < 224


def check_bounds(stack: Stack, config: StackConfig) -> None:
    assert stack.drops["internal-error"] == 0, stack.last_internal_error
    reassembler = stack.reassembler
    assert len(reassembler) <= config.reassembly_max_datagrams
    assert 0 <= reassembler.held_bytes <= config.reassembly_max_bytes
    for entry in reassembler.datagrams.values():
        assert len(entry.pieces) <= config.reassembly_max_fragments
    assert len(stack.arp_pending) <= config.arp_pending_addresses
    for pending in stack.arp_pending.values():
        assert len(pending.packets) <= config.arp_queue_per_address
    assert len(stack.arp_cache) <= config.arp_cache_size


class FixedRandom:
    def getrandbits(self, bits: int) -> int:
        return 0x1000


def run_fuzz(seed: int, count: int, config: StackConfig) -> Stack:
    rng = random.Random(seed)
    stack = Stack(config, FixedRandom())
    seeds = seed_frames()
    now = 0.0
    for i in range(count):
        frame = mutate(rng, seeds)
        stack.receive_frame(frame, now)  # must not raise
        if i % 7 == 0:
            # The NAT side's commands, to guests known and unknown.
            dst = bytes([10, 0, 2, rng.choice((100, 15, 16, rng.randrange(256)))])
            stack.send_udp(
                bytes([10, 0, 2, 2]), 53, dst, 4000, rng.randbytes(rng.randrange(3000)), now
            )
        if i % 50 == 0:
            now += rng.choice((0.01, 0.5, 1.0, 31.0))
            deadline = stack.get_timer()
            if deadline is not None and deadline <= now:
                stack.handle_timer(now)
        check_output(stack.frames_to_send(now), config.mtu)
        while stack.next_event() is not None:
            pass
        check_bounds(stack, config)
    assert sum(stack.drops.values()) > count // 4  # most garbage is refused...
    assert stack.counters["frames-out"] > 0  # ...and some gets answered
    return stack


def test_fuzz_default_limits():
    stack = run_fuzz(seed=20240601, count=20000, config=StackConfig())
    # The mutations reach deep: reassembly and both transports saw frames.
    assert stack.counters["reassembled"] > 0
    assert stack.counters["udp-in"] > 0
    assert stack.counters["icmp-echo-answered"] > 0


@pytest.mark.parametrize("seed", [1, 2])
def test_fuzz_small_limits(seed):
    config = StackConfig(
        mtu=576,
        arp_queue_per_address=2,
        arp_pending_addresses=3,
        arp_cache_size=4,
        reassembly_max_datagrams=3,
        reassembly_max_bytes=4000,
        reassembly_max_fragments=4,
        reassembly_timeout=5.0,
    )
    stack = run_fuzz(seed=seed, count=5000, config=config)
    assert stack.drops["reassembly-datagrams-full"] + stack.drops["reassembly-memory-full"] > 0
