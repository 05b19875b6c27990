"""The sans-IO stack's own cost per step of a connection, warm and cold.

    python3 bench/stack.py [--test cc|rr] [--count 5000]

Drives a Stack in this process with the frames a Linux guest sends (virtio
header, NEEDS_CSUM as its kernel marks them) and the NAT side's commands,
and times each step: for cc the SYN, the accept and its SYN-ACK, the
handshake's ACK, the guest's FIN, our close and FIN, and the last ACK; for
rr a 1-byte request in (to a sink, as direct delivery has it) and a 1-byte
reply out. No sockets and no kernel: the stack alone.

Each step is timed twice: warm (one after the other, as a microbenchmark
sees it) and cold (after touching a byte in every KiB of 4 MiB, as the
kernel's work between two steps of a real run leaves the caches). In a
real forwarder every step comes after a system call's worth of kernel
work, so the cold figure is the one that shows in its CPU time.
"""

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loop import GUEST, GUEST_MAC, SYN_OPTIONS, frame  # noqa: E402 - bench/loop.py's guest frames

from pyslirp.stack.config import StackConfig  # noqa: E402
from pyslirp.stack.interface import Stack  # noqa: E402
from pyslirp.stack.tcp import ACK, FIN, PSH, SYN  # noqa: E402

PORT = 80
SWEEP = bytearray(4 << 20)


def sweep() -> None:
    """Touch one byte in every KiB of 4 MiB: 4,096 cache lines, spread over
    every set of this CPU's L2 (512 KiB), which they half fill."""
    memory = SWEEP
    for at in range(0, len(memory), 1024):
        memory[at] = 1


def segment(port, flags, seq, ack, ts=(1, 0), payload=b"", options=None) -> bytes:
    """A guest frame toward PORT (bench/loop.py's, with NEEDS_CSUM)."""
    return frame(port, PORT, flags, seq, ack, payload, ts, options)


class Steps:
    """Nanoseconds per named step, warm or cold: ``begin()``, the step,
    ``end(name)``."""

    def __init__(self, cold: bool) -> None:
        self.cold = cold
        self.totals: dict[str, int] = {}
        self._start = 0

    def begin(self) -> None:
        if self.cold:
            sweep()
        self._start = time.perf_counter_ns()

    def end(self, name: str) -> None:
        spent = time.perf_counter_ns() - self._start
        self.totals[name] = self.totals.get(name, 0) + spent


def drain(stack) -> list:
    events = []
    while (event := stack.next_event()) is not None:
        events.append(event)
    return events


def connect_close(count: int, steps: Steps) -> None:
    stack = Stack(StackConfig(offload=True), random.Random(1))
    stack.learn_neighbor(GUEST, GUEST_MAC)
    tcp = stack.tcp
    now = 1.0
    for i in range(count):
        port, isn = 20000 + i % 30000, 1000 + i * 7919
        frame = segment(port, SYN, isn, 0, options=SYN_OPTIONS)
        steps.begin()
        stack.receive_vnet_frame(frame, now)
        events = drain(stack)
        steps.end("SYN in")
        conn = events[0].conn
        steps.begin()
        tcp.accept(conn, now)
        stack.vnet_frames_to_send(now)
        steps.end("accept, SYN-ACK out")
        ours = conn.iss + 1
        frame = segment(port, ACK, isn + 1, ours)
        steps.begin()
        stack.receive_vnet_frame(frame, now)
        steps.end("handshake's ACK in")
        frame = segment(port, FIN | ACK, isn + 1, ours)
        steps.begin()
        stack.receive_vnet_frame(frame, now)
        drain(stack)
        steps.end("guest's FIN in")
        steps.begin()
        tcp.close(conn, now)
        stack.vnet_frames_to_send(now)
        steps.end("close, FIN out")
        frame = segment(port, ACK, isn + 2, ours + 1)
        steps.begin()
        stack.receive_vnet_frame(frame, now)
        drain(stack)
        steps.end("last ACK in")
        now += 0.0002
    if tcp.connections:
        raise SystemExit(f"{len(tcp.connections)} connections did not close")


def request_response(count: int, steps: Steps) -> None:
    stack = Stack(StackConfig(offload=True), random.Random(1))
    stack.learn_neighbor(GUEST, GUEST_MAC)
    tcp = stack.tcp
    now = 1.0
    port, isn = 40000, 5000
    stack.receive_vnet_frame(segment(port, SYN, isn, 0, options=SYN_OPTIONS), now)
    conn = drain(stack)[0].conn
    tcp.accept(conn, now)
    stack.vnet_frames_to_send(now)
    stack.receive_vnet_frame(segment(port, ACK, isn + 1, conn.iss + 1), now)
    stack.vnet_frames_to_send(now)
    conn.sink = len  # the host socket takes every byte at once
    seq = isn + 1
    for i in range(count):
        frame = segment(port, PSH | ACK, seq, conn.snd_nxt, ts=(10 + i, 0), payload=b"x")
        steps.begin()
        stack.receive_vnet_frame(frame, now)
        drain(stack)
        steps.end("request in")
        steps.begin()
        tcp.send(conn, b"y", now, at_once=True)
        stack.vnet_frames_to_send(now)
        steps.end("reply out")
        seq += 1
        now += 0.0001
    if conn.bytes_in != count or conn.bytes_out + len(conn.snd_buf) != count:
        raise SystemExit("the stack did not relay every byte")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", choices=("cc", "rr"), default="cc")
    parser.add_argument("--count", type=int, default=5000, help="connections or transactions")
    args = parser.parse_args()
    run = connect_close if args.test == "cc" else request_response
    results = {}
    for cold in (False, True):
        steps = Steps(cold)
        run(min(args.count, 1000), Steps(cold))  # the first pass warms the interpreter up
        run(args.count, steps)
        results[cold] = steps.totals
    print(
        f"| step ({args.test}, µs per {'connection' if args.test == 'cc' else 'transaction'}) "
        "| warm | cold |"
    )
    print("|---|---|---|")
    for name in results[False]:
        warm, cold = (results[c][name] / args.count / 1000 for c in (False, True))
        print(f"| {name} | {warm:.2f} | {cold:.2f} |")
    warm, cold = (sum(results[c].values()) / args.count / 1000 for c in (False, True))
    print(f"| all | {warm:.2f} | {cold:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
