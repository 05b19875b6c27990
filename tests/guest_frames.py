"""Frames captured from a real Linux guest (kernel 6.x), as hex.

How they were captured (as root, inside one throwaway namespace): ``ip netns
add g``; a process in g opens /dev/net/tun and creates TAP ``tap0``
(IFF_TAP|IFF_NO_PI), as the forwarder does, and records every frame it reads;
tap0 gets MAC 02:00:00:00:00:64, 10.0.2.100/24 and a default route via
10.0.2.2. Then, in g: ``ping -c1 10.0.2.2`` with no neighbour entry (the ARP
request), static neighbour entries for 10.0.2.2 and 10.0.2.3, ``ping -p
0123456789abcdef 10.0.2.2``, ``ping -R 10.0.2.3`` (record-route option), and
from a UDP socket bound to 10.0.2.100:40000: b"hello pyslirp" to 10.0.2.3:53,
b"x" to 198.51.100.7:9 and ``bytes(range(256)) * 12`` to 198.51.100.7:9 (a
documentation address; nothing left the TAP, which nobody else read). The ARP
reply is the kernel's answer to a request the recorder wrote into the TAP.

A TAP (not a veth) matters: over veth the kernel leaves UDP checksums to
offload and a capture shows partial sums.

The three fragments of the last datagram are stored as their Ethernet and IP
headers; their payload is the known pattern, checked at capture time to equal
the captured bytes.
"""

ARP_REQUEST = bytes.fromhex(
    "ffffffffffff020000000064080600010800060400010200000000640a0002640000000000000a000202"
)
ARP_REPLY = bytes.fromhex(
    "52550a000202020000000064080600010800060400020200000000640a00026452550a0002020a000202"
)
# ping -p 0123456789abcdef 10.0.2.2: id 0x2bee, seq 1, DF, TTL 64, IP id 0xe6b7.
ECHO_TO_GATEWAY = bytes.fromhex(
    "52550a000202020000000064080045000054e6b7400040013b8c0a0002640a000202080048aa2bee0001a3bb"
    "0b6b00000000af830e00000000000123456789abcdef0123456789abcdef0123456789abcdef0123456789ab"
    "cdef0123456789abcdef"
)
ECHO_TO_GATEWAY_IDENT = 0x2BEE
# ping -R 10.0.2.3: a 60-byte IP header (record-route option), id 0x2c27, seq 1.
ECHO_WITH_OPTIONS = bytes.fromhex(
    "52550a00020302000000006408004f00007cd13f4000400112680a0002640a000203010727080a0002640000"
    "00000000000000000000000000000000000000000000000000000000000008009d462c270001a4bb0b6b0000"
    "0000b1970e0000000000101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031"
    "323334353637"
)
ECHO_WITH_OPTIONS_IDENT = 0x2C27
# b"hello pyslirp" from 10.0.2.100:40000 to 10.0.2.3:53, DF, IP id 0xcf4a.
UDP_TO_DNS = bytes.fromhex(
    "52550a000203020000000064080045000029cf4a4000401153130a0002640a0002039c4000350015499d6865"
    "6c6c6f207079736c697270"
)
# b"x" from 10.0.2.100:40000 to 198.51.100.7:9: 43 bytes, no Ethernet padding.
UDP_ONE_BYTE = bytes.fromhex(
    "52550a00020202000000006408004500001de530400040111f010a000264c63364079c4000090009b4f378"
)

# bytes(range(256)) * 12 from 10.0.2.100:40000 to 198.51.100.7:9, IP id 0xe531.
UDP_FRAGMENTED_IDENT = 0xE531
UDP_FRAGMENTED_PAYLOAD = bytes(range(256)) * 12
_UDP_DATAGRAM = bytes.fromhex("9c4000090c0811f9") + UDP_FRAGMENTED_PAYLOAD
_FRAGMENT_HEADERS = (
    "52550a0002020200000000640800450005dce5312000401139410a000264c6336407",
    "52550a0002020200000000640800450005dce53120b9401138880a000264c6336407",
    "52550a00020202000000006408004500008ce531017240115d1f0a000264c6336407",
)
UDP_FRAGMENTS = (
    bytes.fromhex(_FRAGMENT_HEADERS[0]) + _UDP_DATAGRAM[0:1480],
    bytes.fromhex(_FRAGMENT_HEADERS[1]) + _UDP_DATAGRAM[1480:2960],
    bytes.fromhex(_FRAGMENT_HEADERS[2]) + _UDP_DATAGRAM[2960:],
)

GUEST_MAC = bytes.fromhex("020000000064")
GUEST_IP = bytes([10, 0, 2, 100])
