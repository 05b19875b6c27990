"""Virtio-net offloads (a TAP with IFF_VNET_HDR, TUNSETOFFLOAD checksum and TSO).

Stack: frame scripts with the virtio_net_hdr before each frame, both ways:
a 64 KiB GSO segment with a partial checksum from the guest, and segments of
many MSS toward the guest with NEEDS_CSUM and gso_size = MSS. Expected
frames are built with scapy and the header with struct, not with the stack's
emitters. End to end: the kernel as guest sends GSO frames at MTU 1500 and
the data arrives intact; with --no-offload no frame exceeds the MTU.
"""

import contextlib
import hashlib
import os
import socket
import struct
import threading

import dpkt
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from pyslirp.stack.config import StackConfig
from pyslirp.stack.events import TcpDataReceived
from pyslirp.stack.interface import Stack
from tests import harness
from tests.harness import this_thread_in
from tests.test_ipv6_e2e import forwarder6, named_netns
from tests.test_tcp_stack import (
    GISN,
    GPORT,
    GUEST,
    GUEST_MAC,
    GW_MAC,
    ISS,
    MASK,
    PEER,
    PPORT,
    FixedRandom,
    Script,
    fix_isn,
)

VNET = struct.Struct("<BBHHHH")  # struct virtio_net_hdr, host order (x86: little)
NEEDS_CSUM, DATA_VALID = 1, 2
GSO_NONE, GSO_TCPV4 = 0, 1
MSS = 1448  # 1460 less the timestamp option


class OffloadScript(Script):
    """Script on a stack whose TAP carries virtio_net_hdr (StackConfig.offload)."""

    def __init__(self, mtu: int = 1500) -> None:
        self.stack = Stack(StackConfig(mtu=mtu, offload=True), FixedRandom(ISS))
        self.tcp = self.stack.tcp
        fix_isn(self.tcp, ISS)
        self.ident = 0x1000
        self.iss = ISS
        self.strict = True

    def feed_vnet(self, now, vnet: bytes, seq, payload, ack=ISS + 1, ts=(102, 0), chksum=None):
        pkt = IP(src=GUEST, dst=PEER, ttl=64, flags="DF") / TCP(
            sport=GPORT,
            dport=PPORT,
            seq=seq & MASK,
            ack=ack & MASK,
            flags="A",
            window=502,
            options=[("NOP", None), ("NOP", None), ("Timestamp", ts)],
            chksum=chksum,
        )
        frame = bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / pkt / Raw(payload))
        self.stack.receive_vnet_frame(vnet + frame, now)


def pseudo_sum(src: str, dst: str, length: int) -> int:
    """The folded pseudo-header sum a partial TCP checksum field holds."""
    words = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", 6, length)
    total = sum(struct.unpack("!6H", words))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def complete_checksum(frame: bytes, start: int, offset: int) -> bytes:
    """What the guest's kernel does with NEEDS_CSUM: sum from csum_start to
    the end (the field included) and store the complement at the offset."""
    data = frame[start:] + (b"\0" if (len(frame) - start) % 2 else b"")
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    csum = (~total) & 0xFFFF
    at = start + offset
    return frame[:at] + struct.pack("!H", csum) + frame[at + 2 :]


# ------------------------------------------------------------------ stack
def test_gso_segment_from_guest_with_partial_checksum_is_taken_whole():
    s = OffloadScript()
    conn = s.handshake()
    payload = bytes(range(256)) * 250  # 64000 bytes, 45 segments at MTU 1500
    tcp_len = 32 + len(payload)
    vnet = VNET.pack(NEEDS_CSUM, GSO_TCPV4, 66, MSS, 34, 16)
    # The field holds only the pseudo-header sum: the guest left the rest to us.
    s.feed_vnet(1.1, vnet, GISN + 1, payload, chksum=pseudo_sum(GUEST, PEER, tcp_len))
    (event,) = s.events()
    assert isinstance(event, TcpDataReceived)
    assert b"".join(bytes(c) for c in conn.rx) == payload
    assert s.stack.counters["gso-frames-in"] == 1
    assert not s.stack.drops


def test_data_valid_skips_verification_and_a_plain_header_verifies():
    s = OffloadScript()
    conn = s.handshake()
    s.feed_vnet(1.1, VNET.pack(DATA_VALID, 0, 0, 0, 0, 0), GISN + 1, b"ok", chksum=0x1234)
    assert b"".join(bytes(c) for c in conn.rx) == b"ok"
    s.strict = False
    s.feed_vnet(1.2, bytes(10), GISN + 3, b"bad", chksum=0x1234)
    assert s.stack.drops["tcp-bad-checksum"] == 1
    assert b"".join(bytes(c) for c in conn.rx) == b"ok"


def test_frame_over_the_mtu_without_gso_is_too_big():
    s = OffloadScript()
    s.handshake()
    s.strict = False
    s.feed_vnet(1.1, bytes(10), GISN + 1, bytes(3000))
    assert s.stack.drops["ipv4-too-big"] == 1


def test_unsupported_gso_type_is_dropped():
    s = OffloadScript()
    s.handshake()
    s.strict = False
    s.feed_vnet(1.1, VNET.pack(NEEDS_CSUM, 3, 42, 1000, 34, 6), GISN + 1, bytes(3000))
    assert s.stack.drops["vnet-gso-unsupported"] == 1


def test_large_segments_toward_guest_carry_gso_and_partial_checksum():
    s = OffloadScript()
    conn = s.handshake()
    data = os.urandom(200_000)
    assert s.tcp.send(conn, data, 1.1) == len(data)
    out = s.stack.vnet_frames_to_send(1.1)
    # The initial window (RFC 6928: 10 segments) goes as one frame.
    ((vnet, frame),) = out
    size = 10 * MSS
    assert VNET.unpack(vnet) == (NEEDS_CSUM, GSO_TCPV4, 66, MSS, 34, 16)
    t = s.ts(1.1)
    expected = (
        Ether(src=GW_MAC, dst=GUEST_MAC)
        / IP(src=PEER, dst=GUEST, id=0x1002, ttl=64, flags="DF")
        / TCP(
            sport=PPORT,
            dport=GPORT,
            seq=ISS + 1,
            ack=GISN + 1,
            flags="A",
            window=32768,
            options=[("NOP", None), ("NOP", None), ("Timestamp", (t, 101))],
            chksum=pseudo_sum(PEER, GUEST, 32 + size),
        )
        / Raw(data[:size])
    )
    assert frame == bytes(expected)
    # The guest's kernel completes the checksum into the right one.
    full = Ether(bytes(expected))
    del full[TCP].chksum
    assert complete_checksum(frame, 34, 16) == bytes(Ether(bytes(full)))
    # ACK it all: the window opens and segments grow up to 45 MSS.
    got = data[:size]
    acked = ISS + 1 + size
    now = 1.2
    for _ in range(20):
        s.feed(now, "A", GISN + 1, acked, window=0xFFFF, ts=(103, t))
        for item in s.stack.vnet_frames_to_send(now):
            vnet, frame = item
            fields = VNET.unpack(vnet)
            pkt = Ether(frame)
            payload = bytes(pkt[TCP].payload)
            assert len(payload) <= 45 * MSS and len(frame) <= 65535 + 14
            assert fields[1] == (GSO_TCPV4 if len(payload) > MSS else GSO_NONE)
            assert fields[0] == NEEDS_CSUM
            assert pkt[TCP].seq == (ISS + 1 + len(got)) & MASK
            got += payload
        acked = ISS + 1 + len(got)
        now += 0.1
        if len(got) == len(data):
            break
    assert got == data
    assert s.tcp.counters["tcp-gso-out"] >= 3


def test_without_offload_segments_stay_at_the_mss():
    s = Script()
    conn = s.handshake()
    s.tcp.send(conn, bytes(20000), 1.1)
    frames = s.stack.frames_to_send(1.1)
    assert len(frames) == 10
    assert all(len(Ether(f)[TCP].payload) == MSS for f in frames)


# ---------------------------------------------------------------- end to end
def _sink(server: socket.socket, digests: list) -> None:
    conn, _ = server.accept()
    with conn:
        h = hashlib.sha256()
        total = 0
        while chunk := conn.recv(1 << 16):
            h.update(chunk)
            total += len(chunk)
        digests.append((total, h.hexdigest()))


def _source(server: socket.socket, data: bytes) -> None:
    conn, _ = server.accept()
    with conn:
        conn.sendall(data)


OUR_ADDRESSES = {socket.inet_pton(socket.AF_INET, a) for a in ("10.0.2.2", "10.0.2.3")} | {
    socket.inet_pton(socket.AF_INET6, a) for a in ("fd00::2", "fd00::3", "fe80::2")
}


def _frame_sizes(pcap_path: str) -> tuple[int, int]:
    """(largest frame from the guest, largest frame toward it) in the capture."""
    largest_in = largest_out = 0
    with open(pcap_path, "rb") as f:
        for _ts, buf in dpkt.pcap.Reader(f):
            ethertype = buf[12:14]
            if ethertype == b"\x08\x00":
                source = buf[26:30]
            elif ethertype == b"\x86\xdd":
                source = buf[22:38]
            else:
                continue
            if source in OUR_ADDRESSES:
                largest_out = max(largest_out, len(buf))
            else:
                largest_in = max(largest_in, len(buf))
    return largest_in, largest_out


def _listener(family=socket.AF_INET) -> socket.socket:
    server = socket.socket(family)
    server.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    server.listen(1)
    return server


@contextlib.contextmanager
def _guest(v6: bool, args: list[str]):
    """(forwarder, listener family, gateway for socat): IPv4 as the harness
    starts it; IPv6 in a host namespace of its own (this host may lack ::1)."""
    if not v6:
        with harness.forwarder_as_asked(*args, mtu=1500) as fwd:
            yield fwd, socket.AF_INET, "TCP:10.0.2.2", contextlib.nullcontext
        return
    with named_netns("offload6") as host, forwarder6(host, *args, mtu=1500) as fwd:
        yield fwd, socket.AF_INET6, "TCP6:[fd00::2]", lambda: this_thread_in(host)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
def test_gso_frames_both_ways_and_data_holds(tmp_path, monkeypatch, offload, family):
    monkeypatch.setattr(harness, "NO_OFFLOAD", False)  # this test picks the mode itself
    data = os.urandom(8 << 20)
    digest = hashlib.sha256(data).hexdigest()
    src = tmp_path / "data"
    src.write_bytes(data)
    pcap = tmp_path / "cap.pcap"
    args = ["--pcap", str(pcap)] + ([] if offload else ["--no-offload"])
    digests: list = []
    with _guest(family == "ipv6", args) as (fwd, af, gateway, inside):
        with inside():
            sink, source = _listener(af), _listener(af)
        threads = [
            threading.Thread(target=_sink, args=(sink, digests), daemon=True),
            threading.Thread(target=_source, args=(source, data), daemon=True),
        ]
        for thread in threads:
            thread.start()
        try:
            up = f"{gateway}:{sink.getsockname()[1]}"
            result = fwd.run(["socat", "-u", f"OPEN:{src}", up], timeout=60)
            assert result.returncode == 0, result.stderr
            down = f"socat -u {gateway}:{source.getsockname()[1]} STDOUT | sha256sum"
            result = fwd.run(["sh", "-c", down], timeout=60)
            assert result.returncode == 0, result.stderr
            assert result.stdout.split()[0] == digest
            for thread in threads:
                thread.join(timeout=30)
        finally:
            sink.close()
            source.close()
    assert digests == [(len(data), digest)]
    largest_in, largest_out = _frame_sizes(str(pcap))
    if offload:
        assert largest_in > 1514 and largest_out > 1514  # GSO frames both ways
    else:
        assert largest_in <= 1514 and largest_out <= 1514
