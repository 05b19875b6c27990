"""Namespaces, the TAP device and the bind mount, through ctypes and rtnetlink.

The namespace work happens in a forked child, as slirp4netns does it: the
child enters (or creates) the network namespace, opens the TAP there, sets up
the links, and hands the TAP's file descriptor back over a unix socket. The
parent never leaves its own namespaces, so host sockets are made on the host.
A child is needed because a process cannot go back: joining a user namespace
is one-way, and an unprivileged user inside ``unshare -rm`` may create a
network namespace but may not setns() back into the host's one.

Everything here raises ``StartupError`` with one line fit for the user.
"""

from __future__ import annotations

import _socket
import errno
import fcntl
import os
import stat
import struct
import sys

from pyslirp.nat.compat import if_nametoindex
from pyslirp.settings import Settings

from .libc import (
    CLONE_NEWNET,
    CLONE_NEWUSER,
    MNT_DETACH,
    MS_BIND,
    UMOUNT_NOFOLLOW,
    get_errno,
    libc,
)

# <fcntl.h>, <linux/if_tun.h>
O_PATH = getattr(os, "O_PATH", 0o10000000)
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
VNET_HDR_LEN = 10  # struct virtio_net_hdr (pyslirp.stack.virtio)
IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, flags, rest of the union

TUN_PATH = "/dev/net/tun"
OWN_NETNS = "/proc/thread-self/ns/net"


class StartupError(Exception):
    """A failure to start, with a one-line message for the user."""


def _errno_text(err: int) -> str:
    return os.strerror(err)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = get_errno()
        raise StartupError(f"{what}: {_errno_text(err)}")


def unshare_net() -> None:
    _check(libc().unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")


def unmount(target: str) -> int:
    """Lazily unmount ``target`` (a symbolic link is not followed); the errno, or 0."""
    if libc().umount2(os.fsencode(target), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
        return get_errno()
    return 0


# The PATH form mounts and unmounts as root in a directory that others may
# write to; neither may go through a symbolic link put at PATH, which could
# aim our mount, or our unmount, at any file on the system.
def open_mount_point(path: str) -> int:
    """PATH itself (O_PATH, not following a symbolic link in its last
    component), to mount onto through /proc/self/fd; a link is refused."""
    try:
        fd = os.open(path, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise StartupError(f"namespace file {path}: {exc.strerror}") from None
    if stat.S_ISLNK(os.fstat(fd).st_mode):
        os.close(fd)
        raise StartupError(
            f"namespace file {path} is a symbolic link: refusing to mount through it"
        )
    return fd


def bind_mount_at(source: str, fd: int, path: str) -> None:
    """Bind-mount ``source`` onto the file that ``fd`` (open_mount_point) holds."""
    at = f"/proc/self/fd/{fd}".encode()
    result = libc().mount(os.fsencode(source), at, b"none", MS_BIND, None)
    if result != 0:
        err = get_errno()
        raise StartupError(f"cannot bind-mount the namespace on {path}: {_errno_text(err)}")


def namespace_identity(path: str = OWN_NETNS) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def unmount_if_ours(path: str, identity: tuple[int, int]) -> str | None:
    """Unmount ``path`` only if what is there (not following a link) is still
    the namespace we mounted, (st_dev, st_ino) ``identity``. A message for
    the user, or None."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None  # gone with its mount
    except OSError as exc:
        return f"cannot unmount {path}: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"not unmounting {path}: it is now a symbolic link"
    if (st.st_dev, st.st_ino) != identity:
        return None  # someone else unmounted it already
    err = unmount(path)
    if err not in (0, errno.EINVAL, errno.ENOENT):
        return f"cannot unmount {path}: {_errno_text(err)}"
    return None


def same_namespace(path_a: str, path_b: str) -> bool:
    a, b = os.stat(path_a), os.stat(path_b)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def validate_tap_name(name: str) -> None:
    """The kernel's rules for an interface name (dev_valid_name)."""
    if not name or name in (".", "..") or len(os.fsencode(name)) >= IFNAMSIZ:
        raise StartupError(f"invalid TAP name {name!r}: 1 to {IFNAMSIZ - 1} bytes")
    if any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise StartupError(f"invalid TAP name {name!r}: no '/', ':' or white space")


def open_offload_tap(name: str) -> int | None:
    """open_tap with IFF_VNET_HDR and the checksum and TSO offloads, so that
    the guest's kernel sends and takes 64 KiB TCP segments at any MTU; None
    where the kernel refuses any of it (the caller opens a plain TAP)."""
    try:
        fd = open_tap(name, IFF_VNET_HDR)
    except StartupError:
        return None
    try:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    except OSError:
        os.close(fd)  # the device goes with it: not persistent
        return None
    return fd


def open_tap(name: str, extra_flags: int = 0) -> int:
    """Open a TAP (IFF_TAP | IFF_NO_PI) named ``name`` in the current network
    namespace. The device lives as long as the returned descriptor."""
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise StartupError(f'open("{TUN_PATH}"): {exc.strerror}') from None
    ifreq = _IFREQ.pack(os.fsencode(name), IFF_TAP | IFF_NO_PI | extra_flags)
    try:
        fcntl.ioctl(fd, TUNSETIFF, ifreq)
    except OSError as exc:
        os.close(fd)
        hint = ""
        if exc.errno in (errno.EBUSY, errno.EINVAL, errno.EEXIST):
            hint = f" (is the name {name} taken by another device?)"
        raise StartupError(
            f"cannot create TAP {name}: ioctl(TUNSETIFF): {exc.strerror}{hint}"
        ) from None
    return fd


# ------------------------------------------------------------------ links
class LinkSetup(Settings):
    """What to do to the links inside the namespace (rtnetlink.py)."""

    loopback_up: bool = False
    configure: bool = False  # -c: TAP up with MTU, address, default route
    mtu: int = 1500
    address: str = ""
    prefix_len: int = 24
    gateway: str = ""
    mac: str | None = None  # --macaddress: the TAP's MAC, set with -c
    report: bool = True  # print slirp4netns's "sent tapfd=" / "received tapfd=" lines
    # -c with -6: no duplicate address detection on the TAP (we are the only
    # other node on the link; it would delay the address by a second, which
    # is why podman turns it off too), and a netlink socket to watch SLAAC.
    ipv6: bool = False
    # Open the TAP with IFF_VNET_HDR and offloads where the kernel allows.
    offload: bool = False


def setup_links(tap: str, setup: LinkSetup) -> None:
    if not (setup.loopback_up or setup.configure):
        return
    from .rtnetlink import NetlinkError, Rtnl

    step = "open netlink"
    try:
        with Rtnl() as rtnl:
            if setup.loopback_up or setup.configure:
                step = "set lo up"
                rtnl.link_set(if_nametoindex("lo"), up=True)
            if setup.configure:
                index = if_nametoindex(tap)
                if setup.mac:
                    step = f"set {tap} MAC address {setup.mac}"
                    rtnl.link_set(index, address=bytes.fromhex(setup.mac.replace(":", "")))
                step = f"set {tap} MTU {setup.mtu}"
                rtnl.link_set(index, mtu=setup.mtu)
                if setup.ipv6:
                    step = f"turn off duplicate address detection on {tap}"
                    _write_sysctl(f"/proc/sys/net/ipv6/conf/{tap}/accept_dad", "0")
                    # 2: router advertisements count even if forwarding is on
                    _write_sysctl(f"/proc/sys/net/ipv6/conf/{tap}/accept_ra", "2")
                step = f"set {tap} up"
                rtnl.link_set(index, up=True)
                step = f"add address {setup.address}/{setup.prefix_len} to {tap}"
                rtnl.addr_add(index, setup.address, setup.prefix_len)
                step = f"add default route via {setup.gateway}"
                rtnl.default_route_add(setup.gateway, index)
    except NetlinkError as exc:
        raise StartupError(
            f"cannot configure the namespace: {step}: {_errno_text(exc.errno)}"
        ) from None
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot configure the namespace: {step}: {exc}") from None


def _write_sysctl(path: str, value: str) -> None:
    """A per-namespace sysctl (/proc/sys/net follows the writer's namespace)."""
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        # Not fatal: the guest still configures itself, a second later.
        print(f"warning: cannot write {path}: {exc.strerror}", file=sys.stderr, flush=True)


# ------------------------------------------------------------ the targets
class NewNamespace(Settings):
    """Create a network namespace and bind-mount it on ``path``."""

    path: str


class ExistingNamespace(Settings):
    """Join the network namespace at ``netns_path`` (and the user namespace
    at ``userns_path`` first, where it differs from ours)."""

    netns_path: str
    userns_path: str | None = None


class Attachment(Settings):
    """A TAP obtained from a namespace; ``close`` undoes what the front end made."""

    tap_fd: int
    tap_name: str
    mounted_path: str | None = None
    # (st_dev, st_ino) of the namespace mounted at mounted_path (nsfs).
    mounted_identity: tuple = (0, 0)
    # -c with -6: a NETLINK_ROUTE socket inside the namespace (forwarder.slaac).
    netlink_fd: int = -1
    # The TAP has IFF_VNET_HDR and offloads (LinkSetup.offload, if granted).
    offload: bool = False

    def close(self) -> None:
        if self.tap_fd >= 0:
            os.close(self.tap_fd)
            self.tap_fd = -1
        if self.netlink_fd >= 0:
            try:
                os.close(self.netlink_fd)
            except OSError:
                pass  # handed to the SLAAC watch, which closed it
            self.netlink_fd = -1
        if self.mounted_path is not None:
            message = unmount_if_ours(self.mounted_path, self.mounted_identity)
            if message:
                print(message, file=sys.stderr, flush=True)
            self.mounted_path = None


def _enter(target: ExistingNamespace) -> None:
    """In the child: join the user namespace (if it differs) and the network
    namespace of the target. The wording follows slirp4netns."""
    try:
        net_fd = os.open(target.netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise StartupError(f"{target.netns_path}: {exc.strerror}") from None
    try:
        if target.userns_path is not None:
            try:
                user_fd = os.open(target.userns_path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise StartupError(f"{target.userns_path}: {exc.strerror}") from None
            try:
                own = os.fstat(user_fd)
                mine = os.stat("/proc/self/ns/user")
                if (own.st_dev, own.st_ino) != (mine.st_dev, mine.st_ino):
                    # As in slirp4netns, a failure here is not fatal by itself:
                    # joining the network namespace decides.
                    libc().setns(user_fd, CLONE_NEWUSER)
            finally:
                os.close(user_fd)
        _check(libc().setns(net_fd, CLONE_NEWNET), "setns(CLONE_NEWNET)")
    finally:
        os.close(net_fd)


def _child(target, tap: str, setup: LinkSetup, sock: _socket.socket) -> None:
    """Runs in the forked child; reports back over ``sock`` and never returns."""
    code = 1
    try:
        mounted = None  # our namespace's identity, once mounted at target.path
        try:
            if isinstance(target, NewNamespace):
                mount_fd = open_mount_point(target.path)
                unshare_net()
            else:
                _enter(target)
            tap_fd = open_offload_tap(tap) if setup.offload else None
            offload = tap_fd is not None
            if tap_fd is None:
                tap_fd = open_tap(tap)
            fds = [tap_fd]
            if setup.ipv6 and setup.configure:
                from .slaac import open_watch_socket

                watch = open_watch_socket()  # before the link is up: no event is missed
                fds.append(watch.fileno())
            setup_links(tap, setup)
            identity = namespace_identity()
            if isinstance(target, NewNamespace):
                bind_mount_at(OWN_NETNS, mount_fd, target.path)
                mounted = identity
            word = (b"\1" if offload else b"\0") + _IDENTITY.pack(*identity)
            send_fds(sock, word, fds)
            if setup.report:
                print(f"sent tapfd={tap_fd} for {tap}", file=sys.stderr, flush=True)
            code = 0
        except StartupError as exc:
            if mounted:
                unmount_if_ours(target.path, mounted)
            sock.sendall(str(exc).encode(errors="replace")[:4000])
        except BaseException as exc:  # noqa: BLE001 - must not escape a forked child
            if mounted:
                unmount_if_ours(target.path, mounted)
            sock.sendall(f"namespace set-up failed: {exc!r}".encode(errors="replace")[:4000])
    finally:
        os._exit(code)


# The child's word for success: a plain TAP or one with offloads, then the
# (st_dev, st_ino) of the namespace (what is mounted at PATH).
_DONE = (b"\0", b"\1")
_IDENTITY = struct.Struct("=QQ")
_WORD_LEN = 1 + _IDENTITY.size


def send_fds(sock, data: bytes, fds: list[int]) -> None:
    """socket.send_fds without the socket module (its enums and selectors
    are 0.45 MB of an idle forwarder): ``data`` and ``fds`` in one message."""
    rights = struct.pack(f"{len(fds)}i", *fds)
    sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])


def recv_fds(sock, size: int, max_fds: int) -> tuple[bytes, list[int]]:
    """socket.recv_fds likewise: up to ``size`` bytes and ``max_fds`` descriptors."""
    data, ancillary, _flags, _addr = sock.recvmsg(size, _socket.CMSG_LEN(max_fds * 4))
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            count = len(payload) // 4
            fds.extend(struct.unpack(f"{count}i", payload[: count * 4]))
    return data, fds


def attach(target, tap: str, setup: LinkSetup) -> Attachment:
    """Get a TAP named ``tap`` inside ``target``'s network namespace."""
    validate_tap_name(tap)
    parent_sock, child_sock = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        parent_sock.close()
        _child(target, tap, setup, child_sock)
    child_sock.close()
    try:
        message, fds = recv_fds(parent_sock, 4096, 2)
        # The rest of an error's text, or of the word for success.
        while message and (message[:1] not in _DONE or len(message) < _WORD_LEN):
            chunk = parent_sock.recv(4096)
            if not chunk:
                break
            message += chunk
    finally:
        parent_sock.close()
        _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    done = len(message) == _WORD_LEN and message[:1] in _DONE
    if fds and code == 0 and done:
        tap_fd = fds[0]
        for fd in fds:
            os.set_inheritable(fd, False)
        if setup.report:
            print(f"received tapfd={tap_fd}", file=sys.stderr, flush=True)
        mounted = target.path if isinstance(target, NewNamespace) else None
        netlink_fd = fds[1] if len(fds) > 1 else -1
        identity = _IDENTITY.unpack_from(message, 1)
        return Attachment(tap_fd, tap, mounted, identity, netlink_fd, offload=message[:1] == b"\1")
    for fd in fds:
        os.close(fd)
    if message and not done:
        raise StartupError(message.decode(errors="replace"))
    raise StartupError(f"the namespace set-up child failed (exit status {code})")
