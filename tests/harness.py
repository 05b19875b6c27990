"""End-to-end harness: a real forwarder, a real namespace, real clients.

Every process, mount and file made here is removed on exit, also when the
test fails. Guest-side commands run with ``nsenter --net=PATH``.
"""

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# PYSLIRP_TEST_PYTHON=pypy3: the forwarders that harness.forwarder() starts
# run under that interpreter (the tests themselves stay on this one).
FORWARDER = [os.environ.get("PYSLIRP_TEST_PYTHON") or sys.executable, "-m", "forwarder"]
# The study tools (`pyslirp`), run from this checkout as the tests run the forwarder.
TOOLS = [sys.executable, "-m", "forwarder.tools"]
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def is_mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


class Forwarder:
    def __init__(self, ns_path: str, proc: subprocess.Popen, log_path: str) -> None:
        self.ns_path = ns_path
        self.proc = proc
        self.log_path = log_path
        self._background: list[subprocess.Popen] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def guest_cmd(self, cmd: list[str]) -> list[str]:
        return ["nsenter", f"--net={self.ns_path}", *cmd]

    def run(self, cmd: list[str], timeout: float = 30.0, check: bool = False, **kw):
        return subprocess.run(
            self.guest_cmd(cmd), capture_output=True, text=True, timeout=timeout, check=check, **kw
        )

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(self.guest_cmd(cmd), **kw)
        self._background.append(proc)
        return proc

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def socket_count(self) -> int:
        count = 0
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                if os.readlink(f"/proc/{self.pid}/fd/{name}").startswith("socket:"):
                    count += 1
            except OSError:
                pass
        return count

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text()
        except OSError:
            return ""

    def _stop_background(self) -> None:
        for proc in self._background:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _wait_for_tap(ns_path: str, tap: str, proc: subprocess.Popen, log_path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"forwarder exited with {proc.returncode}: {Path(log_path).read_text()}"
            )
        if is_mounted(ns_path):
            probe = subprocess.run(
                ["nsenter", f"--net={ns_path}", "ip", "link", "show", tap],
                capture_output=True,
                timeout=5,
            )
            if probe.returncode == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"forwarder did not start: {Path(log_path).read_text()}")


def configure_guest(
    fwd: Forwarder,
    address: str = "10.0.2.100/24",
    mtu: int | None = None,
    gateway: str = "10.0.2.2",
    tap: str = "tap0",
) -> None:
    cmds = [["ip", "link", "set", "lo", "up"], ["ip", "link", "set", tap, "up"]]
    if mtu:
        cmds.append(["ip", "link", "set", tap, "mtu", str(mtu)])
    cmds += [
        ["ip", "addr", "add", address, "dev", tap],
        ["ip", "route", "add", "default", "via", gateway],
    ]
    for cmd in cmds:
        fwd.run(cmd, timeout=10, check=True)



# The interpreter may live under /root, mode 0700 here: the unprivileged user
# gets a way through to it, in the calling mount namespace only.
PYTHON_UNDER_ROOT_SH = r"""case "$py" in /root/*)
    mkdir "$work/root"
    mount --bind /root "$work/root"
    mount -t tmpfs -o mode=755 none /root
    top=$(echo "$py" | cut -d/ -f3)
    mkdir "/root/$top"
    mount --bind "$work/root/$top" "/root/$top"
esac
"""

@contextlib.contextmanager
def forwarder(
    *extra_args: str,
    dns_upstreams=(),
    mtu: int | None = None,
    configure: bool = True,
    prefix: list[str] | None = None,
    env=None,
    expect_exit: int | None = 0,
):
    """Start the forwarder in its PATH form; yield a Forwarder.

    ``prefix`` wraps the command (e.g. ``["ip", "netns", "exec", NAME]`` to run
    the forwarder inside a test-made host namespace).
    """
    workdir = tempfile.mkdtemp(prefix="pyslirp-test-")
    ns_path = os.path.join(workdir, "net")
    Path(ns_path).touch()
    log_path = os.path.join(workdir, "forwarder.log")
    args = list(extra_args)
    for upstream in dns_upstreams:
        args += ["--dns-upstream", upstream]
    if mtu is not None:
        args += ["--mtu", str(mtu)]
    cmd = [*(prefix or []), *FORWARDER, *args, ns_path]
    log_file = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    fwd = Forwarder(ns_path, proc, log_path)
    try:
        _wait_for_tap(ns_path, "tap0", proc, log_path)
        if configure:
            configure_guest(fwd, mtu=mtu)
        yield fwd
    finally:
        fwd._stop_background()
        code = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        else:
            code = proc.returncode
        log_file.close()
        if is_mounted(ns_path):
            subprocess.run(["umount", "-l", ns_path], check=False)
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
    if expect_exit is not None:
        assert code == expect_exit, f"forwarder exited with {code}"


@contextlib.contextmanager
def netns(tag: str = "test"):
    """A named namespace ``pyslirp-TAG-XXXXXXXX`` (ip netns add) with lo up;
    on exit every process in it is killed and it is deleted."""
    name = f"pyslirp-{tag}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
    try:
        subprocess.run(
            ["ip", "-n", name, "link", "set", "lo", "up"],
            check=True,
            capture_output=True,
            timeout=10,
        )
        yield name
    finally:
        pids = subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


@contextlib.contextmanager
def this_thread_in(ns: str):
    """Run this thread in the named namespace ``ns`` (sockets made there stay there)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


@contextlib.contextmanager
def vm_forwarder(path: str, *args: str):
    """A forwarder serving a VM on the socket ``path`` (``--socket``, the DNS
    upstream a dead port, and ``args``), ready (its ``-r`` byte came): the
    Popen, stdout and stderr in one pipe. Killed at the end if it runs."""
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "forwarder", f"--socket={path}", "-r", str(write_fd),
         "--dns-upstream=127.0.0.1:9", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
    )  # fmt: skip
    os.close(write_fd)
    try:
        ready = select.select([read_fd], [], [], 30)[0] and os.read(read_fd, 1) == b"1"
        assert ready, proc.communicate(timeout=30)[0]
        yield proc
    finally:
        os.close(read_fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def __getattr__(name):
    if name == "DnsServer":  # written beside us in tests/dnsserver.py
        from tests.dnsserver import DnsServer

        return DnsServer
    raise AttributeError(name)


# PYSLIRP_TEST_NO_OFFLOAD=1: every forwarder the tests start runs with
# --no-offload (a plain TAP), so that the suite covers both TAP modes.
NO_OFFLOAD = os.environ.get("PYSLIRP_TEST_NO_OFFLOAD", "") not in ("", "0")
forwarder_as_asked = forwarder  # the forwarder with exactly the flags given (test_offload)


@contextlib.contextmanager
def forwarder(*extra_args: str, **kw):  # noqa: F811 - wraps the one above
    if NO_OFFLOAD:
        extra_args = ("--no-offload", *extra_args)
    with forwarder_as_asked(*extra_args, **kw) as fwd:
        yield fwd
