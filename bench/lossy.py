"""Byte-exact transfers over a lossy guest link: pyslirp against slirp4netns.

Usage (as root, from the repository):
    python3 bench/lossy.py [--loss 1 5] [--backend python slirp4netns]
        [--size 100M] [--parallel 20 --parallel-size 5M] [--pcap FILE] [--timeout 300]

The loss is made inside the guest's namespace, where the guest's kernel
cannot tell it from a bad wire:

- toward the guest: an nftables rule on tap0's ingress hook drops frames
  at random (``numgen random mod 100 < P drop``);
- from the guest: an iptables-nft rule sends packets leaving by tap0 at
  random to an NFQUEUE nobody reads (``-m statistic --mode random
  --probability P -j NFQUEUE``), where they vanish. (An nftables ``drop`` in
  the output chain would not do: the guest's TCP is told of a local send
  error and resends at once, so nothing is lost on the wire.)

With TAP offloads on, the frames the rules see are the guest's and our
large (GSO) segments: one drop loses up to 64 KiB. The counts of dropped
frames each way are reported with the results.

Each transfer is checked by SHA-256 at the receiver: host -> guest from a
sender on 127.0.0.1 (reached as 10.0.2.2) to a reader in the namespace, and
guest -> host the other way. Everything stays on loopback and in the
namespace this script makes; every process, rule and namespace is removed
at exit; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import forwarder as start_forwarder  # noqa: E402
from bench.run import namespace  # noqa: E402

NFQUEUE_NUM = 4242  # a queue no process listens on: what goes there is lost
CHUNK = 1 << 16

# Run in the guest's namespace: N transfers at once, each a connection to
# the host that either reads everything (down) or writes SIZE bytes of the
# seeded stream (up); prints one JSON line per transfer.
GUEST_CLIENT = r"""
import hashlib, json, random, socket, sys, threading, time
mode, port, size, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
timeout = float(sys.argv[5])
def stream(seed, size):
    rng = random.Random(seed)
    left = size
    while left:
        n = min(left, 1 << 16)
        yield rng.randbytes(n)
        left -= n
results = [None] * count
def one(i):
    start = time.monotonic()
    h = hashlib.sha256()
    got = 0
    try:
        s = socket.create_connection(("10.0.2.2", port), timeout=timeout)
        s.settimeout(timeout)
        s.sendall(i.to_bytes(4, "big"))
        if mode == "down":
            while True:
                data = s.recv(1 << 16)
                if not data:
                    break
                h.update(data)
                got += len(data)
        else:
            for piece in stream(i, size):
                s.sendall(piece)
                h.update(piece)
                got += len(piece)
            s.shutdown(socket.SHUT_WR)
            s.recv(1)
        s.close()
        error = None
    except OSError as exc:
        error = str(exc)
    seconds = time.monotonic() - start
    results[i] = {"i": i, "bytes": got, "sha256": h.hexdigest(), "seconds": seconds, "error": error}
threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
for t in threads: t.start()
for t in threads: t.join()
for r in results: print(json.dumps(r))
"""


def expected_sha256(seed: int, size: int) -> str:
    """The SHA-256 of the seeded stream (as GUEST_CLIENT and Server make it)."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    left = size
    while left:
        n = min(left, CHUNK)
        h.update(rng.randbytes(n))
        left -= n
    return h.hexdigest()


class Server:
    """On 127.0.0.1: each connection names its transfer (4 bytes); in "down"
    mode the server writes SIZE bytes of that transfer's seeded stream and
    closes, in "up" mode it reads to the end, records the SHA-256, and
    closes."""

    def __init__(self, mode: str, size: int) -> None:
        self.mode, self.size = mode, size
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.sock.getsockname()[1]
        self.received: dict[int, tuple[int, str, float]] = {}
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        start = time.monotonic()
        with conn:
            conn.settimeout(600)
            try:
                head = b""
                while len(head) < 4:
                    part = conn.recv(4 - len(head))
                    if not part:
                        return
                    head += part
                index = int.from_bytes(head, "big")
                if self.mode == "down":
                    rng = random.Random(index)
                    left = self.size
                    while left:
                        n = min(left, CHUNK)
                        conn.sendall(rng.randbytes(n))
                        left -= n
                    return
                h = hashlib.sha256()
                got = 0
                while True:
                    data = conn.recv(CHUNK)
                    if not data:
                        break
                    h.update(data)
                    got += len(data)
                self.received[index] = (got, h.hexdigest(), time.monotonic() - start)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


def in_ns(ns_name: str, cmd: list[str], timeout: float = 10, check: bool = True) -> str:
    result = subprocess.run(
        ["ip", "netns", "exec", ns_name, *cmd], capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()}")
    return result.stdout


@contextlib.contextmanager
def lossy_link(ns_name: str, percent: float, queue: int = NFQUEUE_NUM):
    """Drop ``percent`` % of the frames each way on the guest's tap0; yields
    a function that returns (dropped toward the guest, dropped from it)."""
    if percent:
        # numgen gives whole numbers: P % is "random mod 10000 < 100 P".
        threshold = int(round(percent * 100))
        rules = (
            "table netdev pyslirp_loss {\n"
            "  chain ingress {\n"
            '    type filter hook ingress device "tap0" priority 0;\n'
            f"    numgen random mod 10000 < {threshold} counter drop\n"
            "  }\n"
            "}\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", ns_name, "nft", "-f", "-"],
            input=rules, text=True, check=True, capture_output=True, timeout=10,
        )  # fmt: skip
        in_ns(ns_name, ["iptables", "-w", "-A", "OUTPUT", "-o", "tap0", "-m", "statistic",
                        "--mode", "random", "--probability", f"{percent / 100:.4f}",
                        "-j", "NFQUEUE", "--queue-num", str(queue)])  # fmt: skip

    def dropped() -> tuple[int, int]:
        if not percent:
            return 0, 0
        listing = in_ns(ns_name, ["nft", "list", "table", "netdev", "pyslirp_loss"])
        toward = int(listing.split("counter packets ")[1].split()[0])
        table = in_ns(ns_name, ["iptables", "-w", "-L", "OUTPUT", "-v", "-x", "-n"])
        lines = [line for line in table.splitlines() if "NFQUEUE" in line]
        return toward, int(lines[0].split()[0]) if lines else 0

    yield dropped


def transfer(ns_name: str, mode: str, size: int, count: int, timeout: float) -> list[dict]:
    """``count`` transfers of ``size`` bytes at once, ``mode`` "down" (host
    -> guest) or "up"; each result has ok (byte-exact), seconds, error."""
    server = Server(mode, size)
    try:
        try:
            proc = subprocess.run(
                ["ip", "netns", "exec", ns_name, sys.executable, "-c", GUEST_CLIENT, mode,
                 str(server.port), str(size), str(count), str(timeout)],
                capture_output=True, text=True, timeout=timeout + 30,
            )  # fmt: skip
        except subprocess.TimeoutExpired:  # (subprocess.run has killed the client)
            error = f"did not finish in {timeout:.0f} s"
            return [
                {"i": i, "ok": False, "seconds": timeout, "bytes": 0, "error": error}
                for i in range(count)
            ]
        results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if len(results) != count:
            raise RuntimeError(f"guest client: {proc.stderr[-2000:]}")
        deadline = time.monotonic() + 10
        while mode == "up" and len(server.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        for result in results:
            want = expected_sha256(result["i"], size)
            if mode == "down":
                result["ok"] = result["bytes"] == size and result["sha256"] == want
            else:
                got = server.received.get(result["i"])
                result["ok"] = got is not None and got[0] == size and got[1] == want
        return results
    finally:
        server.close()


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def run_case(
    backend, percent, size, parallel, parallel_size, timeout, pcap=None, mtu=1500,
    modes=("down", "up"),
):  # fmt: skip
    """One backend at one loss rate: the single transfers both ways, then
    the parallel ones; returns a dict of results."""
    ns_name = f"pyslirp-lossy-{os.getpid()}-{backend}-{int(percent * 10)}"
    out = {"backend": backend, "loss_percent": percent}
    with namespace(ns_name) as ns_path:
        extra = [f"--pcap={pcap}"] if pcap and backend != "slirp4netns" else []
        with (
            start_forwarder(backend, mtu, ns_name, ns_path, extra, None),
            lossy_link(ns_name, percent) as dropped,
        ):
                for mode in modes:
                    if size:
                        before = dropped()
                        (result,) = transfer(ns_name, mode, size, 1, timeout)
                        after = dropped()
                        out[f"single_{mode}"] = {
                            "ok": result["ok"],
                            "seconds": round(result["seconds"], 1),
                            "MiB/s": round(size / (1 << 20) / result["seconds"], 2),
                            "dropped_toward_guest": after[0] - before[0],
                            "dropped_from_guest": after[1] - before[1],
                            "error": result["error"],
                        }
                    if parallel:
                        before = dropped()
                        results = transfer(ns_name, mode, parallel_size, parallel, timeout)
                        after = dropped()
                        times = sorted(r["seconds"] for r in results)
                        out[f"parallel_{mode}"] = {
                            "ok": all(r["ok"] for r in results),
                            "count": parallel,
                            "median_s": round(times[len(times) // 2], 1),
                            "max_s": round(times[-1], 1),
                            "dropped_toward_guest": after[0] - before[0],
                            "dropped_from_guest": after[1] - before[1],
                            "errors": [r["error"] for r in results if r["error"]],
                        }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", type=float, nargs="+", default=[1.0, 5.0])
    parser.add_argument("--backend", nargs="+", default=["python", "slirp4netns"])
    parser.add_argument("--size", type=parse_size, default=100 << 20)
    parser.add_argument("--parallel", type=int, default=20)
    parser.add_argument("--parallel-size", type=parse_size, default=5 << 20)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--pcap", default=None)
    parser.add_argument("--modes", nargs="+", default=["down", "up"], choices=["down", "up"])
    args = parser.parse_args(argv)
    failed = False
    for percent in args.loss:
        for backend in args.backend:
            result = run_case(backend, percent, args.size, args.parallel, args.parallel_size,
                              args.timeout, args.pcap, args.mtu, args.modes)  # fmt: skip
            print(json.dumps(result), flush=True)
            failed |= any(
                isinstance(v, dict) and not v["ok"] and backend != "slirp4netns"
                for v in result.values()
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
