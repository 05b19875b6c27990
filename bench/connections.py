"""Many concurrent TCP connections from one guest to the host, each passing
data: the forwarder's memory, descriptors and time to open them.

Usage (as root, from the repository, inside .ci/sandbox):
    python3 bench/connections.py [--count 10000]

The guest (a namespace with a real forwarder on tap0) opens COUNT
connections to an echo server on 127.0.0.1 (reached as 10.0.2.2), a few
hundred connects in flight at a time; on each it sends 16 bytes and reads
them back, and keeps it open. With all of them open it echoes once more on
every one, then closes them all. Reported: the time to open (connect and
first echo) them all, the forwarder's resident memory and descriptors before,
with all open, and after the close (waited for, up to CLOSE_WAIT_LIMIT, to
come back to the baseline).
"""

from __future__ import annotations

import argparse
import json
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import harness  # noqa: E402

CLOSE_WAIT_LIMIT = 60.0  # seconds for the descriptors to come back after the close

# Run in the guest: open COUNT connections (IN_FLIGHT connects at a time),
# echo 16 bytes on each, print "open <seconds>", wait for a line on stdin,
# echo again on each, close all, print "closed".
GUEST_CLIENT = r"""
import resource, selectors, socket, sys, time
port, count, in_flight = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
sel = selectors.DefaultSelector()
socks, pending, waiting = [], 0, 0
start = time.monotonic()
deadline = start + 600
def message(i):
    return i.to_bytes(8, "big") * 2
opened = 0
while opened < count or pending or waiting:
    if time.monotonic() > deadline:
        sys.exit(f"timed out: {opened} opened, {pending} connecting, {waiting} echoing")
    while opened < count and pending + waiting < in_flight:
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("10.0.2.2", port))
        sel.register(s, selectors.EVENT_WRITE, opened)
        socks.append(s)
        opened += 1
        pending += 1
    for key, mask in sel.select(timeout=1.0):
        s, i = key.fileobj, key.data
        if mask & selectors.EVENT_WRITE:
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                sys.exit(f"connect {i} failed: errno {err}")
            s.send(message(i))
            sel.modify(s, selectors.EVENT_READ, i)
            pending -= 1
            waiting += 1
        else:
            data = s.recv(64)
            if data != message(i):
                sys.exit(f"connection {i}: echo {data!r}")
            sel.unregister(s)
            waiting -= 1
print("open", round(time.monotonic() - start, 2), flush=True)
sys.stdin.readline()
bad = 0
for i, s in enumerate(socks):
    s.setblocking(True)
    s.settimeout(30)
    s.sendall(message(i))
    got = b""
    while len(got) < 16:
        part = s.recv(16 - len(got))
        if not part:
            break
        got += part
    bad += got != message(i)
for s in socks:
    s.close()
print("closed", bad, flush=True)
"""


class EchoServer:
    """An echo server on 127.0.0.1 in one thread (selectors: thousands of
    connections without a thread each)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.stopping = False
        self.open = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            for key, _mask in self.sel.select(timeout=0.2):
                if key.data is None:
                    try:
                        while True:
                            conn, _ = self.listener.accept()
                            conn.setblocking(False)
                            self.sel.register(conn, selectors.EVENT_READ, True)
                            self.open += 1
                    except BlockingIOError:
                        pass
                    except OSError:
                        return
                    continue
                conn = key.fileobj
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if data:
                    try:
                        conn.send(data)
                    except OSError:
                        pass
                else:
                    self.sel.unregister(conn)
                    conn.close()
                    self.open -= 1

    def close(self) -> None:
        self.stopping = True
        self.thread.join(timeout=5)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def run(count: int = 10_000, in_flight: int = 256, out=print) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the echo server's sockets
    server = EchoServer()
    try:
        with harness.forwarder() as fwd:
            time.sleep(0.5)
            base_fds, base_rss = fwd.fd_count(), rss(fwd.pid)
            out(f"baseline: {base_fds} fds, RSS {base_rss / 2**20:.1f} MiB")
            guest = fwd.popen(
                [sys.executable, "-c", GUEST_CLIENT, str(server.port), str(count), str(in_flight)],
                stdin=subprocess.PIPE,
                text=True,
            )
            line = guest.stdout.readline()
            if not line.startswith("open"):
                guest.kill()
                raise RuntimeError(f"guest: {line} {guest.stderr.read()[-2000:]}")
            open_seconds = float(line.split()[1])
            peak_fds, peak_rss = fwd.fd_count(), rss(fwd.pid)
            out(f"{count} open in {open_seconds} s: {peak_fds} fds, RSS {peak_rss / 2**20:.1f} MiB")
            guest.stdin.write("go\n")
            guest.stdin.flush()
            line = guest.stdout.readline()
            guest.wait(timeout=60)
            echo_failures = int(line.split()[1]) if line.startswith("closed") else -1
            closed_at = time.monotonic()
            fds = fwd.fd_count()
            while fds > base_fds and time.monotonic() - closed_at < CLOSE_WAIT_LIMIT:
                time.sleep(0.5)
                fds = fwd.fd_count()
            back_after = time.monotonic() - closed_at
            after_rss = rss(fwd.pid)
            out(f"closed: {fds} fds after {back_after:.1f} s, RSS {after_rss / 2**20:.1f} MiB")
            return {
                "count": count,
                "open_seconds": open_seconds,
                "baseline_fds": base_fds,
                "peak_fds": peak_fds,
                "fds_after_close": fds,
                "seconds_to_baseline": round(back_after, 1),
                "baseline_rss": base_rss,
                "peak_rss": peak_rss,
                "rss_after_close": after_rss,
                "per_connection_bytes": (peak_rss - base_rss) // count,
                "echo_failures": echo_failures,
            }
    finally:
        server.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--in-flight", type=int, default=256)
    args = parser.parse_args(argv)
    result = run(args.count, args.in_flight)
    print(json.dumps(result))
    return 0 if result["echo_failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
