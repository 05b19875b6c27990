"""Start-up time and memory of a forwarder: exec to the ready fd, and RSS/PSS/USS.

Usage (as root):
    python3 bench/startup.py [--starts 20] [--forwarder PROGRAM...] [--slirp4netns]
        [--connections 1000] [--stages] [--importtime]

Each start is the slirp4netns-style command ``PROGRAM --configure
--ready-fd=N PID tap0`` against a fresh network namespace (a ``sleep`` made
by ``unshare --net``); the time runs from just before the fork and exec to
the byte on the ready fd. PROGRAM is an installed console script (say
``/venv/bin/pyslirp-forwarder``) or ``python3 -m forwarder``. Beside the
median and p90 come the interpreter's floors: ``python -c pass`` and
``python -S -c pass``, timed the same way.

Memory is read from /proc/PID/smaps_rollup: RSS, PSS (shared pages divided
among the processes that map them) and USS (pages of this process alone:
Private_Clean + Private_Dirty), idle and with --connections TCP connections
held open from the namespace to a listener on 127.0.0.1 (reached as
10.0.2.2) through the forwarder.

--stages times the steps of one start (imports of our modules, the fork,
setns, the TAP, the netlink and host sockets) with an audit hook; the hook
is the only difference from a plain start. --importtime prints the slowest
imports of one start (``-X importtime``).

Everything runs in namespaces made here and on loopback; every process and
namespace made here is removed on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import math
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
WAIT_TIMEOUT = 20.0  # seconds for one start to say ready (2 shared CPUs, busy)

# Run inside the namespace: open N connections, say so, hold them until stdin closes.
HOLD_CLIENT = """
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
held = [socket.create_connection(("10.0.2.2", port), timeout=10) for _ in range(n)]
print(len(held), flush=True)
sys.stdin.read()
"""

# Prepended to the forwarder's start by --stages: log audit events with the
# time since the exec (T0 from the environment, CLOCK_MONOTONIC in every process).
STAGES_HOOK = r"""
import os, sys, time
_t0 = float(os.environ.pop("PYSLIRP_STAGES_T0"))
_out = os.open(os.environ.pop("PYSLIRP_STAGES_LOG"), os.O_WRONLY | os.O_APPEND)
def _mark(what):
    ms = (time.monotonic() - _t0) * 1000
    os.write(_out, f"{ms:8.1f} ms  pid {os.getpid()}  {what}\n".encode())
_mark("interpreter up (site done), main script next")
_seen = set()
def _hook(event, args):
    if event == "import":
        top = args[0].split(".")[0]
        if top in ("forwarder", "pyslirp") and args[0] not in _seen:
            _seen.add(args[0])
            _mark(f"import {args[0]}")
    elif event == "os.fork":
        _mark("fork")
    elif event == "ctypes.call_function":
        _mark(f"libc call {args[0]:#x}")
    elif event == "open" and isinstance(args[0], str) and args[0].startswith(("/dev", "/proc")):
        _mark(f"open {args[0]}")
    elif event == "socket.__new__":
        _mark(f"socket family {args[1]} type {args[2]}")
    elif event == "socket.bind":
        _mark(f"bind {args[1]!r}")
sys.addaudithook(_hook)
"""


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile: for 20 values, p90 is the 18th smallest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "p90": percentile(values, 0.9), "n": len(values)}


def smaps(pid: int) -> dict:
    """RSS, PSS and USS of ``pid`` in MB (from /proc/PID/smaps_rollup)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        fields[key] = int(rest.split()[0]) / 1024
    return {
        "RSS": fields["Rss"],
        "PSS": fields["Pss"],
        "USS": fields["Private_Clean"] + fields["Private_Dirty"],
    }


@contextlib.contextmanager
def target_namespace():
    """A process alone in a new network namespace; yields its PID."""
    proc = subprocess.Popen(["unshare", "--net", "--", "sleep", "600"], start_new_session=True)
    try:
        # unshare execs sleep in the same process: wait until it has.
        deadline = time.monotonic() + WAIT_TIMEOUT
        own = os.stat("/proc/self/ns/net").st_ino
        while os.stat(f"/proc/{proc.pid}/ns/net").st_ino == own:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("unshare --net did not start")
            time.sleep(0.005)
        yield proc.pid
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL to the whole group after 5 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@contextlib.contextmanager
def started(program: list[str], target_pid: int, env=None, stderr=subprocess.DEVNULL):
    """Start ``program --configure --ready-fd=N PID tap0``; yield (process,
    ms from just before exec to the ready byte)."""
    ready_r, ready_w = os.pipe()
    cmd = [*program, "--configure", f"--ready-fd={ready_w}", str(target_pid), "tap0"]
    if env is not None:
        env = {**env, "PYSLIRP_STAGES_T0": repr(time.monotonic())}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,  # python -m forwarder: this checkout's
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,
        pass_fds=(ready_w,),
        env=env,
    )
    try:
        os.close(ready_w)
        ready_w = -1
        if not wait_readable(ready_r, WAIT_TIMEOUT) or os.read(ready_r, 1) != b"1":
            raise RuntimeError(f"{' '.join(cmd)}: no ready byte (exit {proc.poll()})")
        yield proc, (time.monotonic() - t0) * 1000
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)
        stop(proc)


def wait_readable(fd: int, timeout: float) -> bool:
    import select

    return bool(select.select([fd], [], [], timeout)[0])


def start_times(program: list[str], starts: int, cpu: list[float] | None = None) -> list[float]:
    """Milliseconds from exec to the ready fd, ``starts`` times, each on a
    fresh namespace; with ``cpu``, the process's milliseconds on a CPU up
    to then are appended to it (see cpu_ms)."""
    times = []
    for _ in range(starts):
        with target_namespace() as pid, started(program, pid) as (proc, ms):
            if cpu is not None:
                cpu.append(cpu_ms(proc.pid))
            times.append(ms)
    return times


def cpu_ms(pid: int) -> float:
    """Milliseconds that ``pid`` has run on a CPU (/proc/PID/schedstat, in
    ns): unlike the wall-clock time, it does not grow when other work
    shares the CPUs. Read just after the ready byte, it is the start-up's
    cost less the namespace child's (a short fork, not counted here)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e6


def floor_times(python: str, flags: list[str], starts: int) -> list[float]:
    """Milliseconds to run ``python FLAGS -c pass``: the interpreter's own start."""
    times = []
    for _ in range(starts):
        t0 = time.monotonic()
        subprocess.run([python, *flags, "-c", "pass"], check=True)
        times.append((time.monotonic() - t0) * 1000)
    return times


def interpreter_of(program: list[str]) -> str:
    """The interpreter that runs ``program`` (its #! line, for a script)."""
    first = program[0]
    if Path(first).name.startswith(("python", "pypy")):
        return first
    path = shutil.which(first) or first
    with open(path, "rb") as f:
        line = f.readline().decode(errors="replace")
    if line.startswith("#!"):
        return line[2:].split()[0]
    return sys.executable


class HoldServer:
    """Accepts and keeps every connection on 127.0.0.1 until released."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.held.append(conn)

    def release(self) -> None:
        with self._lock:
            held, self.held = self.held, []
        for conn in held:
            conn.close()

    def close(self) -> None:
        self.sock.close()
        self.release()


def memory_with_connections(enter: list[str], forwarder_pid: int, port: int, count: int) -> dict:
    """smaps() of the forwarder while ``count`` connections from its guest's
    namespace (``enter`` runs a command there: ``nsenter -t PID -n --`` or
    ``ip netns exec NAME``) to 127.0.0.1:``port`` are open through it."""
    client = subprocess.Popen(
        [*enter, sys.executable, "-S", "-c", HOLD_CLIENT, str(port), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if not wait_readable(client.stdout.fileno(), 60):
            raise RuntimeError(f"{count} connections not open within 60 s")
        line = client.stdout.readline()
        if line.strip() != str(count):
            raise RuntimeError(f"could not open {count} connections")
        time.sleep(0.5)
        return smaps(forwarder_pid)
    finally:
        client.stdin.close()
        try:
            client.wait(timeout=20)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait(timeout=5)


def memory(program: list[str], connections: int, hold: HoldServer | None) -> dict:
    """Idle smaps() a second after ready, and with ``connections`` open."""
    result = {}
    with target_namespace() as pid, started(program, pid) as (proc, _ms):
        time.sleep(1.0)
        result["idle"] = smaps(proc.pid)
        if connections and hold is not None:
            subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "link", "set", "lo", "up"])
            try:
                enter = ["nsenter", "-t", str(pid), "-n", "--"]
                result["connections"] = memory_with_connections(
                    enter, proc.pid, hold.port, connections
                )
            finally:
                hold.release()
    return result


def stages(program: list[str]) -> str:
    """The audit-hook timeline of one start (see STAGES_HOOK)."""
    python = interpreter_of(program)
    if Path(program[0]).name.startswith(("python", "pypy")):
        script_args = program[1:]
    else:
        script_args = [shutil.which(program[0]) or program[0], *program[1:]]
    if script_args[:1] == ["-m"]:
        module = script_args[1]
        run = f"import runpy; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
        rest = script_args[2:]
    else:
        run = f"import runpy; runpy.run_path({script_args[0]!r}, run_name='__main__')"
        rest = script_args[1:]
    log_path = f"/tmp/pyslirp-stages-{os.getpid()}.log"
    Path(log_path).write_text("")
    env = {**os.environ, "PYSLIRP_STAGES_LOG": log_path}
    try:
        with (
            target_namespace() as pid,
            started([python, "-c", STAGES_HOOK + run, *rest], pid, env=env) as (_proc, ms),
        ):
            pass
        lines = Path(log_path).read_text().splitlines()
    finally:
        os.unlink(log_path)
    lines.sort(key=lambda line: float(line.split()[0]))
    return "\n".join([*lines, f"{ms:8.1f} ms  ready byte read by the parent"])


def report_program(label: str, program: list[str], args, hold) -> list[str]:
    python = interpreter_of(program)
    cpu: list[float] = []
    times = start_times(program, args.starts, cpu)
    s = summary(times)
    c = summary(cpu)
    floor = summary(floor_times(python, [], args.starts))
    floor_s = summary(floor_times(python, ["-S"], args.starts))
    lines = [
        f"{label}: {' '.join(program)}",
        f"  exec -> ready fd: median {s['median']:.1f} ms, p90 {s['p90']:.1f} ms ({s['n']} starts);"
        f" on a CPU: median {c['median']:.1f} ms, p90 {c['p90']:.1f} ms",
        f"  floor {python} -c pass: median {floor['median']:.1f} ms, p90 {floor['p90']:.1f} ms;"
        f" -S -c pass: median {floor_s['median']:.1f} ms, p90 {floor_s['p90']:.1f} ms",
    ]
    mem = memory(program, args.connections, hold)
    for key, name in (("idle", "idle"), ("connections", f"{args.connections} connections")):
        if key in mem:
            m = mem[key]
            lines.append(
                f"  memory {name}: RSS {m['RSS']:.1f} MB, PSS {m['PSS']:.1f} MB,"
                f" USS {m['USS']:.1f} MB"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument(
        "--forwarder",
        type=str.split,  # one argument: "/venv/bin/python3 -m forwarder"
        default=None,
        help="the forwarder's command (default: this python -m forwarder, from the repository)",
    )
    parser.add_argument("--slirp4netns", action="store_true", help="measure slirp4netns too")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--stages", action="store_true")
    parser.add_argument("--importtime", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    program = args.forwarder or [sys.executable, "-m", "forwarder"]
    if args.stages:
        print(stages(program))
        return 0
    if args.importtime:
        print(import_profile(program))
        return 0
    hold = HoldServer()
    try:
        for line in report_program("pyslirp", program, args, hold):
            print(line, flush=True)
        if args.slirp4netns and shutil.which("slirp4netns"):
            times = summary(start_times(["slirp4netns"], args.starts))
            print(
                f"slirp4netns: exec -> ready fd: median {times['median']:.1f} ms,"
                f" p90 {times['p90']:.1f} ms",
                flush=True,
            )
            mem = memory(["slirp4netns"], args.connections, hold)
            for key, m in mem.items():
                print(
                    f"  memory {key}: RSS {m['RSS']:.1f} MB, PSS {m['PSS']:.1f} MB,"
                    f" USS {m['USS']:.1f} MB",
                    flush=True,
                )
    finally:
        hold.close()
    return 0


def import_profile(program: list[str], top: int = 40) -> str:
    """The ``top`` imports by cumulative time in one start (``-X importtime``)."""
    err_path = f"/tmp/pyslirp-importtime-{os.getpid()}.log"
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    try:
        with (
            open(err_path, "w") as err,
            target_namespace() as pid,
            started(program, pid, env=env, stderr=err) as (_proc, ms),
        ):
            pass
        rows = []
        for line in Path(err_path).read_text().splitlines():
            if not line.startswith("import time:") or "cumulative" in line:
                continue
            self_us, cumulative_us, name = line[len("import time:") :].split("|", 2)
            rows.append((int(cumulative_us), int(self_us), name.strip()))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(err_path)
    total_self = sum(r[1] for r in rows) / 1000
    rows.sort(reverse=True)
    lines = [f"one start: {ms:.1f} ms to ready; imports {total_self:.1f} ms (sum of self times)"]
    lines += [
        f"{c / 1000:8.1f} ms cumulative {s / 1000:7.1f} ms self  {n}" for c, s, n in rows[:top]
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
