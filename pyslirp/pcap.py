"""A pcap writer (the classic libpcap format, LINKTYPE_ETHERNET) for --pcap."""

from __future__ import annotations

import struct
import time

_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
MAGIC = 0xA1B2C3D4  # microsecond timestamps
LINKTYPE_ETHERNET = 1
SNAPLEN = 262144


class PcapWriter:
    def __init__(self, path: str) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - lives as long as the writer
        self._file.write(_GLOBAL.pack(MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))
        self._file.flush()
        # Frames written so far: the last one's index, 1-based as Wireshark
        # numbers them (the trace names a dropped guest frame by it).
        self.frames = 0

    def write(self, frame) -> None:
        now = time.time()
        seconds = int(now)
        micros = int((now - seconds) * 1_000_000)
        captured = frame[:SNAPLEN]
        self._file.write(_RECORD.pack(seconds, micros, len(captured), len(frame)))
        self._file.write(captured)
        self.frames += 1

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
