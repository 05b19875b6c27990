"""A QEMU guest for the VM tests, driven through its serial console.

    with Guest(["-netdev", "stream,...", "-device", "virtio-net-pci,netdev=n0"]) as vm:
        status, output = vm.run("udhcpc -i eth0 -n -q -s /etc/udhcpc.script")

QEMU runs under TCG (no KVM here) with the kernel and initramfs of
tests/vmimage.py; the console is QEMU's stdio. ``run`` sends one shell line
followed by an echo of a numbered marker and ``$?``, and reads until the
marker comes back (bounded by ``timeout``); the shell's echo of the line
holds ``$?``, not a number, so it never matches.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import time

from tests import vmimage

BOOT_TIMEOUT = 90.0  # TCG on two shared cores: a boot takes 3-10 s, more under load
QEMU = "qemu-system-x86_64"


class GuestError(AssertionError):
    pass


class Guest:
    def __init__(self, netdev_args: list[str], memory: str = "256M") -> None:
        kernel, initrd = vmimage.build()
        self.proc = subprocess.Popen(
            [
                QEMU, "-machine", "q35", "-accel", "tcg", "-m", memory, "-nodefaults",
                "-display", "none", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
                "-append", "console=ttyS0 quiet panic=-1", "-serial", "stdio",
                *netdev_args,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.output = b""  # everything the console said
        self._seen = 0  # where the next run's search starts
        self._count = 0
        try:
            self._wait_for(rb"pyslirp-guest-ready", BOOT_TIMEOUT)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop QEMU (by its PID) and wait for it."""
        proc = self.proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def _wait_for(self, pattern: bytes, timeout: float) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            match = regex.search(self.output, self._seen)
            if match is not None:
                self._seen = match.end()
                return match
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(
                    f"no {pattern!r} from the guest in {timeout:.0f} s; console tail:\n"
                    + self.output[-2000:].decode(errors="replace")
                )
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    raise GuestError(
                        f"QEMU exited ({self.proc.wait(timeout=10)}); console tail:\n"
                        + self.output[-2000:].decode(errors="replace")
                    )
                self.output += data

    def run(self, line: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run one shell line in the guest: (its exit status, its output)."""
        self._count += 1
        marker = f"@@END{self._count}"
        start = len(self.output)
        self.proc.stdin.write(f'{line}; echo "{marker} $? @@"\n'.encode())
        self.proc.stdin.flush()
        match = self._wait_for(marker.encode() + rb" (\d+) @@", timeout)
        text = self.output[start : match.start()].decode(errors="replace")
        return int(match.group(1)), text

    def check(self, line: str, timeout: float = 60.0) -> str:
        """``run`` that fails the test when the line's status is not 0."""
        status, text = self.run(line, timeout)
        if status != 0:
            raise GuestError(f"{line!r} exited {status}:\n{text}")
        return text
