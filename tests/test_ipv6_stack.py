"""IPv6 in the sans-IO stack, frame by frame, with a plain float clock.

Neighbour discovery, router advertisements, ICMPv6 echo and errors,
extension headers, fragments and egress toward the guest. Each test feeds
whole frames and asserts "exactly these frames, then nothing"; expected
frames are built with scapy, independently of the emitters under test, and
the guest's frames are either captured from a Linux kernel
(tests/ipv6_frames.py) or built with scapy.
"""

import ipaddress
import itertools
import random

import pytest
from scapy.layers.inet import UDP
from scapy.layers.inet6 import (
    HBHOptUnknown,
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_RS,
    ICMPv6NDOptDNSSL,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptMTU,
    ICMPv6NDOptPrefixInfo,
    ICMPv6NDOptRDNSS,
    ICMPv6NDOptSrcLLAddr,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
    defragment6,
    fragment6,
)
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from pyslirp.stack import icmpv4
from pyslirp.stack.config import StackConfig
from pyslirp.stack.events import IcmpEchoRequested, UdpDatagramReceived
from pyslirp.stack.interface import Stack
from tests import ipv6_frames

GUEST_MAC = "02:00:00:00:00:64"
GW_MAC = "52:56:00:00:00:02"
DNS_MAC = "52:56:00:00:00:03"
LL = "fe80::ff:fe00:64"  # the captured guest's link-local address
GUEST = "fd00::ff:fe00:64"  # and its SLAAC address
GW = "fd00::2"
GW_LL = "fe80::2"
DNS = "fd00::3"
OUT = "2001:db8::7"
ALL_NODES = "ff02::1"
ALL_NODES_MAC = "33:33:00:00:00:01"
FRAG_ID = 0x10001001  # the stack's first fragment id with FixedRandom (0x1000 + 1)


def a6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


class FixedRandom:
    def getrandbits(self, bits: int) -> int:
        return 0x10001000 if bits == 32 else 0x1000


def new_stack(now: float | None = 0.0, **config) -> Stack:
    """An IPv6 stack whose first periodic RA (due at once) has gone, at ``now``."""
    config.setdefault("ipv6", True)
    config.setdefault("guest_probe_delays", ())  # tested on their own below
    stack = Stack(StackConfig(**config), FixedRandom())
    if now is not None:
        stack.handle_timer(now)
        stack.frames_to_send(now)
        stack.ipv6.ra_at = None  # no more periodic RAs in these scripts
        stack.ipv6.probe_at = None  # nor the probes that RA scheduled
    return stack


def from_guest(pkt, dst_mac: str = GW_MAC, src_mac: str = GUEST_MAC) -> bytes:
    return bytes(Ether(src=src_mac, dst=dst_mac) / pkt)


def to_guest(pkt, dst_mac: str = GUEST_MAC, src_mac: str = GW_MAC) -> bytes:
    return bytes(Ether(src=src_mac, dst=dst_mac) / pkt)


def describe(frames) -> str:
    return "\n".join(Ether(f).summary() for f in frames)


def assert_frames(stack: Stack, expected: list[bytes], now: float = 1.0) -> None:
    got = stack.frames_to_send(now)
    if got != expected:
        for g, e in zip(got, expected, strict=False):
            if g != e:
                Ether(g).show2()
                Ether(e).show2()
                break
    assert got == expected, f"got:\n{describe(got)}\nexpected:\n{describe(expected)}"
    assert stack.frames_to_send(now) == []


def events(stack: Stack) -> list:
    out = []
    while (event := stack.next_event()) is not None:
        out.append(event)
    return out


def guest_knows_gateway(stack: Stack, src: str = GUEST) -> None:
    """The guest has resolved the gateway and we know the guest's MAC."""
    stack.receive_frame(
        from_guest(
            IPv6(src=src, dst="ff02::1:ff00:2", hlim=255)
            / ICMPv6ND_NS(tgt=GW)
            / ICMPv6NDOptSrcLLAddr(lladdr=GUEST_MAC),
            dst_mac="33:33:ff:00:00:02",
        ),
        0.5,
    )
    stack.frames_to_send(0.5)


def expected_ra(dst: str = ALL_NODES, dst_mac: str = ALL_NODES_MAC, mtu=1500, search=None):
    ra = (
        IPv6(src=GW_LL, dst=dst, hlim=255)
        / ICMPv6ND_RA(
            chlim=64, M=0, O=1, prf=0, routerlifetime=1800, reachabletime=0, retranstimer=0
        )
        / ICMPv6NDOptSrcLLAddr(lladdr=GW_MAC)
        / ICMPv6NDOptMTU(mtu=mtu)
        / ICMPv6NDOptPrefixInfo(
            prefixlen=64, L=1, A=1, validlifetime=2592000, preferredlifetime=604800, prefix="fd00::"
        )
        / ICMPv6NDOptRDNSS(lifetime=1800, dns=[DNS])
    )
    if search:
        ra = ra / ICMPv6NDOptDNSSL(lifetime=1800, searchlist=search)
    return to_guest(ra, dst_mac=dst_mac)


# ---------------------------------------------------------------- off by default
def test_ipv6_frames_dropped_when_off():
    stack = Stack(StackConfig(), FixedRandom())
    stack.receive_frame(ipv6_frames.ROUTER_SOLICITATION, 0.0)
    assert stack.drops["ethertype-unsupported"] == 1
    assert stack.frames_to_send(0.0) == [] and stack.get_timer() is None


def test_mtu_below_ipv6_minimum_refused():
    with pytest.raises(ValueError, match="1280"):
        Stack(StackConfig(ipv6=True, mtu=1279), FixedRandom())


# ---------------------------------------------------------------- neighbour discovery
@pytest.mark.parametrize(
    ("target", "mac", "router"), [(GW, GW_MAC, 1), (GW_LL, GW_MAC, 1), (DNS, DNS_MAC, 0)]
)
def test_neighbor_solicitation_answered_for_our_addresses(target, mac, router):
    stack = new_stack()
    group = "ff02::1:ff00:" + target[-1]  # the solicited-node group of ::2 or ::3
    ns = (
        IPv6(src=LL, dst=group, hlim=255)
        / ICMPv6ND_NS(tgt=target)
        / ICMPv6NDOptSrcLLAddr(lladdr=GUEST_MAC)
    )
    stack.receive_frame(from_guest(ns, dst_mac="33:33:ff:00:00:0" + target[-1]), 1.0)
    na = (
        IPv6(src=target, dst=LL, hlim=255)
        / ICMPv6ND_NA(tgt=target, R=router, S=1, O=1)
        / ICMPv6NDOptDstLLAddr(lladdr=mac)
    )
    assert_frames(stack, [to_guest(na)])
    assert stack.ipv6.neighbors[a6(LL)] == bytes.fromhex("020000000064")


def test_unicast_neighbor_solicitation_for_reachability_answered():
    stack = new_stack()
    ns = IPv6(src=LL, dst=GW_LL, hlim=255) / ICMPv6ND_NS(tgt=GW_LL)
    stack.receive_frame(from_guest(ns), 1.0)
    na = (
        IPv6(src=GW_LL, dst=LL, hlim=255)
        / ICMPv6ND_NA(tgt=GW_LL, R=1, S=1, O=1)
        / ICMPv6NDOptDstLLAddr(lladdr=GW_MAC)
    )
    assert_frames(stack, [to_guest(na)])


def test_solicitation_for_other_addresses_not_answered():
    stack = new_stack()
    for target in (GUEST, "fd00::4", "fe80::3"):
        # To the target's solicited-node group, which we are not in...
        group = "ff02::1:ff00:" + target.rsplit(":", 1)[1]
        ns = (
            IPv6(src=LL, dst=group, hlim=255)
            / ICMPv6ND_NS(tgt=target)
            / ICMPv6NDOptSrcLLAddr(lladdr=GUEST_MAC)
        )
        stack.receive_frame(from_guest(ns), 1.0)
        # ...or sent to us by mistake.
        ns = IPv6(src=LL, dst=GW_LL, hlim=255) / ICMPv6ND_NS(tgt=target)
        stack.receive_frame(from_guest(ns), 1.0)
    assert_frames(stack, [])
    assert stack.drops["ndp-not-ours"] == 6


def test_captured_dad_teaches_the_guest_address_and_is_not_answered():
    stack = new_stack()
    stack.receive_frame(ipv6_frames.DAD_SOLICITATION, 1.0)
    assert_frames(stack, [])
    assert stack.guest_address6 is None  # a link-local address: not in the prefix
    dad = IPv6(src="::", dst="ff02::1:ff00:64", hlim=255) / ICMPv6ND_NS(tgt=GUEST)
    stack.receive_frame(from_guest(dad, dst_mac="33:33:ff:00:00:64"), 1.0)
    assert_frames(stack, [])
    assert stack.guest_address6 == a6(GUEST)
    assert not +stack.drops


def test_dad_for_our_address_is_defended():
    stack = new_stack()
    dad = IPv6(src="::", dst="ff02::1:ff00:2", hlim=255) / ICMPv6ND_NS(tgt=GW)
    stack.receive_frame(from_guest(dad, dst_mac="33:33:ff:00:00:02"), 1.0)
    na = (
        IPv6(src=GW, dst=ALL_NODES, hlim=255)
        / ICMPv6ND_NA(tgt=GW, R=1, S=0, O=1)
        / ICMPv6NDOptDstLLAddr(lladdr=GW_MAC)
    )
    assert_frames(stack, [to_guest(na, dst_mac=ALL_NODES_MAC)])


@pytest.mark.parametrize(
    "bad",
    [
        IPv6(src=LL, dst=GW_LL, hlim=64) / ICMPv6ND_NS(tgt=GW_LL),  # not hop limit 255
        IPv6(src=LL, dst=GW_LL, hlim=255) / ICMPv6ND_NS(code=1, tgt=GW_LL),
        IPv6(src=LL, dst=GW_LL, hlim=255) / ICMPv6ND_NS(tgt="ff02::1"),  # multicast target
        # DAD to a unicast address, and DAD with a link-layer option.
        IPv6(src="::", dst=GW_LL, hlim=255) / ICMPv6ND_NS(tgt=GW_LL),
        IPv6(src="::", dst="ff02::1:ff00:2", hlim=255)
        / ICMPv6ND_NS(tgt=GW_LL)
        / ICMPv6NDOptSrcLLAddr(lladdr=GUEST_MAC),
        IPv6(src=LL, dst=GW_LL, hlim=255) / ICMPv6ND_NS(tgt=GW_LL) / Raw(b"\x01\x00" + bytes(6)),
    ],
)
def test_invalid_neighbor_solicitations_dropped(bad):
    stack = new_stack()
    stack.receive_frame(from_guest(bad), 1.0)
    assert_frames(stack, [])
    assert sum(stack.drops.values()) == 1 and stack.drops["internal-error"] == 0


def test_captured_mld_reports_ignored_quietly():
    stack = new_stack()
    stack.receive_frame(ipv6_frames.MLD_REPORT_UNSPECIFIED, 1.0)
    assert_frames(stack, [])
    assert stack.drops["ipv6-multicast"] == 1  # ff02::16 is not a group we are in


# ---------------------------------------------------------------- router advertisements
def test_captured_router_solicitation_answered_unicast():
    stack = new_stack()
    stack.receive_frame(ipv6_frames.ROUTER_SOLICITATION, 1.0)
    assert_frames(stack, [expected_ra(dst=LL, dst_mac=GUEST_MAC)])
    assert stack.ipv6.neighbors[a6(LL)] == ipv6_frames.GUEST_MAC


def test_router_advertisement_carries_mtu_and_search_list():
    stack = new_stack(mtu=65520, dns_search=("example.test", "corp.example"))
    stack.receive_frame(ipv6_frames.ROUTER_SOLICITATION, 1.0)
    (frame,) = stack.frames_to_send(1.0)
    assert frame == expected_ra(
        dst=LL, dst_mac=GUEST_MAC, mtu=65520, search=["example.test.", "corp.example."]
    )
    ra = Ether(frame)
    assert ra[ICMPv6NDOptDNSSL].searchlist == ["example.test.", "corp.example."]


def test_solicitation_from_unspecified_answered_by_multicast_at_most_every_3_s():
    stack = new_stack()
    rs = IPv6(src="::", dst="ff02::2", hlim=255) / ICMPv6ND_RS()
    stack.receive_frame(from_guest(rs, dst_mac="33:33:00:00:00:02"), 10.0)
    assert_frames(stack, [expected_ra()], now=10.0)
    stack.receive_frame(from_guest(rs, dst_mac="33:33:00:00:00:02"), 11.0)
    assert_frames(stack, [], now=11.0)
    assert stack.get_timer() == 13.0
    stack.handle_timer(13.0)
    assert_frames(stack, [expected_ra()], now=13.0)


def test_periodic_router_advertisements():
    stack = new_stack(now=None)
    assert stack.get_timer() == 0.0
    stack.handle_timer(0.0)
    assert_frames(stack, [expected_ra()], now=0.0)
    # RFC 4861 6.2.4: the first ones 16 s apart, then between 198 and 600 s.
    assert stack.get_timer() == 16.0
    stack.handle_timer(16.0)
    assert_frames(stack, [expected_ra()], now=16.0)
    stack.handle_timer(32.0)
    assert_frames(stack, [expected_ra()], now=32.0)
    later = stack.get_timer() - 32.0
    assert 198.0 <= later <= 600.0
    stack.handle_timer(31.0 + later)
    assert_frames(stack, [], now=31.0 + later)


def test_router_advertisements_and_redirects_from_the_guest_ignored():
    stack = new_stack()
    ra = IPv6(src=LL, dst=ALL_NODES, hlim=255) / ICMPv6ND_RA()
    stack.receive_frame(from_guest(ra, dst_mac=ALL_NODES_MAC), 1.0)
    assert_frames(stack, [])
    assert stack.drops["ndp-from-another-router"] == 1


# ---------------------------------------------------------------- echo
def test_captured_echo_to_gateway_answered():
    stack = new_stack()
    stack.receive_frame(ipv6_frames.ECHO_TO_GATEWAY, 1.0)
    request = Ether(ipv6_frames.ECHO_TO_GATEWAY)
    reply = IPv6(src=GW, dst=GUEST) / ICMPv6EchoReply(
        id=ipv6_frames.ECHO_TO_GATEWAY_IDENT, seq=1, data=request.data
    )
    assert_frames(stack, [to_guest(reply)])
    assert stack.guest_address6 == ipv6_frames.GUEST_GLOBAL


@pytest.mark.parametrize("dst", [GW_LL, DNS])
def test_echo_to_link_local_gateway_and_dns_answered(dst):
    stack = new_stack()
    src = LL if dst == GW_LL else GUEST
    stack.receive_frame(
        from_guest(IPv6(src=src, dst=dst) / ICMPv6EchoRequest(id=7, seq=9, data=b"abc")), 1.0
    )
    assert_frames(
        stack, [to_guest(IPv6(src=dst, dst=src) / ICMPv6EchoReply(id=7, seq=9, data=b"abc"))]
    )


def test_echo_to_outside_becomes_an_event():
    stack = new_stack()
    stack.receive_frame(
        from_guest(IPv6(src=GUEST, dst=OUT, hlim=9) / ICMPv6EchoRequest(id=7, seq=9, data=b"x")),
        1.0,
    )
    assert_frames(stack, [])
    (event,) = events(stack)
    assert isinstance(event, IcmpEchoRequested)
    assert (event.src, event.dst, event.ident, event.sequence, event.payload, event.ttl) == (
        a6(GUEST),
        a6(OUT),
        7,
        9,
        b"x",
        9,
    )
    assert len(event.packet) == 48


def test_echo_with_bad_checksum_dropped():
    stack = new_stack()
    stack.receive_frame(
        from_guest(IPv6(src=GUEST, dst=GW) / ICMPv6EchoRequest(id=7, seq=9, cksum=0x1234)), 1.0
    )
    assert_frames(stack, [])
    assert stack.drops["icmpv6-bad-checksum"] == 1


def test_echo_reply_command_for_the_relay():
    stack = new_stack()
    guest_knows_gateway(stack)
    stack.send_echo_reply(a6(OUT), a6(GUEST), 7, 9, b"pong", 1.0)
    assert_frames(
        stack, [to_guest(IPv6(src=OUT, dst=GUEST) / ICMPv6EchoReply(id=7, seq=9, data=b"pong"))]
    )


# ---------------------------------------------------------------- UDP and errors
def test_udp_to_dns_becomes_an_event_with_a_quote():
    stack = new_stack()
    stack.receive_frame(
        from_guest(IPv6(src=GUEST, dst=DNS) / UDP(sport=4000, dport=53) / Raw(b"query")), 1.0
    )
    (event,) = events(stack)
    assert isinstance(event, UdpDatagramReceived)
    assert (event.src, event.src_port, event.dst, event.dst_port, event.payload) == (
        a6(GUEST),
        4000,
        a6(DNS),
        53,
        b"query",
    )
    assert (
        event.packet == bytes(IPv6(src=GUEST, dst=DNS) / UDP(sport=4000, dport=53) / b"query")[:48]
    )


def test_udp_zero_checksum_dropped():
    stack = new_stack()
    frame = bytearray(from_guest(IPv6(src=GUEST, dst=OUT) / UDP(sport=1, dport=2) / b"x"))
    frame[14 + 40 + 6 : 14 + 40 + 8] = b"\0\0"
    stack.receive_frame(bytes(frame), 1.0)
    assert events(stack) == []
    assert stack.drops["udp-zero-checksum"] == 1


def test_udp_to_dhcp_agents_passes_other_multicast_dropped():
    stack = new_stack()
    dhcp = IPv6(src=LL, dst="ff02::1:2") / UDP(sport=546, dport=547) / b"x"
    mdns = IPv6(src=LL, dst="ff02::fb") / UDP(sport=5353, dport=5353) / b"x"
    stack.receive_frame(from_guest(dhcp, dst_mac="33:33:00:01:00:02"), 1.0)
    stack.receive_frame(from_guest(mdns, dst_mac="33:33:00:00:00:fb"), 1.0)
    (event,) = events(stack)
    assert event.dst == a6("ff02::1:2") and event.dst_port == 547
    assert stack.drops["ipv6-multicast"] == 1


@pytest.mark.parametrize(
    ("v4_type", "v4_code", "scapy_error"),
    [
        (icmpv4.DEST_UNREACHABLE, icmpv4.PORT_UNREACHABLE, ICMPv6DestUnreach(code=4)),
        (icmpv4.DEST_UNREACHABLE, icmpv4.HOST_UNREACHABLE, ICMPv6DestUnreach(code=3)),
        (icmpv4.DEST_UNREACHABLE, icmpv4.NET_UNREACHABLE, ICMPv6DestUnreach(code=0)),
        (icmpv4.DEST_UNREACHABLE, icmpv4.ADMIN_PROHIBITED, ICMPv6DestUnreach(code=1)),
        (icmpv4.DEST_UNREACHABLE, icmpv4.FRAGMENTATION_NEEDED, ICMPv6PacketTooBig(mtu=1400)),
        (icmpv4.TIME_EXCEEDED, 0, ICMPv6TimeExceeded(code=0)),
    ],
)
def test_nat_errors_in_v4_terms_become_icmpv6(v4_type, v4_code, scapy_error):
    stack = new_stack()
    guest_knows_gateway(stack)
    original = bytes(IPv6(src=GUEST, dst=OUT) / UDP(sport=1, dport=2) / b"payload")
    stack.send_icmp_error(v4_type, v4_code, original, 1.0, mtu=1400, src=a6(OUT))
    assert_frames(stack, [to_guest(IPv6(src=OUT, dst=GUEST) / scapy_error / Raw(original))])


def test_no_error_about_an_error_or_to_multicast_or_from_unspecified():
    stack = new_stack()
    guest_knows_gateway(stack)
    about_error = bytes(IPv6(src=GUEST, dst=OUT) / ICMPv6DestUnreach() / (b"x" * 8))
    to_multicast = bytes(IPv6(src=GUEST, dst="ff0e::1") / UDP(sport=1, dport=2))
    from_nobody = bytes(IPv6(src="::", dst=OUT) / UDP(sport=1, dport=2))
    for original in (about_error, to_multicast, from_nobody):
        stack.send_icmp_error(icmpv4.DEST_UNREACHABLE, 3, original, 1.0)
    assert_frames(stack, [])


def test_icmpv6_errors_rate_limited():
    stack = new_stack(icmpv6_error_burst=3, icmpv6_error_rate=1.0)
    guest_knows_gateway(stack)
    original = bytes(IPv6(src=GUEST, dst=OUT) / UDP(sport=1, dport=2))
    for _ in range(5):
        stack.send_icmp_error(icmpv4.DEST_UNREACHABLE, 3, original, 1.0)
    assert len(stack.frames_to_send(1.0)) == 3
    assert stack.drops["icmpv6-error-rate-limited"] == 2
    stack.send_icmp_error(icmpv4.DEST_UNREACHABLE, 3, original, 2.0)
    assert len(stack.frames_to_send(2.0)) == 1


def test_packet_larger_than_mtu_gets_packet_too_big():
    stack = new_stack(mtu=1280)
    guest_knows_gateway(stack)
    big = IPv6(src=GUEST, dst=OUT) / UDP(sport=1, dport=2) / Raw(bytes(1300))
    stack.receive_frame(from_guest(big), 1.0)
    quote = bytes(big)[:1232]
    assert_frames(stack, [to_guest(IPv6(src=GW, dst=GUEST) / ICMPv6PacketTooBig(mtu=1280) / quote)])
    assert events(stack) == []


def test_hop_limit_1_to_outside_gets_time_exceeded():
    stack = new_stack()
    guest_knows_gateway(stack)
    pkt = IPv6(src=GUEST, dst=OUT, hlim=1) / UDP(sport=1, dport=2) / b"x"
    stack.receive_frame(from_guest(pkt), 1.0)
    assert_frames(
        stack, [to_guest(IPv6(src=GW, dst=GUEST) / ICMPv6TimeExceeded(code=0) / bytes(pkt))]
    )


# ---------------------------------------------------------------- extension headers
def test_udp_behind_hop_by_hop_and_destination_options():
    stack = new_stack()
    pkt = (
        IPv6(src=GUEST, dst=OUT)
        / IPv6ExtHdrHopByHop(options=[PadN(optdata=b"\0\0\0\0")])
        / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0\0\0\0")])
        / UDP(sport=1, dport=2)
        / b"through"
    )
    stack.receive_frame(from_guest(pkt), 1.0)
    (event,) = events(stack)
    assert event.payload == b"through"
    assert len(event.packet) == 40 + 16 + 8


@pytest.mark.parametrize(
    ("option_type", "answered"), [(0x3E, False), (0x7E, False), (0xBE, True), (0xFE, True)]
)
def test_unknown_options_act_by_their_high_bits(option_type, answered):
    stack = new_stack()
    guest_knows_gateway(stack)
    # The option type byte sits at 40 + 2.
    option = HBHOptUnknown(otype=option_type, optdata=b"\0\0\0\0")
    pkt = IPv6(src=GUEST, dst=OUT) / IPv6ExtHdrHopByHop(options=[option])
    pkt = IPv6(bytes(pkt / UDP(sport=1, dport=2) / b"x"))
    stack.receive_frame(from_guest(pkt), 1.0)
    got_events = events(stack)
    if option_type == 0x3E:  # 00: skip it
        assert len(got_events) == 1
        assert_frames(stack, [])
        return
    assert got_events == []
    if answered:
        expected = IPv6(src=GW, dst=GUEST) / ICMPv6ParamProblem(code=2, ptr=42) / bytes(pkt)
        assert_frames(stack, [to_guest(expected)])
    else:
        assert_frames(stack, [])


def test_unknown_option_to_multicast_answered_only_for_action_10():
    stack = new_stack()
    guest_knows_gateway(stack)
    for option_type in (0xBE, 0xFE):
        option = HBHOptUnknown(otype=option_type, optdata=b"\0\0\0\0")
        pkt = IPv6(src=GUEST, dst=ALL_NODES) / IPv6ExtHdrHopByHop(options=[option])
        pkt = IPv6(bytes(pkt / UDP() / b"x"))
        stack.receive_frame(from_guest(pkt, dst_mac=ALL_NODES_MAC), 1.0)
    (frame,) = stack.frames_to_send(1.0)
    assert Ether(frame)[ICMPv6ParamProblem].code == 2
    assert Ether(frame)[ICMPv6ParamProblem].ptr == 42


def test_routing_header_with_segments_left_gets_parameter_problem():
    stack = new_stack()
    guest_knows_gateway(stack)
    pkt = IPv6(src=GUEST, dst=OUT) / IPv6ExtHdrRouting(addresses=["2001:db8::9"], segleft=1)
    pkt = IPv6(bytes(pkt / UDP(sport=1, dport=2) / b"x"))
    stack.receive_frame(from_guest(pkt), 1.0)
    expected = IPv6(src=GW, dst=GUEST) / ICMPv6ParamProblem(code=0, ptr=42) / bytes(pkt)
    assert_frames(stack, [to_guest(expected)])
    # Segments left 0: the header is skipped.
    pkt = IPv6(src=GUEST, dst=OUT) / IPv6ExtHdrRouting(addresses=["2001:db8::9"], segleft=0)
    stack.receive_frame(from_guest(pkt / UDP(sport=1, dport=2) / b"x"), 1.0)
    assert len(events(stack)) == 1


def test_unknown_next_header_gets_parameter_problem_pointing_at_it():
    stack = new_stack()
    guest_knows_gateway(stack)
    pkt = IPv6(bytes(IPv6(src=GUEST, dst=OUT, nh=60) / IPv6ExtHdrDestOpt(nh=253) / b"12345678"))
    stack.receive_frame(from_guest(pkt), 1.0)
    expected = IPv6(src=GW, dst=GUEST) / ICMPv6ParamProblem(code=1, ptr=40) / bytes(pkt)
    assert_frames(stack, [to_guest(expected)])


def test_hop_by_hop_not_first_is_a_parameter_problem():
    stack = new_stack()
    guest_knows_gateway(stack)
    pkt = IPv6(src=GUEST, dst=OUT) / IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop() / UDP() / b"x"
    pkt = IPv6(bytes(pkt))
    stack.receive_frame(from_guest(pkt), 1.0)
    expected = IPv6(src=GW, dst=GUEST) / ICMPv6ParamProblem(code=1, ptr=40) / bytes(pkt)
    assert_frames(stack, [to_guest(expected)])


def test_long_chains_and_truncated_headers_dropped():
    stack = new_stack()
    chain = IPv6(src=GUEST, dst=OUT)
    for _ in range(9):
        chain = chain / IPv6ExtHdrDestOpt()
    stack.receive_frame(from_guest(chain / UDP() / b"x"), 1.0)
    assert stack.drops["ipv6-too-many-extension-headers"] == 1
    # A destination options header claiming 16 bytes when 8 are there.
    pkt = bytearray(bytes(IPv6(src=GUEST, dst=OUT) / IPv6ExtHdrDestOpt(nh=59)))
    pkt[41] = 1
    stack.receive_frame(bytes(Ether(src=GUEST_MAC, dst=GW_MAC, type=0x86DD) / Raw(pkt)), 1.0)
    assert stack.drops["ipv6-extension-truncated"] == 1
    assert events(stack) == [] and stack.frames_to_send(1.0) == []


# ---------------------------------------------------------------- fragments
PAYLOAD = bytes(range(256)) * 12


def guest_fragments(ident: int = 0x77, size: int = 1280, payload: bytes = PAYLOAD):
    pkt = IPv6(src=GUEST, dst=OUT) / IPv6ExtHdrFragment(id=ident) / UDP(sport=9, dport=10) / payload
    return [from_guest(f) for f in fragment6(pkt, size)]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_fragments_reassembled_in_any_order(order):
    stack = new_stack()
    frames = guest_fragments()
    assert len(frames) == 3
    for i in order:
        stack.receive_frame(frames[i], 1.0)
    (event,) = events(stack)
    assert event.payload == PAYLOAD
    quoted = IPv6(event.packet)
    assert quoted.plen == 8 + len(PAYLOAD) and quoted.nh == 17  # the fragment header is gone
    assert stack.counters["reassembled"] == 1 and len(stack.reassembler) == 0


def test_atomic_fragment_processed_as_whole():
    stack = new_stack()
    pkt = IPv6(src=GUEST, dst=OUT) / IPv6ExtHdrFragment(id=5, offset=0, m=0) / UDP() / b"atomic"
    stack.receive_frame(from_guest(pkt), 1.0)
    (event,) = events(stack)
    assert event.payload == b"atomic"
    assert len(stack.reassembler) == 0


def test_overlapping_fragments_drop_the_datagram():
    stack = new_stack()
    first, second, _third = guest_fragments()
    overlap = Ether(second)
    overlap[IPv6ExtHdrFragment].offset -= 1
    stack.receive_frame(first, 1.0)
    stack.receive_frame(bytes(overlap), 1.0)
    assert stack.drops["fragment-overlap"] == 1 and len(stack.reassembler) == 0
    assert events(stack) == []


def test_reassembly_timeout_sends_time_exceeded_code_1():
    stack = new_stack(reassembly_timeout=30.0)
    guest_knows_gateway(stack)
    first = guest_fragments()[0]
    stack.receive_frame(first, 1.0)
    stack.handle_timer(31.0)
    quote = first[14:][:1232]
    assert_frames(
        stack, [to_guest(IPv6(src=GW, dst=GUEST) / ICMPv6TimeExceeded(code=1) / quote)], now=31.0
    )
    assert stack.drops["reassembly-timeout"] == 1


def test_fragments_share_the_reassembly_bounds():
    stack = new_stack(reassembly_max_datagrams=2)
    for ident in (1, 2, 3):
        stack.receive_frame(guest_fragments(ident)[0], 1.0)
    assert len(stack.reassembler) == 2
    assert stack.drops["reassembly-datagrams-full"] == 1


def test_reassembled_datagram_too_long_dropped():
    stack = new_stack()
    head = IPv6(src=GUEST, dst=OUT) / IPv6ExtHdrFragment(id=9, offset=0, m=1) / Raw(bytes(1224))
    tail = IPv6(src=GUEST, dst=OUT) / IPv6ExtHdrFragment(id=9, offset=65528 // 8, m=0) / (b"x" * 8)
    stack.receive_frame(from_guest(head), 1.0)
    stack.receive_frame(from_guest(tail), 1.0)
    assert stack.drops["fragment-too-long"] == 1
    assert events(stack) == []


# ---------------------------------------------------------------- egress
def test_unknown_guest_is_solicited_and_queued_packets_follow_the_advertisement():
    stack = new_stack()
    stack.send_udp(a6(DNS), 53, a6(GUEST), 4000, b"answer", 1.0)
    ns = (
        IPv6(src=GW, dst="ff02::1:ff00:64", hlim=255)
        / ICMPv6ND_NS(tgt=GUEST)
        / ICMPv6NDOptSrcLLAddr(lladdr=GW_MAC)
    )
    assert_frames(stack, [to_guest(ns, dst_mac="33:33:ff:00:00:64")])
    na = (
        IPv6(src=GUEST, dst=GW, hlim=255)
        / ICMPv6ND_NA(tgt=GUEST, S=1, O=1)
        / ICMPv6NDOptDstLLAddr(lladdr=GUEST_MAC)
    )
    stack.receive_frame(from_guest(na), 1.5)
    udp = IPv6(src=DNS, dst=GUEST) / UDP(sport=53, dport=4000) / b"answer"
    assert_frames(stack, [to_guest(udp)])


def test_solicitation_retried_then_given_up():
    stack = new_stack()
    stack.send_udp(a6(DNS), 53, a6(GUEST), 4000, b"answer", 1.0)
    assert len(stack.frames_to_send(1.0)) == 1
    stack.handle_timer(2.0)
    assert len(stack.frames_to_send(2.0)) == 1
    stack.handle_timer(3.0)
    assert len(stack.frames_to_send(3.0)) == 1
    stack.handle_timer(4.0)
    assert stack.frames_to_send(4.0) == []
    assert stack.drops["nd-unresolved"] == 1


def test_large_datagram_to_guest_fragmented():
    stack = new_stack()
    guest_knows_gateway(stack)
    stack.send_udp(a6(OUT), 7, a6(GUEST), 4000, PAYLOAD, 1.0)
    frames = stack.frames_to_send(1.0)
    assert len(frames) == 3 and all(len(f) <= 14 + 1500 for f in frames)
    packets = [Ether(f)[IPv6] for f in frames]
    assert {p[IPv6ExtHdrFragment].id for p in packets} == {FRAG_ID}
    whole = IPv6(bytes(defragment6(packets)))
    assert bytes(whole[UDP].payload) == PAYLOAD
    assert (
        whole[UDP].chksum
        == UDP(bytes(IPv6(src=OUT, dst=GUEST) / UDP(sport=7, dport=4000) / PAYLOAD)[40:]).chksum
    )


# ---------------------------------------------------------------- fuzz
def test_fuzzed_ipv6_frames_never_escape():
    rng = random.Random(6)
    seeds = [
        ipv6_frames.ROUTER_SOLICITATION,
        ipv6_frames.DAD_SOLICITATION,
        ipv6_frames.MLD_REPORT_UNSPECIFIED,
        ipv6_frames.ECHO_TO_GATEWAY,
        *guest_fragments(),
        from_guest(
            IPv6(src=GUEST, dst=OUT)
            / IPv6ExtHdrHopByHop(options=[PadN(optdata=b"\0\0\0\0")])
            / UDP(sport=1, dport=2)
            / b"x"
        ),
    ]
    stack = new_stack(reassembly_max_datagrams=8, reassembly_max_bytes=1 << 16)
    for i in range(4000):
        frame = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(14, len(frame))
            frame[at] = rng.randrange(256)
        if rng.random() < 0.2:
            frame = frame[: rng.randrange(14, len(frame) + 1)]
        stack.receive_frame(bytes(frame), 1.0 + i * 0.01)
        stack.frames_to_send(1.0)
        events(stack)
        if i % 100 == 0:
            stack.handle_timer(1.0 + i * 0.01)
    assert stack.drops["internal-error"] == 0, stack.last_internal_error
    assert len(stack.reassembler) <= 8
    assert len(stack.ipv6.neighbors) <= stack.config.arp_cache_size
    assert len(stack.ipv6.pending) <= stack.config.arp_pending_addresses


# ---------------------------------------------------------------- asking for the guest's address
def test_guest_address_probed_after_router_advertisement_until_known():
    stack = new_stack(guest_probe_delays=(0.1, 1.5))
    stack.receive_frame(ipv6_frames.ROUTER_SOLICITATION, 1.0)
    stack.frames_to_send(1.0)
    assert stack.get_timer() == 1.1
    stack.handle_timer(1.1)
    probe = IPv6(src=GW, dst=ALL_NODES) / ICMPv6EchoRequest(id=0x7073, seq=1)
    assert_frames(stack, [to_guest(probe, dst_mac=ALL_NODES_MAC)], now=1.1)
    # Linux answers from its SLAAC address: learned, and no further probe.
    reply = IPv6(src=GUEST, dst=GW) / ICMPv6EchoReply(id=0x7073, seq=1)
    stack.receive_frame(from_guest(reply), 1.2)
    assert stack.guest_address6 == a6(GUEST)
    assert_frames(stack, [], now=1.2)
    assert stack.get_timer() == 2.5
    stack.handle_timer(2.5)
    assert_frames(stack, [], now=2.5)
    assert stack.get_timer() is None


def test_no_probe_when_the_guest_address_is_known():
    stack = new_stack(guest_probe_delays=(0.1,))
    guest_knows_gateway(stack)  # an NS from the guest's SLAAC address
    stack.receive_frame(ipv6_frames.ROUTER_SOLICITATION, 1.0)
    stack.frames_to_send(1.0)
    assert stack.get_timer() is None
