"""What differs between the Pythons we run on: CPython 3.11 (tested) and
Debian 12's PyPy (7.3.11, Python 3.9), which the benchmark measures because
its JIT halves our per-packet interpreter time.

PyPy 3.9 evaluates no ``X | Y`` type at run time (hence ``from __future__
import annotations`` in every module) and has no ``dataclass(slots=...)``;
the system calls it lacks are in pyslirp/nat/compat.py. This module imports
nothing but sys, so that the sans-IO stack may use it."""

from __future__ import annotations

import sys

# ``@dataclass(**SLOTS)``: __slots__ where dataclass can make them (3.10+).
SLOTS = {"slots": True} if sys.version_info >= (3, 10) else {}
