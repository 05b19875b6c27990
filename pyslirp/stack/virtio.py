"""The virtio-net header that a TAP opened with IFF_VNET_HDR puts before
every frame (struct virtio_net_hdr, 10 bytes: no mrg_rxbuf).

Read first: the virtio specification 1.1, section 5.1.6 (Device Operation:
"Packet Transmission" and "Processing of Incoming Packets"), and Linux's
include/linux/virtio_net.h (virtio_net_hdr_to_skb: what a TAP accepts on
write) for the facts used here:

- From the guest (a TAP read): NEEDS_CSUM means the guest did not compute
  the TCP/UDP checksum; the field holds only the pseudo-header sum and the
  bytes from ``csum_start`` on are to be summed by whoever delivers them. We
  terminate the segment, so we only skip verification. DATA_VALID means the
  checksum was already checked. A ``gso_type`` other than NONE means one
  large TCP segment (up to 64 KiB) that the guest's link would have split
  into ``gso_size``-byte segments; its IP length covers the whole of it.
- Toward the guest (a TAP write): NEEDS_CSUM with ``csum_start`` at the TCP
  header, ``csum_offset`` 16 and the pseudo-header sum (with the whole TCP
  length) in the checksum field, which the guest kernel takes as verified;
  TCPV4/TCPV6 with ``gso_size`` = the MSS makes one segment of up to 64 KiB.

Fields are in the host's byte order (a TAP's legacy header; TUNSETVNETLE is
not used), which is little-endian on every machine we run on.
"""

from __future__ import annotations

import struct

from .errors import MalformedFrame

HEADER = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
HEADER_LEN = 10

F_NEEDS_CSUM = 1
F_DATA_VALID = 2

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_ECN = 0x80

NO_OFFLOAD = bytes(HEADER_LEN)  # a plain frame: nothing to do for either side

TCP_CHECKSUM_OFFSET = 16  # offsetof(struct tcphdr, check)


def parse(data) -> tuple[int, int, int, int, int, int]:
    """(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)."""
    if len(data) < HEADER_LEN:
        raise MalformedFrame("vnet-truncated")
    return HEADER.unpack_from(data, 0)


def tcp_header(l3_offset: int, ip_header_len: int, tcp_header_len: int, gso: int, mss: int):
    """The header for one TCP segment toward the guest with a partial
    checksum; ``gso`` is GSO_NONE, GSO_TCPV4 or GSO_TCPV6."""
    start = l3_offset + ip_header_len
    return HEADER.pack(
        F_NEEDS_CSUM,
        gso,
        start + tcp_header_len,
        mss if gso else 0,
        start,
        TCP_CHECKSUM_OFFSET,
    )
