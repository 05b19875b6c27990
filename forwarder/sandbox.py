"""--enable-sandbox and --enable-seccomp, as slirp4netns does them, in Python.

Sandbox (slirp4netns's sandbox.c, same steps): a new mount namespace whose
root is an empty read-only tmpfs holding only /etc and /run, bound read-only
(so /etc/resolv.conf stays readable), then no new privileges and every
capability dropped except CAP_NET_BIND_SERVICE (so forwards can still take
ports below 1024). Everything the process will import must be imported
before: after pivot_root the Python library is gone.

Seccomp (slirp4netns's seccompfilter_rules.h, same list): a classic BPF
filter, built here and loaded with seccomp(2) on every thread, that lets
every system call through except execve, ptrace, mount, setns, unshare,
reboot, module loading and the rest of that list, which kill the process.
Calls of another ABI (i386, x32) kill it too. Only x86_64 and aarch64 are
known here; elsewhere --enable-seccomp is an error, never a silent no-op.

A user who is not root has no right to make a mount namespace. In the
namespace forms the sandbox first joins the target's user namespace (as
slirp4netns does); with --socket there is no target, so the sandbox makes
a user namespace of its own (the user's uid and gid mapped to themselves),
which gives it those rights over a mount namespace of its own, and then
builds the same root. Where the kernel refuses that (unprivileged user
namespaces turned off), what needs no rights is still done: no new
privileges, every capability dropped, and one warning names what was
skipped.

Both are one-way, so the things that must happen at exit and need mount
rights (unmounting the namespace file, removing the API socket) are handed
to a small "keeper" process forked before: it waits for our end of a pipe
to close (also when we are killed), does them, and exits.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import signal
import struct
import sys
import time

from .libc import (
    CLONE_NEWNS,
    CLONE_NEWUSER,
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    MS_SLAVE,
    libc,
)
from .namespace import unmount_if_ours

# <linux/prctl.h>, <linux/capability.h>
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_NET_BIND_SERVICE = 10
LINUX_CAPABILITY_VERSION_3 = 0x20080522

# <linux/seccomp.h>, <linux/filter.h>, <linux/audit.h>
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_ALLOW = 0x7FFF0000
BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K
SECCOMP_DATA_NR = 0  # offsetof(struct seccomp_data, nr)
SECCOMP_DATA_ARCH = 4  # offsetof(struct seccomp_data, arch)
X32_SYSCALL_BIT = 0x40000000
_SOCK_FILTER = struct.Struct("=HBBI")

# The system calls slirp4netns blocks (its seccompfilter_rules.h, by group).
BLOCKED = (
    "execve",
    "lookup_dcookie",
    "pidfd_getfd",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "delete_module",
    "finit_module",
    "init_module",
    "chroot",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "mount",
    "move_mount",
    "open_tree",
    "pivot_root",
    "umount",
    "umount2",
    "open_by_handle_at",
    "execveat",
    "pidfd_open",
    "pidfd_send_signal",
    "prctl",
    "setns",
    "unshare",
    "kexec_file_load",
    "kexec_load",
    "reboot",
    "name_to_handle_at",
)

# Numbers from <asm/unistd_64.h> (x86_64) and <asm-generic/unistd.h>
# (aarch64). A name missing from a table does not exist there (umount).
_X86_64 = {
    "execve": 59,
    "lookup_dcookie": 212,
    "pidfd_getfd": 438,
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "delete_module": 176,
    "finit_module": 313,
    "init_module": 175,
    "chroot": 161,
    "fsconfig": 431,
    "fsmount": 432,
    "fsopen": 430,
    "fspick": 433,
    "mount": 165,
    "move_mount": 429,
    "open_tree": 428,
    "pivot_root": 155,
    "umount2": 166,
    "open_by_handle_at": 304,
    "execveat": 322,
    "pidfd_open": 434,
    "pidfd_send_signal": 424,
    "prctl": 157,
    "setns": 308,
    "unshare": 272,
    "kexec_file_load": 320,
    "kexec_load": 246,
    "reboot": 169,
    "name_to_handle_at": 303,
    "seccomp": 317,
}
_AARCH64 = {
    "execve": 221,
    "lookup_dcookie": 18,
    "pidfd_getfd": 438,
    "ptrace": 117,
    "process_vm_readv": 270,
    "process_vm_writev": 271,
    "delete_module": 106,
    "finit_module": 273,
    "init_module": 105,
    "chroot": 51,
    "fsconfig": 431,
    "fsmount": 432,
    "fsopen": 430,
    "fspick": 433,
    "mount": 40,
    "move_mount": 429,
    "open_tree": 428,
    "pivot_root": 41,
    "umount2": 39,
    "open_by_handle_at": 265,
    "execveat": 281,
    "pidfd_open": 434,
    "pidfd_send_signal": 424,
    "prctl": 167,
    "setns": 268,
    "unshare": 97,
    "kexec_file_load": 294,
    "kexec_load": 104,
    "reboot": 142,
    "name_to_handle_at": 264,
    "seccomp": 277,
}
# machine -> (AUDIT_ARCH_*, table, whether x32 calls share the arch value)
ARCHES = {
    "x86_64": (0xC000003E, _X86_64, True),
    "aarch64": (0xC00000B7, _AARCH64, False),
}


class SandboxError(Exception):
    """One line for the user."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _fail(what: str) -> None:
    err = ctypes.get_errno()
    raise SandboxError(f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None) -> int:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    return libc().mount(enc(source), enc(target), enc(fstype), flags, enc(data))


# ------------------------------------------------------------------ sandbox
def resolv_conf_warning() -> str | None:
    """slirp4netns's warning for a resolv.conf that the sandbox will hide."""
    path = os.path.realpath("/etc/resolv.conf")
    if not (path.startswith("/etc") or path.startswith("/run")):
        return (
            f"sandbox: /etc/resolv.conf (-> {path}) seems a symlink to a file "
            "outside {/etc, /run}. DNS will not work."
        )
    return None


def join_user_namespace(userns_path: str) -> None:
    """As slirp4netns does for a user that is not root: enter the target's
    user namespace (where we are root) so that the sandbox may be made."""
    try:
        fd = os.open(userns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SandboxError(f"{userns_path}: {exc.strerror}") from None
    try:
        if libc().setns(fd, CLONE_NEWUSER) != 0:
            _fail("setns(CLONE_NEWUSER)")
    finally:
        os.close(fd)
    try:
        os.setegid(0)
        os.seteuid(0)
    except OSError as exc:
        raise SandboxError(f"seteuid(0): {exc.strerror}") from None


def _bind_read_only(source: str, target: str) -> None:
    if _mount(None, source, None, MS_SLAVE | MS_REC) != 0 and ctypes.get_errno() != errno.EINVAL:
        _fail(f"cannot make mount propagation slave {source}")
    flags = MS_BIND | MS_REC | MS_SLAVE | MS_NOSUID | MS_NODEV | MS_NOEXEC
    if _mount(source, target, None, flags) != 0:
        _fail(f"cannot bind mount {source} to {target}")
    if _mount(None, target, None, MS_SLAVE | MS_REC) != 0:
        _fail(f"cannot make mount propagation slave {target}")
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    if _mount(source, target, None, flags) != 0:
        _fail(f"cannot remount ro {target}")


def create_sandbox() -> None:
    """Enter the sandbox (one way). Raises SandboxError."""
    if libc().unshare(CLONE_NEWNS) != 0:
        _fail("cannot unshare new mount namespace")
    _enter_empty_root()
    drop_capabilities()


def create_own_sandbox() -> str | None:
    """The sandbox for a user who is not root and has no namespace to join
    (--socket): a user namespace of our own, then the same mount namespace
    and empty root, no new privileges, capabilities dropped. Where the
    kernel refuses the user or the mount namespace, only what needs no
    rights is done; the warning line that says so is returned (else None).
    Needs a process with one thread. Raises SandboxError."""
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        # The kernel refuses CLONE_NEWUSER to a process with threads (EINVAL):
        # our fault, not the kernel's, so an error rather than a warning.
        raise SandboxError(f"cannot unshare new user namespace: the process has {threads} threads")
    try:
        make_user_namespace()
        if libc().unshare(CLONE_NEWNS) != 0:
            _fail("cannot unshare new mount namespace")
    except SandboxError as exc:
        drop_every_capability()
        return (
            f"WARNING: sandbox: {exc}: the mount namespace (empty read-only root) is "
            "skipped; no new privileges and no capabilities still apply"
        )
    _enter_empty_root()
    # CAP_NET_BIND_SERVICE in our own user namespace would open no port
    # below 1024 of the host's network namespace: it goes too.
    drop_every_capability()
    return None


def make_user_namespace() -> None:
    """unshare(CLONE_NEWUSER) with our uid and gid mapped to themselves
    (setgroups denied, as the kernel asks of an unprivileged map): in it
    we hold every capability over the namespaces we make next, and none
    over anything else. Host files, sockets and descriptors already open
    are untouched (their owners are the same kernel ids)."""
    uid, gid = os.geteuid(), os.getegid()
    if libc().unshare(CLONE_NEWUSER) != 0:
        _fail("cannot unshare new user namespace")
    maps = (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1"))
    for name, text in maps:
        try:
            fd = os.open(f"/proc/self/{name}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise SandboxError(f"cannot write /proc/self/{name}: {exc.strerror}") from None


def _no_new_privileges():
    """No new privileges and no ambient capability (the start of both
    drops below); the C library, for what follows."""
    lib = libc()
    if lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _fail("prctl(PR_SET_NO_NEW_PRIVS)")
    if lib.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        _fail("prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    return lib


def drop_every_capability() -> None:
    """No new privileges (no set-user-ID or file-capability program can
    give any back) and no ambient, permitted or effective capability. The
    bounding set is emptied where we may (CAP_SETPCAP, which an
    unprivileged process lacks outside a user namespace of its own); with
    no new privileges nothing could be raised from it anyway."""
    lib = _no_new_privileges()
    cap = 0
    while lib.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1  # stops at EPERM (no CAP_SETPCAP) or EINVAL (past the last)
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)((0, 0, 0), (0, 0, 0))
    lib.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
    if lib.capset(ctypes.byref(header), data) != 0:
        _fail("capset")


def _enter_empty_root() -> None:
    """In a new mount namespace: pivot_root into an empty tmpfs holding
    /etc and /run bound read-only, the old root detached."""
    lib = libc()
    if _mount(None, "/", None, MS_PRIVATE | MS_REC) != 0:
        _fail("cannot remount / private")
    if _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=1k") != 0:
        _fail("cannot mount tmpfs on /tmp")
    for name in ("etc", "old", "run"):
        try:
            os.mkdir(f"/tmp/{name}", 0o755)
        except OSError as exc:
            raise SandboxError(f"cannot mkdir /{name}: {exc.strerror}") from None
    _bind_read_only("/etc", "/tmp/etc")
    _bind_read_only("/run", "/tmp/run")
    os.chdir("/tmp")
    nr = _syscall_number("pivot_root")
    if lib.syscall(nr, b".", b"old") != 0:
        _fail("cannot pivot_root to /tmp")
    os.chdir("/")
    if lib.umount2(b"/old", MNT_DETACH) != 0:
        _fail("cannot umount /old")
    os.rmdir("/old")
    # slirp4netns treats a failure here as negligible, and so do we.
    _mount("tmpfs", "/", "tmpfs", MS_REMOUNT | MS_RDONLY, "size=0k")


def drop_capabilities() -> None:
    """No new privileges; every capability but CAP_NET_BIND_SERVICE gone."""
    lib = _no_new_privileges()
    cap = 0
    while True:
        if cap != CAP_NET_BIND_SERVICE and lib.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            if ctypes.get_errno() == errno.EINVAL:
                break  # past the last capability the kernel knows
            _fail("prctl(PR_CAPBSET_DROP)")
        cap += 1
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    bit = 1 << CAP_NET_BIND_SERVICE
    data = (_CapData * 2)((bit, bit, bit), (0, 0, 0))
    lib.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
    if lib.capset(ctypes.byref(header), data) != 0:
        _fail("capset")


# ------------------------------------------------------------------ seccomp
def seccomp_arch() -> tuple:
    """This machine's entry in ARCHES: (AUDIT_ARCH_*, system call numbers,
    whether x32 calls share the arch value). SandboxError where the table
    is not known (the command line checks it before anything is set up)."""
    machine = platform.machine()
    arch = ARCHES.get(machine)
    if arch is None:
        raise SandboxError(
            f"--enable-seccomp: the system call table of {machine} is not known "
            f"(known: {', '.join(ARCHES)})"
        )
    return arch


def _syscall_number(name: str) -> int:
    return seccomp_arch()[1][name]


def build_filter(audit_arch: int, table: dict, x32: bool, kill_action: int):
    """The BPF program (bytes) and the names it blocks."""
    blocked = [name for name in BLOCKED if name in table]
    prog = [
        (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH),
        (BPF_JEQ_K, 0, None, audit_arch),  # another ABI: kill
        (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
    ]
    if x32:
        prog.append((BPF_JGE_K, None, 0, X32_SYSCALL_BIT))  # x32 calls: kill
    for name in blocked:
        prog.append((BPF_JEQ_K, None, 0, table[name]))
    prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    kill_at = len(prog)
    prog.append((BPF_RET_K, 0, 0, kill_action))
    out = []
    for index, (code, jt, jf, k) in enumerate(prog):
        # None marks "jump to the kill instruction"; offsets are relative.
        jt = kill_at - index - 1 if jt is None else jt
        jf = kill_at - index - 1 if jf is None else jf
        out.append(_SOCK_FILTER.pack(code, jt, jf, k))
    return b"".join(out), blocked


def _kill_action(nr_seccomp: int) -> int:
    action = ctypes.c_uint32(SECCOMP_RET_KILL_PROCESS)
    result = libc().syscall(nr_seccomp, SECCOMP_GET_ACTION_AVAIL, 0, ctypes.byref(action))
    return SECCOMP_RET_KILL_PROCESS if result == 0 else SECCOMP_RET_KILL_THREAD


def enable_seccomp() -> list[str]:
    """Load the filter on every thread of the process; the names blocked."""
    audit_arch, table, x32 = seccomp_arch()
    nr_seccomp = table["seccomp"]
    program, blocked = build_filter(audit_arch, table, x32, _kill_action(nr_seccomp))
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // _SOCK_FILTER.size, ctypes.addressof(buffer))
    lib = libc()
    if lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _fail("seccomp: prctl(PR_SET_NO_NEW_PRIVS)")
    result = lib.syscall(
        nr_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, ctypes.byref(fprog)
    )
    if result != 0:
        if result > 0:
            raise SandboxError(f"seccomp: thread {result} could not be synchronised")
        _fail("seccomp: seccomp(SECCOMP_SET_MODE_FILTER)")
    return blocked


# ------------------------------------------------------------------ keeper
class Keeper:
    """A process that outlives our privileges: at our exit (or death) it
    unmounts ``unmount`` (path, (device, inode) of the namespace mounted
    there) if that is still what is mounted there, and removes ``remove``
    (path, (device, inode)) if it is still the file it was."""

    def __init__(self, unmount: tuple | None, remove: tuple | None) -> None:
        self.pid = 0
        self._w = -1
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(write_fd)
            _keeper_main(read_fd, unmount, remove)
        os.close(read_fd)
        self.pid = pid
        self._w = write_fd

    def finish(self, timeout: float = 5.0) -> None:
        """Let it do its work and wait for it (bounded)."""
        if self._w >= 0:
            os.close(self._w)
            self._w = -1
        deadline = time.monotonic() + timeout
        while self.pid:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                return
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)


def _keeper_main(read_fd: int, unmount, remove) -> None:
    code = 0
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_IGN)
        os.closerange(3, read_fd)
        os.closerange(read_fd + 1, 65536)
        while True:
            try:
                if not os.read(read_fd, 1):
                    break
            except InterruptedError:
                continue
        if unmount is not None:
            message = unmount_if_ours(*unmount)
            if message:
                print(message, file=sys.stderr, flush=True)
                code = 1
        if remove is not None:
            path, identity = remove
            try:
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == identity:
                    os.unlink(path)
            except OSError:
                pass
    finally:
        os._exit(code)
