"""slirp4netns compatibility of the command line: every flag, its errors, the
lifecycle (-r, -e, signals), --disable-dns, --outbound-addr, --macaddress,
--enable-sandbox, --enable-seccomp, and rootlesskit driving us.

The equivalents of slirp4netns's own test scenarios (tests/*.sh there):
api-socket (test_api.py), cidr and configure (test_forwarder.py), dhcp
(test_dhcp.py), disable-dns, disable-host-loopback (test_udp_e2e.py),
exit-fd, macaddress, nspath (test_forwarder.py), outbound-addr, ready-fd,
sandbox, seccomp (here).
"""

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests import harness

FORWARDER = [sys.executable, "-m", "forwarder"]
REPO = harness.REPO
GW = "10.0.2.2"


def run_forwarder(*args: str, timeout: float = 20.0, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FORWARDER, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def free_port(kind=socket.SOCK_STREAM, addr="127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def status_fields(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


class Started:
    def __init__(self, proc, ns_path, work, log_path):
        self.proc = proc
        self.ns_path = ns_path
        self.work = work
        self.log_path = log_path

    def run(self, cmd, timeout=20.0, **kw):
        return subprocess.run(
            ["nsenter", f"--net={self.ns_path}", *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )

    def popen(self, cmd, **kw):
        return subprocess.Popen(["nsenter", f"--net={self.ns_path}", *cmd], **kw)

    def log(self) -> str:
        return Path(self.log_path).read_text()


@contextlib.contextmanager
def started(*args: str, pass_fds=(), ready_timeout: float = 10.0):
    """The PATH form with ``-r`` on a pipe of our own: yields once the
    forwarder says it is ready; stops it with SIGTERM (exit 0 expected) and
    checks that it left nothing behind."""
    work = tempfile.mkdtemp(prefix="pyslirp-compat-")
    ns_path = os.path.join(work, "net")
    Path(ns_path).touch()
    log_path = os.path.join(work, "log")
    ready_r, ready_w = os.pipe()
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [*FORWARDER, "-r", str(ready_w), *args, ns_path],
        stdout=log,
        stderr=subprocess.STDOUT,
        pass_fds=(ready_w, *pass_fds),
        cwd=REPO,
        start_new_session=True,
    )
    os.close(ready_w)
    fwd = Started(proc, ns_path, work, log_path)
    try:
        readable, _, _ = select.select([ready_r], [], [], ready_timeout)
        assert readable, f"not ready: {fwd.log()}"
        assert os.read(ready_r, 10) == b"1", fwd.log()
        assert os.read(ready_r, 10) == b"", "the ready fd must be closed"
        yield fwd
    finally:
        os.close(ready_r)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        log.close()
        assert proc.returncode == 0, (proc.returncode, Path(log_path).read_text())
        assert not harness.is_mounted(ns_path), "the namespace file is still mounted"
        leftovers = [n for n in os.listdir(work) if n not in ("net", "log")]
        shutil.rmtree(work, ignore_errors=True)
        assert leftovers == [], leftovers


# ------------------------------------------------------------- --help, -v
ROOTLESSKIT_GREPS = (  # pkg/network/slirp4netns DetectFeatures
    "--netns-type",
    "--enable-ipv6",
    "--cidr",
    "--disable-host-loopback",
    "--api-socket",
    "--enable-sandbox",
    "--enable-seccomp",
)
PODMAN_GREPS = (  # containers/common libnetwork/slirp4netns checkSlirpFlags
    "--disable-host-loopback",
    "--mtu",
    "--enable-sandbox",
    "--enable-seccomp",
    "--cidr",
    "--outbound-addr",
    "--enable-ipv6",
)


def test_help_has_what_rootlesskit_and_podman_look_for():
    result = run_forwarder("--help")
    assert result.returncode == 0 and result.stderr == ""
    for flag in (
        *ROOTLESSKIT_GREPS,
        *PODMAN_GREPS,
        "--userns-path",
        "--disable-dns",
        "--outbound-addr6",
        "--macaddress",
        "-c, --configure",
        "-e, --exit-fd=FD",
        "-r, --ready-fd=FD",
        "-m, --mtu=MTU",
        "-6, --enable-ipv6",
        "-a, --api-socket=PATH",
        "--target-type=TYPE",
        "-p, --publish=[HOST_ADDR:]HOST_PORT:GUEST_PORT[/tcp|/udp]",
        "-- COMMAND [ARG]...",
        "-h, --help",
        "-v, --version",
    ):
        assert flag in result.stdout, flag


def test_version_first_line_is_slirp4netns_style():
    from pyslirp import __version__

    result = run_forwarder("--version")
    assert result.returncode == 0
    first, *rest = result.stdout.splitlines()
    assert first == f"pyslirp-forwarder version {__version__}"
    assert all(": " in line for line in rest), rest


# --------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "args, message",
    [
        (["-6", "--mtu", "1000"], "IPv6 needs an MTU of at least 1280, got 1000"),
        (["--enable-ipv6", "--ipv6-prefix", "fd00::/48"], "SLAAC needs a /64"),
        (["--ipv6-prefix", "fd01::/64"], "--ipv6-prefix needs --enable-ipv6"),
        (["-e", "x"], "exit-fd must be a non-negative integer"),
        (["--exit-fd=-1"], "exit-fd must be a non-negative integer"),
        (["--exit-fd=987"], "exit-fd 987: Bad file descriptor"),
        (["--ready-fd=x"], "ready-fd must be a non-negative integer"),
        (["-r", "987"], "ready-fd 987: Bad file descriptor"),
        (
            ["--macaddress", "0e:d4:18:d9:38:fb"],
            "--macaddr cannot be specified when --configure or -c is not specified",
        ),
        (["-c", "--macaddress", "zz"], '"zz" is an invalid MAC address'),
        (["-c", "--macaddress", "0e:d4:18:d9:38"], '"0e:d4:18:d9:38" is an invalid MAC address'),
        (["-c", "--macaddress", "01:00:5e:00:00:01"], "it is a multicast address"),
        (
            ["--outbound-addr", "nosuchif0"],
            "outbound-addr has to be valid ipv4 address or interface name.",
        ),
        (["--outbound-addr", "192.0.2.1"], "--outbound-addr 192.0.2.1: Cannot assign requested"),
        (
            ["--outbound-addr6", "nosuchif0"],
            "outbound-addr6 has to be valid ipv6 address or interface name.",
        ),
        (["--target-type=bess"], "--target-type=bess is not supported"),
        (["--target-type=vm"], '--target-type must be either "netns" or "bess"'),
        (["-p", "80"], "invalid --publish '80': expected [HOST_ADDR:]HOST_PORT:GUEST_PORT"),
        (["-p", "8080:80/sctp"], "the protocol must be tcp or udp"),
        (["-p", "[::1]:8080:80"], "IPv6 host addresses need --enable-ipv6"),
        (["-6", "-p", "[::1]:8080"], "expected [IPv6]:HOST_PORT:GUEST_PORT"),
        (["-p", "1.2.3:8080:80"], "'1.2.3' is not an IPv4 address"),
        (["--publish=0:80"], "ports are 1 to 65535"),
        (["-p", "8080:70000/udp"], "ports are 1 to 65535"),
        (["-a", "/tmp/" + "x" * 110], "the specified API socket path is too long (>= 108)"),
        (["--busy-poll=fast"], "--busy-poll must be an integer from 0 to 1000 (microseconds)"),
        (["--busy-poll=-1"], "--busy-poll must be an integer from 0 to 1000 (microseconds)"),
        (["--busy-poll", "1001"], "--busy-poll must be an integer from 0 to 1000 (microseconds)"),
    ],
)
def test_flag_errors(tmp_path, args, message):
    ns = tmp_path / "net"
    ns.touch()
    line = one_line_error(run_forwarder(*args, str(ns)))
    assert line.startswith("pyslirp-forwarder: ") and message in line, line
    assert not harness.is_mounted(str(ns))
    assert list(tmp_path.iterdir()) == [ns]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--"], "missing COMMAND after --"),
        (["NS", "--", "true"], "PATH, PID or TAPNAME cannot be combined with -- COMMAND"),
        (["--netns-type=path", "--", "true"], "--netns-type and --userns-path cannot be combined"),
    ],
)
def test_run_mode_usage_errors(tmp_path, args, message):
    args = [str(tmp_path / "net") if a == "NS" else a for a in args]
    (tmp_path / "net").touch()
    assert message in one_line_error(run_forwarder(*args))


def test_busy_publish_port_is_one_line_and_leaves_nothing(tmp_path):
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        ns = tmp_path / "net"
        ns.touch()
        result = run_forwarder("-p", f"127.0.0.1:{port}:80", "--dns-upstream=127.0.0.1:9", str(ns))
        assert result.returncode == 1, result.stderr
        assert (
            f"pyslirp-forwarder: cannot publish tcp 127.0.0.1:{port}: Address already in use"
            in result.stderr.splitlines()
        )
        assert not harness.is_mounted(str(ns))
    finally:
        busy.close()


# ------------------------------------------------------------ lifecycle
@pytest.mark.e2e
def test_ready_fd_comes_after_tap_configured_and_api_listening():
    api = os.path.join(tempfile.mkdtemp(prefix="pyslirp-api-"), "api.sock")
    try:
        with started("-c", "-a", api, "--dns-upstream=127.0.0.1:9") as fwd:
            # At the moment "1" arrives, both are in place already.
            addr = fwd.run(["ip", "-o", "-4", "addr", "show", "tap0"]).stdout
            assert "inet 10.0.2.100/24" in addr
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(api)
                sock.sendall(b'{"execute": "list_hostfwd"}')
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(100) == b'{"entries":[]}'
        assert not os.path.exists(api)
    finally:
        shutil.rmtree(os.path.dirname(api), ignore_errors=True)


@pytest.mark.e2e
def test_exit_fd_hang_up_stops_with_status_0_and_removes_the_api_socket():
    api = os.path.join(tempfile.mkdtemp(prefix="pyslirp-api-"), "api.sock")
    exit_r, exit_w = os.pipe()
    try:
        with started("-e", str(exit_r), "-a", api, pass_fds=(exit_r,)) as fwd:
            os.close(exit_r)
            exit_r = -1
            os.write(exit_w, b"data is not a hang-up")
            time.sleep(0.3)
            assert fwd.proc.poll() is None
            assert os.path.exists(api)
            os.close(exit_w)
            exit_w = -1
            started_at = time.monotonic()
            assert fwd.proc.wait(timeout=5) == 0
            assert time.monotonic() - started_at < 1.0
            assert not os.path.exists(api)
            assert not harness.is_mounted(fwd.ns_path)
    finally:
        for fd in (exit_r, exit_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(os.path.dirname(api), ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_closes_every_host_socket_within_a_second(sig):
    tcp_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    api = os.path.join(tempfile.mkdtemp(prefix="pyslirp-api-"), "api.sock")
    try:
        with started(
            "-c",
            "-a",
            api,
            "-p",
            f"127.0.0.1:{tcp_port}:80",
            "-p",
            f"127.0.0.1:{udp_port}:53/udp",
        ) as fwd:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe, pytest.raises(OSError):
                probe.bind(("127.0.0.1", tcp_port))  # the forward holds it
            fwd.proc.send_signal(sig)
            started_at = time.monotonic()
            assert fwd.proc.wait(timeout=5) == 0
            assert time.monotonic() - started_at < 1.0
            for kind, port in ((socket.SOCK_STREAM, tcp_port), (socket.SOCK_DGRAM, udp_port)):
                with socket.socket(socket.AF_INET, kind) as probe:
                    probe.bind(("127.0.0.1", port))
            assert not os.path.exists(api)
    finally:
        shutil.rmtree(os.path.dirname(api), ignore_errors=True)


@pytest.mark.e2e
def test_deprecated_spellings_warn_and_work():
    with started("--no-host-loopback", "--create-sandbox") as fwd:
        log = fwd.log()
        assert "WARNING: --no-host-loopback is deprecated" in log
        assert "WARNING: --create-sandbox is deprecated" in log
        assert "127.0.0.1:* on the host is accessible" not in log
        assert status_fields(fwd.proc.pid)["NoNewPrivs"] == "1"


# --------------------------------------------------------- network flags
@pytest.mark.e2e
def test_disable_dns_refuses_udp_and_tcp_at_the_dns_address():
    with harness.DnsServer(records={"example.test.": "192.0.2.7"}) as dns:
        upstream = f"--dns-upstream=127.0.0.1:{dns.port}"
        with started("-c", upstream) as fwd:
            answer = fwd.run(["dig", "+short", "+tries=1", "+time=2", "@10.0.2.3", "example.test"])
            assert answer.stdout.strip() == "192.0.2.7"
        asked = len(dns.queries)
        with started("-c", "--disable-dns", upstream) as fwd:
            udp = fwd.run(["dig", "+tries=1", "+time=2", "@10.0.2.3", "example.test"])
            assert udp.returncode != 0
            assert "connection refused" in udp.stdout + udp.stderr, udp.stdout
            tcp = fwd.run(["dig", "+tcp", "+tries=1", "+time=2", "@10.0.2.3", "example.test"])
            assert tcp.returncode != 0
            assert "connection refused" in tcp.stdout + tcp.stderr, tcp.stdout
            assert fwd.run(["ping", "-c", "1", "-W", "2", "10.0.2.3"]).returncode == 0
            assert "* DNS proxy:       disabled" in fwd.log()
        assert len(dns.queries) == asked


@pytest.mark.e2e
def test_outbound_addr_binds_udp_flows():
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(5)
    port = server.getsockname()[1]
    try:
        with started("-c", "--outbound-addr=127.0.0.2") as fwd:
            assert "* Outbound IPv4:   127.0.0.2" in fwd.log()
            sent = fwd.run(["sh", "-c", f"echo hi | socat -u - UDP4-SENDTO:{GW}:{port}"])
            assert sent.returncode == 0, sent.stderr
            data, peer = server.recvfrom(100)
            assert data == b"hi\n" and peer[0] == "127.0.0.2"
        with started("-c", "--outbound-addr=lo") as fwd:  # an interface name
            assert "* Outbound IPv4:   127.0.0.1" in fwd.log()
    finally:
        server.close()


@pytest.mark.e2e
def test_macaddress_sets_the_tap_and_traffic_flows():
    mac = "0e:d4:18:d9:38:fb"
    with started("-c", "--macaddress", mac.upper()) as fwd:
        link = fwd.run(["ip", "-o", "link", "show", "tap0"]).stdout
        assert f"link/ether {mac}" in link
        assert fwd.run(["ping", "-c", "1", "-W", "2", GW]).returncode == 0
        assert f"* MAC address:     {mac}" in fwd.log()


# ------------------------------------------------------ sandbox, seccomp
GUEST_TRAFFIC = r"""
import socket, sys
port_tcp, port_udp = int(sys.argv[1]), int(sys.argv[2])
t = socket.create_connection(("10.0.2.2", port_tcp), timeout=5)
t.sendall(b"tcp-ok"); assert t.recv(10) == b"tcp-ok"; t.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
u.sendto(b"udp-ok", ("10.0.2.2", port_udp)); assert u.recvfrom(10)[0] == b"udp-ok"
"""


@contextlib.contextmanager
def host_echo_servers():
    """TCP and UDP echo servers on the host's loopback (one client each)."""
    import threading

    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    tcp.settimeout(10)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(10)

    def serve():
        with contextlib.suppress(OSError):
            conn, _ = tcp.accept()
            with conn:
                conn.sendall(conn.recv(100))
        with contextlib.suppress(OSError):
            data, peer = udp.recvfrom(100)
            udp.sendto(data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield tcp.getsockname()[1], udp.getsockname()[1]
    finally:
        tcp.close()
        udp.close()
        thread.join(timeout=10)


def check_guest_traffic(fwd, dns_answer="192.0.2.7"):
    with host_echo_servers() as (port_tcp, port_udp):
        out = fwd.run(["python3", "-c", GUEST_TRAFFIC, str(port_tcp), str(port_udp)], timeout=30)
        assert out.returncode == 0, out.stderr + fwd.log()
    for transport in ("+notcp", "+tcp"):
        dig = fwd.run(
            ["dig", "+short", "+tries=1", "+time=3", transport, "@10.0.2.3", "example.test"]
        )
        assert dig.stdout.strip() == dns_answer, dig.stdout + dig.stderr


@pytest.mark.e2e
def test_sandbox_keeps_etc_and_run_drops_capabilities_and_still_serves():
    api = os.path.join(tempfile.mkdtemp(prefix="pyslirp-api-"), "api.sock")
    try:
        with (
            harness.DnsServer(records={"example.test.": "192.0.2.7"}) as dns,
            started(
                "-c", "--enable-sandbox", "-a", api, f"--dns-upstream=127.0.0.1:{dns.port}"
            ) as fwd,
        ):
            pid = fwd.proc.pid
            status = status_fields(pid)
            assert int(status["CapEff"], 16) == 1 << 10  # CAP_NET_BIND_SERVICE only
            assert int(status["CapPrm"], 16) == 1 << 10
            assert int(status["CapBnd"], 16) == 1 << 10
            assert status["NoNewPrivs"] == "1"
            assert sorted(os.listdir(f"/proc/{pid}/root")) == ["etc", "run"]
            assert os.path.exists(f"/proc/{pid}/root/etc/resolv.conf")
            for hidden in ("home", "root", "var", "usr", "tmp"):
                assert not os.path.exists(f"/proc/{pid}/root/{hidden}")
            check_guest_traffic(fwd)
            # Forwards made after the sandbox work (the API, UDP, a port < 1024).
            from forwarder.api import request

            port = free_port(socket.SOCK_DGRAM)
            reply = request(
                api,
                {
                    "execute": "add_hostfwd",
                    "arguments": {"proto": "udp", "host_port": port, "guest_port": 7000},
                },
            )
            assert reply == {"return": {"id": 1}}
            low = request(
                api,
                {
                    "execute": "add_hostfwd",
                    "arguments": {
                        "proto": "tcp",
                        "host_addr": "127.0.0.1",
                        "host_port": 999,
                        "guest_port": 80,
                    },
                },
            )
            assert low == {"return": {"id": 2}}, low
            echo = fwd.popen(
                ["socat", "-T", "5", "UDP4-RECVFROM:7000", "EXEC:cat"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                    client.settimeout(0.5)
                    got = None
                    for _ in range(10):
                        client.sendto(b"through the sandbox", ("127.0.0.1", port))
                        try:
                            got = client.recvfrom(100)[0]
                            break
                        except TimeoutError:
                            continue
                    assert got == b"through the sandbox"
            finally:
                echo.kill()
                echo.wait(timeout=5)
        assert not os.path.exists(api)
    finally:
        shutil.rmtree(os.path.dirname(api), ignore_errors=True)


@pytest.mark.e2e
def test_seccomp_filter_is_loaded_and_traffic_flows():
    with (
        harness.DnsServer(records={"example.test.": "192.0.2.7"}) as dns,
        started(
            "-c", "--enable-seccomp", "--enable-sandbox", f"--dns-upstream=127.0.0.1:{dns.port}"
        ) as fwd,
    ):
        status = status_fields(fwd.proc.pid)
        assert status["Seccomp"] == "2" and status["Seccomp_filters"] == "1"
        blocked = [
            line for line in fwd.log().splitlines() if line.startswith("seccomp: The following")
        ]
        assert len(blocked) == 1
        for name in ("execve", "ptrace", "mount", "setns", "unshare", "reboot", "umount2"):
            assert f" {name}" in blocked[0]
        check_guest_traffic(fwd)


SECCOMP_PROBE = """
import ctypes, os, socket, sys
from forwarder.sandbox import enable_seccomp
enable_seccomp()
socket.socket().close()  # allowed
os.getpid()
print("loaded", flush=True)
what = sys.argv[1]
if what == "execve":
    os.execv("/bin/true", ["true"])
elif what == "unshare":
    ctypes.CDLL(None, use_errno=True).unshare(0x40000000)
elif what == "prctl":
    ctypes.CDLL(None).prctl(15, b"x", 0, 0, 0)
print("still alive", flush=True)
"""


@pytest.mark.parametrize("call", ["execve", "unshare", "prctl", "nothing"])
def test_seccomp_kills_on_a_blocked_call(call):
    result = subprocess.run(
        [sys.executable, "-c", SECCOMP_PROBE, call],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=REPO,
    )
    assert result.stdout.startswith("loaded"), result.stderr
    if call == "nothing":
        assert result.returncode == 0 and "still alive" in result.stdout
    else:
        assert result.returncode == -signal.SIGSYS, (result.returncode, result.stderr)
        assert "still alive" not in result.stdout


def test_seccomp_filters_are_well_formed_for_both_arches():
    from forwarder.sandbox import ARCHES, BLOCKED, SECCOMP_RET_KILL_PROCESS, build_filter

    for arch, table, x32 in ARCHES.values():
        program, blocked = build_filter(arch, table, x32, SECCOMP_RET_KILL_PROCESS)
        assert blocked == [name for name in BLOCKED if name != "umount"]
        assert len(program) == 8 * (3 + int(x32) + len(blocked) + 2)
        assert len(set(table[name] for name in blocked)) == len(blocked)


# ------------------------------------------------------------ rootlesskit
ROOTLESSKIT_CHILD = r"""
set -eu
# The host's loopback service, through the gateway.
python3 - "$1" <<'EOF'
import socket, sys
with socket.create_connection(("10.0.2.2", int(sys.argv[1])), timeout=5) as s:
    print("inside got:", s.recv(100).decode().strip(), flush=True)
EOF
# Served inside, reached from the host through the published port.
exec socat -T 10 TCP4-LISTEN:80,reuseaddr SYSTEM:'echo hello-from-inside'
"""


@pytest.mark.e2e
def test_rootlesskit_runs_us_as_its_slirp4netns():
    rootlesskit = shutil.which("rootlesskit")
    if rootlesskit is None:
        pytest.fail("rootlesskit is not installed (Debian's package; .ci/install installs it)")
    work = tempfile.mkdtemp(prefix="pyslirp-rlk-")
    host_service = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    host_service.bind(("127.0.0.1", 0))
    host_service.listen()
    host_service.settimeout(20)
    published = free_port()
    proc = None
    try:
        wrapper = Path(work, "slirp4netns")
        wrapper.write_text(
            "#!/bin/sh\n"
            f'echo "$*" >> {work}/args\n'
            f"PYTHONPATH={REPO} exec {sys.executable} -m forwarder "
            '--dns-upstream=127.0.0.1:9 "$@"\n'
        )
        wrapper.chmod(0o755)
        # rootlesskit maps uids through /etc/subuid: a private one, seen by
        # nobody else (this mount namespace is the test's).
        subid = Path(work, "subid")
        subid.write_text("root:100000:65536\n")
        resolv = Path(work, "resolv.conf")
        resolv.write_text("nameserver 127.0.0.1\n")
        child = Path(work, "child.sh")
        child.write_text(ROOTLESSKIT_CHILD)
        script = textwrap.dedent(
            f"""
            mount --bind {subid} /etc/subuid
            mount --bind {subid} /etc/subgid
            # rootlesskit binds its resolv.conf over ours, which it cannot do
            # over the DNS sandbox's (a mount of a deleted file): a fresh one,
            # that names 127.0.0.1 too.
            umount /etc/resolv.conf 2>/dev/null || true
            mount --bind {resolv} /etc/resolv.conf
            exec {rootlesskit} --net=slirp4netns --slirp4netns-binary={wrapper} \
                --port-driver=slirp4netns -p 127.0.0.1:{published}:80/tcp \
                --state-dir={work}/state sh {child} \
                {host_service.getsockname()[1]}
            """
        )
        proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            conn, _ = host_service.accept()
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"nobody came: {proc.communicate(timeout=5)[0]}") from None
        with conn:
            conn.sendall(b"hello-from-host\n")
        answer = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and b"hello-from-inside" not in answer:
            try:
                with socket.create_connection(("127.0.0.1", published), timeout=2) as c:
                    answer = c.recv(100)
            except OSError:
                time.sleep(0.2)
        output, _ = proc.communicate(timeout=20)
        assert b"hello-from-inside" in answer, output
        assert "inside got: hello-from-host" in output, output
        assert proc.returncode == 0, output
        args = Path(work, "args").read_text().splitlines()
        assert "--help" in args  # its feature probe
        assert any("--api-socket" in line and "-r 3" in line for line in args), args
    finally:
        host_service.close()
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        shutil.rmtree(work, ignore_errors=True)
