"""Run mode: pyslirp-forwarder [OPTION]... -- COMMAND [ARG]...

The one-line way to use pyslirp. A child process makes new namespaces (a
user namespace when we are not root, then mount and network), waits until
the forwarder has set up its TAP as with -c, bind-mounts a resolv.conf that
names the DNS proxy over /etc/resolv.conf (in its private mount namespace,
so nobody else sees it), and execs COMMAND. The forwarder attaches to the
child's network namespace exactly as ``PID TAPNAME`` would, serves until
COMMAND exits, and exits with COMMAND's status (128+N for signal N).

SIGINT and SIGTERM are passed on to COMMAND and the forwarder keeps serving
until COMMAND exits. Nothing is left behind: the namespaces die with their
last process, and the resolv.conf file is removed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import sys
import tempfile
import time

from pyslirp.backend import READ
from pyslirp.nat.compat import pidfd_open

from .errors import PROG, fail
from .libc import (
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWUSER,
    MNT_DETACH,
    MS_BIND,
    MS_PRIVATE,
    MS_REC,
    errno_text,
    libc,
)
from .namespace import ExistingNamespace
from .serve import serve

EXIT_SETUP_FAILED = 125  # as env(1) and container runtimes: our failure, not COMMAND's
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
STOP_GRACE = 1.0  # seconds COMMAND gets after SIGTERM when we must stop first


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _child(command, resolv_conf, to_parent: int, from_parent: int, uid: int, gid: int) -> None:
    """In the forked child: never returns."""
    try:
        lib = libc()
        flags = CLONE_NEWNS | CLONE_NEWNET
        if uid != 0:
            flags |= CLONE_NEWUSER
        if lib.unshare(flags) != 0:
            os.write(to_parent, f"unshare: {errno_text()}".encode())
            os._exit(EXIT_SETUP_FAILED)
        if uid != 0:
            # Root in the new user namespace is us outside it.
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"0 {uid} 1")
            _write("/proc/self/gid_map", f"0 {gid} 1")
        if lib.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            os.write(to_parent, f"cannot make / private: {errno_text()}".encode())
            os._exit(EXIT_SETUP_FAILED)
        os.write(to_parent, b"\0")
        os.close(to_parent)
        # Wait until the forwarder has configured the TAP (EOF: it failed).
        if os.read(from_parent, 1) != b"g":
            os._exit(EXIT_SETUP_FAILED)
        os.close(from_parent)
        if resolv_conf is not None:
            source, target = os.fsencode(resolv_conf), b"/etc/resolv.conf"
            result = lib.mount(source, target, None, MS_BIND, None)
            if result != 0 and ctypes.get_errno() == errno.ENOENT:
                # The file there is itself a bind mount of a deleted file
                # (as in a sandbox): a mount cannot go on top of it, but in
                # this private namespace it can go away first.
                lib.umount2(target, MNT_DETACH)
                result = lib.mount(source, target, None, MS_BIND, None)
            if result != 0:
                print(
                    f"{PROG}: warning: cannot bind-mount {resolv_conf} on "
                    f"/etc/resolv.conf: {errno_text()}",
                    file=sys.stderr,
                    flush=True,
                )
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvp(command[0], command)
        except OSError as exc:
            print(f"{PROG}: {command[0]}: {exc.strerror}", file=sys.stderr, flush=True)
            os._exit(EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_NOT_EXECUTABLE)
    except BaseException as exc:  # noqa: BLE001 - must not escape a forked child
        try:
            print(f"{PROG}: run mode: {exc!r}", file=sys.stderr, flush=True)
        finally:
            os._exit(EXIT_SETUP_FAILED)


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def run_command(options) -> int:
    config = options.config
    workdir = tempfile.mkdtemp(prefix="pyslirp-run-")
    resolv_conf = None
    if not config.disable_dns:
        resolv_conf = os.path.join(workdir, "resolv.conf")
        servers = f"nameserver {config.dns}\n"
        if config.enable_ipv6:
            servers += f"nameserver {config.ipv6_dns}\n"
        _write(resolv_conf, servers)
        os.chmod(workdir, 0o755)
        os.chmod(resolv_conf, 0o644)
    child_r, to_parent = os.pipe2(os.O_CLOEXEC)
    from_parent, parent_w = os.pipe2(os.O_CLOEXEC)
    uid, gid = os.geteuid(), os.getegid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(child_r)
        os.close(parent_w)
        _child(options.command, resolv_conf, to_parent, from_parent, uid, gid)
    os.close(to_parent)
    os.close(from_parent)
    status = None
    pidfd = -1
    try:
        message = os.read(child_r, 4096)
        os.close(child_r)
        child_r = -1
        if message != b"\0":
            _, status = os.waitpid(pid, 0)
            text = message.decode(errors="replace") or "the command's namespaces failed"
            fail(f"run mode: {text}")
            return EXIT_SETUP_FAILED
        options.target = ExistingNamespace(
            f"/proc/{pid}/ns/net", f"/proc/{pid}/ns/user" if uid != 0 else None
        )
        pidfd = pidfd_open(pid)

        def on_signal(signum: int) -> bool:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                return False
            return True  # keep serving until COMMAND exits

        def on_ready(backend, request_stop) -> None:
            def command_exited(mask: int, now: float) -> None:
                backend.unregister(pidfd)
                request_stop()

            backend.register(pidfd, READ, command_exited)
            os.write(parent_w, b"g")

        code = serve(options, on_signal=on_signal, on_ready=on_ready)
        os.close(parent_w)
        parent_w = -1
        _, status = _reap(pid)
        if code != 0:
            return code if code != 1 else EXIT_SETUP_FAILED
        return _exit_code(status)
    finally:
        for fd in (child_r, parent_w, pidfd):
            if fd >= 0:
                os.close(fd)
        if status is None:
            _reap(pid)
        shutil.rmtree(workdir, ignore_errors=True)


def _reap(pid: int):
    """Wait for COMMAND; if it is still running (we stopped first), SIGTERM,
    then SIGKILL after STOP_GRACE."""
    got, status = os.waitpid(pid, os.WNOHANG)
    if got:
        return got, status
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return got, status
        time.sleep(0.01)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return os.waitpid(pid, 0)
