"""--record and ``pyslirp replay``: the file format, the recording proxy in
front of the stack, and replays of recorded sessions (in process, and of a
run-mode session with real clients)."""

import ast
import contextlib
import dataclasses
import http.server
import io
import os
import pathlib
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from forwarder import replay
from pyslirp import record
from pyslirp.config import NetworkConfig
from pyslirp.stack.budget import MemoryBudget
from pyslirp.stack.config import StackConfig
from pyslirp.stack.interface import Stack
from pyslirp.stack.tcp_connection import TcpConnection
from pyslirp.stack.tcp_layer import TcpLayer
from tests import harness
from tests.inprocess import InProcessNetwork

REPO = pathlib.Path(__file__).resolve().parent.parent
GUEST_MAC = "02:00:00:00:00:01"
GW_MAC = "52:55:0a:00:02:02"
GUEST = "10.0.2.100"


def run_replay(*argv) -> tuple[int, str, str]:
    """forwarder.replay in process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        status = replay.main(list(argv))
    finally:
        sys.stdout, sys.stderr = saved
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


# ------------------------------------------------------------- format
def test_values_round_trip():
    values = [
        None,
        True,
        False,
        0,
        -5,
        1 << 70,
        1.5,
        b"\x00\xff",
        memoryview(b"view"),
        bytearray(b"array"),
        "text",
        [1, (2, b"x")],
        {"at_once": True},
    ]
    for value in values:
        parts: list = []
        record.encode(value, parts)
        data = b"".join(parts)
        decoded, end = record.decode(data, 0)
        assert end == len(data)
        if isinstance(value, (memoryview, bytearray)):
            assert decoded == bytes(value)
        elif isinstance(value, tuple):
            assert decoded == list(value)
        elif isinstance(value, list):
            assert decoded == [1, [2, b"x"]]
        else:
            assert decoded == value and type(decoded) is type(value)


def test_damaged_values_raise_recording_error():
    parts: list = []
    record.encode([1, b"abcdef", "x"], parts)
    data = b"".join(parts)
    for cut in range(len(data)):
        with pytest.raises(record.RecordingError):
            record.decode(data[:cut], 0)
    with pytest.raises(record.RecordingError):
        record.decode(b"Z", 0)


@dataclasses.dataclass
class SomethingHappened:  # an event of the shape the stack's have
    conn: object
    data: bytes
    count: int
    flag: bool


def test_generated_encoders_give_what_encode_gives():
    conn = TcpConnection.__new__(TcpConnection)
    conn.serial = 42
    buffer = bytearray(b"reused buffer")
    shapes = [  # (method, args, kwargs, result)
        ("receive_frame", (b"\x00" * 60, 1.5), {}, None),
        ("tcp.send", (conn, memoryview(buffer)[2:8], 2.0), {"at_once": True}, 6),
        ("tcp.send", (conn, buffer, 2.0), {"at_once": False}, 0),
        ("tcp.consume", (conn, 1 << 40, 3.0), {}, None),
        ("tcp.consume", (conn, 1 << 70, 3.0), {}, None),  # past 64 bits: encode()
        ("tcp.consume", (conn, -5, 3.0), {}, False),
        ("send_udp", (b"a", 53, "not fixed", 4.0), {}, None),  # a str: encode()
        ("tcp.send_space", (None,), {}, 7),
        ("tcp.close", (conn, 5), {"now": 6.0}, True),
    ]
    events = [
        SomethingHappened(conn, b"xyz", 3, True),
        SomethingHappened(None, bytearray(b"q"), 1 << 80, False),
        SomethingHappened(conn, b"", 0, False),
    ]
    for method, args, kwargs, result in shapes:
        index = record.INDEX[method]
        for start, stop in ((0, 0), (0, 1), (1, 3), (0, 3)):
            ev = record.encode_events(events, start, stop)
            expected: list = []
            record.encode(events[start:stop], expected)
            assert ev == b"".join(expected)
            kinds = tuple(type(a) for a in args)
            names = tuple((k, type(v)) for k, v in kwargs.items())
            encoder = record._compile_call(index, kinds, names, type(result), False)
            assert (encoder is None) == (method == "send_udp")
            want, want_size = record.encode_call(index, args, kwargs, result, 9.0, ev, False)
            if encoder is not None and 1 << 70 not in args:
                got, size = encoder(args, kwargs, result, 9.0, ev, bytes)
                assert b"".join(got) == b"".join(want) and size == want_size
            assert want_size == len(b"".join(want))
    buffer[:] = b"changed later"  # the recorded bytes were copied
    got, _ = record._compile_call(
        record.INDEX["tcp.send"], (TcpConnection, memoryview, float), (), int, False
    )((conn, memoryview(buffer), 1.0), {}, 5, 1.0, b"l\0\0\0\0", bytes)
    assert bytes(buffer) in got and all(not isinstance(p, memoryview) for p in got)


def test_frame_digests_check_length_headers_and_the_end_of_the_payload():
    frame = bytes(range(256)) * 256
    digest = record.frame_digests([frame])
    assert record.split_digests(digest)[0][0] == len(frame)
    for changed in (
        frame[:20] + b"\xff" + frame[21:],  # a header field
        frame[:-3] + b"zzz",  # the payload's end
        frame[:-1],  # the length
    ):
        assert record.frame_digests([changed]) != digest
    # a vnet pair: its header counts as the start of the frame
    pair = (b"\x01" + bytes(9), frame[:100])
    assert record.frame_digests([pair]) != record.frame_digests([(bytes(10), frame[:100])])
    assert record.split_digests(record.frame_digests([pair]))[0][0] == 110
    short = frame[:128]  # all head, no tail
    assert record.split_digests(record.frame_digests([short]))[0][2] == 0


def test_a_recording_of_the_previous_format_gives_one_line(tmp):
    path = tmp / "old.rec"
    write_recording(path, 10)
    data = bytearray(path.read_bytes())
    older = (record.FORMAT_VERSION - 1).to_bytes(2, "little")
    data[len(record.MAGIC) : len(record.MAGIC) + 2] = older
    path.write_bytes(bytes(data))
    status, out, err = run_replay(str(path))
    assert (status, out) == (1, "")
    assert err == (
        f"pyslirp: {path}: recording format {record.FORMAT_VERSION - 1}; "
        f"this pyslirp reads format {record.FORMAT_VERSION}\n"
    )


def write_recording(path, count, limit=0, payload=b"p" * 100):
    header = record.header_for(StackConfig(), 7, False)
    rec = record.Recorder(str(path), header, limit)
    for i in range(count):
        index = record.INDEX["receive_frame"]
        parts, size = record.encode_call(
            index, (payload, i / 1000), {}, None, i / 1000, b"l\0\0\0\0", False
        )
        rec.add(parts, size, i / 1000)
    rec.close()
    return rec


NO_EVENTS = b"l\0\0\0\0"


def test_staged_writes_leave_a_whole_file_at_every_flush(tmp):
    """Records through the staging buffer (O_DIRECT on a file system that
    takes it, /tmp's here): blocks straddle its end; a flush by time leaves a
    file of exactly the records so far (a crash loses nothing before it);
    close leaves exactly the bytes written."""
    path = tmp / "staged.rec"
    header = record.header_for(StackConfig(), 7, False)
    rec = record.Recorder(str(path), header)
    payload = os.urandom(30000)  # stored, not compressed: sizes add up
    index = record.INDEX["receive_frame"]
    now = 0.0
    for i in range(200):  # about 6 MB: several stage buffers, blocks across their ends
        now = i / 1000
        parts, size = record.encode_call(index, (payload, now), {}, None, now, NO_EVENTS, False)
        rec.add(parts, size, now)
    now = 5.0  # more than FLUSH_INTERVAL later: this record's block goes out with sync
    parts, size = record.encode_call(index, (b"last", now), {}, None, now, NO_EVENTS, False)
    rec.add(parts, size, now)
    deadline = time.monotonic() + 30
    while os.path.getsize(path) != rec.written and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.path.getsize(path) == rec.written
    with pytest.raises(record.RecordingError, match="truncated at record 202"):
        records = []
        for r in record.Recording(str(path)):
            records.append(r)
    assert len(records) == 201 and records[200].args == [b"last", 5.0]
    assert all(r.args[0] == payload for r in records[:200])
    rec.close()
    assert os.path.getsize(path) == rec.written
    recording = record.Recording(str(path))
    assert len(list(recording)) == 201 and recording.end == "closed"
    assert rec.direct == takes_o_direct(tmp)  # and it kept O_DIRECT to the end


def test_lent_buffers_are_copied_and_survive_their_reuse(tmp):
    """tcp.send's data is a view of the NAT's reused buffer: the recording
    copies it (into its arena) before the buffer changes, across blocks."""
    path = tmp / "lent.rec"
    rec = record.Recorder(str(path), record.header_for(StackConfig(), 7, False))
    conn = TcpConnection.__new__(TcpConnection)
    conn.serial = 3
    encoder = record._compile_call(
        record.INDEX["tcp.send"], (TcpConnection, memoryview, float), (), int, False
    )
    buffer = bytearray(200_000)
    sent = []
    kept = []
    for i in range(40):  # about 4 MB: many blocks, the arena reused for each
        buffer[:] = os.urandom(len(buffer))
        size = 1000 + i * 4999
        view = memoryview(buffer)[:size]
        parts, total = encoder((conn, view, i / 10), {}, size, i / 10, NO_EVENTS, rec.keep)
        kept += [type(p) for p in parts]
        rec.add(parts, total, i / 10)
        sent.append(bytes(view))
    buffer[:] = bytes(len(buffer))
    rec.close()
    assert memoryview in kept  # the arena, not a bytes copy, held them
    records = list(record.Recording(str(path)))
    assert [r.args[1] for r in records] == sent
    assert [r.result for r in records] == [len(s) for s in sent]


def takes_o_direct(directory) -> bool:
    """Whether the file system under ``directory`` writes an aligned buffer
    with O_DIRECT."""
    import mmap

    path = os.path.join(directory, "probe")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        os.pwrite(fd, mmap.mmap(-1, 4096), 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)


def test_file_round_trip(tmp):
    path = tmp / "r.rec"
    write_recording(path, 5000)
    recording = record.Recording(str(path))
    records = list(recording)
    assert len(records) == 5000 and recording.end == "closed" and recording.end_count == 5000
    assert [r.index for r in records[:3]] == [1, 2, 3]
    assert records[10].method == "receive_frame" and records[10].args == [b"p" * 100, 0.01]
    assert records[10].now == 0.01
    config, unknown, missing = recording.stack_config()
    assert config == StackConfig() and unknown == [] and missing == []
    assert os.path.getsize(path) < 5000 * 100 / 4  # compressible: zlib took it


def test_limit_keeps_a_valid_file_under_the_limit(tmp):
    path = tmp / "r.rec"
    rec = write_recording(path, 50000, limit=200_000, payload=os.urandom(100))
    assert rec.stopped == "limit"
    assert 100_000 < os.path.getsize(path) <= 200_000
    recording = record.Recording(str(path))
    records = list(recording)
    assert recording.end == "limit" and len(records) == recording.end_count < 50000


def test_truncated_and_foreign_files_give_one_line(tmp):
    path = tmp / "r.rec"
    write_recording(path, 3000, payload=os.urandom(100))
    data = path.read_bytes()
    cut = tmp / "cut.rec"
    cut.write_bytes(data[: len(data) - 10])
    status, out, err = run_replay(str(cut))
    assert status == 1
    assert err.count("\n") == 1 and err.startswith(f"pyslirp: {cut}: truncated at record ")
    assert "Traceback" not in out + err
    other = tmp / "other"
    other.write_bytes(b"\x7fELF and so on")
    status, out, err = run_replay(str(other))
    assert (status, out, err) == (1, "", f"pyslirp: {other}: not a pyslirp recording\n")
    damaged = tmp / "damaged.rec"
    damaged.write_bytes(data[:200] + bytes(50) + data[250:])
    status, out, err = run_replay(str(damaged))
    assert status == 1 and err.startswith(f"pyslirp: {damaged}: ") and err.count("\n") == 1
    status, out, err = run_replay(str(tmp / "missing"))
    assert status == 1 and err == f"pyslirp: {tmp / 'missing'}: No such file or directory\n"


def test_bad_options_give_one_line(tmp):
    path = tmp / "r.rec"
    write_recording(path, 3)
    for argv, text in (
        (["--set", "nonsense=1"], "no stack setting 'nonsense'"),
        (["--set", "mtu=big"], "bad value 'big' for mtu"),
        (["--until", "soon"], "expected a frame number or a time"),
    ):
        status, out, err = run_replay(str(path), *argv)
        assert status == 1 and err.startswith("pyslirp replay: ") and text in err
        assert err.count("\n") == 1


# ------------------------------------------------------------- the method table
def _public_methods(cls) -> set:
    return {n for n in vars(cls) if not n.startswith("_") and callable(getattr(cls, n))}


def test_every_stack_method_the_nat_calls_is_recorded_or_a_query():
    """An AST scan of pyslirp/nat and pyslirp/link.py: a call of a public
    method of Stack, TcpLayer or MemoryBudget on something named stack, tcp
    or budget must be in record.RECORDED or record.QUERIES, else a new
    command would escape recordings."""
    names = {
        "stack": _public_methods(Stack),
        "tcp": _public_methods(TcpLayer),
        "budget": _public_methods(MemoryBudget),
    }
    files = [*sorted((REPO / "pyslirp" / "nat").glob("*.py")), REPO / "pyslirp" / "link.py"]
    seen = set()
    missing = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            receiver = ast.unparse(node.func.value).rsplit(".", 1)[-1]
            method = node.func.attr
            for kind, methods in names.items():
                if kind in receiver and method in methods:
                    full = method if kind == "stack" else f"{kind}.{method}"
                    seen.add(full)
                    if full not in record.RECORDED and method not in record.QUERIES:
                        missing.append(f"{path.name}:{node.lineno} {full}")
    assert not missing, missing
    # the scan does find the commands (it would pass vacuously otherwise)
    assert {"send_udp", "tcp.send", "tcp.accept", "budget.charge"} <= seen


# ------------------------------------------------------------- in process
def guest_syn(dst, dport, sport=40000, seq=5000):
    return bytes(
        Ether(src=GUEST_MAC, dst=GW_MAC)
        / IP(src=GUEST, dst=dst)
        / TCP(sport=sport, dport=dport, seq=seq, flags="S", options=[("MSS", 1460)])
    )


def guest_tcp(dport, seq, ack, flags, payload=b"", sport=40000):
    return bytes(
        Ether(src=GUEST_MAC, dst=GW_MAC)
        / IP(src=GUEST, dst="10.0.2.2")
        / TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, window=65535)
        / payload
    )


def is_tcp(frame):
    return TCP in Ether(frame)


def recorded_session(path, **config):
    """An in-process network recorded to ``path``: a guest TCP connection to
    an echo server on loopback (data both ways, FIN), a UDP datagram to it,
    and a SYN to a closed port. Returns the (closed) Recorder."""
    echo = socket.create_server(("127.0.0.1", 0))
    port = echo.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connect is refused
    try:
        with InProcessNetwork(record_path=str(path), **config) as net:
            recorder = net.loop.stack.recorder
            net.send(guest_syn("10.0.2.2", port))
            synack = Ether(net.receive(timeout=5, predicate=is_tcp))[TCP]
            assert str(synack.flags) == "SA"
            peer, _ = echo.accept()
            server_seq = synack.seq + 1
            net.send(guest_tcp(port, 5001, server_seq, "A"))
            net.send(guest_tcp(port, 5001, server_seq, "PA", b"hello"))
            peer.settimeout(5)
            assert peer.recv(100) == b"hello"
            peer.sendall(b"world" * 1000)
            got = 0
            for _ in range(100):
                frame = net.receive(timeout=5, predicate=is_tcp)
                assert frame is not None
                seg = Ether(frame)[TCP]
                got += len(seg.payload)
                net.send(guest_tcp(port, 5006, seg.seq + len(seg.payload), "A"))
                if got >= 5000:
                    break
            assert got == 5000
            peer.close()
            fin = net.receive(timeout=5, predicate=lambda f: is_tcp(f) and Ether(f)[TCP].flags.F)
            assert fin is not None
            net.send(guest_tcp(port, 5006, Ether(fin)[TCP].seq + 1, "FA"))
            net.send(
                bytes(
                    Ether(src=GUEST_MAC, dst=GW_MAC)
                    / IP(src=GUEST, dst="10.0.2.2")
                    / UDP(sport=5353, dport=udp.getsockname()[1])
                    / b"datagram"
                )
            )
            udp.settimeout(5)
            data, source = udp.recvfrom(100)
            assert data == b"datagram"
            udp.sendto(b"answer", source)
            assert net.receive(timeout=5, predicate=lambda f: UDP in Ether(f)) is not None
            net.send(guest_syn("10.0.2.2", closed.getsockname()[1], sport=40001))
            rst = net.receive(timeout=5, predicate=lambda f: is_tcp(f) and Ether(f)[TCP].flags.R)
            assert rst is not None
    finally:
        echo.close()
        udp.close()
        closed.close()
    return recorder


def test_in_process_session_replays_without_divergence(tmp):
    path = tmp / "s.rec"
    recorded_session(path)
    recording = record.Recording(str(path))
    methods = {r.method for r in recording}
    assert recording.end == "closed"
    assert {"receive_frame", "frames_to_send", "tcp.accept", "tcp.send", "tcp.consume"} <= methods
    assert {"tcp.refuse", "send_udp", "tcp.close"} <= methods
    pcap = tmp / "s.pcap"
    status, out, err = run_replay(str(path), "--pcap", str(pcap))
    assert (status, err) == (0, ""), out
    assert out.endswith("pyslirp replay: no divergence\n")
    # the pcap holds every frame both ways, as the summary counts them
    summary = [line for line in out.splitlines() if " records, " in line][0]
    frames_in = int(summary.split(" records, ")[1].split(" frames")[0])
    frames_out = int(summary.split(" from the guest, ")[1].split(" to it")[0])
    from scapy.utils import rdpcap

    packets = rdpcap(str(pcap))
    assert len(packets) == frames_in + frames_out and frames_in >= 6
    assert any(TCP in p and bytes(p[TCP].payload) == b"hello" for p in packets)


def test_changed_parameter_diverges_at_the_first_frame_it_changes(tmp):
    path = tmp / "s.rec"
    recorded_session(path)
    # The SYN-ACK advertises the receive window: a smaller buffer changes it.
    status, out, err = run_replay(str(path), "--set", "tcp.receive_buffer=30000")
    assert status == 1, out
    assert "changed: tcp.receive_buffer=30000 (recorded 1048576)" in out
    line = [x for x in out.splitlines() if "first divergence" in x][0]
    assert "frames_to_send" in line and "frame 2 to the guest" in line
    assert "[SA]" in line and "TCP 10.0.2.2:" in line
    # the record named is the first output one: the SYN is record 1
    recording = record.Recording(str(path))
    first_output = next(r for r in recording if r.method == "frames_to_send")
    assert f"at record {first_output.index} " in line


def test_until_and_break(tmp):
    path = tmp / "s.rec"
    recorded_session(path)
    status, out, _err = run_replay(str(path), "--until", "3")
    assert status == 0 and "stopped after frame 3 (--until)" in out
    assert " 2 frames from the guest, 1 to it" in out  # SYN, SYN-ACK, ACK
    status, out, _err = run_replay(str(path), "--until", "0s")
    assert status == 0 and "stopped at 0 s (--until)" in out
    # the SYN and what came at the same `now`; the guest's ACK came later
    assert " 1 frames from the guest, " in out
    code = (
        "import sys; from forwarder import replay; "
        f"sys.exit(replay.main([{str(path)!r}, '--break', '3']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input="p frame_index\np record.method\nc\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "before frame 3" in result.stdout
    assert "(Pdb) 3\n" in result.stdout
    assert "no divergence" in result.stdout


def test_trace_option_sets_a_tracer(tmp):
    path = tmp / "s.rec"
    recorded_session(path)
    trace = tmp / "t.jsonl"
    status, out, _err = run_replay(str(path), f"--trace={trace}")
    assert status == 0, out
    assert trace.exists()


def test_older_version_and_settings_are_reported(tmp):
    import json

    path = tmp / "s.rec"
    write_recording(path, 3)
    data = path.read_bytes()
    start = len(record.MAGIC) + 6
    size = int.from_bytes(data[len(record.MAGIC) + 2 : start], "little")
    header = json.loads(data[start : start + size])
    header["pyslirp"] = "0.0.1"
    header["stack"]["old_knob"] = 3
    del header["stack"]["tcp"]["dupack_burst"]
    head = json.dumps(header).encode()
    old = tmp / "old.rec"
    old.write_bytes(
        data[: len(record.MAGIC) + 2]
        + len(head).to_bytes(4, "little")
        + head
        + data[start + size :]
    )
    status, out, err = run_replay(str(old))
    assert "recorded by pyslirp 0.0.1, replayed by pyslirp " in out
    assert "settings this version does not have (ignored): old_knob" in out
    assert "the recording does not have (this version's default): tcp.dupack_burst" in out
    assert status == 0 and "no divergence" in out


def test_recording_off_leaves_the_stack_bare():
    with InProcessNetwork() as net:
        assert type(net.loop.stack) is Stack


def test_loop_closes_the_recording(tmp):
    path = tmp / "idle.rec"
    with InProcessNetwork(record_path=str(path)) as net:
        assert type(net.loop.stack) is record.RecordingStack
    recording = record.Recording(str(path))
    assert list(recording) == [] and recording.end == "closed"
    assert recording.header["stack"]["tcp"]["receive_buffer"] == 1 << 20


def test_recording_files_a_file_per_stack_and_one_limit_for_all(tmp):
    """RecordingFiles: the first stack records to PATH, the next ones to
    PATH.2, PATH.3; --record-limit is shared (the second file gets what the
    first left), and once too little is left the next stack is plain."""
    path = tmp / "vm.rec"
    config = NetworkConfig(record_path=str(path))
    files = record.RecordingFiles(str(path))
    stacks = [files.stack(config)]
    stacks[0].close_recording()
    for _ in range(2):
        stacks.append(files.stack(config))
        stacks[-1].receive_frame(b"\xff" * 60, 1.0)  # a runt: recorded, dropped
        stacks[-1].close_recording()
    files.close()
    assert sorted(os.listdir(tmp)) == ["vm.rec", "vm.rec.2", "vm.rec.3"]
    assert [len(list(record.Recording(str(tmp / n)))) for n in ("vm.rec.2", "vm.rec.3")] == [1, 1]

    first = os.path.getsize(path)
    limited = tmp / "limited.rec"
    config = NetworkConfig(record_path=str(limited))
    limit = first + record.MIN_FILE + 100  # 100: headers differ by a few bytes (the seed)
    files = record.RecordingFiles(str(limited), limit=limit)
    files.stack(config).close_recording()
    second = files.stack(config)
    assert second.recorder.limit == limit - os.path.getsize(limited)
    second.receive_frame(b"\xff" * 60, 1.0)
    second.close_recording()
    third = files.stack(config)  # less than MIN_FILE left: not recorded
    files.close()
    assert type(third) is Stack
    assert not (tmp / "limited.rec.3").exists()
    total = sum(os.path.getsize(tmp / n) for n in ("limited.rec", "limited.rec.2"))
    assert total <= limit


def test_a_file_that_cannot_be_made_stops_the_recording_not_the_stack(tmp, caplog):
    path = tmp / "vm.rec"
    (tmp / "vm.rec.2").mkdir()  # open() of the second file fails (EISDIR)
    config = NetworkConfig(record_path=str(path))
    files = record.RecordingFiles(str(path))
    files.stack(config).close_recording()
    second, third = files.stack(config), files.stack(config)
    files.close()
    assert type(second) is Stack and type(third) is Stack
    assert files.stopped.startswith(f"cannot write {path}.2: ")
    assert [r.getMessage() for r in caplog.records if "not recorded" in r.getMessage()] == [
        f"--record: the next VMs are not recorded (1 recorded): {files.stopped}"
    ]


def test_a_file_begun_for_a_vm_that_never_came_is_removed(tmp):
    path = tmp / "vm.rec"
    config = NetworkConfig(record_path=str(path))
    files = record.RecordingFiles(str(path))
    files.stack(config).close_recording()  # the first: kept even if empty
    files.stack(config).close_recording()  # waited for a VM, none came
    files.close()
    assert os.listdir(tmp) == ["vm.rec"]


def _arp_request(guest_mac: str) -> bytes:
    return bytes(
        Ether(dst="ff:ff:ff:ff:ff:ff", src=guest_mac)
        / ARP(op=1, hwsrc=guest_mac, psrc=GUEST, pdst="10.0.2.2")
    )


@pytest.mark.parametrize("sandbox", [False, True], ids=["plain", "sandbox"])
def test_each_vm_records_to_a_file_of_its_own(tmp_path, sandbox):
    """--socket with --record: three VMs one after the other make vm.rec,
    vm.rec.2 and vm.rec.3, each replaying without divergence with its own
    frames; with --enable-sandbox too (the files are made after the
    forwarder has left the host's file system)."""
    path, rec = str(tmp_path / "vm.sock"), tmp_path / "vm.rec"
    args = (f"--record={rec}", *(["--enable-sandbox"] if sandbox else []))
    with harness.vm_forwarder(path, *args) as proc:
        for n in range(1, 4):  # VM n sends n ARP requests
            vm = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            vm.settimeout(10)
            vm.connect(path)
            for _ in range(n):
                frame = _arp_request(f"02:00:00:00:00:0{n}")
                vm.sendall(struct.pack("!I", len(frame)) + frame)
                assert len(vm.recv(4)) == 4  # the reply's length: the frame was handled
                time.sleep(0.05)
            vm.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not os.path.exists(f"{rec}.{n + 1}"):
                time.sleep(0.02)  # the next VM's loop (and file) is ready
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
    assert sorted(os.listdir(tmp_path)) == ["vm.rec", "vm.rec.2", "vm.rec.3"]  # no vm.rec.4
    for n, name in enumerate(["vm.rec", "vm.rec.2", "vm.rec.3"], start=1):
        status, out, err = run_replay(str(tmp_path / name))
        assert (status, err) == (0, ""), out
        assert f"{n} frames from the guest, {n} to it" in out and "no divergence" in out
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o600



# ------------------------------------------------------------- end to end
class _Web(http.server.BaseHTTPRequestHandler):
    """GET /N: N bytes; POST: the count of bytes read back."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 - http.server's name
        size = int(self.path.strip("/") or 0)
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        chunk = os.urandom(65536)
        while size > 0:
            self.wfile.write(chunk[: min(size, len(chunk))])
            size -= len(chunk)

    def do_POST(self):  # noqa: N802
        size = int(self.headers["Content-Length"])
        got = 0
        while got < size:
            data = self.rfile.read(min(65536, size - got))
            if not data:
                break
            got += len(data)
        body = f"got {got}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def web_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Web)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextlib.contextmanager
def udp_echo():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(2048)
            except (TimeoutError, OSError):
                continue
            sock.sendto(b"echo " + data, peer)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        sock.close()


def guest_script(web: int, udp: int, upload: str) -> str:
    """curl both ways, dig through the DNS proxy, a UDP exchange, ping, and
    a download while nftables drops a tenth of the guest's packets."""
    get = f"http://10.0.2.2:{web}"
    return "; ".join(
        [
            "set -e",
            f"curl -sS --max-time 60 -o /dev/null -w 'down %{{size_download}}\\n' {get}/3000000",
            f"curl -sS --max-time 60 --data-binary @{upload} {get}/up",
            "dig +short +time=3 +tries=3 @10.0.2.3 example.test",
            f"echo hello | socat -T 5 - UDP4:10.0.2.2:{udp}",
            "echo",
            "ping -c 3 -i 0.2 -W 3 10.0.2.2 >/dev/null && echo ping-ok",
            # 0/8 is never relayed: the ICMP relay answers net unreachable (send_icmp_error)
            "ping -c 1 -W 2 0.1.2.3 >/dev/null || echo ping-unreachable",
            "nft add table inet lossy",
            "nft add chain inet lossy out '{ type filter hook output priority 0; }'",
            "nft add rule inet lossy out numgen random mod 10 0 drop",
            f"curl -sS --max-time 120 -o /dev/null -w 'lossy %{{size_download}}\\n' {get}/1000000",
            "nft delete table inet lossy",
        ]
    )


@pytest.mark.e2e
def test_run_mode_session_replays_without_divergence(tmp_path):
    path = tmp_path / "session.rec"
    upload = tmp_path / "upload"
    upload.write_bytes(os.urandom(2_000_000))
    with (
        web_server() as web,
        udp_echo() as udp,
        harness.DnsServer(records={"example.test.": "192.0.2.7"}) as dns,
    ):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "forwarder",
                f"--dns-upstream=127.0.0.1:{dns.port}",
                f"--record={path}",
                "--",
                "sh",
                "-c",
                guest_script(web, udp, str(upload)),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "down 3000000" in lines and "got 2000000" in lines and "192.0.2.7" in lines
    assert "echo hello" in lines and "ping-ok" in lines and "ping-unreachable" in lines
    assert "lossy 1000000" in lines
    recording = record.Recording(str(path))
    methods = {}
    for r in recording:
        methods[r.method] = methods.get(r.method, 0) + 1
    recording.close()
    assert recording.end == "closed"
    # run mode's TAP has the virtio header (offloads): the vnet_ verbs
    for name in ("receive_vnet_frame", "vnet_frames_to_send", "tcp.send"):
        assert methods.get(name), (name, methods)
    for name in ("tcp.consume", "tcp.accept", "send_udp", "send_icmp_error", "budget.charge"):
        assert methods.get(name), (name, methods)

    pcap = tmp_path / "session.pcap"
    played = subprocess.run(
        [*harness.TOOLS, "replay", str(path), "--pcap", str(pcap)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert played.returncode == 0, played.stdout + played.stderr
    assert played.stdout.endswith("pyslirp replay: no divergence\n")
    assert pcap.stat().st_size > 6_000_000  # both transfers' payload, as the guest saw it

    changed = subprocess.run(
        [*harness.TOOLS, "replay", str(path), "--set", "tcp.receive_buffer=30000"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert changed.returncode == 1, changed.stdout + changed.stderr
    line = [x for x in changed.stdout.splitlines() if "first divergence" in x]
    assert line and "to the guest" in line[0] and "[SA]" in line[0] and "win=30000" in line[0]


def test_record_limit_stops_cleanly_and_the_part_replays(tmp):
    path = tmp / "small.rec"
    recorded_session(path, record_limit=2500)
    assert os.path.getsize(path) <= 2500
    recording = record.Recording(str(path))
    records = list(recording)
    assert recording.end == "limit" and 0 < len(records) == recording.end_count
    status, out, err = run_replay(str(path))
    assert (status, err) == (0, ""), out
    assert "stopped at its size limit (--record-limit)" in out and "no divergence" in out


def test_a_write_error_stops_the_recording_not_the_network():
    # /dev/full: every write fails with ENOSPC; the session must still work.
    recorder = recorded_session(pathlib.Path("/dev/full"))
    assert recorder.stopped == "write error: No space left on device"


def test_mutated_recordings_never_raise(tmp, monkeypatch):
    """A recording is untrusted input: flipped bytes anywhere give a
    divergence or one line, never an exception out of replay.main."""
    import random

    path = tmp / "s.rec"
    # stored, so that a flip reaches the records rather than zlib's checksum
    monkeypatch.setattr(record, "COMPRESS", False)
    recorded_session(path)
    good = path.read_bytes()
    assert b"hello" in good
    rng = random.Random(15)
    bad = tmp / "bad.rec"
    outcomes = set()
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        bad.write_bytes(bytes(data))
        status, out, err = run_replay(str(bad))
        assert status in (0, 1)
        if status == 1:
            assert "first divergence" in out or err.count("\n") == 1, (out, err)
        outcomes.add("divergence" if "first divergence" in out else err[:30] if err else status)
    assert "divergence" in outcomes and len(outcomes) > 2, outcomes
