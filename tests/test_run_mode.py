"""Run mode: pyslirp-forwarder [OPTION]... -- COMMAND [ARG]...

COMMAND runs in fresh namespaces configured as with -c, resolves names
through the DNS proxy (a test DNS server on 127.0.0.1 is the upstream), and
its exit status becomes ours; nothing is left behind.
"""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests import harness

FORWARDER = [sys.executable, "-m", "forwarder"]
REPO = harness.REPO
pytestmark = pytest.mark.e2e


def run_mode(*args, timeout=30.0, **kw) -> subprocess.CompletedProcess:
    before = set(glob.glob("/tmp/pyslirp-run-*"))
    result = subprocess.run(
        [*FORWARDER, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw
    )
    assert_nothing_left(before)
    return result


def assert_nothing_left(before=frozenset()) -> None:
    assert set(glob.glob("/tmp/pyslirp-run-*")) <= set(before), "a run directory was left"
    with open("/proc/self/mountinfo") as f:
        assert "pyslirp-run-" not in f.read()
    with open("/etc/resolv.conf") as f:
        assert "10.0.2.3" not in f.read()


def test_exit_status_is_the_commands():
    assert run_mode("--dns-upstream=127.0.0.1:9", "--", "sh", "-c", "exit 7").returncode == 7
    assert run_mode("--dns-upstream=127.0.0.1:9", "--", "true").returncode == 0
    killed = run_mode("--dns-upstream=127.0.0.1:9", "--", "sh", "-c", "kill -9 $$")
    assert killed.returncode == 128 + signal.SIGKILL
    missing = run_mode("--dns-upstream=127.0.0.1:9", "--", "/nonexistent/command")
    assert missing.returncode == 127
    assert "pyslirp-forwarder: /nonexistent/command: No such file or directory" in missing.stderr


def test_command_sees_a_configured_network_and_quiet_output():
    result = run_mode(
        "--dns-upstream=127.0.0.1:9",
        "--",
        "sh",
        "-c",
        "ip -o -4 addr show tap0; ip -4 route; cat /etc/resolv.conf; "
        "ping -c 1 -W 2 10.0.2.2 >/dev/null && echo ping-ok",
    )
    assert result.returncode == 0, result.stderr
    assert "inet 10.0.2.100/24" in result.stdout
    assert "default via 10.0.2.2 dev tap0" in result.stdout
    assert "nameserver 10.0.2.3" in result.stdout
    assert "ping-ok" in result.stdout
    # No banner unless asked for logs: the output is the command's.
    assert "Starting slirp" not in result.stdout and result.stderr == ""


def test_getent_resolves_through_the_proxy():
    with harness.DnsServer(records={"example.test.": "192.0.2.7"}) as dns:
        result = run_mode(
            f"--dns-upstream=127.0.0.1:{dns.port}", "--", "getent", "hosts", "example.test"
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["192.0.2.7", "example.test"]
        assert ("example.test.", 1) in dns.queries


def test_custom_cidr_names_its_dns_address():
    result = run_mode(
        "--cidr=10.9.0.0/16", "--dns-upstream=127.0.0.1:9", "--", "cat", "/etc/resolv.conf"
    )
    assert result.stdout == "nameserver 10.9.0.3\n"


def test_udhcpc_gets_a_lease():
    result = run_mode(
        "--dns-upstream=127.0.0.1:9",
        "--",
        "udhcpc",
        "-i",
        "tap0",
        "-n",
        "-q",
        "-t",
        "3",
        "-T",
        "1",
        "-s",
        "/bin/true",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lease of 10.0.2.15 obtained" in result.stdout + result.stderr


def test_publish_reaches_a_server_in_the_command():
    port = harness_free_udp_port()
    proc = subprocess.Popen(
        [
            *FORWARDER,
            "--dns-upstream=127.0.0.1:9",
            "-p",
            f"127.0.0.1:{port}:7000/udp",
            "--",
            "socat",
            "-T",
            "10",
            "UDP4-RECVFROM:7000",
            "EXEC:cat",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(0.3)
            got = None
            for _ in range(30):
                client.sendto(b"ping", ("127.0.0.1", port))
                try:
                    got, peer = client.recvfrom(100)
                    break
                except (TimeoutError, ConnectionRefusedError):
                    continue
            assert got == b"ping" and peer == ("127.0.0.1", port)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=5)


def harness_free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_goes_to_the_command_and_its_status_comes_back(sig):
    before = set(glob.glob("/tmp/pyslirp-run-*"))
    proc = subprocess.Popen(
        [*FORWARDER, "--dns-upstream=127.0.0.1:9", "--", "sleep", "30"],
        cwd=REPO,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        sleeper = None
        while sleeper is None and time.monotonic() < deadline:
            out = subprocess.run(
                ["pgrep", "-P", str(proc.pid), "-x", "sleep"], capture_output=True, text=True
            ).stdout.split()
            sleeper = int(out[0]) if out else None
            time.sleep(0.05)
        assert sleeper is not None, "the command did not start"
        proc.send_signal(sig)
        started = time.monotonic()
        assert proc.wait(timeout=5) == 128 + sig
        assert time.monotonic() - started < 2.0
        assert not os.path.exists(f"/proc/{sleeper}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    assert_nothing_left(before)


def test_exit_fd_stops_the_command_too_and_is_not_inherited():
    exit_r, exit_w = os.pipe()
    proc = subprocess.Popen(
        [
            *FORWARDER,
            "-e",
            str(exit_r),
            "--dns-upstream=127.0.0.1:9",
            "--",
            "sh",
            "-c",
            f"test -e /proc/self/fd/{exit_r} && echo leaked; exec sleep 30",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        pass_fds=(exit_r,),
        start_new_session=True,
    )
    os.close(exit_r)
    try:
        time.sleep(1.0)
        assert proc.poll() is None
        os.close(exit_w)
        exit_w = -1
        assert proc.wait(timeout=5) == 128 + signal.SIGTERM
        assert proc.stdout.read() == ""
    finally:
        if exit_w >= 0:
            os.close(exit_w)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


UNPRIVILEGED = r"""
set -eu
work=$1; py=$2; shift 2
# This mount namespace is the test's own: nothing below is seen outside.
mkdir "$work/dev"
mount -t tmpfs -o mode=755 none "$work/dev"
mknod "$work/dev/tun" c 10 200
chmod 0666 "$work/dev/tun"
mount --bind "$work/dev/tun" /dev/net/tun
# The DNS sandbox's resolv.conf is a mount of a deleted file, which nothing
# can be mounted over, and which a user namespace may not unmount: a fresh
# file (naming 127.0.0.1 too) for the run mode to cover.
printf 'nameserver 127.0.0.1
' > "$work/resolv.conf"
umount /etc/resolv.conf 2>/dev/null || true
mount --bind "$work/resolv.conf" /etc/resolv.conf
""" + harness.PYTHON_UNDER_ROOT_SH + r"""chmod 755 "$work"
cd /
exec setpriv --reuid=65534 --regid=65534 --clear-groups "$py" -m forwarder "$@"
"""


def test_unprivileged_user_gets_a_user_namespace():
    work = tempfile.mkdtemp(prefix="pyslirp-unpriv-")
    try:
        with harness.DnsServer(records={"example.test.": "192.0.2.7"}) as dns:
            result = subprocess.run(
                [
                    "unshare",
                    "-m",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    UNPRIVILEGED,
                    "sh",
                    work,
                    sys.executable,
                    f"--dns-upstream=127.0.0.1:{dns.port}",
                    "--",
                    "sh",
                    "-c",
                    "id -u; getent hosts example.test; exit 3",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        assert result.returncode == 3, result.stdout + result.stderr
        assert result.stdout.split() == ["0", "192.0.2.7", "example.test"], result.stderr
        assert result.stderr == ""
    finally:
        shutil.rmtree(work, ignore_errors=True)
