"""Header prediction changes nothing but speed.

Two stacks play the same random conversations: one with the TCP layer's
frame-level fast path (``TcpLayer.receive_fast``) and header prediction, one
with both turned off so that every frame takes the full parsers and every
segment the RFC's steps (``TcpLayer.predict``). After every step both must have
sent the same bytes, queued the same events, counted the same drops and
hold connections in the same state. The conversations mix what the fast
path takes (in-order data, plain ACKs, FINs, the handshake's last ACK) with
what it must hand on: out-of-order and duplicate segments, old timestamps,
RSTs, SYNs, bad checksums, another source MAC, IP options, fragments, a
zero window, with and without the virtio header and with and without
timestamps.
"""

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyslirp.stack import checksum
from pyslirp.stack.config import StackConfig, TcpConfig
from pyslirp.stack.interface import Stack

GUEST = bytes([10, 0, 2, 100])
PEER = bytes([198, 51, 100, 7])
GUEST_MAC = bytes.fromhex("020000000064")
OTHER_MAC = bytes.fromhex("020000000065")
GW_MAC = bytes.fromhex("525500000202")
MASK = 0xFFFFFFFF
STEPS = 400  # frames per conversation
WRONGS = ("tcp-checksum", "mac", "ip-options", "fragment", "ip-checksum", "ttl")


class FixedRandom:
    def getrandbits(self, bits: int) -> int:
        return 0x1000 if bits == 16 else 0x10000000


def segment(
    sport, dport, flags, seq, ack, payload=b"", window=502, ts=None, options=b"", bad=False
):
    if ts is not None:
        options = b"\x01\x01\x08\x0a" + struct.pack("!II", *ts) + options
    tcp = struct.pack(
        "!HHIIBBHHH", sport, dport, seq & MASK, ack & MASK, (20 + len(options)) << 2, flags,
        window, 0, 0,
    )  # fmt: skip
    tcp += options + payload
    pseudo = int.from_bytes(GUEST, "big") + int.from_bytes(PEER, "big") + 6 + len(tcp)
    s = (pseudo + checksum.partial_sum(tcp)) % 0xFFFF
    csum = ((~s) & 0xFFFF) ^ (0x5555 if bad else 0)
    return tcp[:16] + csum.to_bytes(2, "big") + tcp[18:]


def frame(tcp, mac=GUEST_MAC, ip_options=b"", fragment=False, ttl=64, bad_ip=False):
    ihl = 5 + len(ip_options) // 4
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(tcp), 7, 0x2000 if fragment else 0x4000,
        ttl, 6, 0, GUEST, PEER,
    )  # fmt: skip
    ip += ip_options
    ip = ip[:10] + (checksum.checksum(ip) ^ (0x0F0F if bad_ip else 0)).to_bytes(2, "big") + ip[12:]
    return GW_MAC + mac + b"\x08\x00" + ip + tcp


class Pair:
    """The same stack twice: with header prediction and without."""

    def __init__(self, vnet: bool) -> None:
        self.vnet = vnet
        self.stacks = []
        for fast in (True, False):
            tcp_config = TcpConfig(receive_buffer=65536, send_buffer=65536)
            stack = Stack(StackConfig(offload=vnet, tcp=tcp_config), FixedRandom())
            tcp = stack.tcp
            if fast:
                tcp.receive_fast = self._counting(tcp.receive_fast)
            else:
                tcp.receive_fast = lambda *args: False
                tcp.predict = False  # the RFC's steps for every segment, output's general path
            self.stacks.append(stack)
        self.fast_taken = 0

    def _counting(self, receive_fast):
        def counted(*args):
            taken = receive_fast(*args)
            self.fast_taken += taken
            return taken

        return counted

    def feed(self, data: bytes, now: float, vnet_flags: int = 0) -> None:
        for stack in self.stacks:
            if self.vnet:
                stack.receive_vnet_frame(bytes([vnet_flags]) + bytes(9) + data, now)
            else:
                stack.receive_frame(data, now)

    def events(self):
        out = []
        for stack in self.stacks:
            got = []
            while (event := stack.next_event()) is not None:
                got.append(event)
            out.append(got)
        return out

    def settle(self, now: float, rng: random.Random) -> list:
        """Compare both sides, then play the NAT side the same way in both."""
        sent = [
            stack.vnet_frames_to_send(now) if self.vnet else stack.frames_to_send(now)
            for stack in self.stacks
        ]
        assert sent[0] == sent[1]
        fast, full = self.events()
        assert [(type(e).__name__, _fields(e)) for e in fast] == [
            (type(e).__name__, _fields(e)) for e in full
        ]
        assert self.stacks[0].drops == self.stacks[1].drops
        assert self.stacks[0].arp_cache == self.stacks[1].arp_cache
        conns = [stack.tcp.connections for stack in self.stacks]
        assert {k: _state(c) for k, c in conns[0].items()} == {
            k: _state(c) for k, c in conns[1].items()
        }
        # The NAT side: accept new connections, take some received bytes,
        # send some, sometimes close; the same choices for both stacks.
        choices = [rng.random() for _ in range(4)]
        size = rng.randrange(1, 3000)
        for stack, events in zip(self.stacks, (fast, full)):
            tcp = stack.tcp
            for event in events:
                if type(event).__name__ == "TcpConnectRequested":
                    tcp.accept(event.conn, now)
            for conn in list(tcp.connections.values()):
                if choices[0] < 0.7 and conn.rx_bytes:
                    tcp.consume(conn, min(conn.rx_bytes, size), now)
                if choices[1] < 0.3:
                    tcp.send(conn, bytes(size), now)
                if choices[2] < 0.01:
                    tcp.close(conn, now)
        return sent[0]


def _our_tsval(sent, our_ts: int) -> int:
    """The TSval of the last of our segments in ``sent`` that has one."""
    for item in sent:
        data = item[1] if type(item) is tuple else item
        if len(data) >= 14 + 20 + 32 and data[14 + 20 + 12] >> 4 == 8:
            our_ts = struct.unpack_from("!I", data, 14 + 20 + 24)[0]
    return our_ts


def _fields(event):
    conn = getattr(event, "conn", None)
    return (conn.key if conn is not None else None, getattr(event, "reason", None))


def _state(conn):
    return (
        conn.state,
        conn.snd_una,
        conn.snd_nxt,
        conn.snd_max,
        conn.snd_wnd,
        conn.rcv_nxt,
        conn.rcv_adv,
        conn.rx_bytes,
        b"".join(bytes(chunk) for chunk in conn.rx),
        conn.ts_recent,
        conn.rtx_at,
        conn.delack_at,
        conn.cwnd,
        conn.guest_fin,
        len(conn.ooo),
        conn.dupacks,
        conn.fin_acked,
        conn.snd_wl1,
        conn.snd_wl2,
    )


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
@pytest.mark.parametrize("timestamps", [True, False], ids=["ts", "no-ts"])
@pytest.mark.parametrize("seed", range(6))
def test_header_prediction_matches_the_full_path(vnet, timestamps, seed):
    rng = random.Random(seed * 4 + vnet * 2 + timestamps)
    pair = Pair(vnet)
    now = 1.0
    dport = 80
    syn_options = b"\x02\x04\x05\xb4\x01\x03\x03\x07"  # MSS 1460, window scale 7
    tsval = 100
    our_ts = 0
    conn = None
    for step in range(STEPS):
        now += rng.choice((0.0005, 0.001, 0.003, 0.05))
        if conn is None:  # a new connection (the last one ended)
            sport = 40000 + step
            key = (GUEST, sport, PEER, dport)
            isn = rng.getrandbits(32)
            ts = (tsval, 0) if timestamps else None
            syn = segment(sport, dport, 0x02, isn, 0, window=64240, ts=ts, options=syn_options)
            pair.feed(frame(syn), now)
            pair.settle(now, rng)
            sent = pair.settle(now, rng)  # the accept's SYN-ACK
            seq = isn + 1
            fin_sent = False
            conn = pair.stacks[0].tcp.connections.get(key)
            if conn is not None and rng.random() < 0.7:
                # The handshake's last ACK on its own, as a kernel sends it.
                our_ts = _our_tsval(sent, our_ts)
                ts = (tsval, our_ts) if timestamps else None
                pair.feed(frame(segment(sport, dport, 0x10, seq, conn.snd_nxt, ts=ts)), now)
                pair.settle(now, rng)
            continue
        ack = conn.snd_nxt if rng.random() < 0.8 else conn.snd_una
        tsval += rng.choice((0, 1, 1, 2))
        ts = (tsval, our_ts) if timestamps else None
        kind = rng.random()
        flags, payload, s = 0x10, b"", seq
        mac, ip_options, fragment, bad, vnet_flags = GUEST_MAC, b"", False, False, 0
        ttl, bad_ip = 64, False
        window = rng.choice((502, 502, 502, 0, 1))
        if kind < 0.45:  # in-order data (or a plain ACK)
            payload = bytes(rng.randrange(0, 1500))
            flags |= 0x08 if payload else 0
        elif kind < 0.55:  # out of order
            s = seq + rng.randrange(1, 3000)
            payload = bytes(rng.randrange(1, 800))
        elif kind < 0.62:  # old: a duplicate, or a stale timestamp
            s = seq - rng.randrange(0, 600)
            payload = bytes(rng.randrange(0, 600))
            if timestamps and rng.random() < 0.5:
                ts = (tsval - 5, our_ts)
        elif kind < 0.76:  # an ordinary segment with one thing wrong with it
            payload = bytes(rng.randrange(1, 300))
            wrong = rng.choice(
                ("tcp-checksum", "mac", "ip-options", "fragment", "ip-checksum", "ttl")
            )
            bad = wrong == "tcp-checksum"
            mac = OTHER_MAC if wrong == "mac" else GUEST_MAC
            ip_options = b"\x01\x01\x01\x00" if wrong == "ip-options" else b""
            fragment = wrong == "fragment"
            bad_ip = wrong == "ip-checksum"
            ttl = 1 if wrong == "ttl" else 64
        elif kind < 0.78:  # RST: mostly off by some (a challenge ACK), rarely exact
            flags = 0x04 if rng.random() < 0.5 else 0x14
            s = seq + (0 if rng.random() < 0.1 else 5)
        elif kind < 0.80:
            flags = 0x02  # a SYN on an open connection
        elif kind < 0.82:
            flags = 0x30  # URG
            payload = bytes(rng.randrange(1, 100))
        elif kind < 0.83 and not fin_sent:
            flags = 0x11  # FIN
            fin_sent = True
        else:
            payload = bytes(rng.randrange(0, 100))
        if fin_sent and flags == 0x10 and payload:
            payload = b""
        if vnet and rng.random() < 0.5:
            vnet_flags = 1  # NEEDS_CSUM: the checksum is not checked
            bad = False
        tcp = segment(sport, dport, flags, s, ack, payload, window, ts, bad=bad)
        pair.feed(frame(tcp, mac, ip_options, fragment, ttl, bad_ip), now, vnet_flags)
        sent = pair.settle(now, rng)
        conn = pair.stacks[0].tcp.connections.get(key)
        if conn is not None:
            seq = conn.rcv_nxt  # past the FIN too, once it is taken
            if conn.state.name == "TIME_WAIT":
                conn = None
        our_ts = _our_tsval(sent, our_ts)
    assert pair.stacks[0].counters == pair.stacks[1].counters
    # The fast path did take a good share, or this test tests nothing.
    assert pair.fast_taken > STEPS // 4, pair.fast_taken


def syn_frame(rng, sport, wrong):
    """A guest SYN toward PEER (or elsewhere), with at most one thing wrong."""
    layouts = (
        b"\x02\x04\x05\xb4\x04\x02\x08\x0a" + struct.pack("!II", 7, 0) + b"\x01\x03\x03\x07",
        b"\x02\x04\x05\xb4\x01\x03\x03\x07",
        b"\x02\x04\x05\xb4",
        b"",
        b"\x1e\x04\x00\x00\x02\x04\x05\xb4",  # an unknown kind first
        b"\x02\x05\x05\xb4",  # a bad MSS length
        b"\x01\x01\x01\x1e",  # truncated
    )
    options = rng.choice(layouts)
    flags = 0x03 if wrong == "syn-fin" else 0x02
    payload = b"data" if wrong == "payload" else b""
    tcp = segment(
        0 if wrong == "zero-port" else sport, 80, flags, rng.getrandbits(32), 0,
        payload, 64240, options=options, bad=wrong == "tcp-checksum",
    )  # fmt: skip
    if wrong == "doff":
        tcp = tcp[:12] + bytes([0x40]) + tcp[13:]
    data = frame(
        tcp,
        OTHER_MAC if wrong == "mac" else GUEST_MAC,
        b"\x01\x01\x01\x00" if wrong == "ip-options" else b"",
        wrong == "fragment",
        1 if wrong == "ttl" else 64,
        wrong == "ip-checksum",
    )
    if wrong in ("broadcast", "multicast", "limited-broadcast"):
        dst = {"broadcast": "0a0002ff", "multicast": "e0000001", "limited-broadcast": "ffffffff"}
        ip = bytearray(data[14:34])
        ip[16:20] = bytes.fromhex(dst[wrong])
        ip[10:12] = b"\0\0"
        ip[10:12] = checksum.checksum(bytes(ip)).to_bytes(2, "big")
        data = data[:14] + bytes(ip) + data[34:]
    return data


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
@pytest.mark.parametrize("seed", range(3))
def test_syn_fast_path_matches_the_full_path(vnet, seed):
    """New connections: a plain SYN of a known guest takes the fast path;
    anything doubtful (a wrong MAC, checksum, option, address or flag, a
    repeated SYN, a full table) must end exactly as the full path ends it."""
    rng = random.Random(100 + seed * 2 + vnet)
    pair = Pair(vnet)
    for stack in pair.stacks:
        stack.tcp.config.max_connections = 12
    now = 1.0
    # The first SYN teaches both stacks the guest's MAC (the full path learns).
    pair.feed(frame(segment(39999, 80, 0x02, 1, 0, window=64240)), now)
    pair.settle(now, rng)
    wrongs = (None,) * 8 + (
        "tcp-checksum", "ip-checksum", "mac", "ip-options", "fragment", "ttl", "zero-port",
        "payload", "syn-fin", "doff", "broadcast", "multicast", "limited-broadcast", "repeat",
    )  # fmt: skip
    sport = 40000
    for _ in range(300):
        now += 0.01
        wrong = rng.choice(wrongs)
        if wrong != "repeat":
            sport += 1
        vnet_flags = 1 if vnet and wrong != "tcp-checksum" and rng.random() < 0.5 else 0
        pair.feed(syn_frame(rng, sport, wrong), now, vnet_flags)
        pair.settle(now, rng)
        tcps = [stack.tcp for stack in pair.stacks]
        assert tcps[0].counters == tcps[1].counters
        assert {k: c.syn_packet for k, c in tcps[0].connections.items()} == {
            k: c.syn_packet for k, c in tcps[1].connections.items()
        }
        if rng.random() < 0.05:  # connections end, room for more
            for stack in pair.stacks:
                for conn in list(stack.tcp.connections.values()):
                    stack.tcp.abort(conn, now)
            pair.settle(now, rng)
        elif rng.random() < 0.2:  # one ends in TIME-WAIT: a full table reclaims it
            keys = sorted(k for k, c in tcps[0].connections.items() if c.state.name != "TIME_WAIT")
            if keys:
                key = rng.choice(keys)
                for stack in pair.stacks:
                    stack.tcp.connections[key].enter_time_wait(now)
                pair.settle(now, rng)
    assert pair.stacks[0].counters == pair.stacks[1].counters
    assert pair.fast_taken > 50, pair.fast_taken
    assert tcps[0].counters["tcp-time-wait-reclaimed"] > 5


# SYN options for the differential test below: Linux's usual layout (MSS,
# SACK permitted, timestamps, NOP, window scale: the one _syn_fast unpacks
# into the connection itself) with its values drawn, or any mix of those
# options and NOPs in any order, padded to a multiple of 4 bytes.
_U16 = st.integers(0, 0xFFFF)
_U32 = st.integers(0, MASK)
_LINUX_SYN = st.builds(
    lambda mss, tsval, tsecr, shift: struct.pack(
        "!BBHBBBBIIBBBB", 2, 4, mss, 4, 2, 8, 10, tsval, tsecr, 1, 3, 3, shift
    ),
    _U16,
    _U32,
    _U32,
    st.integers(0, 255),
)
_ONE_OPTION = st.one_of(
    st.builds(lambda mss: struct.pack("!BBH", 2, 4, mss), _U16),
    st.just(b"\x04\x02"),
    st.builds(lambda v, e: struct.pack("!BBII", 8, 10, v, e), _U32, _U32),
    st.builds(lambda shift: bytes((3, 3, shift)), st.integers(0, 255)),
    st.just(b"\x01"),
)
_ANY_SYN = st.lists(_ONE_OPTION, max_size=6).map(b"".join).filter(lambda o: len(o) <= 40)
_SYN_OPTIONS = st.one_of(_LINUX_SYN, _ANY_SYN).map(lambda o: o + b"\x01" * (-len(o) % 4))


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(options=_SYN_OPTIONS, vnet=st.booleans(), isn=_U32, window=_U16)
def test_syn_and_syn_ack_fast_paths_match_the_full_path(options, vnet, isn, window):
    """A SYN with any layout of its options: _syn_fast (Linux's layout
    unpacked straight into the connection, others through the parser) and
    send_syn_ack's one-pack frame leave the same connection, events and
    frames as the full parsers and _frame; then the handshake's last ACK."""
    pair = Pair(vnet)
    now = 1.0
    pair.feed(frame(segment(39999, 80, 0x02, 1, 0, window=64240)), now)  # the guest's MAC
    rng = random.Random(0)
    pair.settle(now, rng)
    fast_before = pair.fast_taken
    pair.feed(frame(segment(40000, 80, 0x02, isn, 0, window=window, options=options)), now)
    assert pair.fast_taken == fast_before + 1  # a SYN of a known guest: the fast path
    pair.settle(now, rng)  # compares, then accepts in both
    now += 0.25
    sent = pair.settle(now, rng)  # the SYN-ACKs (compared)
    assert len(sent) == 1
    key = (GUEST, 40000, PEER, 80)
    conns = [stack.tcp.connections[key] for stack in pair.stacks]
    for conn in conns:
        assert conn.state.name == "SYN_RECEIVED"
    fields = (
        "irs", "iss", "rcv_nxt", "rcv_adv", "ack_sent", "mss", "guest_mss", "ws_enabled",
        "snd_wscale", "rcv_wscale", "ts_enabled", "ts_recent", "sack_permitted", "syn_packet",
        "cwnd", "delack_limit", "rcv_sws", "rtt_time", "rtx_at",
    )  # fmt: skip
    assert [getattr(conns[0], f) for f in fields] == [getattr(conns[1], f) for f in fields]
    ts = ((conns[0].ts_recent + 1) & MASK, _our_tsval(sent, 0)) if conns[0].ts_enabled else None
    ack = frame(segment(40000, 80, 0x10, isn + 1, conns[0].iss + 1, window=window, ts=ts))
    pair.feed(ack, now + 0.01)
    pair.settle(now + 0.01, rng)
    assert [c.state.name for c in conns] == ["ESTABLISHED", "ESTABLISHED"]


@pytest.mark.parametrize("buffer", [65536, 4096])
@pytest.mark.parametrize("timestamps", [True, False], ids=["ts", "no-ts"])
@pytest.mark.parametrize("seed", range(3))
def test_a_sink_changes_nothing_the_guest_sees(buffer, timestamps, seed):
    """Direct delivery (TcpConnection.sink) against the queue: one stack
    hands predicted text to a sink that takes all, part or none of it (a
    host socket with room, a little, or none); the other queues it in rx and
    the NAT side consumes what the sink took, at once. Both must send the
    same frames, hold the same state and bytes, and between the sink and
    consume deliver the same stream. A small receive buffer keeps the
    window near closing, where taking bytes owes the guest an update."""
    rng = random.Random(700 + seed * 2 + timestamps)
    stacks = []
    for _ in range(2):
        tcp_config = TcpConfig(receive_buffer=buffer, send_buffer=65536)
        stacks.append(Stack(StackConfig(tcp=tcp_config), FixedRandom()))
    direct, queued = stacks
    taken_now = []  # what the sink took during the frame just fed
    delivered = [bytearray(), bytearray()]  # the stream each NAT side saw

    def sink(data) -> int:
        roll = rng.random()
        n = len(data) if roll < 0.6 else rng.randrange(0, len(data)) if roll < 0.8 else 0
        delivered[0] += bytes(data[:n])
        taken_now.append(n)
        return n

    now = 1.0
    sport, dport = 41000, 80
    key = (GUEST, sport, PEER, dport)
    isn = rng.getrandbits(32)
    tsval = 100
    syn_options = b"\x02\x04\x05\xb4\x01\x03\x03\x07"
    ts = (tsval, 0) if timestamps else None
    syn = frame(segment(sport, dport, 0x02, isn, 0, window=64240, ts=ts, options=syn_options))
    for stack in stacks:
        stack.receive_frame(syn, now)
        stack.tcp.accept(stack.next_event().conn, now)
        stack.frames_to_send(now)
    direct.tcp.connections[key].sink = sink
    seq = isn + 1
    our_ts = 0
    sink_used = 0
    for _ in range(STEPS):
        now += rng.choice((0.0005, 0.001, 0.003, 0.05))
        conns = [stack.tcp.connections[key] for stack in stacks]
        tsval += rng.choice((0, 1, 2))
        ts = (tsval, our_ts) if timestamps else None
        kind = rng.random()
        s = seq
        if kind < 0.75:  # in order: the sink's share
            payload = bytes(rng.randrange(0, 256) for _ in range(rng.randrange(0, 1500)))
        elif kind < 0.85:  # out of order (then filled by later in-order text)
            s = seq + rng.randrange(1, 2000)
            payload = bytes(rng.randrange(1, 800))
        else:  # a duplicate
            s = seq - rng.randrange(0, 300)
            payload = bytes(rng.randrange(0, 300))
        data = frame(segment(sport, dport, 0x18, s, conns[0].snd_nxt, payload, 502, ts))
        taken_now.clear()
        for stack in stacks:
            stack.receive_frame(data, now)
        sink_used += len(taken_now)
        if sum(taken_now):
            delivered[1] += b"".join(bytes(c) for c in conns[1].rx)[: sum(taken_now)]
            queued.tcp.consume(conns[1], sum(taken_now), now)
        # The NAT side of both: take some queued bytes, send some.
        size = rng.randrange(1, 3000)
        if rng.random() < 0.7:
            for i, (stack, conn) in enumerate(zip(stacks, conns)):
                if conn.rx_bytes:
                    n = min(conn.rx_bytes, size)
                    delivered[i] += b"".join(bytes(c) for c in conn.rx)[:n]
                    stack.tcp.consume(conn, n, now)
        if rng.random() < 0.3:
            for stack, conn in zip(stacks, conns):
                stack.tcp.send(conn, bytes(size), now)
        if rng.random() < 0.05:
            for stack in stacks:
                stack.handle_timer(now + 0.5)
        sent = [stack.frames_to_send(now) for stack in stacks]
        assert sent[0] == sent[1]
        events = [[type(e).__name__ for e in iter(stack.next_event, None)] for stack in stacks]
        assert [e for e in events[0] if e != "TcpDataReceived"] == [
            e for e in events[1] if e != "TcpDataReceived"
        ]
        assert _state(conns[0]) == _state(conns[1])
        assert delivered[0] == delivered[1]
        seq = conns[0].rcv_nxt
        our_ts = _our_tsval(sent[0], our_ts)
    assert direct.drops == queued.drops
    assert len(delivered[0]) > 100_000 and sink_used > STEPS // 10, (len(delivered[0]), sink_used)
