"""IPv6 frames captured from a real Linux guest (kernel 6.18), as hex.

How (as root, in one throwaway namespace with no other link): a process
opens /dev/net/tun and creates TAP ``tap0`` (IFF_TAP|IFF_NO_PI) as the
forwarder does, gives it MAC 02:00:00:00:00:64, sets it up and records
every frame it reads for 3.5 s (nobody answers: no router, no neighbour).
Then fd00::ff:fe00:64/64 is added with nodad, a static neighbour entry for
fd00::2 (52:56:00:00:00:02), and ``ping -6 -c1 -p 0123456789abcdef fd00::2``.
Nothing left the TAP, which nobody else read.
"""

import ipaddress

GUEST_MAC = bytes.fromhex("020000000064")
GUEST_LINK_LOCAL = ipaddress.IPv6Address("fe80::ff:fe00:64").packed
GUEST_GLOBAL = ipaddress.IPv6Address("fd00::ff:fe00:64").packed


# MLDv2 report from :: (hop-by-hop header with router alert and PadN).
MLD_REPORT_UNSPECIFIED = bytes.fromhex(
    "33330000001602000000006486dd600000000024000100000000000000000000000000000000ff0200000000"
    "000000000000000000163a000502000001008f006f260000000104000000ff0200000000000000000001ff00"
    "0064"
)
# Duplicate address detection for fe80::ff:fe00:64: from ::, a nonce option.
DAD_SOLICITATION = bytes.fromhex(
    "3333ff00006402000000006486dd6000000000203aff00000000000000000000000000000000ff0200000000"
    "000000000001ff000064870060f800000000fe80000000000000000000fffe0000640e017302ccc2cd98"
)
# Router solicitation from fe80::ff:fe00:64 with its link-layer address.
ROUTER_SOLICITATION = bytes.fromhex(
    "33330000000202000000006486dd6000000000103afffe80000000000000000000fffe000064ff0200000000"
    "0000000000000000000285007a66000000000101020000000064"
)
# ping -6 -p 0123456789abcdef fd00::2 from fd00::ff:fe00:64, id 0x2ce2, seq 1.
ECHO_TO_GATEWAY = bytes.fromhex(
    "52560000000202000000006486dd600b0fc200403a40fd00000000000000000000fffe000064fd0000000000"
    "000000000000000000028000cc112ce20001a4c50b6b00000000ba3b0c00000000000123456789abcdef0123"
    "456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
)
ECHO_TO_GATEWAY_IDENT = 0x2CE2
