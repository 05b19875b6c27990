"""--record: everything that crosses the stack's boundary, for replay.

The boundary is the Stack object the loop holds (``loop.stack``). With
``NetworkConfig.record_path`` set, the loop holds a ``RecordingStack``
instead: a proxy that passes every call on to a real Stack and writes one
record per call that changes it (the names in ``RECORDED``) with its
arguments, what it returned and the events it appended to ``stack.events``.
Reads (``QUERIES``, and attributes such as ``stack.out`` or ``tcp.dirty``)
pass through unrecorded: they change nothing, so a replay that makes the
same calls reads the same values. With recording off the loop holds the
Stack itself, and nothing here is imported.

What is kept, and what only a digest of:
- frames from the guest (``receive_frame``): whole, they are the input;
- the NAT's commands (``tcp.send`` with the host's bytes, ``send_udp`` with
  a DNS answer or a datagram, ``send_icmp_error``, ``send_echo_reply`` for
  ICMP from a ping socket, ``tcp.accept``/``refuse`` after a connect, the
  memory budget's ``charge``/``release`` for DNS queries): whole;
- frames for the guest (``frames_to_send``): their length and CRC-32s of
  their headers and of their last bytes each (``frame_digests``), since
  they are outputs and their payload is already in the commands that
  queued it;
- ``tcp.send_space`` only when it returns 0 (with room it changes nothing);
- events: whole (their ``conn`` as the connection's serial number, which
  TcpLayer gives from a counter and so is the same in a replay).

Randomness: the stack gets its own ``random.Random`` seeded from
os.urandom(8), and the seed is in the header with the whole StackConfig
(JSON, bytes as hex; never pickle: a recording attached to a bug report is
untrusted input), the pyslirp and Python versions.

The file: ``MAGIC``, a u16 format version, a u32 length and the header
(JSON); then blocks, each a u32 length, a u8 method (0 stored, 1 zlib) and
that many bytes; a block holds whole records, each a u32 length and its
body: u8 method index (in ``METHODS``), f64 ``now`` (the last one seen for
calls without one), then the arguments, keywords, result and events in a
small tagged encoding (``encode``/``decode``; encoders generated per shape
of call give the same bytes faster, see "fast encoding"). The last record is ``END``
with the reason ("closed" or "limit") and the count of records; a file
without it was cut short (a crash, a kill -9) and replays up to its last
whole block. Blocks are compressed with zlib level 1 only when a sample
does not look random (host bytes are often compressed already, and zlib
on incompressible data costs more than the stack). A regular file is
written with O_DIRECT from aligned staging buffers (see STAGE_SIZE).
"""

from __future__ import annotations

import errno
import fcntl
import inspect
import json
import mmap
import os
import platform
import queue
import random as _random
import stat
import struct
import threading
import zlib

import pyslirp
from pyslirp.log import get_logger
from pyslirp.settings import fields, is_dataclass
from pyslirp.stack.config import StackConfig
from pyslirp.stack.tcp_connection import TcpConnection

log = get_logger("pyslirp")

MAGIC = b"PYSLREC\x00"
FORMAT_VERSION = 2  # 2: frame digests are length and two CRC-32s (1 had a blake2b)

# The stack's methods that the NAT side calls and that change it: each call
# is one record. The index in this tuple is the record's method byte, so
# add new names at the end (a replay of an older file then still reads).
# "tcp." names are on stack.tcp (TcpLayer), "budget." on stack.budget.
METHODS = (
    "END",
    "receive_frame",
    "receive_vnet_frame",
    "frames_to_send",
    "vnet_frames_to_send",
    "handle_timer",
    "send_udp",
    "send_icmp_error",
    "send_echo_reply",
    "learn_neighbor",
    "udp_quote",
    "tcp.accept",
    "tcp.refuse",
    "tcp.send",
    "tcp.send_space",
    "tcp.consume",
    "tcp.close",
    "tcp.abort",
    "tcp.connect",
    "tcp.release_received",
    "budget.charge",
    "budget.release",
)
RECORDED = frozenset(METHODS[1:])
INDEX = {name: i for i, name in enumerate(METHODS)}
END = 0
# Methods of the Stack, TcpLayer and MemoryBudget that only read (or, as
# next_event, hand over events already recorded with the call that made
# them): not recorded. tests/test_record.py fails if the NAT side calls a
# public method of theirs that is in neither set.
QUERIES = frozenset(
    {
        "get_timer",
        "next_wake",
        "next_event",
        "drain_events",
        "neighbour_mac",
        "guest_address6",
        "memory_held",
        "held_bytes",
        "queue_lengths",
        "set_tracer",
        "mac_for",
        "in_network",
        "in_prefix6",
        "free",
        "window_room",
        "next_ip_ident",
    }
)
OUTPUTS = frozenset({INDEX["frames_to_send"], INDEX["vnet_frames_to_send"]})
INPUTS = frozenset({INDEX["receive_frame"], INDEX["receive_vnet_frame"]})

# Buffered records are written as one block at this size (or a second of
# `now` after the last write): large enough that zlib and write() are paid
# per 256 KiB rather than per frame, small enough that a crash loses little.
BLOCK_SIZE = 256 * 1024
FLUSH_INTERVAL = 1.0  # seconds of `now`
# Writes handed to the writer thread and not yet done: 16 bounds the memory
# a slow disk can make us hold (blocks of 256 KiB for a pipe or a device);
# past it the loop waits.
WRITE_QUEUE = 16
# A regular file is written with O_DIRECT: the kernel's copy of every byte
# into the page cache (copy_folio_from_iter in perf) was a third of the
# forwarder's CPU time when recording bulk traffic; with O_DIRECT the disk
# reads our buffer itself. O_DIRECT wants aligned buffers, offsets and
# sizes, so the loop copies each block into a page-aligned staging buffer of
# STAGE_SIZE (while its bytes are still in the CPU's cache) and the writer
# thread writes whole buffers (without the GIL, nothing else); STAGES of
# them bound the memory held. A block flushed by time or at the end is
# written padded to DIRECT_ALIGN and the file cut back to its length (to be
# rewritten whole later), so that a crash loses no more than the last
# second. Where O_DIRECT is refused the same path goes through the page cache.
STAGE_SIZE = 1024 * 1024
STAGES = 4
# Bytes the NAT lends (tcp.send's view of its reused receive buffer) are
# copied once, into this arena, where they wait with the block's other
# records until the block is copied into a staging buffer; then the arena is
# reused. A bytes() copy instead cost a malloc of up to 256 KiB, which glibc
# maps and unmaps (page faults were a tenth of the CPU host->guest). A block
# ends at BLOCK_SIZE, so the arena holds a block and one more record; what
# does not fit is copied to bytes.
ARENA_SIZE = 1024 * 1024
DIRECT_ALIGN = 4096  # the largest logical block size of common devices
# A block is compressed unless a sample of its largest part looks random:
# 512 random bytes hold about 221 distinct values, text and headers far
# fewer (zlib itself costs ~50 us per sample here, a set ~5 us).
COMPRESS = True  # False stores every block (tests that damage records do)
SAMPLE_SIZE = 512
SAMPLE_DISTINCT = 180
# The largest block a reader accepts, before and after inflating (a block
# is BLOCK_SIZE plus at most one record, and a record at most a 64 KiB frame
# or a tcp.send of a send buffer): a hostile file cannot make us hold more.
MAX_BLOCK = 64 * 1024 * 1024
# Room kept under record_limit for the last block's framing and END.
END_RESERVE = 64
# What must be left of --record-limit for another file to begin (RecordingFiles).
MIN_FILE = 4096

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_RECORD_HEAD = struct.Struct("<IBd")  # length (of what follows it), method, now
_BLOCK_HEAD = struct.Struct("<IB")
_FRAME_DIGEST = struct.Struct("<III")  # length, CRC-32 of the head, CRC-32 of the tail
# A frame for the guest is checked by its length, a CRC-32 of its first
# HEAD_DIGESTED bytes (every header: addresses, ports, sequence numbers,
# window, flags, IPv6 and TCP options) and a CRC-32 of its last TAIL_DIGESTED
# bytes (a payload taken from the wrong place in the send buffer shows
# there). Not the whole payload: it came from a recorded tcp.send, and a
# CRC-32 over every 64 KiB frame cost 0.35 s per GB here (a third of the
# stack's own cost host->guest).
HEAD_DIGESTED = 128
TAIL_DIGESTED = 64
FRAME_DIGEST_SIZE = _FRAME_DIGEST.size
_IOV_MAX = 1024  # writev's limit on Linux
STORED, ZLIB = 0, 1


_EVENT_FIELDS: dict = {}  # event class -> its field names (fields() is slow)


class RecordingError(Exception):
    """A file that is not a recording, or is damaged: the message is one line."""


# ------------------------------------------------------------- encoding
def encode(value, out: list) -> None:
    """Append the tagged encoding of ``value`` to ``out`` (a list of bytes).
    A TcpConnection is its serial number; a dataclass (an event) its class
    name and fields; anything else unknown its repr, marked so."""
    kind = value.__class__
    if value is None:
        out.append(b"N")
    elif kind is bool:
        out.append(b"T" if value else b"F")
    elif kind is int:
        if -(1 << 63) <= value < (1 << 63):
            out.append(b"i" + _I64.pack(value))
        else:
            text = str(value).encode()
            out.append(b"I" + _U32.pack(len(text)) + text)
    elif kind is float:
        out.append(b"d" + _F64.pack(value))
    elif kind is bytes:
        out.append(b"b" + _U32.pack(len(value)))
        out.append(value)
    elif kind is bytearray or kind is memoryview:  # the caller may reuse it: a copy
        value = bytes(value)
        out.append(b"b" + _U32.pack(len(value)))
        out.append(value)
    elif kind is str:
        text = value.encode("utf-8", "surrogateescape")
        out.append(b"s" + _U32.pack(len(text)) + text)
    elif kind is tuple or kind is list:
        out.append(b"l" + _U32.pack(len(value)))
        for item in value:
            encode(item, out)
    elif kind is dict:
        out.append(b"m" + _U32.pack(len(value)))
        for key, item in value.items():
            encode(key, out)
            encode(item, out)
    elif isinstance(value, TcpConnection):  # its traced subclass too (--trace)
        out.append(b"c" + _I64.pack(value.serial))
    elif kind in _EVENT_FIELDS or is_dataclass(value):
        names = _EVENT_FIELDS.get(kind)
        if names is None:
            names = _EVENT_FIELDS[kind] = tuple(f.name for f in fields(value))
        out.append(b"e" + _U32.pack(len(names)))
        encode(kind.__name__, out)
        for name in names:
            encode(getattr(value, name), out)
    else:
        text = repr(value).encode("utf-8", "replace")
        out.append(b"r" + _U32.pack(len(text)) + text)


class ConnRef(int):
    """A connection in a decoded record: its serial number."""

    def __repr__(self) -> str:
        return f"conn#{int(self)}"


class EventRecord(tuple):
    """A decoded event: (class name, field values...)."""

    def __repr__(self) -> str:
        return f"{self[0]}({', '.join(short(v) for v in self[1:])})"


class Opaque(str):
    """A value recorded by its repr."""


def decode(data, pos: int):
    """The value encoded at ``pos`` and the position after it; damage raises
    RecordingError."""
    try:
        tag = data[pos]
        pos += 1
        if tag == 0x4E:  # N
            return None, pos
        if tag == 0x54:  # T
            return True, pos
        if tag == 0x46:  # F
            return False, pos
        if tag == 0x69:  # i
            return _I64.unpack_from(data, pos)[0], pos + 8
        if tag == 0x64:  # d
            return _F64.unpack_from(data, pos)[0], pos + 8
        if tag == 0x63:  # c
            return ConnRef(_I64.unpack_from(data, pos)[0]), pos + 8
        if tag in (0x62, 0x73, 0x49, 0x72):  # b s I r
            (size,) = _U32.unpack_from(data, pos)
            pos += 4
            raw = bytes(data[pos : pos + size])
            if len(raw) != size:
                raise RecordingError("value runs past its record")
            pos += size
            if tag == 0x62:
                return raw, pos
            text = raw.decode("utf-8", "surrogateescape")
            if tag == 0x49:
                return int(text), pos
            return (text if tag == 0x73 else Opaque(text)), pos
        if tag in (0x6C, 0x65, 0x6D):  # l e m
            (count,) = _U32.unpack_from(data, pos)
            pos += 4
            if count > len(data) - pos:
                raise RecordingError("list longer than its record")
            if tag == 0x6D:
                result = {}
                for _ in range(count):
                    key, pos = decode(data, pos)
                    result[key], pos = decode(data, pos)
                return result, pos
            items = []
            for _ in range(count + (tag == 0x65)):
                item, pos = decode(data, pos)
                items.append(item)
            return (EventRecord(items) if tag == 0x65 else items), pos
    except (struct.error, IndexError, ValueError) as exc:
        raise RecordingError(f"damaged value ({exc})") from None
    raise RecordingError(f"unknown value tag {tag:#x}")


def short(value, limit: int = 24) -> str:
    """A value for a one-line report."""
    if isinstance(value, bytes):
        if len(value) in (4, 16) and limit:
            return value.hex()
        text = value[:limit].hex()
        return f"{len(value)} bytes {text}{'...' if len(value) > limit else ''}"
    if isinstance(value, list):
        return "[" + ", ".join(short(v, limit) for v in value) + "]"
    return repr(value)


def frame_digests(items) -> bytes:
    """Each frame of a frames_to_send result (a vnet pair's header and
    frame together) as its length, the CRC-32 of its first HEAD_DIGESTED
    bytes (a vnet header and the frame's start) and the CRC-32 of its last
    TAIL_DIGESTED bytes after those (0 if none)."""
    parts = []
    crc32 = zlib.crc32
    pack = _FRAME_DIGEST.pack
    for item in items:
        if item.__class__ is tuple:
            header, frame = item
            head = crc32(frame[:HEAD_DIGESTED], crc32(header))
            size = len(header) + len(frame)
        else:
            frame = item
            head = crc32(frame[:HEAD_DIGESTED])
            size = len(frame)
        tail = len(frame) - HEAD_DIGESTED
        tail = crc32(frame[-min(tail, TAIL_DIGESTED) :]) if tail > 0 else 0
        parts.append(pack(size, head, tail))
    return b"".join(parts)


def split_digests(data: bytes) -> list[tuple[int, int, bytes]]:
    return [_FRAME_DIGEST.unpack_from(data, i) for i in range(0, len(data), _FRAME_DIGEST.size)]


# ------------------------------------------------------------- configuration
def config_to_json(config) -> dict:
    """A StackConfig (or TcpConfig) as JSON values: bytes as hex, tuples as lists."""
    result = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            value = config_to_json(value)
        elif isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, tuple):
            value = list(value)
        result[f.name] = value
    return result


def config_from_json(data: dict, kind=StackConfig):
    """The config a recording describes, and its differences from this
    version's fields: (config, unknown fields ignored, fields missing here
    that keep this version's default)."""
    defaults = kind()
    known = {f.name for f in fields(kind)}
    values = {}
    unknown: list[str] = []
    missing = sorted(known - set(data))
    for name, value in data.items():
        if name not in known:
            unknown.append(name)
            continue
        default = getattr(defaults, name)
        if is_dataclass(default):
            if not isinstance(value, dict):
                raise RecordingError(f"config field {name} is not an object")
            value, sub_unknown, sub_missing = config_from_json(value, type(default))
            unknown += [f"{name}.{n}" for n in sub_unknown]
            missing += [f"{name}.{n}" for n in sub_missing]
        else:
            value = _typed(name, value, default)
        values[name] = value
    return kind(**values), unknown, missing


def _typed(name: str, value, default):
    """A JSON value as the type of the field's default, or RecordingError."""
    try:
        if isinstance(default, bytes):
            return bytes.fromhex(value)
        if isinstance(default, tuple):
            return tuple(value)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(default, float):
            return float(value)
        if isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
            return value
        if isinstance(default, str):
            return str(value)
    except (TypeError, ValueError):
        raise RecordingError(f"config field {name} has a bad value {value!r}") from None
    return value


# ------------------------------------------------------------- writing
class Recorder:
    """Writes records to ``path``; stops cleanly at ``limit`` bytes (0: none)
    or at a write error (``stopped`` says why; the loop carries on)."""

    def __init__(self, path: str, header: dict, limit: int = 0, dir_fd: int | None = None) -> None:
        self.path = path
        self.limit = limit
        self.records = 0
        self.stopped: str | None = None  # why no more records are kept
        self.now = 0.0  # the last `now` seen, for calls without one
        self._fd, self.direct = _open_for_recording(path, dir_fd)
        self.regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        # The staging buffer for a regular file (None: writev, for a pipe
        # or a device), the file offset of its start and how full it is.
        self._stage: memoryview | None = None
        self._base = 0
        self._fill = 0
        self._free: queue.Queue = queue.Queue()  # staging buffers written, to fill again
        self._arena = bytearray(ARENA_SIZE)
        self._arena_view = memoryview(self._arena)
        self._arena_fill = 0
        head = json.dumps(header, separators=(",", ":")).encode()
        self.written = 0
        self._pending: list = []
        self._pending_size = 0
        self._flushed_at = float("-inf")  # the first record goes out at once
        self._queue: queue.Queue = queue.Queue(WRITE_QUEUE)
        self._thread: threading.Thread | None = None
        self._error: str | None = None  # set by the writer thread
        if self.regular:
            self._stage = memoryview(mmap.mmap(-1, STAGE_SIZE))
            for _ in range(STAGES - 1):
                self._free.put(memoryview(mmap.mmap(-1, STAGE_SIZE)))
        self._write([MAGIC + _U16.pack(FORMAT_VERSION) + _U32.pack(len(head)) + head], True)
        if limit and self.written + END_RESERVE > limit:
            self.stopped = "limit"

    def add(self, parts: list, size: int, now: float) -> None:
        """One whole record: ``parts`` (bytes-like, its head first) of
        ``size`` bytes in all."""
        if self.stopped is not None:
            return
        self.now = now
        if self.limit and self._over_limit(size):
            self._write_block()  # compressed, the pending records may fit after all
            if self._over_limit(size):
                self._finish("limit")
                return
        self._pending += parts
        self._pending_size += size
        self.records += 1
        if self._pending_size >= BLOCK_SIZE:
            self._write_block()
        elif now - self._flushed_at >= FLUSH_INTERVAL:
            self._write_block(sync=True)

    def keep(self, data):
        """A copy of ``data``, a buffer its owner will reuse, that lasts
        until the block is staged (see ARENA_SIZE)."""
        fill = self._arena_fill
        end = fill + (data.nbytes if data.__class__ is memoryview else len(data))
        if self._stage is None or end > ARENA_SIZE:
            return bytes(data)  # a pipe is written later by the writer thread
        self._arena[fill:end] = data
        self._arena_fill = end
        return self._arena_view[fill:end]

    def _over_limit(self, size: int) -> bool:
        """Whether a record of ``size`` might take the file past the limit
        (pending records counted uncompressed, so it never does)."""
        end = self.written + self._pending_size + size + 2 * _BLOCK_HEAD.size + END_RESERVE
        return end > self.limit

    def _write_block(self, sync: bool = False) -> None:
        """The pending records as one block; ``sync``: on disk now (a flush
        by time or the end), else when the staging buffer is full."""
        pending = self._pending
        if not pending or self.stopped not in (None, "closed", "limit"):
            return
        size = self._pending_size
        self._pending = []
        self._pending_size = 0
        self._flushed_at = self.now
        # Compress only what compresses, judged by a sample of the largest
        # part (a frame or host bytes): zlib on random bytes runs at tens of
        # MB/s, slower than the stack.
        largest = max(pending, key=len)
        if len(largest) >= SAMPLE_SIZE:
            middle = (len(largest) - SAMPLE_SIZE) // 2
            sample = bytes(largest[middle : middle + SAMPLE_SIZE])
            compress = len(set(sample)) < SAMPLE_DISTINCT
        else:  # small records: heads, numbers and frame digests
            compress = True
        if compress and COMPRESS:
            packed = zlib.compress(b"".join(pending), 1)
            if len(packed) < size:
                self._write([_BLOCK_HEAD.pack(len(packed), ZLIB), packed], sync)
                self._arena_fill = 0
                return
        pending.insert(0, _BLOCK_HEAD.pack(size, STORED))
        self._write(pending, sync)
        self._arena_fill = 0  # staged (copied): the arena's bytes are free

    def _write(self, parts: list, sync: bool = False) -> None:
        """Copy ``parts`` into the staging buffer, handing it to the writer
        thread when full (for a pipe or a device, ``parts`` as they are),
        or stop recording after a write error."""
        if self._error is not None:
            self.stopped = f"write error: {self._error}"
            log.warning("recording %s stopped: %s", self.path, self._error)
            return
        self.written += sum(map(len, parts))
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer, name="record", daemon=True)
            self._thread.start()
        if self._stage is None:
            self._queue.put((parts, 0, None))  # waits while WRITE_QUEUE do: back-pressure
            return
        stage = self._stage
        fill = self._fill
        for part in parts:
            size = len(part)
            if fill + size < STAGE_SIZE:  # the common case: it fits
                stage[fill : fill + size] = part
                fill += size
                continue
            view = memoryview(part)
            while view:
                take = min(len(view), STAGE_SIZE - fill)
                stage[fill : fill + take] = view[:take]
                view = view[take:]
                fill += take
                if fill == STAGE_SIZE:
                    self._queue.put((stage, self._base, None))
                    self._base += STAGE_SIZE
                    stage = self._stage = self._free.get()  # waits for the disk: back-pressure
                    fill = 0
        self._fill = fill
        if sync and fill:  # a copy (aligned too): the loop goes on filling this buffer
            padded = -(-fill // DIRECT_ALIGN) * DIRECT_ALIGN
            copy = mmap.mmap(-1, padded)
            copy[:] = stage[:padded]
            self._queue.put((copy, self._base, self._base + fill))

    def _writer(self) -> None:
        """The writer thread: (parts, 0, None) for a pipe or a device,
        (buffer, offset, None) for a whole staging buffer, (bytes, offset,
        length) for a flush (an mmap): write it there and cut the file to
        length."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            data, offset, length = item
            try:
                if self._error is not None:
                    pass  # drained, not written: the recording has stopped
                elif self._stage is None:
                    self._writev(data)
                else:
                    self._pwrite(data, offset)
                    if length is not None:
                        os.ftruncate(self._fd, length)
            except OSError as exc:
                self._error = exc.strerror or str(exc)
            except Exception as exc:  # noqa: BLE001 - the thread must live: the loop waits on it
                self._error = f"{type(exc).__name__}: {exc}"
            finally:
                if data.__class__ is memoryview:  # a staging buffer: free again
                    self._free.put(data)

    def _pwrite(self, view, offset: int) -> None:
        view = memoryview(view)
        while view:
            try:
                done = os.pwrite(self._fd, view, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                # O_DIRECT taken at open but refused on writing: the page cache
                flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                self.direct = False
                continue
            if done <= 0:
                raise OSError(errno.EIO, "short write")
            view = view[done:]
            offset += done

    def _writev(self, parts: list) -> None:
        """``parts`` written in order, as they are (a pipe or a device)."""
        fd = self._fd
        for start in range(0, len(parts), _IOV_MAX):
            chunk = parts[start : start + _IOV_MAX]
            done = os.writev(fd, chunk)
            want = sum(map(len, chunk))
            if done < want:  # a short write (a full disk, a signal): the rest
                rest = memoryview(b"".join(chunk))[done:]
                while rest:
                    rest = rest[os.write(fd, rest) :]

    def _finish(self, reason: str) -> None:
        self.stopped = reason
        parts: list = []
        encode(reason, parts)
        encode(self.records, parts)
        body = b"".join(parts)
        self._pending.append(_RECORD_HEAD.pack(9 + len(body), END, self.now) + body)
        self._pending_size += 13 + len(body)
        self._write_block(sync=True)

    def close(self) -> None:
        if self._fd < 0:
            return
        if self.stopped is None:
            self._finish("closed")
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        os.close(self._fd)
        self._fd = -1


def _open_for_recording(path: str, dir_fd: int | None = None) -> tuple[int, bool]:
    """The file descriptor for a recording, and whether it has O_DIRECT;
    with ``dir_fd``, ``path``'s last component is opened in that directory."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    if dir_fd is not None:
        path = os.path.basename(path)
    try:
        fd = os.open(path, flags | os.O_DIRECT, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return os.open(path, flags, 0o600, dir_fd=dir_fd), False
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a device or a pipe: as it is
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        return fd, False
    return fd, True


class _Proxy:
    """Passes attributes on to ``_target``; recorded methods are set on the
    instance by ``_wrap``."""

    def __getattr__(self, name):
        return getattr(self._target, name)

    def rebind(self) -> None:
        """Call the target's methods as its class has them now."""
        for cell, target, name in self.__dict__.get("_cells", ()):
            cell[0] = getattr(target, name)


# ------------------------------------------------------------- fast encoding
# A call's record in the tagged encoding, built with one struct pack per run
# of fixed-size values rather than a recursive encode() per value: the
# encoder for each shape of call (method, classes of its arguments, keyword
# names and classes of their values, class of its result) and of event
# (class, classes of its fields) is generated once and kept in _SHAPES. Its
# output is byte for byte what encode() gives (tests/test_record.py checks).
# A shape with a value of another class (a str, a list, an int past 64
# bits) is encoded by encode().
_FIXED = {  # class -> (struct format, the values to pack for value v)
    type(None): ("B", "78"),
    bool: ("B", "(84 if {v} else 70)"),
    int: ("Bq", "105, {v}"),
    float: ("Bd", "100, {v}"),
    TcpConnection: ("Bq", "99, {v}.serial"),
}
_BLOBS = (bytes, bytearray, memoryview)  # the latter two copied: the caller reuses them
_NO_EVENTS = b"l\x00\x00\x00\x00"
_MISSING = object()
# Shapes seen, each with its encoder (None: encode() it). The NAT side makes
# a few dozen; a guest cannot add any (its frames are always bytes), so the
# bound only guards against a caller passing ever new classes.
MAX_SHAPES = 1024
_SHAPES: dict = {}


class _Unsupported(Exception):
    """A value of a class that _FIXED and _BLOBS do not cover."""


class _Builder:
    """The source of an encoder: runs of fixed-size values, each packed by
    one Struct, between blobs appended as they are."""

    def __init__(self, head_format: str, head_items: list[str]) -> None:
        self.lines: list[str] = []
        self.formats: list[str] = []
        self.fmt = [head_format]
        self.values: list[list[str]] = [list(head_items)]
        self.blobs: list[str] = []
        self.scope: dict = {}

    def fixed(self, code: str, items: str) -> None:
        self.fmt.append(code)
        self.values[-1].append(items)

    def constant(self, text: str) -> None:
        """A str known when the encoder is made (a keyword, a class name)."""
        key = text.encode("utf-8", "surrogateescape")
        name = f"K{len(self.scope)}"
        self.scope[name] = key
        self.fixed(f"BI{len(key)}s", f"115, {len(key)}, {name}")

    def value(self, expr: str, kind) -> None:
        if kind not in _FIXED and issubclass(kind, TcpConnection):
            kind = TcpConnection  # the traced subclass (--trace) is encoded the same
        if kind in _FIXED:
            code, items = _FIXED[kind]
            self.fixed(code, items.format(v=expr))
        elif kind in _BLOBS:
            blob = f"b{len(self.blobs)}"
            self.lines.append(f"    {blob} = {expr if kind is bytes else f'keep({expr})'}")
            self.fixed("BI", f"98, len({blob})")
            self.formats.append("".join(self.fmt))
            self.fmt = ["<"]
            self.values.append([])
            self.blobs.append(blob)
        else:
            raise _Unsupported(kind)

    def function(self, name: str, parameters: str, extra: str = "", prefix: int = 0):
        """The encoder: returns (parts, size), size being its bytes plus
        ``extra`` (an expression), and ``prefix`` (the head's u32) not."""
        self.formats.append("".join(self.fmt))
        structs = [struct.Struct(f) for f in self.formats]
        fixed_size = sum(s.size for s in structs)
        blob_sizes = "".join(f" + len({b})" for b in self.blobs)
        self.lines.append(f"    size = {fixed_size}{blob_sizes}{extra}")
        packed = []
        for i, items in enumerate(self.values):
            packed.append(f"S{i}.pack({', '.join(items).replace('SIZE', f'size - {prefix}')})")
            if i < len(self.blobs):
                packed.append(self.blobs[i])
        tail = ", ev" if extra else ""
        self.lines.append(f"    return [{', '.join(packed)}{tail}], size")
        source = f"def {name}({parameters}):\n" + "\n".join(self.lines) + "\n"
        scope = dict(self.scope, frame_digests=frame_digests)
        scope.update({f"S{i}": s for i, s in enumerate(structs)})
        exec(compile(source, f"<record {name}>", "exec"), scope)  # noqa: S102 - our own source
        return scope[name]


def _compile_call(index: int, kinds: tuple, names: tuple, result_kind, output: bool):
    """The encoder for one shape of call: f(args, kwargs, result, now, ev,
    keep) -> (parts, size) of the whole record, ``ev`` its encoded events,
    ``keep`` what copies a lent buffer (Recorder.keep); None if a value's
    class is not covered."""
    build = _Builder("<IBd", ["SIZE", str(index), "now"])
    try:
        build.fixed("BI", f"108, {len(kinds)}")
        for i, kind in enumerate(kinds):
            build.value(f"a[{i}]", kind)
        build.fixed("BI", f"109, {len(names)}")
        for name, kind in names:
            build.constant(name)
            build.value(f"k[{name!r}]", kind)
        if output:
            build.lines.append("    r = frame_digests(r)")
            build.value("r", bytes)
        else:
            build.value("r", result_kind)
    except _Unsupported:
        return None
    return build.function("encode_call", "a, k, r, now, ev, keep", " + len(ev)", prefix=4)


def _compile_event(kind, names: tuple, value_kinds: tuple):
    """The encoder for one shape of event: f(event) -> (parts, size)."""
    build = _Builder("<BI", [f"101, {len(names)}"])
    build.constant(kind.__name__)
    try:
        for name, value_kind in zip(names, value_kinds, strict=True):
            build.value(f"e.{name}", value_kind)
    except _Unsupported:
        return None
    return build.function("encode_event", "e, keep=bytes")


def encode_call(index: int, args, kwargs, result, now, ev: bytes, output: bool):
    """(parts, size) of a call's record by encode(): any shape."""
    parts: list = []
    encode(args, parts)
    encode(kwargs, parts)
    if output:
        digests = frame_digests(result)
        parts.append(b"b" + _U32.pack(len(digests)))
        parts.append(digests)
    else:
        encode(result, parts)
    parts.append(ev)
    size = 13 + sum(map(len, parts))
    parts.insert(0, _RECORD_HEAD.pack(size - 4, index, now))
    return parts, size


def encode_events(events, start: int, stop: int) -> bytes:
    """events[start:stop] as encode() gives a list of them."""
    parts = [b"l" + _U32.pack(stop - start)]
    shapes = _SHAPES
    for i in range(start, stop):
        event = events[i]
        kind = event.__class__
        names = _EVENT_FIELDS.get(kind)
        if names is None:
            if not is_dataclass(event):
                encode(event, parts)
                continue
            names = _EVENT_FIELDS[kind] = tuple(f.name for f in fields(event))
        kinds = tuple(type(getattr(event, name)) for name in names)
        key = (kind, *kinds)
        try:
            encoder = shapes[key]
        except KeyError:
            encoder = None
            if len(shapes) < MAX_SHAPES:
                encoder = shapes[key] = _compile_event(kind, names, kinds)
        if encoder is None:
            encode(event, parts)
            continue
        try:
            parts += encoder(event)[0]
        except struct.error:  # an int past 64 bits
            encode(event, parts)
    return b"".join(parts)


def _wrap(proxy, target, full_name: str, recorder: Recorder, events) -> None:
    name = full_name.rsplit(".", 1)[-1]
    method = getattr(target, name)
    # The method called, in a cell that _Proxy.rebind fills again: tracing
    # switches the stack's classes (stack/tracing.py), and the NAT side may
    # hold this wrapper.
    cell = [method]
    proxy.__dict__.setdefault("_cells", []).append((cell, target, name))
    index = INDEX[full_name]
    try:
        parameters = list(inspect.signature(method).parameters)
        now_at = parameters.index("now")
    except ValueError:
        now_at = 1 << 30  # no `now` among its arguments
    output = index in OUTPUTS
    # tcp.send_space changes nothing when it has room (it marks the
    # connection as waiting only when it returns 0), and the NAT side asks
    # it before every tcp.send: only its 0 is recorded (the send's own record
    # holds how many bytes were offered and taken).
    room_unrecorded = full_name == "tcp.send_space"
    add = recorder.add
    keep = recorder.keep
    shapes = _SHAPES
    get = shapes.get

    def call(*args, **kwargs):
        before = len(events)
        result = cell[0](*args, **kwargs)
        if recorder.stopped is not None or (room_unrecorded and result):
            return result
        if now_at < len(args):
            now = args[now_at]
        elif kwargs:
            now = kwargs.get("now", recorder.now)
        else:
            now = recorder.now
        after = len(events)
        ev = encode_events(events, before, after) if after > before else _NO_EVENTS
        if kwargs:
            key = (index, *map(type, args), *kwargs, *map(type, kwargs.values()), type(result))
        else:
            key = (index, *map(type, args), type(result))
        encoder = get(key, _MISSING)
        if encoder is _MISSING:
            encoder = None
            if len(shapes) < MAX_SHAPES:
                kinds = tuple(map(type, args))
                names = tuple((k, type(v)) for k, v in kwargs.items())
                encoder = shapes[key] = _compile_call(index, kinds, names, type(result), output)
        if encoder is None:
            parts, size = encode_call(index, args, kwargs, result, now, ev, output)
        else:
            try:
                parts, size = encoder(args, kwargs, result, now, ev, keep)
            except struct.error:  # an int past 64 bits: the general encoding
                parts, size = encode_call(index, args, kwargs, result, now, ev, output)
        add(parts, size, now)
        return result

    call.__name__ = name
    object.__setattr__(proxy, name, call)


class _RecordingPart(_Proxy):
    def __init__(self, target, prefix: str, recorder: Recorder, events) -> None:
        self._target = target
        self._prefix = prefix
        for name in METHODS:
            if name.startswith(prefix + "."):
                _wrap(self, target, name, recorder, events)


class RecordingStack(_Proxy):
    """A Stack that records the calls which change it (see the module's
    docstring). ``stack.out`` and ``stack.events`` are the real ones."""

    def __init__(self, stack, recorder: Recorder) -> None:
        self._target = stack
        self.recorder = recorder
        # Bytes handed to a sink would leave inside a recorded call, where
        # a replay (which has no sink) would queue them: the NAT side gets
        # every byte through TcpDataReceived instead.
        stack.tcp.direct_delivery = False
        self.events = stack.events
        self.tcp = _RecordingPart(stack.tcp, "tcp", recorder, stack.events)
        self.budget = _RecordingPart(stack.budget, "budget", recorder, stack.events)
        for name in METHODS:
            if name in RECORDED and "." not in name:
                _wrap(self, stack, name, recorder, stack.events)

    @property
    def out(self):
        return self._target.out

    def set_tracer(self, tracer) -> None:
        """Stack.set_tracer, then the recorded calls go to the traced
        methods (the stack, its TCP layer and its budget change class)."""
        self._target.set_tracer(tracer)
        for part in (self, self.tcp, self.budget):
            part.rebind()

    def close_recording(self) -> None:
        self.recorder.close()


def header_for(stack_config: StackConfig, seed: int, vnet: bool) -> dict:
    return {
        "format": FORMAT_VERSION,
        "pyslirp": pyslirp.__version__,
        "python": platform.python_version(),
        "seed": seed,
        "vnet": vnet,
        "stack": config_to_json(stack_config),
    }


class RecordingFiles:
    """The recordings of one forwarder, a file per stack. The first stack
    records to ``path``. A forwarder serving VMs makes a new stack for each
    VM that connects after the last one left, and that stack records to
    ``path.2``, ``path.3``, ... They are made in ``path``'s directory through
    a descriptor opened here, at the start, so that --enable-sandbox (which
    hides the file system later) does not stop them. ``limit`` (bytes, 0
    for none) bounds all the files together. Once it is used up, when
    ``path`` is a pipe or a device, or when a file cannot be made, later
    stacks are not recorded (a warning says why, once)."""

    def __init__(self, path: str, limit: int = 0) -> None:
        self.path = path
        self.limit = limit
        self.count = 0  # stacks recorded so far
        self.used = 0  # bytes in the files already closed
        self.stopped: str | None = None  # why later stacks are not recorded
        self._last: Recorder | None = None
        directory = os.path.dirname(path) or "."
        self._dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def stack(self, config):
        """A stack for the next loop: recorded into the next file, or plain
        (``Stack``) when no more can be recorded."""
        from pyslirp.stack.interface import Stack

        stack_config = config.stack_config()
        last, self._last = self._last, None
        if last is not None and self.stopped is None:
            self.used += last.written  # closed with its loop: the final size
            if not last.regular:
                self._stop(f"{self.path} is not a regular file")
            elif self.limit and self.limit - self.used < MIN_FILE:
                self._stop(f"--record-limit={self.limit} is used up")
        if self.stopped is not None:
            return Stack(stack_config, config.random)
        seed = int.from_bytes(os.urandom(8), "big")
        stack = Stack(stack_config, _random.Random(seed))
        header = header_for(stack_config, seed, bool(config.offload))
        if self.count == 0:  # the first: as the option check found it (errors are the start's)
            recorder = Recorder(self.path, header, self.limit)
        else:
            left = self.limit - self.used if self.limit else 0
            path = f"{self.path}.{self.count + 1}"
            try:
                recorder = Recorder(path, header, left, self._dir_fd)
            except OSError as exc:  # a full disk, a directory gone read-only
                self._stop(f"cannot write {path}: {exc.strerror}")
                return Stack(stack_config, config.random)
        self.count += 1
        self._last = recorder
        return RecordingStack(stack, recorder)

    def _stop(self, why: str) -> None:
        self.stopped = why
        log.warning("--record: the next VMs are not recorded (%d recorded): %s", self.count, why)

    def close(self) -> None:
        """After the last loop's close: a file begun for a VM that never
        came (its stack recorded nothing) is removed."""
        if self._dir_fd < 0:
            return
        last = self._last
        if last is not None and self.count > 1 and last.records == 0 and last.regular:
            try:
                os.unlink(os.path.basename(last.path), dir_fd=self._dir_fd)
            except OSError:
                pass
        os.close(self._dir_fd)
        self._dir_fd = -1


def recording_stack(config) -> RecordingStack:
    """The stack for a loop with ``config.record_path`` (a NetworkConfig)
    that records into that file alone: its own random source, seeded from
    os.urandom and recorded."""
    files = RecordingFiles(config.record_path, config.record_limit)
    try:
        return files.stack(config)
    finally:
        files.close()


# ------------------------------------------------------------- reading
class Record:
    __slots__ = ("index", "method", "now", "args", "kwargs", "result", "events")

    def __init__(self, index, method, now, args, kwargs, result, events) -> None:
        self.index = index  # 1-based, in the file
        self.method = method  # a name from METHODS
        self.now = now
        self.args = args
        self.kwargs = kwargs
        self.result = result
        self.events = events


class Recording:
    """A recording's header and its records, read as they are iterated.

    ``end`` is the END record's reason once it has been read ("closed",
    "limit"); iterating a file without one raises RecordingError
    ("truncated at record N") after its last whole record."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise RecordingError(exc.strerror or str(exc)) from None
        start = self._file.read(len(MAGIC) + 6)
        if len(start) < len(MAGIC) + 6 or not start.startswith(MAGIC):
            self.close()
            raise RecordingError("not a pyslirp recording")
        (self.format,) = _U16.unpack_from(start, len(MAGIC))
        if self.format != FORMAT_VERSION:
            self.close()
            raise RecordingError(
                f"recording format {self.format}; this pyslirp reads format {FORMAT_VERSION}"
            )
        (size,) = _U32.unpack_from(start, len(MAGIC) + 2)
        head = self._file.read(size)
        try:
            self.header = json.loads(head)
            if not isinstance(self.header, dict) or not isinstance(self.header.get("stack"), dict):
                raise ValueError("no stack configuration")
        except ValueError:
            self.close()
            raise RecordingError("damaged header") from None
        self.end: str | None = None
        self.end_count: int | None = None

    def close(self) -> None:
        self._file.close()

    def stack_config(self):
        """(StackConfig, unknown fields, missing fields) from the header."""
        return config_from_json(self.header["stack"])

    def __iter__(self):
        count = 0
        read = self._file.read
        while True:
            head = read(_BLOCK_HEAD.size)
            if not head:
                break
            if len(head) < _BLOCK_HEAD.size:
                raise RecordingError(f"truncated at record {count + 1}")
            size, method = _BLOCK_HEAD.unpack(head)
            if size > MAX_BLOCK:
                raise RecordingError(f"damaged block at record {count + 1}")
            data = read(size)
            if len(data) < size:
                raise RecordingError(f"truncated at record {count + 1}")
            if method == ZLIB:
                inflate = zlib.decompressobj()
                try:
                    data = inflate.decompress(data, MAX_BLOCK)
                except zlib.error:
                    raise RecordingError(f"damaged block at record {count + 1}") from None
                if inflate.unconsumed_tail or not inflate.eof:
                    raise RecordingError(f"damaged block at record {count + 1}")
            elif method != STORED:
                raise RecordingError(f"damaged block at record {count + 1}")
            pos = 0
            while pos < len(data):
                count += 1
                if pos + _RECORD_HEAD.size > len(data):
                    raise RecordingError(f"damaged record {count}")
                length, index, now = _RECORD_HEAD.unpack_from(data, pos)
                body_end = pos + 4 + length
                if index >= len(METHODS) or body_end > len(data) or length < 9:
                    raise RecordingError(f"damaged record {count}")
                pos += _RECORD_HEAD.size
                if index == END:
                    self.end, pos = decode(data, pos)
                    self.end_count, pos = decode(data, pos)
                    return
                try:
                    args, pos = decode(data, pos)
                    kwargs, pos = decode(data, pos)
                    result, pos = decode(data, pos)
                    events, pos = decode(data, pos)
                except RecordingError as exc:
                    raise RecordingError(f"damaged record {count}: {exc}") from None
                if (
                    pos != body_end
                    or not isinstance(args, list)
                    or not isinstance(kwargs, dict)
                    or not all(isinstance(k, str) for k in kwargs)
                    or not isinstance(events, list)
                    or (
                        index in OUTPUTS
                        and not (isinstance(result, bytes) and len(result) % FRAME_DIGEST_SIZE == 0)
                    )
                ):
                    raise RecordingError(f"damaged record {count}")
                yield Record(count, METHODS[index], now, args, kwargs, result, events)
        raise RecordingError(f"truncated at record {count + 1}")
