"""Throughput, request/response and connection rates: pyslirp against slirp4netns.

Usage (as root, from the repository):  python3 bench/run.py [--time 3] [--mtu 1500 65520]
    [--backend python slirp4netns] [--runs 1]

For each backend and MTU: a fresh network namespace (``ip netns add``), the
forwarder attached to it with ``--configure --netns-type=path NS tap0``, then
from inside the namespace toward host servers on 127.0.0.1 reached as
10.0.2.2 (host loopback is allowed for both backends):

- iperf3 guest -> host and host -> guest (``-R``), Gbit/s;
- 1-byte request/response over one connection (TCP_NODELAY), transactions/s;
- connect/close rate (the client connects and closes, 4 at a time, to 16
  ports in turn), connections/s;
- CPU seconds of the forwarder process per GB moved in the iperf3 runs.

All traffic stays on loopback and in namespaces this script creates. Every
run is bounded in time, and every process and namespace is removed at exit.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Backends that are our python backend run by another interpreter: "pypy"
# by PyPy, "python-distro" by the distribution's CPython (Debian's python3,
# built with PGO and LTO; a pyenv build, as this machine's python3 is, has
# neither unless asked).
PYPY = os.environ.get("PYSLIRP_PYPY", "pypy3")
DISTRO_PYTHON = os.environ.get("PYSLIRP_DISTRO_PYTHON", "/usr/bin/python3")
INTERPRETERS = {"pypy": PYPY, "python-distro": DISTRO_PYTHON}
# "python-floor": our front end with bench/floor.py's minimal relay in place
# of the stack, NAT and loop (tests rr and cc only): the floor under ours.
FLOOR = "python-floor"
FLOOR_TESTS = ("rr", "cc")

# Run inside the namespace: 1-byte request/response for DURATION seconds.
RR_CLIENT = """
import socket, sys, time
s = socket.create_connection(("10.0.2.2", int(sys.argv[1])), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
end = time.monotonic() + float(sys.argv[2])
n = 0
while True:
    s.send(b"x")
    if s.recv(1) != b"x":
        raise SystemExit("short read")
    n += 1
    if n % 64 == 0 and time.monotonic() >= end:
        break
print(n / (time.monotonic() - end + float(sys.argv[2])), n)
"""

# Run inside the namespace: connect and close, WORKERS at a time, to the
# ports of PORTS (comma-separated) in turn. Several ports, because the guest
# closes first and keeps each connection's port in TIME-WAIT for 60 s: toward
# one port, Linux's connect() finds a free source port ever more slowly as the
# even half of the range (about 14,000 ports) fills, and after 3 s at 5,000
# connections/s it is full. The test then measured the guest kernel's port
# search (every stack at 0.96-1.06x of slirp4netns, the client the busiest
# process) instead of the stacks. TIME-WAIT is per address pair, so each port
# has its own range.
CC_CLIENT = """
import socket, sys, time, threading
ports, duration, workers = sys.argv[1].split(","), float(sys.argv[2]), int(sys.argv[3])
ports = [int(p) for p in ports]
counts = [0] * workers
errors = [0] * workers
start = time.monotonic()
end = start + duration
def work(i):
    n = i
    while time.monotonic() < end:
        try:
            s = socket.create_connection(("10.0.2.2", ports[n % len(ports)]), timeout=5)
            s.close()
            counts[i] += 1
        except OSError:
            errors[i] += 1
        n += workers
threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
for t in threads: t.start()
for t in threads: t.join()
print(sum(counts) / (time.monotonic() - start), sum(errors), sum(counts))
"""
CC_PORTS = 16  # 16 x 14,000 source ports: far more than a run of 3-10 s uses


class EchoServer:
    """1-byte echo on 127.0.0.1 (one thread per connection)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.sock.getsockname()[1]
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def close(self) -> None:
        self.stop = True
        self.sock.close()


class AcceptCloseServer:
    """Accepts and closes on ``count`` ports of 127.0.0.1 (a thread each);
    ``port`` is their list, comma-separated, as CC_CLIENT takes it."""

    def __init__(self, count: int = CC_PORTS) -> None:
        self.socks = [socket.create_server(("127.0.0.1", 0), backlog=1024) for _ in range(count)]
        self.port = ",".join(str(sock.getsockname()[1]) for sock in self.socks)
        for sock in self.socks:
            threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    @staticmethod
    def _accept(sock) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.close()

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    if os.environ.get("BENCH_CPU_SPLIT"):  # user and system time apart, on stderr
        user, system = int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
        print(f"  utime {user} stime {system}", file=sys.stderr)
        for task in Path(f"/proc/{pid}/task").iterdir():  # and each thread's
            with contextlib.suppress(OSError):
                stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
                name = (task / "comm").read_text().strip()
                user, system = int(stat[11]) / CLK_TCK, int(stat[12]) / CLK_TCK
                print(f"    {name}: utime {user} stime {system}", file=sys.stderr)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@contextlib.contextmanager
def namespace(name: str):
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        pids = subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], check=False)


def wait_configured(ns_name: str, proc, backend: str, interval: float = 0.05) -> None:
    """Wait (10 s at most) until the forwarder has given tap0 its address and route."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["ip", "-n", ns_name, "-4", "addr", "show", "tap0"], capture_output=True, text=True
        ).stdout
        routes = subprocess.run(
            ["ip", "-n", ns_name, "route"], capture_output=True, text=True
        ).stdout
        if "10.0.2.100" in out and "default" in routes:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{backend} exited with {proc.returncode}")
        time.sleep(interval)
    raise RuntimeError(f"{backend} did not configure tap0 within 10 s")


RECORD_SUFFIX = "+record"
TRACE_SUFFIX = "+trace"


def recording(backend: str) -> bool:
    """"python+record" (or "python@DIR+record", ...) is that backend run with
    ``--record`` into a file of its own, so that a recording's cost is
    measured beside the same backend without it in one run."""
    return backend.endswith(RECORD_SUFFIX)


def tracing(backend: str) -> bool:
    """"python+trace": the same with ``--trace`` into a file of its own."""
    return backend.endswith(TRACE_SUFFIX)


def base_backend(backend: str) -> str:
    for suffix in (RECORD_SUFFIX, TRACE_SUFFIX):
        if backend.endswith(suffix):
            return backend[: -len(suffix)]
    return backend


def checkout(backend: str) -> Path:
    """Where the backend's forwarder runs from: "python@DIR" is the python
    backend of another checkout (a worktree of an older commit, say), so
    that a change and its parent are measured side by side in one run."""
    backend = base_backend(backend)
    if backend.startswith("python@"):
        return Path(backend.split("@", 1)[1])
    return REPO


def our_command(backend: str, mtu: int, ns_path: str, extra=(), wrap=()) -> list[str]:
    """Our forwarder on ``ns_path``'s tap0, run by this interpreter unless
    the backend names another (INTERPRETERS)."""
    if base_backend(backend) == FLOOR:
        program = [str(REPO / "bench" / "floor.py")]
    else:
        program = ["-m", "forwarder"]
    return [
        INTERPRETERS.get(base_backend(backend), sys.executable),
        *wrap,
        *program,
        "--configure",
        f"--mtu={mtu}",
        *extra,
        "--netns-type=path",
        ns_path,
        "tap0",
    ]


def stop(proc) -> None:
    """SIGTERM, then SIGKILL to the whole group after 5 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@contextlib.contextmanager
def forwarder(
    backend: str, mtu: int, ns_name: str, ns_path: str, extra: list[str], profile: str | None
):
    if backend == "slirp4netns":
        cmd = ["slirp4netns", "--configure", f"--mtu={mtu}", "--netns-type=path", ns_path, "tap0"]
    else:
        wrap = ["-m", "cProfile", "-o", profile] if profile else []
        cmd = our_command(backend, mtu, ns_path, extra, wrap)
    proc = subprocess.Popen(
        cmd,
        cwd=checkout(backend),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_configured(ns_name, proc, backend)
        yield proc
    finally:
        stop(proc)


def in_ns(ns_name: str, cmd: list[str], timeout: float) -> str:
    result = subprocess.run(
        ["ip", "netns", "exec", ns_name, *cmd], capture_output=True, text=True, timeout=timeout
    )
    if result.returncode:
        raise RuntimeError(f"{cmd[0]} failed: {result.stderr.strip() or result.stdout[-500:]}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iperf(ns_name: str, port: int, pid: int, duration: float, reverse: bool):
    """(Gbit/s, forwarder CPU seconds per GB, GB moved)."""
    cmd = ["iperf3", "-c", "10.0.2.2", "-p", str(port), "-t", str(duration), "-J"]
    if reverse:
        cmd.append("-R")
    cpu0 = cpu_seconds(pid)
    out = in_ns(ns_name, cmd, timeout=duration + 30)
    cpu = cpu_seconds(pid) - cpu0
    report = json.loads(out)
    end = report["end"]["sum_received"]
    gigabytes = end["bytes"] / 1e9
    cost = cpu / gigabytes if gigabytes else float("nan")
    return end["bits_per_second"] / 1e9, cost, gigabytes


def request_response(ns_name: str, port: int, pid: int, duration: float):
    """(transactions/s, forwarder CPU microseconds per transaction)."""
    cpu0 = cpu_seconds(pid)
    out = in_ns(
        ns_name,
        [sys.executable, "-c", RR_CLIENT, str(port), str(duration)],
        timeout=duration + 30,
    )
    cpu = cpu_seconds(pid) - cpu0
    rate, count = out.split()
    return float(rate), cpu / int(count) * 1e6


def connect_close(ns_name: str, port: str, pid: int, duration: float):
    """(connections/s, forwarder CPU microseconds per connection); ``port``
    is AcceptCloseServer's list of ports."""
    cpu0 = cpu_seconds(pid)
    out = in_ns(
        ns_name,
        [sys.executable, "-c", CC_CLIENT, str(port), str(duration), "4"],
        timeout=duration + 60,
    )
    cpu = cpu_seconds(pid) - cpu0
    rate, errors, count = out.split()
    if int(errors):
        print(f"  ({errors} connect errors)", file=sys.stderr)
    return float(rate), cpu / max(int(count), 1) * 1e6


METRICS = [
    ("guest->host", "Gbit/s"),
    ("host->guest", "Gbit/s"),
    ("guest->host CPU", "s/GB"),
    ("host->guest CPU", "s/GB"),
    ("1-byte request/response", "tx/s"),
    ("request/response CPU", "us/tx"),
    ("connect/close", "conn/s"),
    ("connect/close CPU", "us/conn"),
    ("recording size", "MB per GB moved"),
    ("trace size", "MB per GB moved"),
]


TESTS = ("up", "down", "rr", "cc")


def measure(backend, mtu, duration, extra, tests, profile, ports, record_dir="/tmp") -> dict:
    tag = "other" if backend.startswith("python@") else base_backend(backend)
    tag += "-rec" if recording(backend) else ""  # a namespace name has no "/" or "+"
    tag += "-trace" if tracing(backend) else ""
    name = f"pyslirp-bench-{os.getpid()}-{tag}-{mtu}"
    if profile and base_backend(backend) == "python":
        profile = f"{profile}.{backend}.{mtu}"
    else:
        profile = None
    results = {}
    record_path = os.path.join(record_dir, f"{name}.rec")
    trace_path = os.path.join(record_dir, f"{name}.jsonl")
    if recording(backend):
        extra = [*extra, f"--record={record_path}"]
    if tracing(backend):
        extra = [*extra, f"--trace={trace_path}"]
    if base_backend(backend) == FLOOR:
        tests = [test for test in tests if test in FLOOR_TESTS]
    moved = 0.0
    try:
        with namespace(name) as ns_path, forwarder(
            backend, mtu, name, ns_path, extra, profile
        ) as p:
            in_ns(name, ["ip", "link", "set", "lo", "up"], timeout=10)
            moved = _run_tests(name, p.pid, duration, tests, ports, results)
        if recording(backend) and moved:
            results["recording size"] = os.path.getsize(record_path) / 1e6 / moved
        if tracing(backend) and moved:
            results["trace size"] = os.path.getsize(trace_path) / 1e6 / moved
    finally:
        for path in (record_path, trace_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return results


def _run_tests(name, pid, duration, tests, ports, results) -> float:
    """The tests against the forwarder ``pid``; the GB the iperf3 runs moved."""
    moved = 0.0
    if "up" in tests:
        rate, cpu, gigabytes = iperf(name, ports["iperf"], pid, duration, reverse=False)
        results["guest->host"], results["guest->host CPU"] = rate, cpu
        moved += gigabytes
    if "down" in tests:
        rate, cpu, gigabytes = iperf(name, ports["iperf"], pid, duration, reverse=True)
        results["host->guest"], results["host->guest CPU"] = rate, cpu
        moved += gigabytes
    if "rr" in tests:
        rate, cpu = request_response(name, ports["echo"], pid, duration)
        results["1-byte request/response"], results["request/response CPU"] = rate, cpu
    if "cc" in tests:
        rate, cpu = connect_close(name, ports["close"], pid, duration)
        results["connect/close"], results["connect/close CPU"] = rate, cpu
    return moved


def table(results: dict, backends: list[str], mtus: list[int]) -> str:
    """Medians over the rounds; the ratio column is the median of the rounds'
    ratios, with their range when there was more than one round."""
    head = ["metric", "MTU", *backends]
    both = "python" in backends and "slirp4netns" in backends
    if both:
        head.append("python/slirp4netns")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mtu in mtus:
        for metric, unit in METRICS:
            row = [f"{metric} ({unit})", str(mtu)]
            values = {b: results.get((b, mtu), {}).get(metric) or [] for b in backends}
            if not any(values.values()):
                continue
            for b in backends:
                v = statistics.median(values[b]) if values[b] else None
                row.append("-" if v is None else (f"{v:.2f}" if v < 100 else f"{v:.0f}"))
            if both:
                ratios = [
                    p / s
                    for p, s in zip(values["python"], values["slirp4netns"], strict=False)
                    if s
                ]
                if not ratios:
                    row.append("-")
                elif len(ratios) == 1:
                    row.append(f"{ratios[0]:.2f}x")
                else:
                    row.append(
                        f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
                    )
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--mtu", type=int, nargs="+", default=[1500, 65520])
    parser.add_argument("--backend",
        nargs="+",
        default=["python", "slirp4netns"],
        help="python, pypy, python-distro, slirp4netns, "
        "python-floor (bench/floor.py's minimal relay: rr and cc only), "
        "or python@DIR: the python backend of the checkout at DIR; "
        "any of ours with +record (python+record, python@DIR+record) "
        "runs with --record into a file in --record-dir, removed after each run; "
        "with +trace, with --trace likewise",
    )
    parser.add_argument(
        "--forwarder-arg", action="append", default=[], help="extra option for our forwarder"
    )
    parser.add_argument("--tests", nargs="+", default=list(TESTS), choices=TESTS)
    parser.add_argument(
        "--record-dir", default="/tmp", help="where +record backends write (default /tmp)"
    )
    parser.add_argument("--profile", help="cProfile our forwarder into PROFILE.python.MTU")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every backend this many times, alternating (the table shows medians)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    for tool in ("iperf3", "ip") + (("slirp4netns",) if "slirp4netns" in args.backend else ()):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    iperf_port = free_port()
    iperf_server = subprocess.Popen(
        ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    echo = EchoServer()
    closer = AcceptCloseServer()
    ports = {"iperf": iperf_port, "echo": echo.port, "close": closer.port}
    results = {}
    try:
        time.sleep(0.3)
        for round_ in range(1, max(args.rounds, 1) + 1):
            for mtu in args.mtu:
                for backend in args.backend:
                    print(f"{backend}, MTU {mtu}, round {round_} ...", file=sys.stderr)
                    measured = measure(
                        backend,
                        mtu,
                        args.time,
                        args.forwarder_arg,
                        args.tests,
                        args.profile,
                        ports,
                        args.record_dir,
                    )
                    for metric, value in measured.items():
                        results.setdefault((backend, mtu), {}).setdefault(metric, []).append(value)
    finally:
        iperf_server.terminate()
        iperf_server.wait(timeout=5)
        echo.close()
        closer.close()
    print(table(results, args.backend, args.mtu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
