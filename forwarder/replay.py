"""``pyslirp replay FILE``: play a recording (--record) through a fresh stack.

The stack is built from the recorded configuration and random seed, in
this process, with no namespace, TAP or socket. Every record is fed to it
(a frame from the guest, a command from the NAT side, a timer call, each
with its recorded ``now``) and what the stack did is checked against the
recording: the frames it sent (length and digests), the events
it raised and what each command returned. The first difference is
reported, with the record, time and frame it concerns, and the replay
stops there: after it the two stacks no longer hold the same state.

Frames are numbered as in the pcap that ``--pcap`` writes: every frame from
and to the guest, in order, from 1. ``--until`` and ``--break`` take such
a number (``--until`` also a time, ``5s``, from the first record).

Exit status: 0 when the whole recording replays without a difference, 1
after a difference or for a file that is not a recording, is damaged or
was cut short (a one-line message).
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import struct
import sys

import pyslirp
from pyslirp.pcap import PcapWriter
from pyslirp.record import (
    FRAME_DIGEST_SIZE,
    INDEX,
    INPUTS,
    OUTPUTS,
    ConnRef,
    Recording,
    RecordingError,
    decode,
    encode,
    frame_digests,
    short,
    split_digests,
)
from pyslirp.settings import fields, is_dataclass
from pyslirp.stack import virtio
from pyslirp.stack.config import StackConfig, TcpConfig
from pyslirp.stack.interface import Stack
from pyslirp.trace import open_tracer

USAGE_NAME = "pyslirp replay"


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as the forwarder's errors
        raise _Usage(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=USAGE_NAME, description="Play a recording (--record) through a fresh stack.")
    p.add_argument("file")
    p.add_argument("--until", help="stop after frame N, or at time Ts from the start")
    p.add_argument(
        "--trace", nargs="?", const="-", help="trace the replayed stack (default: stderr)"
    )
    p.add_argument("--pcap", help="write the guest-side frames to this pcap file")
    p.add_argument("--break", dest="break_at", type=int, help="enter pdb before frame N")
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="change a stack setting"
    )
    return p


def _set_field(config: StackConfig, assignment: str) -> str:
    """Apply ``FIELD=VALUE`` (a StackConfig field, or a TcpConfig one as
    FIELD or tcp.FIELD); the text for the report."""
    name, sep, text = assignment.partition("=")
    if not sep:
        raise _Usage(f"--set {assignment!r}: expected FIELD=VALUE")
    target = config
    field_name = name
    if name.startswith("tcp."):
        target, field_name = config.tcp, name[4:]
    elif name not in {f.name for f in fields(StackConfig)}:
        target = config.tcp
    if field_name not in {f.name for f in fields(type(target))} or field_name == "tcp":
        raise _Usage(f"--set: no stack setting {name!r}")
    current = getattr(target, field_name)
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            value = text.lower() in ("true", "1", "yes")
        elif isinstance(current, int):
            value = int(text, 0)
        elif isinstance(current, float):
            value = float(text)
        elif isinstance(current, bytes):
            value = bytes.fromhex(text)
        else:
            raise _Usage(f"--set: {name} cannot be set from the command line")
    except ValueError:
        raise _Usage(f"--set: bad value {text!r} for {name}") from None
    setattr(target, field_name, value)
    return f"{name}={value!r} (recorded {current!r})"


# ------------------------------------------------------------- frames, briefly
_TCP_FLAGS = "FSRPAUEC"


def describe_frame(frame) -> str:
    """One line about an Ethernet frame: addresses, protocol, TCP's fields."""
    frame = bytes(frame)
    if len(frame) < 14:
        return f"{len(frame)} bytes (runt)"
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    if ethertype == 0x0806:
        return f"{len(frame)} bytes ARP"
    if ethertype == 0x0800 and len(frame) >= 34:
        ihl = (frame[14] & 15) * 4
        proto = frame[23]
        src = str(ipaddress.IPv4Address(frame[26:30]))
        dst = str(ipaddress.IPv4Address(frame[30:34]))
        l4 = 14 + ihl
    elif ethertype == 0x86DD and len(frame) >= 54:
        proto = frame[20]
        src = str(ipaddress.IPv6Address(frame[22:38]))
        dst = str(ipaddress.IPv6Address(frame[38:54]))
        l4 = 54
    else:
        return f"{len(frame)} bytes ethertype {ethertype:#06x}"
    if proto == 6 and len(frame) >= l4 + 20:
        sport, dport, seq, ack, off, flags, win = struct.unpack_from("!HHIIBBH", frame, l4)
        names = "".join(c for i, c in enumerate(_TCP_FLAGS) if flags >> i & 1)
        payload = len(frame) - l4 - (off >> 4) * 4
        return (
            f"TCP {src}:{sport} > {dst}:{dport} [{names}] seq={seq} ack={ack} win={win} "
            f"len={payload}"
        )
    if proto == 17 and len(frame) >= l4 + 8:
        sport, dport = struct.unpack_from("!HH", frame, l4)
        return f"UDP {src}:{sport} > {dst}:{dport} len={len(frame) - l4 - 8}"
    if proto in (1, 58):
        return f"ICMP {src} > {dst} type={frame[l4] if len(frame) > l4 else '?'}"
    return f"IP proto {proto} {src} > {dst} {len(frame)} bytes"


class _Pcap(PcapWriter):
    """PcapWriter with the recorded time rather than the clock's."""

    def write_at(self, frame, at: float) -> None:
        seconds = int(at)
        micros = int((at - seconds) * 1_000_000)
        captured = frame[:262144]
        self._file.write(struct.pack("<IIII", seconds, micros, len(captured), len(frame)))
        self._file.write(captured)


# ------------------------------------------------------------- the replay
_NAT_HOLDS = "held by the NAT side"  # conn.user in a replay (see Replay._nat_holds)


class Divergence(Exception):
    pass


class Replay:
    """The replayed stack and where it is: ``frame_index`` is the number of
    the last frame fed or sent (as numbered in --pcap), ``record`` the
    record being played."""

    def __init__(self, recording: Recording, config: StackConfig, pcap=None, tracer=None):
        header = recording.header
        seed = header.get("seed")
        if not isinstance(seed, int):
            raise RecordingError("damaged header (no seed)")
        self.stack = Stack(config, random.Random(seed))
        self.vnet = bool(header.get("vnet"))
        if tracer is not None:
            self.stack.set_tracer(tracer)
        self.pcap = pcap
        self.conns: dict[int, object] = {}
        self.frame_index = 0
        self.record = None
        self.start: float | None = None
        self.counts = {"records": 0, "frames-in": 0, "frames-out": 0, "events": 0}

    def _target(self, method: str):
        stack = self.stack
        if method.startswith("tcp."):
            return getattr(stack.tcp, method[4:])
        if method.startswith("budget."):
            return getattr(stack.budget, method[7:])
        return getattr(stack, method)

    def _resolve(self, value):
        if isinstance(value, ConnRef):
            conn = self.conns.get(int(value))
            if conn is None:
                raise Divergence(f"connection #{int(value)} does not exist in the replay")
            return conn
        if isinstance(value, list):
            return tuple(self._resolve(v) for v in value)
        return value

    def _learn(self, value) -> None:
        if hasattr(value, "serial") and hasattr(value, "remote_port"):
            self.conns[value.serial] = value
        elif is_dataclass(value):
            for f in fields(value):
                self._learn(getattr(value, f.name))

    @staticmethod
    def _nat_holds(method: str, args, result, events) -> None:
        """``conn.user``, as the NAT side sets it: the stack looks at it
        (TcpLayer.remove keeps a closed connection's unread bytes for a
        NAT side that holds it), and it is not a call, so it is not in the
        recording. The NAT takes a connection when it hears of it (a SYN's
        event, or its own tcp.connect) and lets go when it refuses or
        aborts it, releases its bytes, or hears that it ended."""
        if method == "tcp.connect" and result is not None:
            result.user = _NAT_HOLDS
        elif method in ("tcp.refuse", "tcp.abort", "tcp.release_received"):
            args[0].user = None
        for event in events:
            kind = event.__class__.__name__
            if kind == "TcpConnectRequested":
                event.conn.user = _NAT_HOLDS
            elif kind in ("TcpConnectionReset", "TcpConnectionClosed"):
                event.conn.user = None

    def frames_of(self, record) -> int:
        """How many frames a record feeds or sends (as recorded)."""
        index = INDEX[record.method]
        if index in INPUTS:
            return 1
        if index in OUTPUTS and isinstance(record.result, bytes):
            return len(record.result) // FRAME_DIGEST_SIZE
        return 0

    def play(self, record) -> None:
        """Feed one record; Divergence if the stack does otherwise."""
        self.record = record
        if self.start is None:
            self.start = record.now
        index = INDEX[record.method]
        args = [self._resolve(a) for a in record.args]
        kwargs = {k: self._resolve(v) for k, v in record.kwargs.items()}
        stack = self.stack
        events = stack.events
        if index in INPUTS:
            self.frame_index += 1
            self.counts["frames-in"] += 1
            if self.pcap is not None:
                frame = args[0]
                if index == INDEX["receive_vnet_frame"]:
                    frame = frame[virtio.HEADER_LEN :]
                self.pcap.write_at(frame, record.now)
        before = len(events)
        try:
            result = self._target(record.method)(*args, **kwargs)
        except Exception as exc:
            raise Divergence(
                f"{record.method} raised {type(exc).__name__}: {exc} (recorded: it returned)"
            ) from None
        new = [events[i] for i in range(before, len(events))]
        events.clear()  # the NAT side's part: it takes every event
        for event in new:
            self._learn(event)
        self._learn(result)
        self._nat_holds(record.method, args, result, new)
        self.counts["records"] += 1
        self.counts["events"] += len(new)
        if index in OUTPUTS:
            self._check_frames(record, result)
        else:
            got = _normal(result)
            if got != record.result:
                raise Divergence(
                    f"{record.method} returned {short(got)}, recorded {short(record.result)}"
                )
        got_events = _normal(new)
        if got_events != record.events:
            raise Divergence(_event_difference(record.events, got_events))

    def _check_frames(self, record, items) -> None:
        expected = split_digests(record.result) if isinstance(record.result, bytes) else []
        got = split_digests(frame_digests(items))
        frames = [item[1] if item.__class__ is tuple else item for item in items]
        if self.pcap is not None:
            for frame in frames:
                self.pcap.write_at(frame, record.now)
        for i in range(max(len(expected), len(got))):
            number = self.frame_index + i + 1
            if i >= len(got):
                raise Divergence(
                    f"frame {number} to the guest: recorded {expected[i][0]} bytes, "
                    f"the replay sent nothing (it sent {len(got)} frames here, "
                    f"recorded {len(expected)})"
                )
            if i >= len(expected):
                raise Divergence(
                    f"frame {number} to the guest: not in the recording, the replay sent "
                    f"{describe_frame(frames[i])}"
                )
            if got[i] != expected[i]:
                raise Divergence(
                    f"frame {number} to the guest: recorded {expected[i][0]} bytes "
                    f"(crc {expected[i][1]:08x}), the replay sent "
                    f"{describe_frame(frames[i])}"
                )
        self.frame_index += len(expected)
        self.counts["frames-out"] += len(expected)


def _normal(value):
    """A live value as a decoded record holds it."""
    parts: list = []
    encode(value, parts)
    return decode(b"".join(parts), 0)[0]


def _event_difference(expected: list, got: list) -> str:
    for i in range(max(len(expected), len(got))):
        want = expected[i] if i < len(expected) else None
        have = got[i] if i < len(got) else None
        if want != have:
            return f"event {i + 1}: recorded {short(want)}, the replay raised {short(have)}"
    return "events differ"


def _parse_until(text: str | None):
    """(frame number, seconds): one of them None."""
    if text is None:
        return None, None
    try:
        if text.endswith("s"):
            return None, float(text[:-1])
        return int(text), None
    except ValueError:
        raise _Usage(f"--until {text!r}: expected a frame number or a time such as 5s") from None


def _differences(recording: Recording, unknown, missing, settings) -> list[str]:
    lines = []
    header = recording.header
    version = header.get("pyslirp")
    if version != pyslirp.__version__:
        lines.append(f"recorded by pyslirp {version}, replayed by pyslirp {pyslirp.__version__}")
    if unknown:
        lines.append(f"settings this version does not have (ignored): {', '.join(unknown)}")
    if missing:
        lines.append(
            f"settings the recording does not have (this version's default): {', '.join(missing)}"
        )
    lines += [f"changed: {s}" for s in settings]
    return lines


def run(argv: list[str], out=None) -> int:
    out = out or sys.stdout
    args = _parser().parse_args(argv)
    until_frame, until_time = _parse_until(args.until)
    recording = Recording(args.file)
    try:
        config, unknown, missing = recording.stack_config()
        if not isinstance(config.tcp, TcpConfig):
            raise RecordingError("damaged header (tcp)")
        settings = [_set_field(config, s) for s in args.set]
        pcap = _Pcap(args.pcap) if args.pcap else None
        replay = Replay(recording, config, pcap)
        if args.trace:
            tracer = open_tracer(args.trace, frame_index=lambda: replay.frame_index)
            replay.stack.set_tracer(tracer)
        else:
            tracer = None
        for line in _differences(recording, unknown, missing, settings):
            out.write(f"{USAGE_NAME}: {line}\n")
        status = _play(replay, recording, args, until_frame, until_time, out)
        if tracer is not None:
            tracer.close()
        if pcap is not None:
            pcap.close()
        return status
    finally:
        recording.close()


def _play(replay: Replay, recording: Recording, args, until_frame, until_time, out) -> int:
    stopped = None
    try:
        for record in recording:
            if replay.start is None:
                replay.start = record.now
            if until_time is not None and record.now - replay.start > until_time:
                stopped = f"at {until_time:g} s (--until)"
                break
            if until_frame is not None and replay.frame_index >= until_frame:
                stopped = f"after frame {until_frame} (--until)"
                break
            count = replay.frames_of(record)
            if args.break_at is not None and (
                replay.frame_index < args.break_at <= replay.frame_index + count
            ):
                _breakpoint(replay, record)
            try:
                replay.play(record)
            except Divergence as exc:
                _summary(replay, out)
                out.write(
                    f"{USAGE_NAME}: first divergence at record {record.index} "
                    f"(t=+{record.now - replay.start:.6f} s, {record.method}): {exc}\n"
                )
                out.flush()
                return 1
    except RecordingError as exc:
        _summary(replay, out)
        sys.stderr.write(f"pyslirp: {recording.path}: {exc}\n")
        return 1
    _summary(replay, out)
    if stopped is not None:
        out.write(f"{USAGE_NAME}: stopped {stopped}; no divergence until there\n")
    else:
        if recording.end == "limit":
            out.write(f"{USAGE_NAME}: the recording stopped at its size limit (--record-limit)\n")
        out.write(f"{USAGE_NAME}: no divergence\n")
    return 0


def _breakpoint(replay: Replay, record) -> None:
    """pdb, just before ``record`` feeds or sends frame --break."""
    import pdb

    stack = replay.stack  # noqa: F841 - for the pdb session
    frame_index = replay.frame_index + 1  # noqa: F841 - the frame about to come
    sys.stdout.write(
        f"{USAGE_NAME}: before frame {frame_index}, record {record.index} ({record.method}); "
        "'c' continues\n"
    )
    sys.stdout.flush()
    pdb.Pdb().set_trace()
    pass  # pdb stops here: stack, record, replay, frame_index are in scope


def _summary(replay: Replay, out) -> None:
    c = replay.counts
    out.write(
        f"{USAGE_NAME}: {c['records']} records, {c['frames-in']} frames from the guest, "
        f"{c['frames-out']} to it, {c['events']} events\n"
    )


def main(argv: list[str]) -> int:
    try:
        return run(argv)
    except _Usage as exc:
        sys.stderr.write(f"{USAGE_NAME}: {exc}\n")
        return 1
    except RecordingError as exc:
        path = argv[0] if argv and not argv[0].startswith("-") else "recording"
        for arg in argv:
            if not arg.startswith("-"):
                path = arg
                break
        sys.stderr.write(f"pyslirp: {path}: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"{USAGE_NAME}: {exc.filename or ''}: {exc.strerror}\n")
        return 1
