"""The VM tests' guest: Debian's kernel and a busybox initramfs, built once
and cached under /var/cache/pyslirp/vm (``python3 tests/vmimage.py`` from
.ci/install; the tests build it when it is missing).

Nothing is installed: the kernel package (the versioned one that
linux-image-amd64 names) and busybox-static are fetched with ``apt-get
download`` and unpacked with ``dpkg-deb -x``. The kernel is turned from the
compressed vmlinuz into the plain ELF vmlinux (under TCG, decompression
costs about 5 s of every boot), and the initramfs holds busybox, the
virtio modules in dependency order (read from each module's ``.modinfo``:
the package ships no modules.dep) and an init that loads them and then
serves a shell on the serial console.
"""

from __future__ import annotations

import glob
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zlib

CACHE = "/var/cache/pyslirp/vm"
KERNEL = os.path.join(CACHE, "vmlinux")
INITRD = os.path.join(CACHE, "initrd.cpio")
# The modules the guest needs: the network card and the PCI transport.
WANTED_MODULES = ("virtio_pci", "virtio_net")

# udhcpc's script (udhcpc -s /etc/udhcpc.script): the lease's address,
# route and resolver.
DHCP_SCRIPT = """#!/bin/sh
case "$1" in
bound|renew)
  ip addr flush dev "$interface"
  ip addr add "$ip/${mask:-24}" dev "$interface"
  for r in $router; do ip route add default via "$r" dev "$interface"; done
  : > /etc/resolv.conf
  for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
  ;;
esac
"""

# The guest's init: modules, /proc and friends, then a shell on ttyS0 that
# the tests drive (tests/vmguest.py). Each command line the test sends ends
# with an echo of a marker and the status.
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m.ko; done
ip link set lo up
mkdir -p /tmp /var/run
ip link set eth0 up
echo "pyslirp-guest-ready"
exec setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'
"""


def _run(*args, cwd=None) -> None:
    subprocess.run(args, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kernel_package() -> str:
    """linux-image-amd64's versioned package (linux-image-6.1.0-NN-amd64)."""
    out = subprocess.run(
        ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"Depends: (linux-image-\S+)", out)
    if match is None:
        raise RuntimeError("apt-cache depends linux-image-amd64 names no kernel package")
    return match.group(1)


def _unpack(package: str, into: str, work: str) -> None:
    _run("apt-get", "download", "-q", package, cwd=work)
    (deb,) = glob.glob(os.path.join(work, f"{package}_*.deb"))
    _run("dpkg-deb", "-x", deb, into)
    os.unlink(deb)


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The ELF image inside a bzImage: find each known compression's magic
    in turn and take the first payload that decompresses to an ELF file
    (as Linux's scripts/extract-vmlinux does)."""
    decoders = (
        (b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ)),
        (b"\x1f\x8b\x08", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)),
    )
    for magic, make in decoders:
        start = vmlinuz.find(magic)
        while start >= 0:
            try:
                data = make().decompress(vmlinuz[start:])
            except (lzma.LZMAError, zlib.error, EOFError):
                data = b""
            if data[:4] == b"\x7fELF":
                return data
            start = vmlinuz.find(magic, start + 1)
    raise RuntimeError("no xz or gzip payload with an ELF image in the kernel")


def _modinfo(path: str) -> dict:
    """The ``key=value`` strings of a module's .modinfo section (read raw:
    they are NUL-separated and start with ``depends=`` or ``name=``)."""
    with open(path, "rb") as f:
        data = f.read()
    info = {}
    for key in (b"depends=", b"name="):
        at = data.find(b"\x00" + key)
        if at >= 0:
            end = data.index(b"\x00", at + 1)
            info[key[:-1].decode()] = data[at + 1 + len(key) : end].decode()
    return info


def _module_order(module_dir: str, wanted) -> list[str]:
    """Paths of ``wanted`` and their dependencies, each after what it needs."""
    paths = {}
    for path in glob.glob(os.path.join(module_dir, "**", "*.ko"), recursive=True):
        paths[os.path.basename(path)[:-3].replace("-", "_")] = path
    order: list[str] = []

    def visit(name: str, depth: int) -> None:
        if name in order or depth > 20:
            return
        deps = _modinfo(paths[name]).get("depends", "")
        for dep in filter(None, deps.split(",")):
            visit(dep.replace("-", "_"), depth + 1)
        order.append(name)

    for name in wanted:
        visit(name, 0)
    return [paths[name] for name in order]


def _cpio(entries) -> bytes:
    """A newc cpio archive of (name, mode, data) entries."""
    out = []
    for ino, (name, mode, data) in enumerate(entries, 1):
        encoded = name.encode() + b"\x00"
        header = "070701" + "".join(
            f"{v:08x}"
            for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        )
        out += [header.encode(), encoded, b"\x00" * (-(110 + len(encoded)) % 4)]
        out += [data, b"\x00" * (-len(data) % 4)]
    trailer = b"TRAILER!!!\x00"
    out += [b"070701" + b"0" * 8 * 4 + b"00000001" + b"0" * 8 * 6 + f"{len(trailer):08x}".encode()]
    out += [b"0" * 8, trailer, b"\x00" * (-(110 + len(trailer)) % 4)]
    return b"".join(out)


def build(cache: str = CACHE) -> tuple[str, str]:
    """(vmlinux, initrd) in ``cache``, built if missing."""
    kernel, initrd = os.path.join(cache, "vmlinux"), os.path.join(cache, "initrd.cpio")
    if os.path.exists(kernel) and os.path.exists(initrd):
        return kernel, initrd
    os.makedirs(cache, exist_ok=True)
    work = tempfile.mkdtemp(dir=cache)
    try:
        os.chmod(work, 0o755)  # apt-get download runs as _apt
        root = os.path.join(work, "root")
        _unpack(_kernel_package(), root, work)
        busybox = "/var/cache/pyslirp/busybox-static/bin/busybox"
        if not os.path.exists(busybox):
            _unpack("busybox-static", os.path.join(work, "bb"), work)
            busybox = os.path.join(work, "bb", "bin", "busybox")
        (vmlinuz,) = glob.glob(os.path.join(root, "boot", "vmlinuz-*"))
        (module_dir,) = glob.glob(os.path.join(root, "lib", "modules", "*"))
        modules = _module_order(module_dir, WANTED_MODULES)
        entries = [(d, 0o40755, b"") for d in ("bin", "dev", "etc", "proc", "sys", "lib")]
        entries.append(("lib/modules", 0o40755, b""))
        with open(busybox, "rb") as f:
            entries.append(("bin/busybox", 0o100755, f.read()))
        names = []
        for path in modules:
            name = os.path.basename(path)[:-3]
            names.append(name)
            with open(path, "rb") as f:
                entries.append((f"lib/modules/{name}.ko", 0o100644, f.read()))
        entries.append(("modules.order", 0o100644, " ".join(names).encode()))
        entries.append(("init", 0o100755, INIT.encode()))
        entries.append(("etc/udhcpc.script", 0o100755, DHCP_SCRIPT.encode()))
        with open(vmlinuz, "rb") as f:
            elf = extract_vmlinux(f.read())
        with open(initrd + ".tmp", "wb") as f:
            f.write(_cpio(entries))
        with open(kernel + ".tmp", "wb") as f:
            f.write(elf)
        os.replace(initrd + ".tmp", initrd)
        os.replace(kernel + ".tmp", kernel)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return kernel, initrd


if __name__ == "__main__":
    print(*build(sys.argv[1] if len(sys.argv) > 1 else CACHE))
