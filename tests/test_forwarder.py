"""The front end: command line, both start forms, errors, signals, --pcap.

The guest is the Linux kernel in a real network namespace; guest commands run
with nsenter. Every namespace, process and mount made here goes away in a
finally block.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests import harness

FORWARDER = [sys.executable, "-m", "forwarder"]
REPO = harness.REPO
NOBODY = 65534


# --------------------------------------------------------------- helpers
def run_forwarder(*args: str, timeout: float = 20.0, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FORWARDER, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def netns_id(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


@contextlib.contextmanager
def target_process(*unshare_flags: str):
    """A `sleep` in a fresh network namespace (made with unshare); yields its PID."""
    proc = subprocess.Popen(["unshare", *unshare_flags, "sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        while netns_id(proc.pid) == netns_id("self"):
            assert time.monotonic() < deadline, "unshare did not make a namespace"
            time.sleep(0.01)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=5)


def in_target(pid: int, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["nsenter", "-t", str(pid), "-n", *cmd], capture_output=True, text=True, timeout=15, **kw
    )


@contextlib.contextmanager
def background_forwarder(*args: str):
    """The forwarder in the PID form, with its output in a file."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([*FORWARDER, *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            yield proc, log
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


def read_log(log) -> str:
    log.seek(0)
    return log.read()


def wait_for(predicate, what: str, proc=None, log=None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"forwarder exited {proc.returncode}: {read_log(log)}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def ping(runner, address: str) -> None:
    result = runner(["ping", "-c", "1", "-W", "2", address])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 received" in result.stdout


def assert_nothing_left(ns_path: str | None = None) -> None:
    if ns_path is not None:
        assert not harness.is_mounted(ns_path)
        assert Path(ns_path).is_file()
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout == ""


# ------------------------------------------------------------- the CLI
def test_version_has_slirp4netns_layout_and_our_version():
    from pyslirp import __version__

    for flag in ("-v", "--version"):
        result = run_forwarder(flag)
        assert result.returncode == 0
        lines = result.stdout.splitlines()
        assert lines[0] == f"pyslirp-forwarder version {__version__}"
        assert lines[1].startswith("backends: python")
        assert result.stderr == ""


def test_help_lists_the_slirp4netns_spellings():
    for flag in ("-h", "--help"):
        result = run_forwarder(flag)
        assert result.returncode == 0
        assert result.stdout.startswith("Usage: pyslirp-forwarder [OPTION]... PATH\n")
        for option in (
            "-c, --configure",
            "-m, --mtu=MTU",
            "--cidr=CIDR",
            "--disable-host-loopback",
            "--netns-type=TYPE",
            "--userns-path=PATH",
            "--backend=NAME",
            "--pcap=FILE",
            "--dns-upstream=ADDR[:PORT]",
            "--log-level=LEVEL",
            "-h, --help",
            "-v, --version",
        ):
            assert option in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "missing PATH, or PID and TAPNAME"),
        (["--mtu", "67"], "MTU must be an integer from 68 to 65520"),
        (["--mtu=65521"], "MTU must be an integer from 68 to 65520"),
        (["-m", "x"], "MTU must be an integer from 68 to 65520"),
        (["--cidr", "10.0.2.0/26"], "prefix length needs to be 1-25"),
        (["--cidr", "10.0.2.0/0"], "prefix length needs to be 1-25"),
        (["--cidr", "10.0.2.100/24"], "CIDR needs to be a network address like 10.0.2.0/24"),
        (["--cidr", "10.0.2/24"], "invalid CIDR: 10.0.2/24"),
        (["--cidr", "10.0.2.256/24"], "invalid network address: 10.0.2.256"),
        (["--backend=bogus"], "unknown backend 'bogus' (available: python"),
        (["--log-level=loud"], "invalid --log-level 'loud'"),
        (["--dns-upstream", "[::1]:x"], "invalid --dns-upstream '[::1]:x'"),
        (["--dns-upstream", "127.0.0.1:0"], "invalid --dns-upstream"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--netns-type=tapfd"], "--netns-type=tapfd is not supported yet"),
        (["--netns-type=bogus"], '--netns-type must be either "pid" or "path"'),
        (["--pcap", "/nonexistent-dir/x.pcap"], "cannot write pcap file /nonexistent-dir/x.pcap"),
    ],
)
def test_bad_option_is_one_line_and_exit_1(tmp_path, args, message):
    ns_file = tmp_path / "net"
    ns_file.touch()
    positional = [str(ns_file)] if args else []
    result = run_forwarder(*args, *positional)
    assert_one_line_error(result, message)
    assert_nothing_left(str(ns_file))


@pytest.mark.parametrize(
    "args, message",
    [
        (["0", "tap0"], "PID must be a positive integer"),
        (["abc", "tap0"], "PID must be a positive integer"),
        (["4242"], "TAPNAME is required after the PID 4242"),
        (["--netns-type=path", "/nonexistent/net", "tap0"], "existing path expected when"),
        (["--netns-type=path", "/proc/self/ns/net"], "TAPNAME is required with --netns-type"),
        (["--userns-path=/nonexistent/user", "1", "tap0"], "userns path doesn't exist"),
        (["1", "this-name-is-too-long"], "invalid TAP name 'this-name-is-too-long'"),
        (["1", "a/b"], "invalid TAP name 'a/b'"),
    ],
)
def test_bad_positional_is_one_line_and_exit_1(args, message):
    assert_one_line_error(run_forwarder(*args), message)


def test_missing_path_is_not_created(tmp_path):
    missing = tmp_path / "net"
    result = run_forwarder(str(missing))
    assert_one_line_error(result, f"namespace file {missing} does not exist")
    assert not missing.exists()


# ------------------------------------------------------ PATH form, e2e
@pytest.mark.e2e
def test_path_form_static_guest_pings_gateway_and_dns():
    with harness.forwarder(dns_upstreams=["127.0.0.1:9"]) as fwd:
        ping(fwd.run, "10.0.2.2")
        ping(fwd.run, "10.0.2.3")
        links = fwd.run(["ip", "-o", "link", "show", "lo"]).stdout
        assert "UP" in links  # the front end brings lo up in a namespace it makes
        banner = fwd.log()
        for line in (
            "* MTU:             1500",
            "* Network:         10.0.2.0",
            "* Netmask:         255.255.255.0",
            "* Gateway:         10.0.2.2",
            "* DNS:             10.0.2.3",
            "* DHCP begin:      10.0.2.15",
            "* DHCP end:        10.0.2.30",
            "* Recommended IP:  10.0.2.100",
            "* DNS upstreams:   127.0.0.1:9 (from command line)",
            "WARNING: 127.0.0.1:* on the host is accessible as 10.0.2.2",
            "sent tapfd=",
            "received tapfd=",
        ):
            assert line in banner, banner
        ns_path = fwd.ns_path
    assert not harness.is_mounted(ns_path)
    assert_nothing_left()


@pytest.mark.e2e
def test_path_form_configure_sets_address_route_mtu_in_custom_cidr():
    args = ("-c", "--mtu", "65520", "--cidr", "10.9.8.0/24", "--disable-host-loopback")
    with harness.forwarder(*args, configure=False) as fwd:
        wait_for(
            lambda: "default via 10.9.8.2" in fwd.run(["ip", "-4", "route"]).stdout,
            "the route from --configure",
        )
        addr = fwd.run(["ip", "-o", "-4", "addr", "show", "dev", "tap0"]).stdout
        assert "inet 10.9.8.100/24" in addr
        link = fwd.run(["ip", "-o", "link", "show", "tap0"]).stdout
        assert "mtu 65520" in link and ",UP" in link
        assert "state UP" in fwd.run(["ip", "-o", "link", "show", "lo"]).stdout or (
            "LOOPBACK,UP" in fwd.run(["ip", "-o", "link", "show", "lo"]).stdout
        )
        ping(fwd.run, "10.9.8.2")
        ping(fwd.run, "10.9.8.3")
        banner = fwd.log()
        assert "* Recommended IP:  10.9.8.100" in banner
        assert "* MTU:             65520" in banner
        assert "WARNING: 127.0.0.1:*" not in banner


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_within_a_second_and_unmounts(sig):
    with harness.forwarder() as fwd:
        ping(fwd.run, "10.0.2.2")
        assert harness.is_mounted(fwd.ns_path)
        started = time.monotonic()
        fwd.proc.send_signal(sig)
        code = fwd.proc.wait(timeout=5)
        elapsed = time.monotonic() - started
        assert code == 0
        assert elapsed < 1.0, elapsed
        assert not harness.is_mounted(fwd.ns_path)
        assert Path(fwd.ns_path).is_file()
        log = fwd.log()
        assert "Traceback" not in log
        # No --dns-upstream: the sandbox's /etc/resolv.conf names 127.0.0.1.
        assert "* DNS upstreams:   127.0.0.1:53 (from /etc/resolv.conf)" in log


@pytest.mark.e2e
def test_pcap_is_read_by_tshark_without_malformed_frames(tmp_path):
    pcap = tmp_path / "capture.pcap"
    with harness.forwarder("--pcap", str(pcap)) as fwd:
        ping(fwd.run, "10.0.2.2")
        ping(fwd.run, "10.0.2.3")
        # 4000 bytes: fragmented both ways at MTU 1500
        ping(lambda cmd: fwd.run([*cmd[:1], "-s", "4000", *cmd[1:]]), "10.0.2.3")
    fields = subprocess.run(
        ["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.protocols"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert fields.returncode == 0, fields.stderr
    protocols = fields.stdout.splitlines()
    assert sum("icmp" in p for p in protocols) >= 6  # three requests, three replies
    assert any("arp" in p for p in protocols)
    bad = subprocess.run(
        [
            "tshark",
            "-r",
            str(pcap),
            "-o",
            "ip.check_checksum:TRUE",
            "-Y",
            "_ws.malformed || _ws.expert.severity >= warning"
            ' || ip.checksum.status == "Bad" || icmp.checksum.status == "Bad"',
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 0, bad.stderr
    assert bad.stdout == ""


@pytest.mark.e2e
def test_path_is_a_directory_fails_cleanly(tmp_path):
    result = run_forwarder(str(tmp_path))
    assert_one_line_error(result, f"cannot bind-mount the namespace on {tmp_path}")
    assert not harness.is_mounted(str(tmp_path))


# ------------------------------------------------------- PID form, e2e
@pytest.mark.e2e
@pytest.mark.parametrize("unshare_flags", [("-n",), ("-r", "-n")], ids=["netns", "userns+netns"])
def test_pid_form_with_configure(unshare_flags):
    with (
        target_process(*unshare_flags) as pid,
        background_forwarder("--dns-upstream", "127.0.0.1:9", str(pid), "tap0", "-c") as (
            proc,
            log,
        ),
    ):
        wait_for(
            lambda: "default via 10.0.2.2" in in_target(pid, ["ip", "-4", "route"]).stdout,
            "the route from --configure",
            proc,
            log,
        )
        ping(lambda cmd: in_target(pid, cmd), "10.0.2.2")
        ping(lambda cmd: in_target(pid, cmd), "10.0.2.3")
        assert f"TAP:             tap0 in the network namespace of PID {pid}" in read_log(log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        # The TAP goes with the forwarder.
        assert in_target(pid, ["ip", "link", "show", "tap0"]).returncode != 0


@pytest.mark.e2e
def test_netns_type_path_with_userns_path_and_static_guest():
    with (
        target_process("-r", "-n") as pid,
        background_forwarder(
            "--netns-type=path",
            f"--userns-path=/proc/{pid}/ns/user",
            f"/proc/{pid}/ns/net",
            "guest1",
        ) as (proc, log),
    ):
        wait_for(
            lambda: in_target(pid, ["ip", "link", "show", "guest1"]).returncode == 0,
            "the TAP",
            proc,
            log,
        )
        for cmd in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "link", "set", "guest1", "up"],
            ["ip", "addr", "add", "10.0.2.50/24", "dev", "guest1"],
            ["ip", "route", "add", "default", "via", "10.0.2.2"],
        ):
            assert in_target(pid, cmd).returncode == 0
        ping(lambda cmd: in_target(pid, cmd), "10.0.2.2")
        ping(lambda cmd: in_target(pid, cmd), "10.0.2.3")


@pytest.mark.e2e
def test_pid_gone_is_one_line():
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=5)
    result = run_forwarder(str(proc.pid), "tap0")
    assert_one_line_error(result, f"/proc/{proc.pid}/ns/net: No such file or directory")


@pytest.mark.e2e
@pytest.mark.parametrize(
    "make_device",
    [
        ["ip", "link", "add", "tap0", "type", "bridge"],
        ["ip", "tuntap", "add", "tap0", "mode", "tun"],
    ],
    ids=["bridge", "tun-device"],
)
def test_tap_name_taken_by_another_device_or_forwarder(make_device):
    with target_process("-n") as pid:
        made = in_target(pid, make_device)
        assert made.returncode == 0, made.stderr
        result = run_forwarder(str(pid), "tap0", "-c")
        assert_one_line_error(result, "cannot create TAP tap0: ioctl(TUNSETIFF)", "taken")
        links = in_target(pid, ["ip", "-o", "link"]).stdout.splitlines()
        assert len(links) == 2  # lo and that device, nothing else
        # A TAP that a running forwarder holds is taken too.
        with background_forwarder(str(pid), "tap1") as (proc, log):
            wait_for(
                lambda: in_target(pid, ["ip", "link", "show", "tap1"]).returncode == 0,
                "the first forwarder's TAP",
                proc,
                log,
            )
            second = run_forwarder(str(pid), "tap1")
            assert_one_line_error(second, "Device or resource busy")
            assert proc.poll() is None
    assert_nothing_left()


@pytest.mark.e2e
def test_configure_failure_removes_the_tap():
    # The target already has a default route, so --configure cannot add one.
    with target_process("-n") as pid:
        for cmd in (
            ["ip", "link", "add", "br0", "type", "bridge"],
            ["ip", "link", "set", "br0", "up"],
            ["ip", "addr", "add", "192.168.77.1/24", "dev", "br0"],
            ["ip", "route", "add", "default", "via", "192.168.77.2"],
        ):
            assert in_target(pid, cmd).returncode == 0
        result = run_forwarder(str(pid), "tap0", "--configure")
        assert_one_line_error(
            result, "cannot configure the namespace: add default route via 10.0.2.2: File exists"
        )
        assert in_target(pid, ["ip", "link", "show", "tap0"]).returncode != 0
    assert_nothing_left()


# ------------------------------------------ an unprivileged user, e2e
UNPRIVILEGED_SCRIPT = r"""
set -eu
work=$1; py=$2; tun_mode=$3
# This mount namespace is the test's own: nothing below is seen outside.
mkdir "$work/dev"
mount -t tmpfs -o mode=755 none "$work/dev"
mknod "$work/dev/tun" c 10 200
chmod "$tun_mode" "$work/dev/tun"
mount --bind "$work/dev/tun" /dev/net/tun
""" + harness.PYTHON_UNDER_ROOT_SH + r"""touch "$work/net"
chown 65534:65534 "$work" "$work/net"
chmod 755 "$work"
exec setpriv --reuid=65534 --regid=65534 --clear-groups \
  unshare -rm --propagation private sh -c '
    set -u
    work=$1; py=$2
    "$py" -m forwarder --dns-upstream 127.0.0.1:9 "$work/net" >"$work/log" 2>&1 &
    pid=$!
    i=0
    while [ $i -lt 100 ]; do
        nsenter --net="$work/net" ip link show tap0 >/dev/null 2>&1 && break
        kill -0 $pid 2>/dev/null || break
        sleep 0.05; i=$((i+1))
    done
    if kill -0 $pid 2>/dev/null; then
        nsenter --net="$work/net" sh -c "ip link set tap0 up &&
            ip addr add 10.0.2.100/24 dev tap0 &&
            ip route add default via 10.0.2.2 &&
            ping -c 1 -W 2 10.0.2.2" >"$work/ping" 2>&1 || true
        kill -TERM $pid
    fi
    wait $pid; echo "forwarder-exit=$?"
    grep -c " $work/net " /proc/self/mountinfo || true
  ' sh "$work" "$py"
"""


def run_unprivileged(tun_mode: str) -> tuple[str, str, str]:
    """Run the PATH form as uid 65534 inside `unshare -rm`, with a private
    /dev/net/tun node of mode ``tun_mode``. Returns (output, log, ping)."""
    work = tempfile.mkdtemp(prefix="pyslirp-unpriv-")
    try:
        result = subprocess.run(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                UNPRIVILEGED_SCRIPT,
                "sh",
                work,
                sys.executable,
                tun_mode,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert result.returncode == 0, result.stdout + result.stderr

        def read(name):
            path = os.path.join(work, name)
            return Path(path).read_text() if os.path.exists(path) else ""

        return result.stdout, read("log"), read("ping")
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.e2e
def test_unprivileged_user_in_unshare_rm_with_usable_tun():
    output, log, ping_out = run_unprivileged("0666")
    assert "forwarder-exit=0" in output, output + log
    assert "1 received" in ping_out, ping_out + log
    assert output.strip().splitlines()[-1] == "0"  # no mount left on the ns file


@pytest.mark.e2e
def test_unprivileged_user_without_tun_access_fails_cleanly():
    output, log, _ = run_unprivileged("0600")
    assert "forwarder-exit=1" in output, output + log
    assert log.strip() == 'pyslirp-forwarder: open("/dev/net/tun"): Permission denied'
    assert output.strip().splitlines()[-1] == "0"


# ------------------- rootlesskit's form: a user who is not root, -c -6, the sandbox
ROOTLESS_SANDBOX_SCRIPT = r"""
set -eu
work=$1; py=$2; port=$3
mkdir "$work/dev"
mount -t tmpfs -o mode=755 none "$work/dev"
mknod "$work/dev/tun" c 10 200
chmod 0666 "$work/dev/tun"
mount --bind "$work/dev/tun" /dev/net/tun
""" + harness.PYTHON_UNDER_ROOT_SH + r"""chown 65534:65534 "$work"
chmod 755 "$work"
# As rootlesskit does it: the user makes a user and network namespace for the
# container, and runs the forwarder from outside, in its own user namespace.
exec setpriv --reuid=65534 --regid=65534 --clear-groups sh -c '
    set -u
    work=$1; py=$2; port=$3
    unshare -rn sleep 60 &
    target=$!
    i=0
    own=$(readlink /proc/self/ns/net)
    while [ "$(readlink /proc/$target/ns/net)" = "$own" ] && [ $i -lt 100 ]; do
        sleep 0.05; i=$((i+1))
    done
    "$py" -m forwarder -c -6 --enable-sandbox --enable-seccomp --dns-upstream 127.0.0.1:9 \
        -r 3 "$target" tap0 3>"$work/ready" >"$work/log" 2>&1 &
    fwd=$!
    i=0
    while [ ! -s "$work/ready" ] && kill -0 $fwd 2>/dev/null && [ $i -lt 400 ]; do
        sleep 0.05; i=$((i+1))
    done
    echo "ready=$(cat "$work/ready")"
    if kill -0 $fwd 2>/dev/null; then
        in_guest="nsenter -t $target -U -n --preserve-credentials"
        for address in 10.0.2.2 fd00::2; do
            $in_guest ping -c 1 -W 5 "$address" >>"$work/guest" 2>&1 &&
                echo "ping-ok $address"
            $in_guest "$py" -c "if 1:
                import socket, sys
                s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
                s.sendall(sys.argv[1].encode())
                s.close()
                print(\"tcp-ok\", sys.argv[1])" "$address" "$port" 2>>"$work/guest"
        done
        kill -TERM $fwd
    fi
    wait $fwd; echo "forwarder-exit=$?"
    kill $target; wait $target 2>/dev/null || true
  ' sh "$work" "$py" "$port"
"""


@pytest.mark.e2e
def test_rootless_configure_ipv6_sandbox_seccomp_as_rootlesskit_runs_it():
    """`-c -6 --enable-sandbox --enable-seccomp PID tap0` by a user who is not
    root: it joins the target's user namespace for the sandbox, which needs a
    process with one thread (the SLAAC watch must not start a timer thread),
    writes the ready fd once the guest did SLAAC, and serves IPv4 and IPv6."""
    import socket as socketlib

    work = tempfile.mkdtemp(prefix="pyslirp-rootless-")
    listeners = []
    for family, address in ((socketlib.AF_INET, "127.0.0.1"), (socketlib.AF_INET6, "::1")):
        sock = socketlib.socket(family, socketlib.SOCK_STREAM)
        sock.bind((address, listeners[0].getsockname()[1] if listeners else 0))
        sock.listen(4)
        listeners.append(sock)
    port = listeners[0].getsockname()[1]
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", ROOTLESS_SANDBOX_SCRIPT, "sh"]
        + [work, sys.executable, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=120)
        log = Path(work, "log").read_text() if Path(work, "log").exists() else ""
        guest = Path(work, "guest").read_text() if Path(work, "guest").exists() else ""
        context = output + log + guest
        assert proc.returncode == 0, context
        assert "ready=1" in output, context
        assert "seccomp: The following syscalls are blocked:" in log, context
        for address in ("10.0.2.2", "fd00::2"):
            assert f"ping-ok {address}" in output, context
            assert f"tcp-ok {address}" in output, context
        assert "forwarder-exit=0" in output, context
        # The guest's connections reached the host's loopback, each family's own.
        for sock, address in zip(listeners, ("10.0.2.2", "fd00::2")):
            sock.settimeout(5)
            conn, _ = sock.accept()
            with conn:
                conn.settimeout(5)
                assert conn.recv(100) == address.encode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        for sock in listeners:
            sock.close()
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------- the PATH form never goes through a link
def _mounted_at(path: str) -> bool:
    """A mount at ``path`` itself (not following a link there)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def test_path_that_is_a_symbolic_link_is_refused_and_nothing_is_mounted():
    work = Path(tempfile.mkdtemp(prefix="pyslirp-link-"))
    try:
        target = work / "precious"
        target.write_text("keep me\n")
        link = work / "net"
        link.symlink_to(target)
        result = run_forwarder("--dns-upstream", "127.0.0.1:9", str(link))
        assert_one_line_error(result, str(link), "symbolic link")
        assert not _mounted_at(str(target))
        assert target.read_text() == "keep me\n"
        assert link.is_symlink()
    finally:
        for path in (work / "precious", work / "net"):
            if _mounted_at(str(path)):
                subprocess.run(["umount", "-l", str(path)], check=False)
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("flags", [(), ("--enable-sandbox",)], ids=["plain", "sandbox-keeper"])
def test_path_replaced_by_a_link_while_running_is_not_unmounted_through_it(flags):
    """Someone (in another mount namespace) swaps PATH for a link to a file
    that has a mount of its own: at exit we unmount nothing through it (nor
    does the keeper that unmounts for us in the sandbox)."""
    work = Path(tempfile.mkdtemp(prefix="pyslirp-swap-"))
    ns_path, target, source = work / "net", work / "target", work / "source"
    for path in (ns_path, target, source):
        path.touch()
    source.write_text("mounted over the target\n")
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        args = ("--dns-upstream", "127.0.0.1:9", *flags, str(ns_path))
        with background_forwarder(*args) as (proc, log):
            wait_for(lambda: _mounted_at(str(ns_path)), "the namespace mount", proc, log)
            swap = subprocess.run(
                ["unshare", "-m", "--propagation", "private", "sh", "-c"]
                + ['umount -l "$1" && rm "$1" && ln -s "$2" "$1"', "sh", str(ns_path), str(target)],
                capture_output=True,
                text=True,
                timeout=15,
            )
            assert swap.returncode == 0, swap.stderr
            assert ns_path.is_symlink()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0, read_log(log)
            wait_for(lambda: "not unmounting" in read_log(log), "the keeper's word", timeout=10)
            output = read_log(log)
        assert _mounted_at(str(target)), output  # the target's own mount is still there
        assert target.read_text() == "mounted over the target\n"
        assert f"not unmounting {ns_path}: it is now a symbolic link" in output
    finally:
        if _mounted_at(str(target)):
            subprocess.run(["umount", "-l", str(target)], check=False)
        shutil.rmtree(work, ignore_errors=True)
