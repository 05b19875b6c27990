"""pyslirp/link.py, a VM's frames over a UNIX stream socket (QEMU's -netdev
stream framing), in process with a real socket as the VM; and the
forwarder's --socket options (no QEMU needed)."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import pytest

from pyslirp.link import HEADER_LEN, Link, LinkLimits, open_link
from pyslirp.tap import MAX_FRAME
from tests import harness

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 10.0  # seconds for anything the kernel should do at once


def framed(*frames: bytes) -> bytes:
    return b"".join(struct.pack("!I", len(f)) + f for f in frames)


def frames_of(link: Link, want: int) -> list:
    """read_frames until ``want`` frames came (bounded in time)."""
    got: list = []
    deadline = time.monotonic() + WAIT
    while len(got) < want and time.monotonic() < deadline:
        if select.select([link.fd], [], [], 0.5)[0]:
            got += link.read_frames()
    return got


def settle(link: Link, until) -> None:
    """read_frames until ``until()`` holds (bounded in time)."""
    deadline = time.monotonic() + WAIT
    while not until():
        assert time.monotonic() < deadline, link.counters
        if select.select([link.fd], [], [], 0.5)[0]:
            link.read_frames()


@pytest.fixture
def link(tmp_path):
    link = open_link(str(tmp_path / "vm.sock"))
    left = []
    link.on_disconnect = lambda: left.append(1)
    link.left = left
    try:
        yield link
    finally:
        link.close()


def connect(link: Link) -> socket.socket:
    vm = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    vm.settimeout(WAIT)
    vm.connect(link.path)
    settle(link, lambda: link.connected)
    return vm


def read_framed(vm: socket.socket, count: int) -> list:
    """``count`` frames from the VM's side of the socket."""
    data = b""
    frames = []
    while len(frames) < count:
        while len(data) >= HEADER_LEN:
            (length,) = struct.unpack_from("!I", data)
            if len(data) < HEADER_LEN + length:
                break
            frames.append(data[HEADER_LEN : HEADER_LEN + length])
            data = data[HEADER_LEN + length :]
        if len(frames) >= count:
            break
        chunk = vm.recv(1 << 20)
        assert chunk, "EOF"
        data += chunk
    assert data == b""
    return frames


def test_socket_file_is_private_and_removed(link):
    assert os.stat(link.path).st_mode & 0o777 == 0o600
    path = link.path
    link.close()
    assert not os.path.exists(path)


def test_frames_both_ways_batched_and_split(link):
    vm = connect(link)
    frames = [bytes([n]) * size for n, size in enumerate((60, 1514, 65536 + 14, 42), 1)]
    data = framed(*frames)
    # In pieces that cut a header and a frame in two, read as they come.
    got = []
    for piece in (data[:2], data[2:100], data[100:70000], data[70000:]):
        view = memoryview(piece)
        while view:
            view = view[vm.send(view) :]
            time.sleep(0.01)
            got += link.read_frames()
    got += frames_of(link, 4 - len(got))
    assert got == frames
    link.write_frames([b"a" * 60, memoryview(b"b" * 1514)])
    assert read_framed(vm, 2) == [b"a" * 60, b"b" * 1514]
    assert link.counters["link-frames-in"] == 4 and link.counters["link-frames-out"] == 2
    vm.close()


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1, 0xFFFFFFFF])
def test_bad_length_drops_the_connection(link, length):
    vm = connect(link)
    vm.sendall(framed(b"x" * 60) + struct.pack("!I", length) + b"y" * 100)
    settle(link, lambda: not link.connected)
    assert link.counters["link-bad-length"] == 1
    assert link.left == [1]
    assert vm.recv(10) == b""  # the VM sees its connection closed
    vm.close()
    # ... and the next VM is served.
    again = connect(link)
    again.sendall(framed(b"z" * 60))
    assert frames_of(link, 1) == [b"z" * 60]
    again.close()


def test_hang_up_inside_a_frame_is_counted(link):
    vm = connect(link)
    vm.sendall(framed(b"x" * 100)[:50])
    vm.close()
    settle(link, lambda: not link.connected)
    assert link.counters["link-partial-frame"] == 1
    assert link.counters["link-disconnected"] == 1


def test_a_vm_that_stops_reading_gets_a_bounded_queue(tmp_path):
    limits = LinkLimits(write_bytes=256 * 1024)
    link = open_link(str(tmp_path / "vm.sock"), limits=limits)
    try:
        vm = connect(link)
        frame = bytes(range(256)) * 256  # 64 KiB
        sent = 0
        for _ in range(100):  # 6.4 MB, far past the socket buffer and the queue
            link.write_frames([frame])
            link.read_frames()
            sent += 1
            assert link.queued_bytes <= limits.write_bytes + len(frame) + HEADER_LEN
        dropped = link.counters["link-write-dropped"]
        assert dropped > 0
        # The VM reads again: what was kept comes whole and in order.
        vm.setblocking(False)
        data = b""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and len(data) < (sent - dropped) * (len(frame) + 4):
            if select.select([link.fd], [], [], 0.01)[0]:
                link.read_frames()
            try:
                data += vm.recv(1 << 20)
            except BlockingIOError:
                pass
        assert len(data) == (sent - dropped) * (len(frame) + HEADER_LEN)
        assert data == framed(*[frame] * (sent - dropped))
        vm.close()
    finally:
        link.close()


def forwarder(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "forwarder", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--socket=/tmp/x.sock", "/run/netns/x"], "--socket cannot be combined with PATH"),
        (["--socket=/tmp/x.sock", "-c"], "--socket cannot be combined with --netns-type"),
        (["--socket=/tmp/x.sock", "--socket-type=seqpacket"], "invalid --socket-type"),
        (["--one-off", "/run/netns/x"], "--socket-type and --one-off need --socket"),
        ([f"--socket=/tmp/{'x' * 120}"], "socket path is empty or too long"),
    ],
)
def test_bad_socket_options(args, message):
    result = forwarder(*args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyslirp-forwarder: ") and message in lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_request(path: str, request: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(WAIT)
        client.connect(path)
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := client.recv(65536):
            data += chunk
    return json.loads(data)


def test_one_off_exits_when_the_vm_leaves(tmp_path):
    """--one-off, with -p (to the VM's DHCP address), the API socket and
    --pcap (which holds the VM's frame)."""
    path = str(tmp_path / "vm.sock")
    api, pcap = str(tmp_path / "api.sock"), str(tmp_path / "vm.pcap")
    args = ("--one-off", "-a", api, f"--pcap={pcap}", "-p", f"127.0.0.1:{free_port()}:80")
    with harness.vm_forwarder(path, *args) as proc:
        assert os.stat(path).st_mode & 0o777 == 0o600
        entries = api_request(api, b'{"execute": "list_hostfwd"}')["entries"]
        assert [e["guest_addr"] for e in entries] == ["10.0.2.15"]
        vm = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        vm.connect(path)
        vm.sendall(framed(b"\xff" * 60))  # a runt broadcast frame: dropped by the stack
        vm.close()
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert f"addr.path={path}" in out.decode()  # the QEMU options were printed
        assert not os.path.exists(path) and not os.path.exists(api)
        with open(pcap, "rb") as f:
            assert f.read()[24 + 16 :] == b"\xff" * 60  # header, one record


def test_dgram_one_frame_per_datagram(tmp_path):
    link = open_link(str(tmp_path / "vm.sock"), "dgram")
    left = []
    link.on_disconnect = lambda: left.append(1)
    vm = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        assert os.stat(link.path).st_mode & 0o777 == 0o600
        vm.bind(str(tmp_path / "qemu.sock"))
        vm.settimeout(WAIT)
        frames = [b"a" * 60, b"b" * 1514, b"c" * (65536 + 14)]
        got = []
        for frame in frames:  # one at a time: the socket queues little
            vm.sendto(frame, link.path)
            got += frames_of(link, 1)
        assert got == frames
        vm.sendto(b"", link.path)  # empty: counted, dropped
        settle(link, lambda: link.counters["link-bad-length"] == 1)
        link.write_frames([b"x" * 60, b"y" * 9000])
        assert [vm.recv(70000) for _ in range(2)] == [b"x" * 60, b"y" * 9000]
        vm.close()  # QEMU went away: the next write finds no socket
        os.unlink(str(tmp_path / "qemu.sock"))
        link.write_frames([b"z" * 60])
        assert left == [1] and not link.connected
    finally:
        vm.close()
        link.close()
    assert not os.path.exists(str(tmp_path / "vm.sock"))


def test_sandbox_still_removes_the_socket_file(tmp_path):
    """--enable-sandbox (as root: pivot_root into an empty root) with
    --socket: a keeper process removes the socket file at exit."""
    path = str(tmp_path / "vm.sock")
    with harness.vm_forwarder(path, "--one-off", "--enable-sandbox") as proc:
        vm = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        vm.connect(path)
        vm.sendall(framed(b"\xff" * 60))
        vm.close()
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert not os.path.exists(path)


def test_a_stale_socket_file_is_replaced_a_live_one_is_not(tmp_path):
    path = str(tmp_path / "vm.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, no one listens: a killed forwarder's
    link = open_link(path)
    try:
        with pytest.raises(OSError) as info:
            open_link(path)  # the first one serves it
        assert info.value.errno == errno.EADDRINUSE
        assert link.counters["link-connected"] == 0
    finally:
        link.close()


# ---------------------------------- --enable-sandbox by a user who is not root
UNPRIVILEGED_SANDBOX_SCRIPT = r"""
set -eu
work=$1; py=$2; ready_fd=$3
""" + harness.PYTHON_UNDER_ROOT_SH + r"""chown 65534:65534 "$work"
chmod 755 "$work"
exec setpriv --reuid=65534 --regid=65534 --clear-groups "$py" -m forwarder \
    --socket="$work/vm.sock" --one-off --enable-sandbox --enable-seccomp \
    --dns-upstream=127.0.0.1:9 -r "$ready_fd"
"""
# Runs "$@" as root in a user namespace (uids and gids 0-65535 as outside)
# where no further user namespace may be made, as on a kernel that refuses
# them to unprivileged users. The first shell is exec'ed before its maps
# exist and so holds no capability: a second exec takes them back.
NO_MORE_USER_NAMESPACES_SCRIPT = r"""
set -eu
unshare -U sh -c '
    i=0
    while [ -z "$(cat /proc/self/gid_map)" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
    exec sh -c "echo 0 >/proc/sys/user/max_user_namespaces && exec \"\$@\"" sh "$@"
' sh "$@" &
child=$!
own=$(readlink /proc/self/ns/user)
i=0
while [ "$(readlink /proc/$child/ns/user)" = "$own" ] && [ $i -lt 200 ]; do
    sleep 0.05; i=$((i+1))
done
echo "0 0 65536" >/proc/$child/uid_map
echo "0 0 65536" >/proc/$child/gid_map
wait $child
"""
GUEST_MAC = bytes.fromhex("525400123456")


def arp_request(target: str) -> bytes:
    """Who has ``target``? Asked by GUEST_MAC at 10.0.2.15."""
    return (
        b"\xff" * 6 + GUEST_MAC + b"\x08\x06"
        + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
        + GUEST_MAC + socket.inet_aton("10.0.2.15") + b"\x00" * 6 + socket.inet_aton(target)
    )  # fmt: skip


def proc_status(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def forwarder_pid(proc: subprocess.Popen, wrapped: bool) -> int:
    """The forwarder's PID: ``proc`` itself (a chain of execs), or, behind
    NO_MORE_USER_NAMESPACES_SCRIPT, that shell's one child (also execs)."""
    if not wrapped:
        return proc.pid
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        (child,) = f.read().split()
    return int(child)


@pytest.mark.e2e
@pytest.mark.parametrize("user_namespaces", ["allowed", "refused"])
def test_unprivileged_sandbox_with_no_namespace_to_join(user_namespaces):
    """--socket --enable-sandbox --enable-seccomp as uid 65534. With no
    namespace to join, the forwarder makes a user namespace of its own and
    the same empty root; where user namespaces are refused it says so in
    one line and keeps the rest (no capability, no new privileges,
    seccomp). Either way the VM's ARP request is answered through the
    socket made before, and when the VM leaves (--one-off) the forwarder
    exits 0 and its keeper removes the socket file."""
    allowed = user_namespaces == "allowed"
    # Not under tmp_path: pytest makes that 0700, out of the user's reach.
    work = pathlib.Path(tempfile.mkdtemp(prefix="pyslirp-vmsb-"))
    path = str(work / "vm.sock")
    read_fd, write_fd = os.pipe()
    command = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               UNPRIVILEGED_SANDBOX_SCRIPT, "sh", str(work), sys.executable, str(write_fd)]
    if not allowed:
        command = ["sh", "-c", NO_MORE_USER_NAMESPACES_SCRIPT, "sh", *command]
    proc = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        pass_fds=(write_fd,), env={**os.environ, "PYTHONPATH": REPO}, start_new_session=True,
    )  # fmt: skip
    os.close(write_fd)
    vm = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        ready = select.select([read_fd], [], [], 30)[0] and os.read(read_fd, 1) == b"1"
        assert ready, proc.communicate(timeout=30)[0]
        pid = forwarder_pid(proc, wrapped=not allowed)
        status = proc_status(pid)
        assert status["Uid"].split()[:2] == ["65534", "65534"]
        with open(f"/proc/{pid}/uid_map") as f:
            uid_map = f.read().split()
        if allowed:
            # Its own user namespace, its own ids in it, an empty root, and
            # not a capability left, even in the bounding set.
            assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
            assert uid_map == ["65534", "65534", "1"]
            assert sorted(os.listdir(f"/proc/{pid}/root")) == ["etc", "run"]
            assert int(status["CapBnd"], 16) == 0
        else:
            assert uid_map == ["0", "0", "65536"]  # still the wrapper's namespace
            assert "etc" in os.listdir(f"/proc/{pid}/root") and "usr" in os.listdir(
                f"/proc/{pid}/root"
            )
        for field in ("CapPrm", "CapEff", "CapAmb"):
            assert int(status[field], 16) == 0, (field, status[field])
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
        # The listening socket made before still serves the VM.
        vm.settimeout(WAIT)
        vm.connect(path)
        vm.sendall(framed(arp_request("10.0.2.2")))
        (reply,) = read_framed(vm, 1)
        assert reply[:6] == GUEST_MAC and reply[12:14] == b"\x08\x06"
        assert struct.unpack_from("!H", reply, 20)[0] == 2  # an ARP reply
        assert reply[28:32] == socket.inet_aton("10.0.2.2")  # from the gateway
        assert reply[32:38] == GUEST_MAC and reply[38:42] == socket.inet_aton("10.0.2.15")
        vm.close()
        out = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == 0, out
        warnings = [line for line in out.splitlines() if line.startswith("WARNING: sandbox")]
        if allowed:
            assert warnings == [], out
        else:
            assert warnings == [
                "WARNING: sandbox: cannot unshare new user namespace: No space left on device: "
                "the mount namespace (empty read-only root) is skipped; no new privileges and "
                "no capabilities still apply"
            ], out
        assert "seccomp: The following syscalls are blocked:" in out
        # The keeper (forked before, as the same user) removed the file.
        deadline = time.monotonic() + WAIT
        while os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(path)
    finally:
        vm.close()
        os.close(read_fd)
        if proc.poll() is None:  # the forwarder, its keeper and any wrapper
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
