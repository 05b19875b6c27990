"""The C library through ctypes, loaded once, and the constants of the calls
that the front end makes with it (namespaces, mounts).

The library is the process's own symbols (``CDLL(None)``: libc's among
them), never a search with ``ctypes.util.find_library``: that runs
ldconfig in a new process, which costs start-up time and which seccomp
(--enable-seccomp forbids execve) would kill. Loaded on first use, so that
a mode that makes none of these calls does not pay for it.
"""

from __future__ import annotations

import os

# <sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

# <sys/mount.h>: mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
# <sys/mount.h>: umount2(2) flags
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

_loaded = None  # ctypes.CDLL, once loaded


def libc():
    """The C library, with the argument types of the calls made here set
    (mount, umount2, unshare, setns, prctl; syscall returns a long). Calls
    set errno for ``ctypes.get_errno()``."""
    global _loaded
    if _loaded is None:
        import ctypes  # here: a process that never calls libc (the server) never loads ctypes

        lib = ctypes.CDLL(None, use_errno=True)
        lib.mount.argtypes = [
            ctypes.c_char_p,  # source
            ctypes.c_char_p,  # target
            ctypes.c_char_p,  # filesystem type
            ctypes.c_ulong,  # MS_* flags
            ctypes.c_void_p,  # data
        ]
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.unshare.argtypes = [ctypes.c_int]
        lib.setns.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        lib.syscall.restype = ctypes.c_long
        _loaded = lib
    return _loaded


def get_errno() -> int:
    """The errno that the last call through ``libc()`` left."""
    import ctypes

    return ctypes.get_errno()


def errno_text() -> str:
    """strerror of the errno that the last call through ``libc()`` left."""
    return os.strerror(get_errno())
