"""Side-by-side speed of every backend: a Markdown table with ratios and an SVG chart.

Usage (as root, from the repository):
    python3 bench/speed.py [--time 3] [--mtu 1500 65520] [--runs 2] [--out bench/results]
        [--backend python python-no-offload python-distro pypy libslirp slirp4netns pasta]
        [--forwarder /venv/bin/pyslirp-forwarder]

The rates come from bench/run.py's measurements (iperf3 both ways, 1-byte
request/response, connect/close, CPU seconds of the forwarder); beside them,
for our forwarder and slirp4netns (bench/startup.py): the median and p90 of
20 starts, ``--configure --ready-fd=N PID tap0`` from exec to the ready fd,
with each interpreter's floors (``-c pass``, ``-S -c pass``) in the
header; and RSS, PSS and USS idle and with 1,000 open connections. With
``--forwarder``, the python column runs that program (its start-ups, its
memory and its rates): an installed console script, as a pip user runs it.
``pasta`` runs Debian's passt build (as root it needs ``--runas 0``); a
backend whose program is missing is left out with a note.

All traffic stays on loopback and in namespaces this script creates.
"""

import argparse
import contextlib
import html
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (bench/run.py: the measurements)
import startup  # noqa: E402  (bench/startup.py: start-up times, RSS/PSS/USS)

REPO = run.REPO
SLIRP_BACKENDS = {
    "python": [],
    "python-no-offload": ["--no-offload"],
    "libslirp": ["--backend=libslirp"],
    "python-distro": [],  # the python backend, run by the distribution's CPython
    "pypy": [],  # the python backend, run by PyPy (run.INTERPRETERS has both)
}
ALL = ["python", "python-no-offload", "python-distro", "pypy", "libslirp", "slirp4netns", "pasta"]
RATE_METRICS = [
    ("guest->host", "Gbit/s"),
    ("host->guest", "Gbit/s"),
    ("1-byte request/response", "tx/s"),
    ("connect/close", "conn/s"),
]
COST_METRICS = [
    ("guest->host CPU", "s/GB"),
    ("host->guest CPU", "s/GB"),
    ("request/response CPU", "us/tx"),
    ("connect/close CPU", "us/conn"),
]
STARTUP_STARTS = 20  # starts per backend for the start-up percentiles
STARTUP_METRICS = [
    ("start-up to ready fd, median of 20", "ms"),
    ("start-up to ready fd, p90 of 20", "ms"),
    ("start-up on a CPU, median of 20", "ms"),
    ("memory idle, RSS", "MB"),
    ("memory idle, PSS", "MB"),
    ("memory idle, USS", "MB"),
    ("memory, 1000 connections, RSS", "MB"),
    ("memory, 1000 connections, PSS", "MB"),
    ("memory, 1000 connections, USS", "MB"),
]


def command(
    backend: str, mtu: int, ns_path: str, ready_fd: int | None, forwarder: list[str] | None = None
) -> list[str]:
    """The command line of ``backend``; ``forwarder`` (--forwarder) runs the
    python backend, as an installed console script would."""
    ready = [f"--ready-fd={ready_fd}"] if ready_fd is not None else []
    if forwarder and backend == "python":
        return [*forwarder, "--configure", f"--mtu={mtu}", *ready, "--netns-type=path"] + [
            ns_path,
            "tap0",
        ]
    if backend == "slirp4netns":
        return [
            "slirp4netns",
            "--configure",
            f"--mtu={mtu}",
            *ready,
            "--netns-type=path",
            ns_path,
            "tap0",
        ]
    if backend == "pasta":
        return [
            "pasta",
            "-f",
            "-q",
            "--runas",
            "0",
            "--config-net",
            "-I",
            "tap0",  # the name run.wait_configured looks for (else the host's)
            "-4",
            "-a",
            "10.0.2.100",
            "-n",
            "24",
            "-g",
            "10.0.2.2",
            "-m",
            str(mtu),
            *("-t", "none", "-u", "none", "-T", "none", "-U", "none"),
            "--netns",
            ns_path,
        ]
    return run.our_command(backend, mtu, ns_path, [*ready, *SLIRP_BACKENDS[backend]])


def startup_program(backend: str, mtu: int, forwarder: list[str] | None) -> list[str] | None:
    """The command that bench/startup.py completes with ``--configure
    --ready-fd=N PID tap0``; None for pasta (no ready fd). ``forwarder``
    (--forwarder) stands for ``python -m forwarder`` in the python backend."""
    if backend == "pasta":
        return None
    if backend == "slirp4netns":
        return ["slirp4netns", f"--mtu={mtu}"]
    extra = [f"--mtu={mtu}", *SLIRP_BACKENDS[backend]]
    if forwarder and backend == "python":
        return [*forwarder, *extra]
    return [run.INTERPRETERS.get(backend, sys.executable), "-m", "forwarder", *extra]


def startup_times(backend: str, mtu: int, forwarder: list[str] | None) -> dict:
    """Median and p90 of STARTUP_STARTS starts, exec to the ready fd (and on a CPU)."""
    program = startup_program(backend, mtu, forwarder)
    if program is None:
        return {}
    cpu: list[float] = []
    wall = startup.summary(startup.start_times(program, STARTUP_STARTS, cpu))
    return {
        "start-up to ready fd, median of 20": wall["median"],
        "start-up to ready fd, p90 of 20": wall["p90"],
        "start-up on a CPU, median of 20": startup.summary(cpu)["median"],
    }


def memory_fields(prefix: str, measured: dict) -> dict:
    """RSS, PSS and USS (bench/startup.py's smaps) as table rows."""
    return {f"{prefix}, {kind}": mb for kind, mb in measured.items()}


@contextlib.contextmanager
def started(backend: str, mtu: int, ns_name: str, ns_path: str, forwarder=None):
    """Start ``backend`` on the namespace; yield (process, ms to ready or None)."""
    ready_r = ready_w = None
    if backend != "pasta":
        ready_r, ready_w = os.pipe()
    cmd = command(backend, mtu, ns_path, ready_w, forwarder)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        pass_fds=(ready_w,) if ready_w is not None else (),
    )
    startup_ms = None
    try:
        if ready_w is not None:
            os.close(ready_w)
            ready_w = None
            os.set_blocking(ready_r, True)
            if os.read(ready_r, 1):
                startup_ms = (time.monotonic() - t0) * 1000
        run.wait_configured(ns_name, proc, backend, interval=0.02)
        yield proc, startup_ms
    finally:
        for fd in (ready_r, ready_w):
            if fd is not None:
                os.close(fd)
        run.stop(proc)


def measure(backend, mtu, duration, tests, ports, hold, forwarder=None) -> dict:
    name = f"pyslirp-speed-{os.getpid()}-{backend}-{mtu}"
    results = {}
    if "startup" in tests:
        results.update(startup_times(backend, mtu, forwarder))
    with run.namespace(name) as ns_path, started(backend, mtu, name, ns_path, forwarder) as (
        proc,
        _ms,
    ):
        time.sleep(1.0)
        if backend != "pasta":
            results.update(memory_fields("memory idle", startup.smaps(proc.pid)))
        run.in_ns(name, ["ip", "link", "set", "lo", "up"], timeout=10)
        pid = proc.pid
        if "up" in tests:
            rate, cpu, _moved = run.iperf(name, ports["iperf"], pid, duration, reverse=False)
            results["guest->host"], results["guest->host CPU"] = rate, cpu
        if "down" in tests:
            rate, cpu, _moved = run.iperf(name, ports["iperf"], pid, duration, reverse=True)
            results["host->guest"], results["host->guest CPU"] = rate, cpu
        if "rr" in tests:
            rate, cpu = run.request_response(name, ports["echo"], pid, duration)
            results["1-byte request/response"], results["request/response CPU"] = rate, cpu
        if "cc" in tests:
            rate, cpu = run.connect_close(name, ports["close"], pid, duration)
            results["connect/close"], results["connect/close CPU"] = rate, cpu
        if "mem" in tests and backend != "pasta":
            try:
                enter = ["ip", "netns", "exec", name]
                held = startup.memory_with_connections(enter, pid, hold.port, 1000)
                results.update(memory_fields("memory, 1000 connections", held))
            finally:
                hold.release()
    return results


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def table(results: dict, backends: list[str], mtus: list[int]) -> str:
    """One row per metric and MTU; each cell a value and its ratio to slirp4netns."""
    head = ["metric", "MTU", *backends]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric, unit in RATE_METRICS + COST_METRICS + STARTUP_METRICS:
        for mtu in mtus:
            values = {b: results.get((b, mtu), {}).get(metric) for b in backends}
            if all(v is None for v in values.values()):
                continue
            ref = values.get("slirp4netns")
            row = [f"{metric} ({unit})", str(mtu)]
            for b in backends:
                v = values[b]
                cell = fmt(v)
                if v is not None and ref and b != "slirp4netns":
                    cell += f" ({v / ref:.2f}x)"
                row.append(cell)
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"]
SHORT = ["guest→host", "host→guest", "req/resp", "conn/s"]


def chart(results: dict, backends: list[str], mtus: list[int], path: Path, title: str) -> None:
    """An SVG of each rate as a multiple of slirp4netns's (log scale, the
    dashed line is 1x), one panel per MTU: written by hand, no plotting
    library needed."""
    others = [b for b in backends if b != "slirp4netns"]
    panel_w, panel_h, top, left, gap = 470, 300, 50, 50, 30
    low, high = 0.1, 100.0  # the log scale's ends (x slirp4netns)

    def y_of(ratio: float) -> float:
        ratio = min(max(ratio, low), high)
        return top + panel_h * (1 - (math.log10(ratio) - math.log10(low)) / 3)

    width = left + len(mtus) * (panel_w + gap) + 130
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + panel_h + 60}" '
        'font-family="sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="12">'
        f"{html.escape(title)}</text>",
    ]
    for p, mtu in enumerate(mtus):
        x0 = left + p * (panel_w + gap)
        out.append(
            f'<text x="{x0 + panel_w / 2}" y="{top - 10}" text-anchor="middle">MTU {mtu}</text>'
        )
        out.append(
            f'<rect x="{x0}" y="{top}" width="{panel_w}" height="{panel_h}" '
            'fill="none" stroke="#888"/>'
        )
        for tick in (0.1, 0.3, 1, 3, 10, 30, 100):
            y = y_of(tick)
            out.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">{tick:g}x</text>')
            style = 'stroke="black" stroke-dasharray="5,3"' if tick == 1 else 'stroke="#eee"'
            out.append(f'<line x1="{x0}" x2="{x0 + panel_w}" y1="{y:.1f}" y2="{y:.1f}" {style}/>')
        ref = results.get(("slirp4netns", mtu), {})
        group = panel_w / len(RATE_METRICS)
        bar = group * 0.8 / max(len(others), 1)
        for j, (metric, _unit) in enumerate(RATE_METRICS):
            gx = x0 + j * group + group * 0.1
            label_y = top + panel_h + 14
            out.append(
                f'<text x="{gx + group * 0.4:.1f}" y="{label_y}" '
                f'text-anchor="middle">{SHORT[j]}</text>'
            )
            for i, b in enumerate(others):
                v, r = results.get((b, mtu), {}).get(metric), ref.get(metric)
                if not v or not r:
                    continue
                ratio = v / r
                x, y = gx + i * bar, y_of(ratio)
                base = y_of(1.0)
                y1, y2 = min(y, base), max(y, base)
                colour = COLOURS[i % len(COLOURS)]
                out.append(
                    f'<rect x="{x:.1f}" y="{y1:.1f}" width="{bar * 0.9:.1f}" '
                    f'height="{max(y2 - y1, 0.5):.1f}" fill="{colour}"/>'
                )
                ty = y1 - 2 if ratio >= 1 else y2 + 9
                out.append(
                    f'<text x="{x + bar * 0.45:.1f}" y="{ty:.1f}" text-anchor="middle" '
                    f'font-size="7">{ratio:.1f}</text>'
                )
    lx = left + len(mtus) * (panel_w + gap)
    for i, b in enumerate(others):
        y = top + 10 + i * 16
        colour = COLOURS[i % len(COLOURS)]
        out.append(f'<rect x="{lx}" y="{y - 9}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{lx + 14}" y="{y}">{html.escape(b)}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()} ({sys.executable})"
    )


def interpreter(backend: str) -> str:
    """Which interpreter and version runs a backend that names its own."""
    program = run.INTERPRETERS[backend]
    ask = "import platform as p; print(p.python_implementation(), p.python_version())"
    out = subprocess.run(
        [program, "-c", ask],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{backend}: {out or 'unknown'} ({shutil.which(program) or program})"


def floors(backends: list[str], forwarder: list[str] | None) -> list[str]:
    """The start-up floors beside the start-ups: each interpreter's
    ``-c pass`` and ``-S -c pass``, median and p90 of STARTUP_STARTS."""
    pythons = [sys.executable] + [run.INTERPRETERS[b] for b in backends if b in run.INTERPRETERS]
    if forwarder:
        pythons.append(startup.interpreter_of(forwarder))
        lines = [f"Start-ups of the python backend: {' '.join(forwarder)}"]
    else:
        lines = [f"Start-ups of the python backend: {sys.executable} -m forwarder"]
    for python in dict.fromkeys(pythons):
        for flags in ([], ["-S"]):
            got = startup.summary(startup.floor_times(python, flags, STARTUP_STARTS))
            lines.append(
                f"Floor: {' '.join([python, *flags])} -c pass: median {got['median']:.1f} ms,"
                f" p90 {got['p90']:.1f} ms"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--mtu", type=int, nargs="+", default=[1500, 65520])
    parser.add_argument("--backend", nargs="+", default=ALL, choices=ALL)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--tests", nargs="+", default=[*run.TESTS, "mem", "startup"])
    parser.add_argument(
        "--forwarder",
        type=str.split,  # one argument: "/venv/bin/python3 -m forwarder"
        default=None,
        help="run the python backend (start-ups, memory, rates) with this command, say a"
        " pip-installed pyslirp-forwarder (default: python3 -m forwarder from this checkout)",
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    backends = []
    for b in args.backend:
        program = {"slirp4netns": "slirp4netns", "pasta": "pasta", **run.INTERPRETERS}.get(b)
        if program and shutil.which(program) is None:
            print(f"{program} is not installed: {b} left out", file=sys.stderr)
            continue
        backends.append(b)
    # 1,000 connections need more than 1,024 descriptors (ours and the clients').
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # As an installed package would be: PYTHONDONTWRITEBYTECODE (set on some
    # machines) would otherwise make every start compile our modules again.
    others = [run.INTERPRETERS[b] for b in backends if b in run.INTERPRETERS]
    for python in [sys.executable, *others]:
        subprocess.run(
            [python, "-m", "compileall", "-q", "pyslirp", "forwarder"], cwd=REPO, check=False
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    iperf_port = run.free_port()
    iperf_server = subprocess.Popen(
        ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    echo, closer, hold = run.EchoServer(), run.AcceptCloseServer(), startup.HoldServer()
    ports = {"iperf": iperf_port, "echo": echo.port, "close": closer.port}
    report = [f"Machine: {machine()}"]
    report += [f"Interpreter of {interpreter(b)}" for b in backends if b in run.INTERPRETERS]
    if "startup" in args.tests:
        report += floors(backends, args.forwarder)
    report.append("")
    try:
        time.sleep(0.3)
        for n in range(1, args.runs + 1):
            results = {}
            for mtu in args.mtu:
                for backend in backends:
                    print(f"run {n}: {backend}, MTU {mtu} ...", file=sys.stderr)
                    try:
                        results[(backend, mtu)] = measure(
                            backend, mtu, args.time, args.tests, ports, hold, args.forwarder
                        )
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        print(f"  {backend} failed: {exc}", file=sys.stderr)
            text = table(results, backends, args.mtu)
            report += [f"### Run {n} ({args.time:g} s per measurement)", "", text, ""]
            print(report[-3] + "\n\n" + text + "\n", flush=True)
            chart(
                results,
                backends,
                args.mtu,
                out / f"speed-run{n}.svg",
                f"Rates as multiples of slirp4netns, run {n} ({machine()})",
            )
    finally:
        iperf_server.terminate()
        iperf_server.wait(timeout=5)
        echo.close()
        closer.close()
        hold.close()
    (out / "speed.md").write_text("\n".join(report))
    print(f"wrote {out / 'speed.md'} and the charts in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
