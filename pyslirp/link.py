"""Links: where a backend's Ethernet frames come from when it serves a
virtual machine instead of a TAP (``pyslirp-forwarder --socket=PATH``).

A TAP gives one frame per read(2) and takes one per write(2); a VM's
network card reaches us over a UNIX socket instead, as QEMU's ``-netdev
stream`` (and ``-netdev socket``, and passt's socket) carry it: each frame
after its length as a 4-byte big-endian integer. ``-netdev dgram`` (and
vfkit) send one frame per datagram, with no length.

A link listens at its path (mode 0600), takes one VM at a time, and gives
the backend one stable descriptor, ``fd`` (an epoll of its own sockets),
to poll: readable when the VM sent frames, connected, went away, or can
take frames that waited. The backend then calls ``read_frames()`` (the
whole frames that arrived; connecting and hang-ups are handled inside) and
hands what it has for the guest to ``write_frames(frames)``.

Batching: one ``recv_into`` takes up to ``LinkLimits.read_bytes`` of the
stream (tens of frames); one ``sendmsg`` writes a whole flush, each frame
after its header. Every hostile case is counted in ``counters`` and never
raises: a length of 0 or above ``MAX_FRAME`` drops the connection (the
stream cannot be resynchronised), a hang-up in the middle of a frame is
counted, and a VM that stops reading gets at most ``write_bytes`` queued for
it, then whole frames are dropped, as a full TAP queue drops them.

This module imports neither the python stack nor its host side, so that
the libslirp backend can use it too.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import select
import socket
import struct

from pyslirp.log import get_logger
from pyslirp.tap import MAX_FRAME

log = get_logger("pyslirp")

_LENGTH = struct.Struct("!I")
HEADER_LEN = _LENGTH.size
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
STREAM, DGRAM = "stream", "dgram"
KINDS = (STREAM, DGRAM)  # the socket types open_link serves


@dataclasses.dataclass
class LinkLimits:
    # One recv_into's worth: a 64 KiB-MTU frame and its header must fit (the
    # rest of a partial frame is kept at the front); 256 KiB is what Linux
    # lets a UNIX stream socket queue by default, so one read empties it.
    read_bytes: int = 256 * 1024
    # Bytes queued for a VM that does not read (its socket buffer is full):
    # past this, whole frames are dropped (counted), as a full TAP queue does,
    # and TCP's retransmission recovers. 4 MiB: tens of 64 KiB frames.
    write_bytes: int = 4 * 1024 * 1024
    # Buffers per sendmsg: Linux's IOV_MAX (1024), two per frame.
    write_buffers: int = 1024
    # Datagrams read per wake-up (dgram), as the TAP's batch: the rest wake
    # the next poll, so that the host side is served in between.
    read_datagrams: int = 64


class Link:
    """The frames of one VM at a time over a UNIX socket at ``path``."""

    kind = STREAM

    def __init__(self, path: str, limits: LinkLimits | None = None) -> None:
        self.path = path
        self.limits = limits or LinkLimits()
        self.counters = {
            "link-connected": 0,  # VMs that came (stream) or first spoke (dgram)
            "link-disconnected": 0,
            "link-frames-in": 0,
            "link-frames-out": 0,
            "link-bytes-in": 0,
            "link-bytes-out": 0,
            "link-bad-length": 0,  # a length of 0 or above MAX_FRAME: connection dropped
            "link-partial-frame": 0,  # the VM hung up in the middle of a frame
            "link-write-dropped": 0,  # frames dropped for a VM that did not read
            "link-error": 0,  # a socket error on the connection (it is dropped)
        }
        self.on_disconnect = None  # called (no arguments) when a VM goes away
        # After a VM leaves, listen for the next (False: --one-off, the
        # backend stops serving instead).
        self.reconnect = True
        self.fd = -1
        self._epoll = None
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None

    # ---------------------------------------------------------- set-up
    def listen(self) -> None:
        """Bind ``path`` (mode 0600; an existing socket file there is
        replaced, anything else is an OSError) and start listening."""
        kind = socket.SOCK_STREAM if self.kind == STREAM else socket.SOCK_DGRAM
        sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            _remove_stale_socket(self.path, kind)
            old = os.umask(0o177)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            if self.kind == STREAM:
                sock.listen(1)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self._epoll = select.epoll()
        self.fd = self._epoll.fileno()
        self._epoll.register(sock.fileno(), select.EPOLLIN)

    def close(self) -> None:
        """Close the sockets and remove the socket file."""
        self._drop_connection(notify=False)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
            self.fd = -1

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting for a VM that does not read fast enough."""
        return self._pending_bytes if self._conn is not None else 0

    # ----------------------------------------------------------- frames
    def read_frames(self) -> list:
        """The whole frames that arrived (bytes each); connects and
        hang-ups are handled here. Never raises for what the VM does."""
        frames: list = []
        if self._epoll is None:
            return frames
        for fd, happened in self._epoll.poll(0):
            conn = self._conn
            if self._listener is not None and fd == self._listener.fileno() and conn is None:
                self._accept()
            elif conn is not None and fd == conn.fileno():
                if happened & select.EPOLLOUT and self._pending:
                    self._send_pending()
                if self._conn is conn and happened & _READABLE:
                    self._receive(frames)
        return frames

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        conn.setblocking(False)
        self._conn = conn
        self._buffer = bytearray(self.limits.read_bytes)
        self._view = memoryview(self._buffer)
        self._have = 0  # bytes of a partial frame at the front of the buffer
        self._pending: list = []  # buffers not yet sent, in order
        self._pending_bytes = 0
        self._epoll.unregister(self._listener.fileno())  # one VM at a time
        self._epoll.register(conn.fileno(), select.EPOLLIN)
        self.counters["link-connected"] += 1
        log.info("link %s: a VM connected", self.path)

    def _receive(self, frames: list) -> None:
        conn = self._conn
        view = self._view
        have = self._have
        try:
            got = conn.recv_into(view[have:])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.counters["link-error"] += 1
            log.info("link %s: %s; the VM is dropped", self.path, exc)
            self._drop_connection()
            return
        if got == 0:
            if have:
                self.counters["link-partial-frame"] += 1
            self._drop_connection()
            return
        end = have + got
        at = 0
        unpack = _LENGTH.unpack_from
        limit = MAX_FRAME
        while end - at >= HEADER_LEN:
            (length,) = unpack(view, at)
            if length == 0 or length > limit:
                self.counters["link-bad-length"] += 1
                log.info("link %s: frame length %d; the VM is dropped", self.path, length)
                self._drop_connection()
                del frames[:]  # what came with it is suspect too
                return
            start = at + HEADER_LEN
            stop = start + length
            if stop > end:
                break
            frames.append(bytes(view[start:stop]))
            at = stop
        if at:
            self.counters["link-frames-in"] += len(frames)
            self.counters["link-bytes-in"] += at
        if at < end:
            view[: end - at] = view[at:end]
        self._have = end - at

    def write_frames(self, frames) -> None:
        """Send ``frames`` (each after its length), all in one sendmsg when
        the VM keeps up; with no VM they are dropped (as a TAP that is down
        drops them)."""
        if self._conn is None:
            self.counters["link-write-dropped"] += len(frames)
            return
        pack = _LENGTH.pack
        buffers = self._pending
        queued = self._pending_bytes
        room = self.limits.write_bytes
        dropped = 0
        for frame in frames:
            size = len(frame)
            if queued + size > room and queued:
                dropped += 1
                continue
            buffers.append(pack(size))
            buffers.append(frame)
            queued += size + HEADER_LEN
        self._pending_bytes = queued
        if dropped:
            self.counters["link-write-dropped"] += dropped
        self.counters["link-frames-out"] += len(frames) - dropped
        if len(buffers) == 2 * (len(frames) - dropped):  # nothing waited: send now
            self._send_pending()

    def _send_pending(self) -> None:
        conn = self._conn
        buffers = self._pending
        most = self.limits.write_buffers
        while buffers:
            batch = buffers if len(buffers) <= most else buffers[:most]
            try:
                sent = conn.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                    self.counters["link-error"] += 1
                self._drop_connection()
                return
            self.counters["link-bytes-out"] += sent
            self._pending_bytes -= sent
            # Drop what went out; a buffer sent in part keeps its tail.
            done = 0
            for buffer in batch:
                size = len(buffer)
                if sent < size:
                    break
                sent -= size
                done += 1
            if done:
                del buffers[:done]
            if sent:
                buffers[0] = memoryview(buffers[0])[sent:]
            if done < len(batch):  # the socket is full: wait for EPOLLOUT
                self._epoll.modify(conn.fileno(), select.EPOLLIN | select.EPOLLOUT)
                return
        self._epoll.modify(conn.fileno(), select.EPOLLIN)

    def _drop_connection(self, notify: bool = True) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            self._epoll.unregister(conn.fileno())
        except (OSError, ValueError):
            pass
        conn.close()
        self._pending = []
        self._pending_bytes = 0
        self._have = 0
        self.counters["link-disconnected"] += 1
        log.info("link %s: the VM went away", self.path)
        if self._listener is not None and self.reconnect:
            self._epoll.register(self._listener.fileno(), select.EPOLLIN)
        if notify and self.on_disconnect is not None:
            self.on_disconnect()


def _remove_stale_socket(path: str, kind: int) -> None:
    """A socket file left at ``path`` by a forwarder that was killed (no one
    answers there) is removed; one in use is EADDRINUSE; any other file is
    left for bind to refuse."""
    import stat

    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX, kind) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            return
    raise OSError(errno.EADDRINUSE, "a forwarder (or another program) is serving it")


class DgramLink(Link):
    """One frame per datagram (QEMU's -netdev dgram, vfkit): the VM is
    whoever sent the last datagram, from its own bound socket; a datagram
    from another address is a new VM (the old one's flows are closed), and
    one that cannot be delivered (its socket is gone) means the VM left.
    Python has no sendmmsg: one sendto per frame, and a full socket buffer
    drops the frame (counted), as a full TAP queue does."""

    kind = DGRAM

    def __init__(self, path: str, limits: LinkLimits | None = None) -> None:
        super().__init__(path, limits)
        self._peer = None
        # One byte more than the largest frame, to see one that is too long.
        self._buffer = bytearray(MAX_FRAME + 1)
        self._view = memoryview(self._buffer)

    @property
    def connected(self) -> bool:
        return self._peer is not None

    @property
    def queued_bytes(self) -> int:
        return 0

    def read_frames(self) -> list:
        frames: list = []
        sock = self._listener
        if sock is None:
            return frames
        view = self._view
        counters = self.counters
        for _ in range(self.limits.read_datagrams):
            try:
                size, peer = sock.recvfrom_into(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                counters["link-error"] += 1
                break
            if size == 0 or size > MAX_FRAME or not peer:
                counters["link-bad-length"] += 1  # or unnamed: no way to answer
                continue
            if peer != self._peer:
                if self._peer is not None:
                    if not self.reconnect:
                        continue
                    self._drop_connection()
                    frames.clear()
                self._peer = peer
                counters["link-connected"] += 1
                log.info("link %s: a VM spoke from %s", self.path, peer)
            frames.append(bytes(view[:size]))
            counters["link-bytes-in"] += size
        counters["link-frames-in"] += len(frames)
        return frames

    def write_frames(self, frames) -> None:
        peer = self._peer
        if peer is None:
            self.counters["link-write-dropped"] += len(frames)
            return
        sendto = self._listener.sendto
        sent = dropped = size = 0
        for frame in frames:
            try:
                size += sendto(frame, peer)
                sent += 1
            except (BlockingIOError, InterruptedError):
                dropped += 1
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):  # its socket is gone
                    self.counters["link-write-dropped"] += len(frames) - sent
                    self._drop_connection()
                    return
                self.counters["link-error"] += 1
                dropped += 1
        self.counters["link-frames-out"] += sent
        self.counters["link-bytes-out"] += size
        self.counters["link-write-dropped"] += dropped

    def _drop_connection(self, notify: bool = True) -> None:
        if self._peer is None:
            return
        self._peer = None
        self.counters["link-disconnected"] += 1
        log.info("link %s: the VM went away", self.path)
        if notify and self.on_disconnect is not None:
            self.on_disconnect()


def open_link(path: str, kind: str = STREAM, limits: LinkLimits | None = None) -> Link:
    """A listening link of ``kind`` (stream or dgram) at ``path``."""
    if kind not in KINDS:
        raise ValueError(f"unknown socket type {kind!r} (choose from {', '.join(KINDS)})")
    link = Link(path, limits) if kind == STREAM else DgramLink(path, limits)
    link.listen()
    return link
