"""The sans-IO stack, frame by frame, with a plain float clock.

Each test feeds whole frames to ``receive_frame`` and asserts "exactly these
frames, then nothing". Expected frames are built with scapy, independently of
the emitters under test. The stack's IP ids come from a fixed "random" source,
so the first packet it sends has id 0x1001.
"""

import ast
import itertools
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, UDP, IPOption, defragment, fragment
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from pyslirp.stack.config import StackConfig
from pyslirp.stack.events import IcmpEchoRequested, UdpDatagramReceived
from pyslirp.stack.interface import Stack
from tests.guest_frames import (
    ARP_REPLY,
    ARP_REQUEST,
    ECHO_TO_GATEWAY,
    ECHO_TO_GATEWAY_IDENT,
    ECHO_WITH_OPTIONS,
    ECHO_WITH_OPTIONS_IDENT,
    GUEST_IP,
    GUEST_MAC,
    UDP_FRAGMENTED_PAYLOAD,
    UDP_FRAGMENTS,
    UDP_ONE_BYTE,
    UDP_TO_DNS,
)

GUEST = "10.0.2.100"
GW = "10.0.2.2"
DNS = "10.0.2.3"
OUT = "198.51.100.7"
GUEST_MAC_S = "02:00:00:00:00:64"
GW_MAC_S = "52:55:0a:00:02:02"
DNS_MAC_S = "52:55:0a:00:02:03"
BCAST_MAC = "ff:ff:ff:ff:ff:ff"
FIRST_ID = 0x1001
E = 14


def ip4(text: str) -> bytes:
    return bytes(int(part) for part in text.split("."))


class FixedRandom:
    def getrandbits(self, bits: int) -> int:
        return 0x1000


def new_stack(**config) -> Stack:
    return Stack(StackConfig(**config), FixedRandom())


def from_guest(pkt, dst_mac: str = GW_MAC_S, src_mac: str = GUEST_MAC_S) -> bytes:
    return bytes(Ether(src=src_mac, dst=dst_mac) / pkt)


def to_guest(pkt, src_mac: str = GW_MAC_S, dst_mac: str = GUEST_MAC_S) -> bytes:
    return bytes(Ether(src=src_mac, dst=dst_mac) / pkt)


def ip_to_guest(src: str = GW, ident: int = FIRST_ID, **kw):
    return IP(src=src, dst=GUEST, id=ident, ttl=64, flags=0, **kw)


def icmp_error(icmp_type: int, code: int, quote: bytes, src: str = GW, mtu: int | None = None):
    if mtu is not None:
        icmp = ICMP(type=icmp_type, code=code, nexthopmtu=mtu)
    else:
        icmp = ICMP(type=icmp_type, code=code)
    return to_guest(ip_to_guest(src=src) / icmp / Raw(quote))


def arp_request_from_stack(target: str) -> bytes:
    return bytes(
        Ether(src=GW_MAC_S, dst=BCAST_MAC)
        / ARP(op=1, hwsrc=GW_MAC_S, psrc=GW, hwdst="00:00:00:00:00:00", pdst=target)
    )


def events(stack: Stack) -> list:
    out = []
    while (event := stack.next_event()) is not None:
        out.append(event)
    return out


def describe(frames: list[bytes]) -> str:
    return "\n".join(Ether(f).summary() + "\n  " + f.hex() for f in frames)


def assert_frames(stack: Stack, expected: list[bytes], now: float = 0.0) -> None:
    actual = stack.frames_to_send(now)
    assert actual == expected, f"\nactual:\n{describe(actual)}\nexpected:\n{describe(expected)}"
    assert stack.frames_to_send(now) == []  # then nothing


def assert_quiet(stack: Stack, now: float = 0.0) -> None:
    assert_frames(stack, [], now)
    assert events(stack) == []


def learned_stack(**config) -> Stack:
    """A stack that knows the guest's MAC (from a gratuitous ARP)."""
    stack = new_stack(**config)
    stack.receive_frame(
        from_guest(ARP(op=1, hwsrc=GUEST_MAC_S, psrc=GUEST, pdst=GUEST), dst_mac=BCAST_MAC),
        0.0,
    )
    assert_quiet(stack)
    return stack


# ----------------------------------------------------------------------- ARP
def test_arp_request_for_gateway_answered():
    stack = new_stack()
    stack.receive_frame(ARP_REQUEST, 0.0)
    expected = to_guest(ARP(op=2, hwsrc=GW_MAC_S, psrc=GW, hwdst=GUEST_MAC_S, pdst=GUEST))
    assert_frames(stack, [expected])
    assert stack.guest_mac == GUEST_MAC
    assert events(stack) == []


def test_arp_request_for_dns_answered_with_its_own_mac():
    stack = new_stack()
    stack.receive_frame(
        from_guest(ARP(op=1, hwsrc=GUEST_MAC_S, psrc=GUEST, pdst=DNS), dst_mac=BCAST_MAC), 0.0
    )
    expected = to_guest(
        ARP(op=2, hwsrc=DNS_MAC_S, psrc=DNS, hwdst=GUEST_MAC_S, pdst=GUEST), src_mac=DNS_MAC_S
    )
    assert_frames(stack, [expected])


@pytest.mark.parametrize("target", ["10.0.2.50", GUEST, "10.0.2.255", "10.0.2.0", OUT, "0.0.0.0"])
def test_arp_request_for_other_addresses_not_answered(target):
    stack = new_stack()
    stack.receive_frame(
        from_guest(ARP(op=1, hwsrc=GUEST_MAC_S, psrc=GUEST, pdst=target), dst_mac=BCAST_MAC), 0.0
    )
    assert_quiet(stack)
    assert stack.guest_mac == GUEST_MAC  # learned all the same


def test_arp_probe_from_zero_address_answered_without_learning():
    # RFC 5227 probe: sender address 0.0.0.0.
    stack = new_stack()
    stack.receive_frame(
        from_guest(ARP(op=1, hwsrc=GUEST_MAC_S, psrc="0.0.0.0", pdst=GW), dst_mac=BCAST_MAC), 0.0
    )
    expected = to_guest(ARP(op=2, hwsrc=GW_MAC_S, psrc=GW, hwdst=GUEST_MAC_S, pdst="0.0.0.0"))
    assert_frames(stack, [expected])
    stack.send_udp(ip4(GW), 53, GUEST_IP, 4000, b"x", 0.0)
    assert_frames(stack, [arp_request_from_stack(GUEST)])


def test_arp_reply_teaches_guest_mac():
    stack = new_stack()
    stack.receive_frame(ARP_REPLY, 0.0)
    assert_quiet(stack)
    stack.send_udp(ip4(DNS), 53, GUEST_IP, 40000, b"answer", 1.0)
    expected = to_guest(ip_to_guest(src=DNS) / UDP(sport=53, dport=40000) / Raw(b"answer"))
    assert_frames(stack, [expected])


def test_unknown_guest_address_is_asked_each_second_then_given_up():
    stack = new_stack(arp_retry_interval=1.0, arp_attempts=3)
    stack.send_udp(ip4(GW), 67, ip4("10.0.2.15"), 68, b"offer", 0.0)
    assert_frames(stack, [arp_request_from_stack("10.0.2.15")])
    assert stack.get_timer() == 1.0
    stack.handle_timer(0.999)
    assert_quiet(stack, 0.999)
    stack.handle_timer(1.0)
    assert_frames(stack, [arp_request_from_stack("10.0.2.15")], 1.0)
    assert stack.get_timer() == 2.0
    stack.handle_timer(2.0)
    assert_frames(stack, [arp_request_from_stack("10.0.2.15")], 2.0)
    assert stack.get_timer() == 3.0
    stack.handle_timer(3.0)
    assert_quiet(stack, 3.0)
    assert stack.drops["arp-unresolved"] == 1
    assert stack.get_timer() is None


def test_queued_packets_sent_in_order_once_guest_answers():
    stack = new_stack()
    for i in range(3):
        stack.send_udp(ip4(GW), 9, GUEST_IP, 40000, bytes([i]), 0.0)
    assert_frames(stack, [arp_request_from_stack(GUEST)])
    stack.receive_frame(
        from_guest(ARP(op=2, hwsrc=GUEST_MAC_S, psrc=GUEST, hwdst=GW_MAC_S, pdst=GW)), 0.5
    )
    expected = [
        to_guest(ip_to_guest(ident=FIRST_ID + i) / UDP(sport=9, dport=40000) / Raw(bytes([i])))
        for i in range(3)
    ]
    assert_frames(stack, expected, 0.5)
    assert stack.get_timer() is None
    stack.handle_timer(5.0)
    assert_quiet(stack, 5.0)
    assert stack.drops == {}


def test_arp_queue_is_bounded_per_address_and_in_addresses():
    stack = new_stack(arp_queue_per_address=4, arp_pending_addresses=2)
    for i in range(6):
        stack.send_udp(ip4(GW), 9, GUEST_IP, 40000, bytes([i]), 0.0)
    assert stack.drops["arp-queue-full"] == 2
    stack.send_udp(ip4(GW), 9, ip4("10.0.2.15"), 68, b"a", 0.0)
    stack.send_udp(ip4(GW), 9, ip4("10.0.2.16"), 68, b"a", 0.0)
    assert stack.drops["arp-pending-full"] == 1
    assert_frames(stack, [arp_request_from_stack(GUEST), arp_request_from_stack("10.0.2.15")])
    stack.receive_frame(ARP_REPLY, 0.1)
    frames = stack.frames_to_send(0.1)
    assert [bytes(Ether(f)[Raw].load) for f in frames] == [bytes([i]) for i in range(4)]


# ---------------------------------------------------------------------- ICMP
def test_echo_to_gateway_answered_with_same_id_seq_payload():
    stack = new_stack()
    stack.receive_frame(ECHO_TO_GATEWAY, 0.0)
    request = Ether(ECHO_TO_GATEWAY)
    expected = to_guest(
        ip_to_guest(src=GW)
        / ICMP(type=0, id=ECHO_TO_GATEWAY_IDENT, seq=1)
        / Raw(request[ICMP].payload.load)
    )
    assert_frames(stack, [expected])
    assert events(stack) == []
    assert stack.counters["icmp-echo-answered"] == 1


def test_echo_to_dns_with_ip_options_answered_from_dns():
    stack = new_stack()
    stack.receive_frame(ECHO_WITH_OPTIONS, 0.0)
    request = Ether(ECHO_WITH_OPTIONS)
    expected = to_guest(
        ip_to_guest(src=DNS)
        / ICMP(type=0, id=ECHO_WITH_OPTIONS_IDENT, seq=1)
        / Raw(request[ICMP].payload.load)
    )
    assert_frames(stack, [expected])


def test_echo_to_outside_becomes_event():
    stack = new_stack()
    frame = from_guest(IP(src=GUEST, dst=OUT, ttl=63) / ICMP(id=0x1234, seq=7) / b"ping!")
    stack.receive_frame(frame, 0.0)
    assert_frames(stack, [])
    packet = frame[E:]
    assert events(stack) == [
        IcmpEchoRequested(GUEST_IP, ip4(OUT), 0x1234, 7, b"ping!", 63, packet[:28])
    ]


def test_echo_to_other_guest_network_address_becomes_event():
    # The relay, not the stack, decides that nobody is there.
    stack = new_stack()
    stack.receive_frame(from_guest(IP(src=GUEST, dst="10.0.2.50") / ICMP(id=1, seq=1)), 0.0)
    assert [type(e) for e in events(stack)] == [IcmpEchoRequested]


def test_echo_to_broadcast_ignored():
    stack = new_stack()
    for dst in ("10.0.2.255", "255.255.255.255"):
        stack.receive_frame(
            from_guest(IP(src=GUEST, dst=dst) / ICMP(id=1, seq=1), dst_mac=BCAST_MAC), 0.0
        )
    assert_quiet(stack)


def test_icmp_bad_checksum_dropped():
    stack = new_stack()
    stack.receive_frame(from_guest(IP(src=GUEST, dst=GW) / ICMP(id=1, seq=1, chksum=1)), 0.0)
    assert_quiet(stack)
    assert stack.drops["icmp-bad-checksum"] == 1


def test_echo_reply_command():
    stack = learned_stack()
    stack.send_echo_reply(ip4(OUT), GUEST_IP, 0x4321, 9, b"pong", 1.0)
    expected = to_guest(ip_to_guest(src=OUT) / ICMP(type=0, id=0x4321, seq=9) / Raw(b"pong"))
    assert_frames(stack, [expected], 1.0)


# ----------------------------------------------------------------------- UDP
def test_udp_datagram_becomes_event():
    stack = new_stack()
    stack.receive_frame(UDP_TO_DNS, 0.0)
    assert_frames(stack, [])
    assert events(stack) == [
        UdpDatagramReceived(
            GUEST_IP, 40000, ip4(DNS), 53, b"hello pyslirp", GUEST_MAC, UDP_TO_DNS[E : E + 28]
        )
    ]


def test_udp_with_ethernet_padding():
    stack = new_stack()
    stack.receive_frame(UDP_ONE_BYTE + bytes(17), 0.0)
    (event,) = events(stack)
    assert (event.dst, event.dst_port, event.payload) == (ip4(OUT), 9, b"x")


def test_udp_bad_checksum_counted_and_dropped():
    stack = new_stack()
    frame = bytearray(UDP_TO_DNS)
    frame[-1] ^= 0x20
    stack.receive_frame(bytes(frame), 0.0)
    assert_quiet(stack)
    assert stack.drops == {"udp-bad-checksum": 1}


def test_udp_zero_checksum_accepted():
    stack = new_stack()
    stack.receive_frame(
        from_guest(IP(src=GUEST, dst=OUT) / UDP(sport=5, dport=6, chksum=0) / b"nock"), 0.0
    )
    (event,) = events(stack)
    assert (event.src_port, event.dst_port, event.payload) == (5, 6, b"nock")


def test_udp_length_past_ip_payload_dropped():
    stack = new_stack()
    stack.receive_frame(
        from_guest(IP(src=GUEST, dst=OUT) / UDP(sport=5, dport=6, len=30) / b"short"), 0.0
    )
    assert_quiet(stack)
    assert stack.drops == {"udp-bad-length": 1}


def test_send_udp_command():
    stack = learned_stack()
    stack.send_udp(ip4(OUT), 9, GUEST_IP, 40000, b"reply", 1.0)
    expected = to_guest(ip_to_guest(src=OUT) / UDP(sport=9, dport=40000) / Raw(b"reply"))
    assert_frames(stack, [expected], 1.0)


def test_send_udp_with_explicit_mac_to_broadcast():
    stack = new_stack()
    stack.send_udp(ip4(GW), 67, b"\xff\xff\xff\xff", 68, b"offer", 0.0, dst_mac=b"\xff" * 6)
    expected = to_guest(
        IP(src=GW, dst="255.255.255.255", id=FIRST_ID, ttl=64)
        / UDP(sport=67, dport=68)
        / Raw(b"offer"),
        dst_mac=BCAST_MAC,
    )
    assert_frames(stack, [expected])


# ---------------------------------------------------------------- reassembly
def frag(ident: int, offset: int, data: bytes, more: bool, dst: str = OUT, proto: int = 17, **kw):
    """A fragment from the guest; ``offset`` in bytes."""
    return from_guest(
        IP(
            src=GUEST,
            dst=dst,
            id=ident,
            proto=proto,
            flags="MF" if more else 0,
            frag=offset // 8,
            **kw,
        )
        / Raw(data)
    )


# A 40-byte UDP datagram (8-byte header, 32-byte payload) cut in three.
SMALL_PAYLOAD = bytes(range(65, 65 + 32))
SMALL_DATAGRAM = bytes(IP(src=GUEST, dst=OUT) / UDP(sport=1000, dport=2000) / Raw(SMALL_PAYLOAD))[
    20:
]
A = (0, SMALL_DATAGRAM[0:16], True)
B = (16, SMALL_DATAGRAM[16:32], True)
C = (32, SMALL_DATAGRAM[32:40], False)


def small_event(stack) -> bytes | None:
    got = events(stack)
    if not got:
        return None
    (event,) = got
    assert (event.src_port, event.dst_port) == (1000, 2000)
    return event.payload


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_captured_fragments_reassembled_in_any_order(order):
    stack = new_stack()
    for i in order:
        stack.receive_frame(UDP_FRAGMENTS[i], 0.0)
    (event,) = events(stack)
    assert event.payload == UDP_FRAGMENTED_PAYLOAD
    assert (event.src, event.src_port, event.dst, event.dst_port) == (GUEST_IP, 40000, ip4(OUT), 9)
    # The quote is a valid IP header for the whole datagram plus 8 bytes.
    quoted = IP(event.packet)
    assert (quoted.len, quoted.flags, quoted.frag) == (20 + 8 + len(UDP_FRAGMENTED_PAYLOAD), 0, 0)
    assert quoted[UDP].sport == 40000
    assert_frames(stack, [])
    assert stack.counters["reassembled"] == 1
    assert stack.get_timer() is None


@pytest.mark.parametrize("order", list(itertools.permutations([A, B, C])))
def test_small_fragments_any_order(order):
    stack = new_stack()
    for offset, data, more in order:
        stack.receive_frame(frag(77, offset, data, more), 0.0)
    assert small_event(stack) == SMALL_PAYLOAD


def test_fragmented_echo_becomes_one_event():
    stack = new_stack()
    packet = IP(src=GUEST, dst=OUT, id=5) / ICMP(id=3, seq=4) / Raw(bytes(3000))
    for piece in reversed(fragment(packet, fragsize=1480)):
        stack.receive_frame(from_guest(piece), 0.0)
    (event,) = events(stack)
    assert (event.ident, event.sequence, event.payload) == (3, 4, bytes(3000))


def test_duplicate_fragments_ignored():
    stack = new_stack()
    for offset, data, more in (A, A, B, A, C):
        stack.receive_frame(frag(9, offset, data, more), 0.0)
    assert small_event(stack) == SMALL_PAYLOAD
    assert stack.drops == {}
    assert_frames(stack, [])


def wrong(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data)


OVERLAPS = {
    # A second fragment whose start overlaps the end of the first.
    "partial": [A, (8, wrong(SMALL_DATAGRAM[8:24]), True)],
    # Same place, same size, different bytes: not a duplicate.
    "replace": [A, (0, wrong(A[1]), True)],
    # One that contains an earlier one.
    "contains": [B, (8, wrong(SMALL_DATAGRAM[8:32]), True)],
    # One inside an earlier one.
    "inside": [(0, SMALL_DATAGRAM[0:32], True), (8, wrong(SMALL_DATAGRAM[8:16]), True)],
    # The same bytes again, but cut differently, is still an overlap.
    "same-bytes": [A, (8, SMALL_DATAGRAM[8:24], True)],
    # A last fragment that overlaps.
    "last": [B, (24, wrong(SMALL_DATAGRAM[24:40]), False)],
}


@pytest.mark.parametrize("name", OVERLAPS)
def test_overlapping_fragments_drop_the_datagram(name):
    stack = new_stack()
    for offset, data, more in OVERLAPS[name]:
        stack.receive_frame(frag(11, offset, data, more), 0.0)
    assert stack.drops["fragment-overlap"] == 1
    assert len(stack.reassembler) == 0 and stack.reassembler.held_bytes == 0
    # What remains of the datagram cannot complete it: nothing held survived.
    stack.receive_frame(frag(11, *B), 0.0)
    stack.receive_frame(frag(11, *C), 0.0)
    assert small_event(stack) is None
    # The honest datagram, sent again whole, arrives uncorrupted.
    stack.receive_frame(frag(11, *A), 0.0)
    assert small_event(stack) == SMALL_PAYLOAD
    assert_frames(stack, [])


def test_conflicting_last_fragments_drop_the_datagram():
    stack = new_stack()
    stack.receive_frame(frag(12, *C), 0.0)
    stack.receive_frame(frag(12, 40, SMALL_DATAGRAM[32:40], False), 0.0)
    assert stack.drops["fragment-conflicting-end"] == 1
    assert len(stack.reassembler) == 0


def test_fragment_past_the_end_drops_the_datagram():
    stack = new_stack()
    stack.receive_frame(frag(13, *C), 0.0)
    stack.receive_frame(frag(13, 40, bytes(8), True), 0.0)
    assert stack.drops["fragment-past-end"] == 1
    assert len(stack.reassembler) == 0


def test_unaligned_middle_fragment_dropped():
    stack = new_stack()
    stack.receive_frame(frag(14, 0, bytes(12), True), 0.0)
    assert stack.drops["fragment-unaligned"] == 1


def test_reassembly_bounded_in_datagrams():
    stack = new_stack(reassembly_max_datagrams=4)
    for ident in range(5):
        stack.receive_frame(frag(ident, *A), 0.0)
    assert len(stack.reassembler) == 4
    assert stack.drops["reassembly-datagrams-full"] == 1
    for ident in range(4):  # those held still complete
        stack.receive_frame(frag(ident, *B), 0.0)
        stack.receive_frame(frag(ident, *C), 0.0)
    assert len(events(stack)) == 4


def test_reassembly_bounded_in_bytes():
    stack = new_stack(reassembly_max_bytes=40)
    stack.receive_frame(frag(1, *A), 0.0)
    stack.receive_frame(frag(2, *A), 0.0)
    assert stack.reassembler.held_bytes == 32
    stack.receive_frame(frag(3, *A), 0.0)
    assert stack.drops["reassembly-memory-full"] == 1
    assert stack.reassembler.held_bytes <= 40
    assert len(stack.reassembler) == 2


def test_reassembly_bounded_in_fragments_per_datagram():
    stack = new_stack(reassembly_max_fragments=4)
    for i in range(5):
        stack.receive_frame(frag(1, i * 8, SMALL_DATAGRAM[i * 8 : i * 8 + 8], True), 0.0)
    assert stack.drops["reassembly-too-many-fragments"] == 1
    assert len(stack.reassembler) == 0 and stack.reassembler.held_bytes == 0


def test_reassembly_timeout_sends_time_exceeded_when_first_fragment_came():
    stack = new_stack(reassembly_timeout=30.0)
    first = frag(21, *A)
    stack.receive_frame(first, 0.0)
    stack.receive_frame(frag(21, *C), 10.0)
    assert stack.get_timer() == 30.0
    stack.handle_timer(29.999)
    assert_quiet(stack, 29.999)
    stack.handle_timer(30.0)
    # RFC 792: code 1, quoting the first fragment's header and 64 bits.
    assert_frames(stack, [icmp_error(11, 1, first[E : E + 28])], 30.0)
    assert stack.drops["reassembly-timeout"] == 1
    assert stack.get_timer() is None


def test_reassembly_timeout_silent_without_first_fragment():
    stack = new_stack(reassembly_timeout=30.0)
    stack.receive_frame(frag(22, *B), 0.0)
    stack.receive_frame(frag(22, *C), 0.0)
    stack.handle_timer(30.0)
    assert_quiet(stack, 30.0)
    assert stack.drops["reassembly-timeout"] == 1
    assert len(stack.reassembler) == 0


def test_reassembled_datagram_too_long_for_ip_dropped():
    # A first fragment with a 60-byte header and data reaching 65515 bytes:
    # 60 + 65515 does not fit in the 16-bit total length.
    stack = new_stack(mtu=65520)
    first = IP(src=GUEST, dst=OUT, id=30, proto=17, flags="MF", options=IPOption(b"\x01" * 40))
    stack.receive_frame(from_guest(first / Raw(bytes(65000))), 0.0)
    stack.receive_frame(frag(30, 65000, bytes(515), False), 0.0)
    assert_quiet(stack)
    assert stack.drops["reassembly-too-long"] == 1
    assert len(stack.reassembler) == 0


# ------------------------------------------------------------- fragmentation
def received_fragments(frames: list[bytes]):
    packets = [Ether(f)[IP] for f in frames]
    return packets


@pytest.mark.parametrize("mtu,size", [(1500, 4000), (1000, 2500), (576, 1473), (68, 100)])
def test_outgoing_udp_above_mtu_is_fragmented(mtu, size):
    stack = learned_stack(mtu=mtu)
    payload = bytes(i % 251 for i in range(size))
    stack.send_udp(ip4(OUT), 9, GUEST_IP, 40000, payload, 1.0)
    frames = stack.frames_to_send(1.0)
    assert stack.frames_to_send(1.0) == []
    packets = received_fragments(frames)
    datagram_len = 8 + size
    assert len(packets) == -(-datagram_len // ((mtu - 20) // 8 * 8))
    expected_offset = 0
    for i, packet in enumerate(packets):
        assert packet.len <= mtu and len(frames[i]) == 14 + packet.len
        assert packet.id == FIRST_ID and packet.src == OUT and packet.dst == GUEST
        data_len = packet.len - 20
        assert packet.frag * 8 == expected_offset
        last = i == len(packets) - 1
        assert bool(packet.flags.MF) == (not last)
        assert not packet.flags.DF
        if not last:
            assert data_len % 8 == 0
        expected_offset += data_len
        assert IP(bytes(packet)).chksum == packet.chksum  # header checksum right
    assert expected_offset == datagram_len
    whole = defragment(packets)[0]
    assert whole[UDP].sport == 9 and whole[UDP].dport == 40000
    assert bytes(whole[UDP].payload) == payload
    # The UDP checksum of the whole datagram is what scapy computes.
    recomputed = UDP(bytes(whole[UDP]))
    del recomputed.chksum
    recomputed = IP(bytes(IP(src=OUT, dst=GUEST) / recomputed))[UDP]
    assert whole[UDP].chksum == recomputed.chksum


def test_outgoing_datagram_at_mtu_is_not_fragmented():
    stack = learned_stack(mtu=1500)
    stack.send_udp(ip4(OUT), 9, GUEST_IP, 40000, bytes(1472), 1.0)
    (frame,) = stack.frames_to_send(1.0)
    assert len(frame) == 1514
    assert Ether(frame)[IP].flags == 0


def test_outgoing_datagram_too_long_for_ip_is_dropped():
    stack = learned_stack(mtu=65520)
    stack.send_udp(ip4(OUT), 9, GUEST_IP, 40000, bytes(65535 - 28 + 1), 1.0)
    assert stack.frames_to_send(1.0) == []
    assert stack.drops["ipv4-too-long-out"] == 1


# -------------------------------------------------------------- ICMP errors
def test_df_packet_above_mtu_gets_fragmentation_needed():
    stack = new_stack(mtu=1500)
    frame = from_guest(
        IP(src=GUEST, dst=OUT, flags="DF", id=99) / ICMP(id=1, seq=1) / Raw(bytes(3000))
    )
    stack.receive_frame(frame, 0.0)
    quote = frame[E : E + 548]
    assert_frames(stack, [icmp_error(3, 4, quote, mtu=1500)])
    assert events(stack) == []
    assert stack.drops["ipv4-too-big"] == 1


def test_packet_above_mtu_without_df_is_accepted():
    stack = new_stack(mtu=1500)
    stack.receive_frame(
        from_guest(IP(src=GUEST, dst=OUT) / UDP(sport=1, dport=2) / Raw(bytes(3000))), 0.0
    )
    assert_frames(stack, [])
    (event,) = events(stack)
    assert len(event.payload) == 3000


def test_ttl_1_to_outside_gets_time_exceeded():
    stack = new_stack()
    frame = from_guest(IP(src=GUEST, dst=OUT, ttl=1) / UDP(sport=33434, dport=33435) / b"tr")
    stack.receive_frame(frame, 0.0)
    assert_frames(stack, [icmp_error(11, 0, frame[E:])])
    assert events(stack) == []


def test_ttl_1_echo_to_outside_gets_time_exceeded():
    stack = new_stack()
    frame = from_guest(IP(src=GUEST, dst=OUT, ttl=1) / ICMP(id=1, seq=1))
    stack.receive_frame(frame, 0.0)
    assert_frames(stack, [icmp_error(11, 0, frame[E:])])


def test_ttl_1_to_gateway_is_answered():
    stack = new_stack()
    stack.receive_frame(from_guest(IP(src=GUEST, dst=GW, ttl=1) / ICMP(id=2, seq=3)), 0.0)
    assert_frames(stack, [to_guest(ip_to_guest() / ICMP(type=0, id=2, seq=3))])


@pytest.mark.parametrize("dst,src", [(OUT, GW), (GW, GW), (DNS, DNS)])
def test_unknown_protocol_gets_protocol_unreachable(dst, src):
    stack = new_stack()
    frame = from_guest(IP(src=GUEST, dst=dst, proto=47) / Raw(b"gre-ish payload"))
    stack.receive_frame(frame, 0.0)
    assert_frames(stack, [icmp_error(3, 2, frame[E:], src=src)])
    assert stack.drops["ipv4-protocol-unsupported"] == 1


@pytest.mark.parametrize("icmp_type", [3, 4, 5, 11, 12])
def test_no_icmp_error_about_an_icmp_error(icmp_type):
    stack = new_stack()
    inner = bytes(IP(src=OUT, dst=GUEST) / UDP(sport=1, dport=2))
    stack.receive_frame(
        from_guest(IP(src=GUEST, dst=OUT, ttl=1) / ICMP(type=icmp_type, code=0) / inner), 0.0
    )
    stack.receive_frame(
        from_guest(IP(src=GUEST, dst=OUT, flags="DF") / ICMP(type=icmp_type) / inner / bytes(2000)),
        0.0,
    )
    assert_quiet(stack)


@pytest.mark.parametrize("src", ["0.0.0.0", "10.0.2.255"])
def test_no_icmp_error_to_a_broadcast_or_zero_source(src):
    stack = new_stack()
    stack.receive_frame(from_guest(IP(src=src, dst=OUT, proto=47) / b"x"), 0.0)
    stack.receive_frame(from_guest(IP(src=src, dst=OUT, ttl=1) / UDP() / b"x"), 0.0)
    stack.receive_frame(from_guest(IP(src=src, dst=OUT, flags="DF") / UDP() / bytes(2000)), 0.0)
    assert_frames(stack, [])


@pytest.mark.parametrize("dst", ["255.255.255.255", "10.0.2.255", "224.0.0.251"])
def test_no_icmp_error_about_a_broadcast_or_multicast_packet(dst):
    stack = learned_stack()
    stack.receive_frame(from_guest(IP(src=GUEST, dst=dst, proto=47) / b"x", BCAST_MAC), 0.0)
    stack.receive_frame(
        from_guest(IP(src=GUEST, dst=dst, ttl=1) / UDP(dport=9) / b"x", BCAST_MAC), 0.0
    )
    stack.receive_frame(
        from_guest(IP(src=GUEST, dst=dst, flags="DF") / UDP(dport=9) / bytes(2000), BCAST_MAC),
        0.0,
    )
    assert_frames(stack, [])


def test_no_icmp_error_about_a_later_fragment():
    stack = new_stack()
    stack.receive_frame(frag(40, 16, SMALL_DATAGRAM[16:32], True, ttl=1), 0.0)
    stack.receive_frame(frag(41, 16, bytes(16), True, proto=47), 0.0)
    assert_frames(stack, [])


# ----------------------------------------------------------- garbage in
INGRESS_FRAMES = [
    ARP_REQUEST,
    ARP_REPLY,
    ECHO_TO_GATEWAY,
    ECHO_WITH_OPTIONS,
    UDP_TO_DNS,
    UDP_ONE_BYTE,
    *UDP_FRAGMENTS,
]


@pytest.mark.parametrize("index", range(len(INGRESS_FRAMES)))
def test_truncated_frames_are_counted_and_dropped(index):
    frame = INGRESS_FRAMES[index]
    for length in range(len(frame)):
        stack = new_stack()
        stack.receive_frame(frame[:length], 0.0)
        assert_quiet(stack)
        assert sum(stack.drops.values()) == 1, (length, stack.drops)
        assert stack.drops["internal-error"] == 0


def test_other_ethertypes_counted():
    stack = new_stack()
    stack.receive_frame(bytes(Ether(src=GUEST_MAC_S, dst=GW_MAC_S, type=0x86DD) / bytes(40)), 0.0)
    stack.receive_frame(bytes(Ether(src=GUEST_MAC_S, dst=GW_MAC_S, type=0x88CC) / bytes(40)), 0.0)
    assert stack.drops == {"ethertype-unsupported": 2}
    assert_quiet(stack)


def test_multicast_source_mac_dropped():
    stack = new_stack()
    stack.receive_frame(from_guest(IP(src=GUEST, dst=GW) / ICMP(), src_mac="01:00:5e:00:00:01"), 0)
    assert_quiet(stack)
    assert stack.guest_mac is None


@pytest.mark.parametrize("src", ["224.0.0.1", "255.255.255.255", "127.0.0.1", "10.0.2.255"])
def test_bad_source_addresses_dropped(src):
    stack = new_stack()
    stack.receive_frame(from_guest(IP(src=src, dst=GW) / ICMP()), 0.0)
    assert_quiet(stack)
    assert stack.drops == {"ipv4-bad-source": 1}


# ------------------------------------------------------------ sans-IO rule
FORBIDDEN = {"socket", "select", "os", "time", "threading", "random", "asyncio", "subprocess"}


def test_stack_imports_no_io_modules():
    stack_dir = Path(__file__).resolve().parent.parent / "pyslirp" / "stack"
    files = sorted(stack_dir.glob("*.py"))
    assert len(files) >= 10
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
                names = ["__import__"]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                assert root not in FORBIDDEN | {"__import__"}, f"{path.name} imports {name}"
