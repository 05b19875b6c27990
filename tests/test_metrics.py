"""--metrics: the API's stats in the Prometheus text format, read by
prometheus_client's own parser (the test extra), from a real forwarder."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forwarder.metrics import CONTENT_TYPE, MetricsLimits, render
from tests import harness
from tests.test_api import ask, free_port, our_api
from tests.test_libslirp import needs_libslirp
from tests.test_top import HOSTILE_FRAMES, HOSTILE_REASONS, wait_for

HTTP_TIMEOUT = 10.0


def http(port: int, request: bytes, address: str = "127.0.0.1") -> tuple[str, dict, str]:
    """(status line, headers, body) of one HTTP/1.0 exchange."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(HTTP_TIMEOUT)
        sock.connect((address, port))
        sock.sendall(request)
        chunks = []
        deadline = time.monotonic() + HTTP_TIMEOUT
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status, *fields = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    return status, headers, body.decode()


def scrape(port: int, address: str = "127.0.0.1") -> dict:
    """GET /metrics, parsed by prometheus_client: {family name: family}."""
    status, headers, body = http(port, b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n", address)
    assert status == "HTTP/1.0 200 OK", status
    assert headers["content-type"] == CONTENT_TYPE
    assert int(headers["content-length"]) == len(body.encode())
    return {family.name: family for family in text_string_to_metric_families(body)}


def samples(family) -> dict:
    """{frozenset of label items: value} of a family's samples."""
    return {frozenset(s.labels.items()): s.value for s in family.samples}


@contextlib.contextmanager
def with_metrics(*extra):
    port = free_port()
    with our_api(f"--metrics=127.0.0.1:{port}", *extra) as fwd:
        fwd.metrics_port = port
        # our_api returns once the API socket listens, which serve() sets
        # up just before the metrics endpoint: wait for that too.
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield fwd


@pytest.mark.e2e
def test_metrics_parse_with_prometheus_and_match_stats():
    count = 3
    with with_metrics() as fwd:
        harness.configure_guest(fwd)
        sent = fwd.run(["python3", "-c", HOSTILE_FRAMES, str(count)], timeout=30)
        assert sent.returncode == 0, sent.stderr

        def dropped():
            families = scrape(fwd.metrics_port)
            drops = {
                dict(labels)["reason"]: value
                for labels, value in samples(families["pyslirp_drops"]).items()
            }
            return all(drops.get(r, 0) >= count for r in HOSTILE_REASONS) and (families, drops)

        families, drops = wait_for(dropped, what="the drops in /metrics")
        assert families["pyslirp_drops"].type == "counter"
        assert {r: drops[r] for r in HOSTILE_REASONS} == dict.fromkeys(HOSTILE_REASONS, count)
        stats = json.loads(ask(fwd.api_path, b'{"execute":"stats"}'))["return"]
        events = samples(families["pyslirp_events"])
        for source, counters in stats["counters"].items():
            for event, value in counters.items():
                key = frozenset({"source": source, "event": event}.items())
                assert key in events and events[key] <= value  # counters only grow
        assert samples(families["pyslirp_info"]) == {frozenset({"backend": "python"}.items()): 1}
        limit = samples(families["pyslirp_memory_limit_bytes"])[frozenset()]
        assert limit == stats["memory"]["limit"]
        kinds = {dict(k)["kind"] for k in samples(families["pyslirp_flows_limit"])}
        assert kinds == set(stats["flow_limits"])
        assert samples(families["pyslirp_descriptors_limit"])[frozenset()] > 0
        assert "pyslirp_unsupported" not in families

        status, _, _ = http(fwd.metrics_port, b"GET / HTTP/1.0\r\n\r\n")
        assert status.startswith("HTTP/1.0 404")
        status, _, _ = http(fwd.metrics_port, b"POST /metrics HTTP/1.0\r\n\r\n")
        assert status.startswith("HTTP/1.0 405")
        status, _, _ = http(fwd.metrics_port, b"hello\r\n\r\n")
        assert status.startswith("HTTP/1.0 400")
        status, _, _ = http(fwd.metrics_port, b"GET /metrics HTTP/1.0\r\n" + b"X: y\r\n" * 2000)
        assert status.startswith("HTTP/1.0 400")  # past MetricsLimits.max_request


@pytest.mark.e2e
def test_clients_that_say_nothing_do_not_take_the_endpoint_away():
    idle = []
    try:
        with with_metrics() as fwd:
            # More silent clients than the bound: the oldest are dropped.
            for _ in range(MetricsLimits().max_clients * 3):
                sock = socket.create_connection(("127.0.0.1", fwd.metrics_port), timeout=5)
                idle.append(sock)
            assert "pyslirp_flows" in scrape(fwd.metrics_port)
            sockets = fwd.socket_count()
            assert sockets < len(idle), "silent clients beyond the bound are closed"
            hung_up = 0
            for sock in idle[:4]:  # the oldest: closed by the forwarder
                sock.settimeout(5)
                with contextlib.suppress(OSError):
                    hung_up += sock.recv(10) == b""
            assert hung_up == 4
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.e2e
@needs_libslirp
def test_metrics_from_libslirp_name_what_it_cannot_report():
    with with_metrics("--backend=libslirp") as fwd:
        families = scrape(fwd.metrics_port)
        info = samples(families["pyslirp_info"])
        assert info == {frozenset({"backend": "libslirp"}.items()): 1}
        unsupported = {dict(k)["figure"] for k in samples(families["pyslirp_unsupported"])}
        assert {"drops", "memory"} <= unsupported
        assert "pyslirp_drops" not in families


@pytest.mark.parametrize(
    "value", ["nope", "127.0.0.1:0", "localhost:9100", "1.2.3.4:70000", "[::1]:x", ""]
)
def test_bad_metrics_values_are_one_error_line(value, tmp_path):
    done = subprocess.run(
        [*harness.FORWARDER, f"--metrics={value}", str(tmp_path / "ns")],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=harness.REPO,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"pyslirp-forwarder: --metrics must be [ADDR:]PORT with an IP address, not {value!r}"
    ]


@pytest.mark.e2e
def test_a_port_in_use_is_one_error_line_and_nothing_left_behind(tmp_path):
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    ns_path = tmp_path / "net"
    ns_path.touch()
    try:
        done = subprocess.run(
            [*harness.FORWARDER, f"--metrics=127.0.0.1:{port}", "-a", str(tmp_path / "api")]
            + [str(ns_path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=harness.REPO,
        )
    finally:
        taken.close()
        if harness.is_mounted(str(ns_path)):
            subprocess.run(["umount", "-l", str(ns_path)], check=False)
            pytest.fail("the namespace's bind mount was left behind")
    assert done.returncode == 1
    # (beside slirp4netns's "sent tapfd" lines, which come before)
    errors = [line for line in done.stderr.splitlines() if line.startswith("pyslirp")]
    assert errors == [
        f"pyslirp-forwarder: --metrics: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert not (tmp_path / "api").exists(), "the API socket file was left behind"


def test_render_escapes_label_values_and_parses():
    stats = {
        "backend": "python",
        "uptime": 1.5,
        "counters": {"stack": {"frames-in": 7}},
        "drops": {'odd "reason"\\\n': 2},
        "memory": {"held": 10, "limit": 100, "peak": 20, "pressure": 75, "refused": 0},
        "flows": {"tcp": 1},
        "unsupported": [],
    }
    families = {f.name: f for f in text_string_to_metric_families(render(stats))}
    assert samples(families["pyslirp_drops"]) == {
        frozenset({"reason": 'odd "reason"\\\n'}.items()): 2
    }
    assert samples(families["pyslirp_uptime_seconds"]) == {frozenset(): 1.5}
    assert samples(families["pyslirp_memory_bytes"]) == {frozenset(): 10}
    assert samples(families["pyslirp_events"]) == {
        frozenset({"source": "stack", "event": "frames-in"}.items()): 7
    }
