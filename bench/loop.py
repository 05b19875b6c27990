"""The python backend's own cost per transaction, without a kernel guest.

The real event loop (pyslirp.nat.backend.build_loop) runs in this process with an
AF_UNIX SOCK_SEQPACKET socketpair as its TAP. A scripted guest in a child
process speaks TCP in raw frames through the other end; a host server in
another child listens on 127.0.0.1. Only this process is measured, so the
numbers are the forwarder's alone: user and system CPU per transaction and,
with --opcodes, the Python bytecodes run per transaction by function (a
count that does not depend on the machine's noise).

    python3 bench/loop.py [--test rr|cc] [--count 20000] [--opcodes] [--busy-poll USEC]
                          [--record FILE]

rr: 1-byte request/response over one connection (the guest acknowledges
each answer with its next request, as a kernel with delayed ACK does).
cc: connect and close (SYN, ACK, FIN; the host server accepts and closes).
No namespace, no TAP: it runs as any user.
"""

import argparse
import os
import random
import resource
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyslirp import log  # noqa: E402
from pyslirp.config import NetworkConfig  # noqa: E402
from pyslirp.nat.backend import build_loop  # noqa: E402
from pyslirp.stack import checksum  # noqa: E402

GUEST_MAC = bytes.fromhex("020000000064")
GATEWAY_MAC = bytes.fromhex("525500000202")
GUEST = bytes([10, 0, 2, 100])
HOST = bytes([10, 0, 2, 2])  # the host's 127.0.0.1
SYN_OPTIONS = bytes.fromhex("020405b4040208") + b"\x0a" + bytes(8) + bytes.fromhex("01030307")
VNET = b"\x01" + bytes(9)  # NEEDS_CSUM, as the guest kernel marks its frames
TIMEOUT = 5.0  # for any one frame or connection: a stuck run ends


def frame(sport, dport, flags, seq, ack, payload=b"", ts=(1, 0), options=None):
    """A guest frame (with its virtio header) with correct checksums."""
    if options is None:
        options = b"\x01\x01\x08\x0a" + struct.pack("!II", *ts)
    tcp = (
        struct.pack(
            "!HHIIBBHHH",
            sport,
            dport,
            seq & 0xFFFFFFFF,
            ack & 0xFFFFFFFF,
            (20 + len(options)) << 2,
            flags,
            502,
            0,
            0,
        )
        + options
        + payload
    )
    pseudo = int.from_bytes(GUEST, "big") + int.from_bytes(HOST, "big") + 6 + len(tcp)
    s = (pseudo + checksum.partial_sum(tcp)) % 0xFFFF
    tcp = tcp[:16] + ((~s) & 0xFFFF).to_bytes(2, "big") + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, GUEST, HOST)
    ip = ip[:10] + checksum.checksum(ip).to_bytes(2, "big") + ip[12:]
    return VNET + GATEWAY_MAC + GUEST_MAC + b"\x08\x00" + ip + tcp


def parse(data):
    """(seq, flags, TSval, payload) of a frame from the stack."""
    tcp = data[10 + 14 + 20 :]
    seq = struct.unpack_from("!I", tcp, 4)[0]
    size = (tcp[12] >> 4) * 4
    tsval = struct.unpack_from("!I", tcp, 24)[0] if size == 32 else 0
    return seq, tcp[13], tsval, tcp[size:]


def host_server(listener, test: str, count: int) -> None:
    listener.settimeout(TIMEOUT)
    if test == "cc":
        for _ in range(count):
            conn, _ = listener.accept()
            conn.close()
        return
    conn, _ = listener.accept()
    conn.settimeout(TIMEOUT)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(count + 1):
        try:
            data = conn.recv(4096)
        except ConnectionResetError:  # the loop closed its end at the finish
            return
        if not data:
            return
        conn.sendall(data)


def guest(sock, port: int, test: str, count: int) -> None:
    sock.settimeout(TIMEOUT)

    def next_frame(wanted):
        for _ in range(16):  # a few frames we do not wait for may come first
            got = parse(sock.recv(70000))
            if wanted(got):
                return got
        raise SystemExit("the stack did not answer as expected")

    if test == "cc":
        for i in range(count):
            sport, isn = 20000 + i % 30000, 1000 + i * 7919
            sock.send(frame(sport, port, 0x02, isn, 0, options=SYN_OPTIONS))
            seq, _, tsval, _ = next_frame(lambda f: f[1] & 0x12 == 0x12)
            sock.send(frame(sport, port, 0x10, isn + 1, seq + 1, ts=(2, tsval)))
            sock.send(frame(sport, port, 0x11, isn + 1, seq + 1, ts=(2, tsval)))
            seq, _, tsval, _ = next_frame(lambda f: f[1] & 0x01)
            sock.send(frame(sport, port, 0x10, isn + 2, seq + 1, ts=(3, tsval)))
        return
    sock.send(frame(40000, port, 0x02, 1000, 0, options=SYN_OPTIONS))
    seq, _, tsval, _ = next_frame(lambda f: f[1] & 0x12 == 0x12)
    ours = seq + 1
    sock.send(frame(40000, port, 0x10, 1001, ours, ts=(2, tsval)))
    for i in range(count):
        sock.send(frame(40000, port, 0x18, 1001 + i, ours, b"x", ts=(3 + i, tsval)))
        seq, _, tsval, data = next_frame(lambda f: f[3])
        ours = seq + len(data)


def trace_opcodes(loop) -> Counter:
    """Run the loop counting the bytecodes of each function."""
    ops: Counter = Counter()

    def tracer(frame, event, arg):
        if event == "call":
            frame.f_trace_opcodes = True
        elif event == "opcode":
            code = frame.f_code
            ops[f"{Path(code.co_filename).name}:{code.co_name}"] += 1
        return tracer

    # Tracing makes every transaction take milliseconds: keep the delayed ACK
    # from firing, as it does not in an untraced run.
    loop.stack.tcp.config.delayed_ack_timeout = 0.5
    sys.settrace(tracer)
    try:
        loop.run()
    finally:
        sys.settrace(None)
    return ops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", choices=("rr", "cc"), default="rr")
    parser.add_argument("--count", type=int, default=20000, help="transactions (or connections)")
    parser.add_argument("--opcodes", action="store_true", help="count bytecodes (slow)")
    parser.add_argument("--top", type=int, default=25, help="functions listed with --opcodes")
    parser.add_argument(
        "--busy-poll",
        type=int,
        default=0,
        help="the loop's busy polling in microseconds (default 0: the work alone, no spinning)",
    )
    parser.add_argument(
        "--record", metavar="FILE", help="run with --record=FILE, to measure a recording's cost"
    )
    args = parser.parse_args()
    count = min(args.count, 3000) if args.opcodes else args.count
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stop_r, stop_w = os.pipe()
    children = []
    try:
        for role in ("host", "guest"):
            pid = os.fork()
            if pid == 0:  # the child: its part, then out without cleanup handlers
                status = 0
                try:
                    if role == "host":
                        host_server(listener, args.test, count)
                    else:
                        guest(theirs, port, args.test, count)
                except BaseException as exc:  # noqa: BLE001 - reported, then exit
                    print(f"{role}: {exc!r}", file=sys.stderr)
                    status = 1
                os._exit(status)
            children.append(pid)
        listener.close()
        theirs.close()
        config = NetworkConfig(
            offload=True,
            random=random.Random(1),
            dns_upstreams=[("127.0.0.1", 9)],
            busy_poll=args.busy_poll / 1e6,
            record_path=args.record,
        )
        # The forwarder's default --log-level (forwarder/ratelimit.py): an
        # INFO line per connection is dropped before logging is asked.
        log.configure("warning")
        loop = build_loop(config, ours.fileno(), stop_r)
        guest_status = []

        def stop_when_guest_ends() -> None:
            guest_status.append(os.waitpid(children[1], 0)[1])
            os.write(stop_w, b"x")

        threading.Thread(target=stop_when_guest_ends, daemon=True).start()
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        ops = trace_opcodes(loop) if args.opcodes else None
        if ops is None:
            loop.run()
        after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
        loop.close()
        if not guest_status or guest_status[0] != 0:
            print("the scripted guest failed", file=sys.stderr)
            return 1
        unit = "connection" if args.test == "cc" else "transaction"
        user = (after.ru_utime - before.ru_utime) / count * 1e6
        system = (after.ru_stime - before.ru_stime) / count * 1e6
        print(
            f"{args.test}: {count} {unit}s, per {unit}: user {user:.1f} us, "
            f"system {system:.1f} us, wall {wall / count * 1e6:.1f} us"
        )
        if ops is not None:
            total = sum(ops.values())
            print(f"bytecodes per {unit}: {total / count:.0f}")
            for name, n in ops.most_common(args.top):
                print(f"  {n / count:7.1f}  {name}")
        return 0
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        ours.close()
        os.close(stop_r)
        os.close(stop_w)


if __name__ == "__main__":
    sys.exit(main())
