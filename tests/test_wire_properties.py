"""Property-based tests of the wire parsers (hypothesis).

Two properties for every parser that takes guest bytes:

- any bytes give either a parsed value or the parser's one error type
  (MalformedFrame in the stack, MalformedDhcp / MalformedDhcpv6 in the NAT
  side's servers), never another exception;
- building a header with the emitter and parsing it back gives the same
  fields.

Seeded through hypothesis' own database-free settings so a CI run is
repeatable; the example counts keep the file within a few seconds.
"""

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyslirp.nat import dhcp, dhcpv6, dns
from pyslirp.stack import arp, ethernet, icmpv4, icmpv6, ipv4, ipv6, ndp, tcp, udp, virtio
from pyslirp.stack.errors import MalformedFrame

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

ANY = st.binary(max_size=200)
ADDR4 = st.binary(min_size=4, max_size=4)
ADDR6 = st.binary(min_size=16, max_size=16)
MAC = st.binary(min_size=6, max_size=6)
PORT = st.integers(1, 65535)
U32 = st.integers(0, 2**32 - 1)
U16 = st.integers(0, 65535)


def parsed_or_malformed(parse, *args, error=MalformedFrame):
    """Call ``parse``; only ``error`` may escape. Return the value or None."""
    try:
        return parse(*args)
    except error as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return None


# -- any bytes: a value or the one error ------------------------------------


@SETTINGS
@given(ANY)
def test_ethernet_any_bytes(data):
    value = parsed_or_malformed(ethernet.parse, data)
    if value is not None:
        assert len(data) >= ethernet.HEADER_LEN


@SETTINGS
@given(ANY)
def test_arp_any_bytes(data):
    value = parsed_or_malformed(arp.parse, data)
    if value is not None:
        assert value[0] in (arp.REQUEST, arp.REPLY)


@SETTINGS
@given(ANY, st.sampled_from([b"", b"\x45", b"\x46", b"\x4f"]))
def test_ipv4_any_bytes(data, prefix):
    data = prefix + data
    value = parsed_or_malformed(ipv4.parse, memoryview(data))
    if value is not None:
        assert 20 <= value.header_len <= value.total_len <= len(data)


@SETTINGS
@given(ANY, st.sampled_from([b"", b"\x60\x00\x00\x00"]), st.sampled_from([0, 6, 17, 43, 44, 60]))
def test_ipv6_any_bytes(data, prefix, next_header):
    data = bytearray(prefix + data)
    if len(data) >= 7:
        data[6] = next_header  # steer into the extension-header walk often
    value = parsed_or_malformed(ipv6.parse, memoryview(bytes(data)))
    if value is not None:
        assert 40 <= value.header_len <= value.total_len <= len(data)


@SETTINGS
@given(ANY, ADDR4, ADDR4, st.booleans())
def test_tcp_any_bytes(data, src, dst, verify):
    value = parsed_or_malformed(tcp.parse, memoryview(data), src, dst, verify)
    if value is not None:
        assert value.src_port and value.dst_port
        assert len(value.payload) <= len(data) - 20


@SETTINGS
@given(st.binary(max_size=40))
def test_tcp_options_any_bytes(options):
    segment = tcp.TcpSegment(1, 2, 0, 0, 0, 0, 0, memoryview(b""))
    parsed_or_malformed(tcp.parse_options, segment, options)
    assert segment.window_scale <= tcp.MAX_WINDOW_SCALE


@SETTINGS
@given(ANY, st.one_of(ADDR4, ADDR6), st.booleans())
def test_udp_any_bytes(data, src, verify):
    dst = bytes(len(src))
    value = parsed_or_malformed(udp.parse, memoryview(data), src, dst, verify)
    if value is not None:
        assert 8 <= value[2] <= len(data)


@SETTINGS
@given(ANY)
def test_icmpv4_any_bytes(data):
    parsed_or_malformed(icmpv4.parse, memoryview(data))


@SETTINGS
@given(ANY, ADDR6, ADDR6)
def test_icmpv6_any_bytes(data, src, dst):
    parsed_or_malformed(icmpv6.parse, memoryview(data), src, dst)


@SETTINGS
@given(ANY)
def test_ndp_any_bytes(data):
    value = parsed_or_malformed(ndp.parse_solicitation, memoryview(data))
    if value is not None:
        assert len(value[0]) == 16
    parsed_or_malformed(ndp.parse_options, memoryview(data))


@SETTINGS
@given(ANY)
def test_virtio_any_bytes(data):
    parsed_or_malformed(virtio.parse, data)


@SETTINGS
@given(st.binary(max_size=400), st.booleans())
def test_dhcp_any_bytes(data, plausible):
    if plausible:
        # A BOOTREQUEST head with the cookie, so the options parser is reached.
        head = bytearray(dhcp.HEADER_LEN)
        head[0:3] = b"\x01\x01\x06"
        head[dhcp.HEADER_LEN - 4 :] = struct.pack("!I", dhcp.MAGIC_COOKIE)
        data = bytes(head) + data
    parsed_or_malformed(dhcp.parse, data, error=dhcp.MalformedDhcp)


@SETTINGS
@given(ANY)
def test_dhcpv6_any_bytes(data):
    parsed_or_malformed(dhcpv6.parse, data, error=dhcpv6.MalformedDhcpv6)


@SETTINGS
@given(ANY)
def test_dns_question_any_bytes(data):
    question = dns.question_of(data)
    assert question is None or (5 <= len(question) <= 259)


# -- build then parse: the same fields --------------------------------------


@SETTINGS
@given(MAC, MAC, U16)
def test_ethernet_round_trip(dst, src, ethertype):
    assert ethernet.parse(ethernet.header(dst, src, ethertype) + b"x") == (dst, src, ethertype)


@SETTINGS
@given(st.sampled_from([arp.REQUEST, arp.REPLY]), MAC, ADDR4, MAC, ADDR4)
def test_arp_round_trip(oper, sha, spa, tha, tpa):
    assert arp.parse(arp.emit(oper, sha, spa, tha, tpa)) == (oper, sha, spa, tha, tpa)


@SETTINGS
@given(
    ADDR4,
    ADDR4,
    st.integers(0, 255),
    st.binary(max_size=64),
    U16,
    st.integers(0, 255),
    st.booleans(),
    st.booleans(),
    st.integers(0, 0x1FFF),
    st.integers(0, 255),
)
def test_ipv4_round_trip(src, dst, proto, payload, ident, ttl, df, mf, offset, tos):
    flags = (ipv4.FLAG_DF if df else 0) | (ipv4.FLAG_MF if mf else 0) | offset
    packet = ipv4.header(src, dst, proto, len(payload), ident, ttl, flags, tos) + payload
    header = ipv4.parse(memoryview(packet + b"\0\0pad"))
    assert (header.src, header.dst, header.protocol, header.ident, header.ttl, header.tos) == (
        src,
        dst,
        proto,
        ident,
        ttl,
        tos,
    )
    assert (header.dont_fragment, header.more_fragments, header.fragment_offset) == (
        df,
        mf,
        offset * 8,
    )
    assert header.header_len == 20 and header.total_len == len(packet)


@SETTINGS
@given(ADDR6, ADDR6, st.sampled_from([6, 17, 58, 59]), st.binary(max_size=64), st.integers(0, 255))
def test_ipv6_round_trip(src, dst, next_header, payload, hop_limit):
    packet = ipv6.header(src, dst, next_header, len(payload), hop_limit) + payload
    header = ipv6.parse(memoryview(packet))
    assert (header.src, header.dst, header.protocol, header.hop_limit) == (
        src,
        dst,
        next_header,
        hop_limit,
    )
    assert header.header_len == 40 and header.total_len == len(packet)


@SETTINGS
@given(ADDR6, ADDR6, st.sampled_from([6, 17, 58, 59]), st.binary(min_size=1, max_size=3000), U32)
def test_ipv6_fragments_parse(src, dst, next_header, payload, ident):
    offsets = []
    for packet in ipv6.fragment(src, dst, next_header, payload, ident, ipv6.MIN_MTU):
        header = ipv6.parse(memoryview(packet))
        assert header.fragment_id == ident and header.protocol == next_header
        offsets.append(header.fragment_offset)
    assert offsets == sorted(offsets) and offsets[0] == 0


@SETTINGS
@given(
    st.one_of(st.tuples(ADDR4, ADDR4), st.tuples(ADDR6, ADDR6)),
    PORT,
    PORT,
    U32,
    U32,
    st.integers(0, 255),
    U16,
    st.integers(0, 65535),
    st.integers(-1, 14),
    st.booleans(),
    st.one_of(st.none(), st.tuples(U32, U32)),
    st.binary(max_size=100),
)
def test_tcp_round_trip(addrs, sport, dport, seq, ack, flags, window, mss, ws, sack, ts, payload):
    src, dst = addrs
    options = tcp.build_options(mss, ws, sack, ts)
    options += b"\0" * (-len(options) % 4)
    wire = tcp.emit(src, dst, sport, dport, seq, ack, flags, window, options, payload)
    segment = tcp.parse(memoryview(wire), src, dst)
    assert (segment.src_port, segment.dst_port, segment.seq, segment.ack) == (
        sport,
        dport,
        seq,
        ack,
    )
    assert (segment.flags, segment.window, bytes(segment.payload)) == (flags, window, payload)
    assert (segment.mss, segment.window_scale, segment.sack_permitted, segment.timestamp) == (
        mss,
        ws,
        sack,
        ts,
    )


@SETTINGS
@given(st.one_of(st.tuples(ADDR4, ADDR4), st.tuples(ADDR6, ADDR6)), PORT, PORT, ANY)
def test_udp_round_trip(addrs, sport, dport, payload):
    src, dst = addrs
    wire = udp.emit(src, dst, sport, dport, payload)
    assert udp.parse(memoryview(wire), src, dst) == (sport, dport, 8 + len(payload))


@SETTINGS
@given(st.integers(0, 255), st.integers(0, 255), U16, U16, ANY)
def test_icmpv4_round_trip(icmp_type, code, word1, word2, body):
    wire = icmpv4.emit(icmp_type, code, word1, word2, body)
    assert icmpv4.parse(memoryview(wire)) == (icmp_type, code, word1, word2)


@SETTINGS
@given(ADDR6, ADDR6, st.integers(0, 255), st.integers(0, 255), U32, ANY)
def test_icmpv6_round_trip(src, dst, icmp_type, code, word, body):
    wire = icmpv6.emit(src, dst, icmp_type, code, word, body)
    assert icmpv6.parse(memoryview(wire), src, dst) == (icmp_type, code, word)


@SETTINGS
@given(ADDR6.filter(lambda a: a[0] != 0xFF), MAC)
def test_ndp_round_trip(target, mac):
    parsed_target, options = ndp.parse_solicitation(ndp.neighbor_advertisement(target, mac))
    assert parsed_target == target
    assert ndp.link_address(options, ndp.OPT_TARGET_LINK_ADDRESS) == mac


@SETTINGS
@given(st.integers(0, 100), st.integers(20, 60), st.integers(20, 60), st.booleans(), U16)
def test_virtio_round_trip(l3, ip_len, tcp_len, gso, mss):
    kind = virtio.GSO_TCPV4 if gso else virtio.GSO_NONE
    flags, gso_type, hdr_len, gso_size, start, offset = virtio.parse(
        virtio.tcp_header(l3, ip_len, tcp_len, kind, mss)
    )
    assert (flags, gso_type, hdr_len, start, offset) == (
        virtio.F_NEEDS_CSUM,
        kind,
        l3 + ip_len + tcp_len,
        l3 + ip_len,
        virtio.TCP_CHECKSUM_OFFSET,
    )
    assert gso_size == (mss if gso else 0)


@SETTINGS
@given(
    st.dictionaries(
        st.integers(1, 65535).filter(lambda c: c not in (0,)), st.binary(max_size=30), max_size=8
    ),
    st.integers(1, 255),
    st.binary(min_size=3, max_size=3),
)
def test_dhcpv6_round_trip(options, message_type, xid):
    wire = bytes([message_type]) + xid + b"".join(dhcpv6.option(c, v) for c, v in options.items())
    assert dhcpv6.parse(wire) == (message_type, xid, options)


@SETTINGS
@given(
    U32,
    MAC,
    st.dictionaries(
        st.integers(1, 254).filter(lambda c: c != dhcp.OPT_OVERLOAD),
        st.binary(max_size=40),
        max_size=8,
    ),
)
def test_dhcp_round_trip(xid, mac, options):
    head = bytearray(dhcp.HEADER_LEN)
    head[0:3] = b"\x01\x01\x06"
    head[4:8] = struct.pack("!I", xid)
    head[28:34] = mac
    head[dhcp.HEADER_LEN - 4 :] = struct.pack("!I", dhcp.MAGIC_COOKIE)
    body = b"".join(bytes((c, len(v))) + v for c, v in options.items()) + bytes((dhcp.OPT_END,))
    message = dhcp.parse(bytes(head) + body)
    assert (message.xid, message.chaddr, message.options) == (xid, mac, options)


@SETTINGS
@given(
    st.lists(
        st.binary(min_size=1, max_size=20).filter(lambda b: True), min_size=1, max_size=5
    ),
    U16,
    U16,
)
def test_dns_question_round_trip(labels, qtype, qclass):
    name = b"".join(bytes((len(label),)) + label for label in labels) + b"\0"
    question = name + struct.pack("!HH", qtype, qclass)
    message = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + question
    assert dns.question_of(message) == question
