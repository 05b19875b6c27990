"""Wire formats: frames a real Linux guest sent (tests/guest_frames.py) parse to
the expected fields, the emitters give the same bytes back, and every
truncation raises MalformedFrame and nothing else.
"""

import random

import pytest

from pyslirp.stack import arp, checksum, ethernet, icmpv4, ipv4, udp
from pyslirp.stack.errors import MalformedFrame
from tests.guest_frames import (
    ARP_REPLY,
    ARP_REQUEST,
    ECHO_TO_GATEWAY,
    ECHO_TO_GATEWAY_IDENT,
    ECHO_WITH_OPTIONS,
    ECHO_WITH_OPTIONS_IDENT,
    GUEST_IP,
    GUEST_MAC,
    UDP_FRAGMENTED_IDENT,
    UDP_FRAGMENTED_PAYLOAD,
    UDP_FRAGMENTS,
    UDP_ONE_BYTE,
    UDP_TO_DNS,
)

GATEWAY = bytes([10, 0, 2, 2])
DNS = bytes([10, 0, 2, 3])
OUTSIDE = bytes([198, 51, 100, 7])
GATEWAY_MAC = bytes.fromhex("52550a000202")
DNS_MAC = bytes.fromhex("52550a000203")
E = ethernet.HEADER_LEN


def parse_frame(frame):
    """Parse every layer we know of; return the innermost result."""
    _dst, _src, ethertype = ethernet.parse(frame)
    body = memoryview(frame)[E:]
    if ethertype == ethernet.ETHERTYPE_ARP:
        return arp.parse(body)
    header = ipv4.parse(body)
    payload = body[header.header_len : header.total_len]
    if header.is_fragment:
        return header
    if header.protocol == ipv4.PROTO_ICMP:
        return icmpv4.parse(payload)
    return udp.parse(payload, header.src, header.dst)


# ------------------------------------------------------------------ checksum
def reference_checksum(data: bytes) -> int:
    """RFC 1071 section 4.1, word by word, written independently."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def test_checksum_rfc1071_vector():
    # RFC 1071 section 3: these eight bytes sum to ddf2, checksum 220d.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert checksum.checksum(data) == 0x220D
    assert checksum.finish(checksum.partial_sum(data)) == 0x220D
    assert checksum.is_valid(data + (0x220D).to_bytes(2, "big"))


def test_checksum_known_headers():
    # The IP header checksums Linux put into the captured frames.
    for frame in (ECHO_TO_GATEWAY, ECHO_WITH_OPTIONS, UDP_TO_DNS, *UDP_FRAGMENTS):
        hl = (frame[E] & 0x0F) * 4
        head = bytearray(frame[E : E + hl])
        expected = int.from_bytes(head[10:12], "big")
        head[10:12] = b"\0\0"
        assert checksum.checksum(head) == expected
        assert checksum.is_valid(frame[E : E + hl])


def test_checksum_random_and_odd_lengths_agree_with_reference():
    rng = random.Random(1071)
    for length in list(range(0, 70)) + [1479, 1480, 1481, 65535]:
        data = rng.randbytes(length)
        assert checksum.checksum(data) == reference_checksum(data), length
    # Odd lengths: the last byte is padded on the right.
    assert checksum.checksum(b"\x01") == ~0x0100 & 0xFFFF
    assert checksum.checksum(b"\x00\x01\x02") == ~0x0201 & 0xFFFF


def test_checksum_edge_values():
    assert checksum.checksum(b"") == 0xFFFF
    assert checksum.checksum(bytes(20)) == 0xFFFF
    # A sum of 0xffff (one's-complement negative zero) has checksum 0.
    assert checksum.checksum(b"\xff\xff") == 0
    assert checksum.checksum(b"\x12\x34\xed\xcb") == 0
    assert checksum.is_valid(b"\xff\xff")
    # All zeros sum to +0, not to all ones: never a valid checksum.
    assert not checksum.is_valid(bytes(8))
    assert not checksum.is_valid(b"")


def test_partial_sums_combine():
    rng = random.Random(2)
    for _ in range(100):
        a = rng.randbytes(rng.randrange(0, 200) * 2)
        b = rng.randbytes(rng.randrange(0, 201))
        combined = checksum.finish(checksum.partial_sum(a) + checksum.partial_sum(b))
        assert combined == reference_checksum(a + b) or not any(a + b)


def test_pseudo_header_sum_matches_captured_udp():
    packet = UDP_TO_DNS[E:]
    datagram = packet[20:]
    total = checksum.pseudo_header_sum(GUEST_IP, DNS, 17, len(datagram))
    total += checksum.partial_sum(datagram)
    assert total % 0xFFFF == 0


def test_rfc1624_update_agrees_with_recompute():
    rng = random.Random(1624)
    for _ in range(2000):
        data = bytearray(rng.randbytes(20))
        data[10:12] = b"\0\0"
        old = checksum.checksum(data)
        word_at = rng.randrange(0, 10) * 2
        if word_at == 10:
            continue
        old_word = int.from_bytes(data[word_at : word_at + 2], "big")
        new_word = rng.choice((0, 0xFFFF, old_word, rng.getrandbits(16)))
        data[word_at : word_at + 2] = new_word.to_bytes(2, "big")
        new = checksum.checksum(data)
        updated = checksum.update(old, old_word, new_word)
        # Both are valid; they may differ only as +0/-0 (0x0000 vs 0xffff).
        assert updated == new or {updated, new} == {0, 0xFFFF}
        data[10:12] = updated.to_bytes(2, "big")
        assert checksum.is_valid(data)


def test_rfc1624_ttl_decrement_on_captured_header():
    head = bytearray(ECHO_TO_GATEWAY[E : E + 20])
    old_csum = int.from_bytes(head[10:12], "big")
    old_word = int.from_bytes(head[8:10], "big")  # TTL and protocol
    head[8] -= 1
    new_word = int.from_bytes(head[8:10], "big")
    head[10:12] = checksum.update(old_csum, old_word, new_word).to_bytes(2, "big")
    assert checksum.is_valid(head)
    recomputed = bytearray(head)
    recomputed[10:12] = b"\0\0"
    assert checksum.checksum(recomputed) == int.from_bytes(head[10:12], "big")


def test_rfc1624_section4_example():
    # RFC 1624 section 4: HC = 0xdd2f, m = 0x5555 -> m' = 0x3285 gives 0x0000.
    assert checksum.update(0xDD2F, 0x5555, 0x3285) == 0x0000


# ------------------------------------------------------------------ ethernet
def test_ethernet_parse_and_emit():
    dst, src, ethertype = ethernet.parse(ECHO_TO_GATEWAY)
    assert (dst, src, ethertype) == (GATEWAY_MAC, GUEST_MAC, ethernet.ETHERTYPE_IPV4)
    assert ethernet.header(dst, src, ethertype) == ECHO_TO_GATEWAY[:E]
    dst, src, ethertype = ethernet.parse(ARP_REQUEST)
    assert (dst, src, ethertype) == (ethernet.BROADCAST, GUEST_MAC, ethernet.ETHERTYPE_ARP)
    assert ethernet.header(dst, src, ethertype) == ARP_REQUEST[:E]


def test_mac_text_round_trip():
    assert ethernet.mac_to_str(GATEWAY_MAC) == "52:55:0a:00:02:02"
    assert ethernet.mac_from_str("52:55:0a:00:02:02") == GATEWAY_MAC
    for bad in ("52:55:0a:00:02", "52:55:0a:00:02:002", "", "52-55-0a-00-02-02"):
        with pytest.raises(ValueError):
            ethernet.mac_from_str(bad)


# ----------------------------------------------------------------------- arp
def test_arp_request_parse_and_emit():
    body = ARP_REQUEST[E:]
    assert arp.parse(body) == (arp.REQUEST, GUEST_MAC, GUEST_IP, bytes(6), GATEWAY)
    assert arp.emit(*arp.parse(body)) == body


def test_arp_reply_parse_and_emit():
    body = ARP_REPLY[E:]
    assert arp.parse(body) == (arp.REPLY, GUEST_MAC, GUEST_IP, GATEWAY_MAC, GATEWAY)
    assert arp.emit(*arp.parse(body)) == body


@pytest.mark.parametrize(
    "offset,value,reason",
    [
        (0, b"\x00\x06", "arp-unsupported"),  # IEEE 802 hardware type
        (2, b"\x86\xdd", "arp-unsupported"),
        (4, b"\x08", "arp-unsupported"),
        (5, b"\x10", "arp-unsupported"),
        (6, b"\x00\x03", "arp-bad-operation"),  # RARP request
        (6, b"\x00\x00", "arp-bad-operation"),
    ],
)
def test_arp_unsupported_fields(offset, value, reason):
    body = bytearray(ARP_REQUEST[E:])
    body[offset : offset + len(value)] = value
    with pytest.raises(MalformedFrame) as info:
        arp.parse(body)
    assert info.value.reason == reason


# ---------------------------------------------------------------------- ipv4
def test_ipv4_parse_and_emit_echo():
    packet = ECHO_TO_GATEWAY[E:]
    header = ipv4.parse(memoryview(packet))
    assert header.header_len == 20
    assert header.total_len == 84 == len(packet)
    assert header.ident == int.from_bytes(packet[4:6], "big")
    assert header.dont_fragment and not header.more_fragments
    assert header.fragment_offset == 0 and not header.is_fragment
    assert (header.ttl, header.protocol, header.tos) == (64, ipv4.PROTO_ICMP, 0)
    assert (header.src, header.dst) == (GUEST_IP, GATEWAY)
    emitted = ipv4.header(
        GUEST_IP, GATEWAY, ipv4.PROTO_ICMP, 64, header.ident, 64, flags_offset=ipv4.FLAG_DF
    )
    assert emitted == packet[:20]


def test_ipv4_options_are_skipped():
    packet = ECHO_WITH_OPTIONS[E:]
    header = ipv4.parse(packet)
    assert header.header_len == 60
    assert (header.src, header.dst, header.protocol) == (GUEST_IP, DNS, ipv4.PROTO_ICMP)
    icmp = packet[header.header_len : header.total_len]
    assert icmpv4.parse(icmp) == (icmpv4.ECHO_REQUEST, 0, ECHO_WITH_OPTIONS_IDENT, 1)


def test_ipv4_ethernet_padding_is_ignored():
    padded = UDP_ONE_BYTE + bytes(60 - len(UDP_ONE_BYTE))
    header = ipv4.parse(memoryview(padded)[E:])
    assert header.total_len == 29
    payload = memoryview(padded)[E + 20 : E + header.total_len]
    assert udp.parse(payload, header.src, header.dst) == (40000, 9, 9)


def test_ipv4_fragments_parse():
    offsets = []
    for frame in UDP_FRAGMENTS:
        header = ipv4.parse(frame[E:])
        assert (
            header.is_fragment and header.ident == UDP_FRAGMENTED_IDENT and not header.dont_fragment
        )
        offsets.append((header.fragment_offset, header.more_fragments, header.total_len))
    assert offsets == [(0, True, 1500), (1480, True, 1500), (2960, False, 140)]


def test_ipv4_fragment_emits_what_linux_sent():
    datagram = b"".join(frame[E + 20 :] for frame in UDP_FRAGMENTS)
    packets = ipv4.fragment(GUEST_IP, OUTSIDE, ipv4.PROTO_UDP, datagram, UDP_FRAGMENTED_IDENT, 1500)
    assert packets == [frame[E:] for frame in UDP_FRAGMENTS]
    assert datagram[8:] == UDP_FRAGMENTED_PAYLOAD


def test_ipv4_fragment_rejects_tiny_mtu():
    with pytest.raises(ValueError):
        ipv4.fragment(GUEST_IP, OUTSIDE, ipv4.PROTO_UDP, bytes(100), 1, 27)


@pytest.mark.parametrize(
    "offset,value,reason",
    [
        (0, 0x65, "ipv4-bad-version"),
        (0, 0x44, "ipv4-bad-header-length"),
        (3, 0x55, "ipv4-bad-total-length"),  # past the end of the data
        (3, 0x10, "ipv4-bad-total-length"),  # shorter than the header
        (6, 0xC0, "ipv4-reserved-flag"),
    ],
)
def test_ipv4_bad_fields(offset, value, reason):
    packet = bytearray(ECHO_TO_GATEWAY[E:])
    packet[offset] = value
    packet[10:12] = b"\0\0"
    packet[10:12] = checksum.checksum(packet[:20]).to_bytes(2, "big")
    with pytest.raises(MalformedFrame) as info:
        ipv4.parse(packet)
    assert info.value.reason == reason


def test_ipv4_bad_checksum():
    packet = bytearray(ECHO_TO_GATEWAY[E:])
    packet[10] ^= 0x40
    with pytest.raises(MalformedFrame) as info:
        ipv4.parse(packet)
    assert info.value.reason == "ipv4-bad-checksum"


# ---------------------------------------------------------------------- icmp
def test_icmp_echo_parse_and_emit():
    icmp = ECHO_TO_GATEWAY[E + 20 :]
    ident = ECHO_TO_GATEWAY_IDENT
    assert icmpv4.parse(icmp) == (icmpv4.ECHO_REQUEST, 0, ident, 1)
    assert icmpv4.emit(icmpv4.ECHO_REQUEST, 0, ident, 1, icmp[8:]) == icmp
    body = icmp[8:]
    assert body[-40:] == bytes.fromhex("0123456789abcdef") * 5


def test_icmp_bad_checksum():
    icmp = bytearray(ECHO_TO_GATEWAY[E + 20 :])
    icmp[-1] ^= 1
    with pytest.raises(MalformedFrame) as info:
        icmpv4.parse(icmp)
    assert info.value.reason == "icmp-bad-checksum"


def test_icmp_all_zero_message_is_rejected():
    with pytest.raises(MalformedFrame):
        icmpv4.parse(bytes(8))


def test_icmp_emit_frag_needed_layout():
    quote = ECHO_TO_GATEWAY[E : E + 28]
    message = icmpv4.emit(icmpv4.DEST_UNREACHABLE, icmpv4.FRAGMENTATION_NEEDED, 0, 1500, quote)
    assert message[:2] == b"\x03\x04"
    assert message[4:8] == b"\x00\x00\x05\xdc"  # unused, next-hop MTU (RFC 1191)
    assert message[8:] == quote
    assert reference_checksum(message) == 0


# ----------------------------------------------------------------------- udp
def test_udp_parse_and_emit():
    packet = UDP_TO_DNS[E:]
    datagram = packet[20:]
    assert udp.parse(datagram, GUEST_IP, DNS) == (40000, 53, 21)
    assert datagram[8:] == b"hello pyslirp"
    assert udp.emit(GUEST_IP, DNS, 40000, 53, b"hello pyslirp") == datagram


def test_udp_one_byte_parse_and_emit():
    datagram = UDP_ONE_BYTE[E + 20 :]
    assert udp.parse(datagram, GUEST_IP, OUTSIDE) == (40000, 9, 9)
    assert udp.emit(GUEST_IP, OUTSIDE, 40000, 9, b"x") == datagram


def test_udp_zero_checksum_accepted_over_ipv4():
    datagram = bytearray(UDP_TO_DNS[E + 20 :])
    datagram[6:8] = b"\0\0"
    assert udp.parse(datagram, GUEST_IP, DNS) == (40000, 53, 21)


def test_udp_computed_zero_is_sent_as_all_ones():
    # Find a payload whose checksum computes to 0: it must go out as 0xffff.
    head_sum = checksum.pseudo_header_sum(GUEST_IP, DNS, 17, 10)
    head_sum += checksum.partial_sum(bytes.fromhex("9c400035000a"))
    word = (0xFFFF - head_sum % 0xFFFF) % 0xFFFF
    payload = word.to_bytes(2, "big")
    datagram = udp.emit(GUEST_IP, DNS, 40000, 53, payload)
    assert datagram[6:8] == b"\xff\xff"
    assert udp.parse(datagram, GUEST_IP, DNS) == (40000, 53, 10)


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda d: d.__setitem__(slice(4, 6), b"\x00\x07"), "udp-bad-length"),
        (lambda d: d.__setitem__(slice(4, 6), b"\x00\x16"), "udp-bad-length"),
        (lambda d: d.__setitem__(-1, 0), "udp-bad-checksum"),
        (lambda d: d.__setitem__(slice(6, 8), b"\x12\x34"), "udp-bad-checksum"),
    ],
)
def test_udp_bad_fields(mutate, reason):
    datagram = bytearray(UDP_TO_DNS[E + 20 :])
    mutate(datagram)
    with pytest.raises(MalformedFrame) as info:
        udp.parse(datagram, GUEST_IP, DNS)
    assert info.value.reason == reason


def test_udp_over_ipv6_requires_checksum():
    datagram = bytearray(udp.emit(bytes(16), bytes(15) + b"\1", 1, 2, b"abc"))
    assert udp.parse(datagram, bytes(16), bytes(15) + b"\1") == (1, 2, 11)
    datagram[6:8] = b"\0\0"
    with pytest.raises(MalformedFrame) as info:
        udp.parse(datagram, bytes(16), bytes(15) + b"\1")
    assert info.value.reason == "udp-zero-checksum"


# ---------------------------------------------------------------- truncation
ALL_FRAMES = {
    "arp-request": ARP_REQUEST,
    "arp-reply": ARP_REPLY,
    "echo": ECHO_TO_GATEWAY,
    "echo-options": ECHO_WITH_OPTIONS,
    "udp-dns": UDP_TO_DNS,
    "udp-one-byte": UDP_ONE_BYTE,
    "fragment-0": UDP_FRAGMENTS[0],
    "fragment-2": UDP_FRAGMENTS[2],
}


@pytest.mark.parametrize("name", ALL_FRAMES)
def test_every_truncation_raises_malformed_frame(name):
    frame = ALL_FRAMES[name]
    parse_frame(frame)  # whole, it parses
    for length in range(len(frame)):
        with pytest.raises(MalformedFrame):
            parse_frame(frame[:length])


@pytest.mark.parametrize(
    "parser,data",
    [
        (ethernet.parse, ECHO_TO_GATEWAY[:E]),
        (arp.parse, ARP_REQUEST[E:]),
        (ipv4.parse, ECHO_TO_GATEWAY[E : E + 20]),
        (icmpv4.parse, ECHO_TO_GATEWAY[E + 20 : E + 28]),
        (lambda d: udp.parse(d, GUEST_IP, DNS), UDP_TO_DNS[E + 20 : E + 28]),
    ],
)
def test_each_parser_rejects_every_short_input(parser, data):
    for length in range(len(data)):
        with pytest.raises(MalformedFrame):
            parser(data[:length])
        with pytest.raises(MalformedFrame):
            parser(memoryview(data)[:length])
