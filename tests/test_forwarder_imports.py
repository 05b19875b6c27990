"""The front end's modules, read as source: imports point one way (function-
local imports count), no module reaches a private name of another, and each
constant and the C library loader have one home (forwarder.libc)."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "forwarder"
# Private names of the standard library that are its documented API.
DOCUMENTED_PRIVATE = {("os", "_exit")}


def modules() -> dict[str, ast.Module]:
    return {
        f"forwarder.{path.stem}" if path.stem != "__init__" else "forwarder": ast.parse(
            path.read_text(), str(path)
        )
        for path in sorted(PACKAGE.glob("*.py"))
    }


def imports(name: str, tree: ast.Module):
    """(imported module, names taken from it) for every import statement,
    at any depth, relative ones made absolute."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if name == "forwarder" else name.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            taken = [alias.name for alias in node.names]
            yield base, taken
            for alias in taken:  # from . import api
                if f"{base}.{alias}" in MODULES:
                    yield f"{base}.{alias}", []


MODULES = modules()


def graph() -> dict[str, set[str]]:
    edges = {name: set() for name in MODULES}
    for name, tree in MODULES.items():
        for target, _ in imports(name, tree):
            if target in MODULES and target != name:
                edges[name].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_front_end():
    edges = graph()
    assert "forwarder.runmode" in edges["forwarder.cli"]  # local imports are seen
    assert find_cycle(edges) is None


def test_the_console_script_is_thin():
    # cli imports the modes' modules only in the modes that need them.
    top = {
        target
        for node in MODULES["forwarder.cli"].body
        if isinstance(node, (ast.ImportFrom, ast.Import))
        for target, _ in imports("forwarder.cli", ast.Module(body=[node], type_ignores=[]))
    }
    assert {"forwarder.runmode", "forwarder.serve"}.isdisjoint(top)


def test_no_private_name_imported_or_reached_across_modules():
    found = []
    for name, tree in MODULES.items():
        for target, taken in imports(name, tree):
            found += [f"{name}: from {target} import {t}" for t in taken if _private(t)]
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and _private(node.attr)
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                owner = ast.unparse(node.value)
                if (owner, node.attr) not in DOCUMENTED_PRIVATE:
                    found.append(f"{name}:{node.lineno}: {owner}.{node.attr}")
    assert found == []


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize(
    "pattern",
    [
        r"^(CLONE_NEW\w+|MS_\w+|MNT_\w+|UMOUNT_\w+) *=",  # mount and namespace flags
        r"CDLL\(",  # the C library loader
    ],
)
def test_one_home_for_the_libc_loader_and_its_constants(pattern):
    homes = [
        path.name
        for path in PACKAGE.glob("*.py")
        if re.search(pattern, path.read_text(), re.MULTILINE)
    ]
    assert homes == ["libc.py"]


def test_no_library_search_at_run_time():
    # find_library runs ldconfig in a new process: slow, and killed by seccomp.
    for name, tree in MODULES.items():
        assert "ctypes.util" not in {target for target, _ in imports(name, tree)}, name
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert "find_library" not in names, name


def test_read_comes_from_the_backend_interface():
    # register(fd, READ, handler): the Backend's constant, not a literal or a copy.
    for path in PACKAGE.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^READ *=", text, re.MULTILINE), path.name
        assert not re.search(r"\bregister\([^,]+, 1,", text), path.name


def test_each_constant_has_one_home():
    homes: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        for match in re.finditer(r"^([A-Z][A-Z0-9_]*) *=", path.read_text(), re.MULTILINE):
            homes.setdefault(match.group(1), []).append(path.name)
    assert {name: where for name, where in homes.items() if len(where) > 1} == {}


# What the plain mode (``--configure --ready-fd=N PID tap0``) must not have
# imported by the time it says ready: each costs start-up time or memory and
# belongs to a mode or option that was not asked for.
NOT_IN_THE_PLAIN_MODE = {
    "argparse",  # forwarder.options parses by itself
    "json",  # the API (-a), the trace and the record
    "typing",
    "logging",  # pyslirp.log imports it for the first line at the level
    "dataclasses",  # pyslirp.settings: Settings and Record
    "inspect",
    "re",  # forwarder.options parses --cidr and sizes by hand; -p imports it
    "secrets",  # and hmac, hashlib: the DNS ids come from os.urandom
    "hashlib",  # its import loads OpenSSL; blake2b comes from _blake2
    "shutil",
    "tempfile",
    "forwarder.api",
    "forwarder.sandbox",
    "forwarder.runmode",
    "forwarder.slaac",
    "forwarder.top",
    "forwarder.metrics",
    "pyslirp.trace",
    "pyslirp.stack.ipv6_layer",  # -6 only
    "pyslirp.stack.ndp",
    "pyslirp.stack.ipv6",  # and the IPv6 and ICMPv6 wire formats
    "pyslirp.stack.icmpv6",
    "pyslirp.nat.dhcpv6",
    "pyslirp.libslirp",
    "cffi",
    # memory (bench/startup.py): each of these is RSS an idle forwarder holds
    "socket",  # 0.45 MB with its enums and selectors; _socket serves
    "selectors",
    "ipaddress",  # 0.4 MB: NetworkConfig keeps its addresses as text
    "random",  # 0.4 MB: the stack draws from _random.Random
    "contextlib",  # forwarder.serve's Cleanup
    "pyslirp.nat.dhcp",  # the services made at first use (Loop.on_first_use)
    "pyslirp.nat.dns",
    "pyslirp.nat.icmp",
    "pyslirp.nat.forward",
    "pyslirp.pcap",  # --pcap only
    "importlib",  # pyslirp.backend finds a backend with __import__
}
READY_TIMEOUT = 30.0  # seconds: two CPUs shared with other test runs
CONSOLE_SCRIPT = "import sys; from forwarder.cli import main; sys.exit(main())"


@pytest.mark.e2e
def test_the_plain_mode_imports_only_what_it_needs():
    import os
    import select
    import signal
    import subprocess
    import sys

    target = subprocess.Popen(["unshare", "--net", "--", "sleep", "120"])
    ready_r, ready_w = os.pipe()
    forwarder = None
    try:
        # Wait (bounded) until unshare has made the namespace.
        own = os.stat("/proc/self/ns/net").st_ino
        for _ in range(1000):
            if os.stat(f"/proc/{target.pid}/ns/net").st_ino != own:
                break
            select.select([], [], [], 0.01)
        forwarder = subprocess.Popen(
            # -S: what site and the .pth files of site-packages import is not
            # ours; and as the console script starts it (``-m`` would bring
            # runpy's imports, contextlib among them).
            [sys.executable, "-S", "-c", CONSOLE_SCRIPT, "--configure", f"--ready-fd={ready_w}"]
            + [str(target.pid), "tap0"],
            cwd=PACKAGE.parent,
            env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=(ready_w,),
        )
        os.close(ready_w)
        ready_w = -1
        assert select.select([ready_r], [], [], READY_TIMEOUT)[0], "not ready in time"
        assert os.read(ready_r, 1) == b"1"
        forwarder.send_signal(signal.SIGTERM)
        _, err = forwarder.communicate(timeout=READY_TIMEOUT)
        assert forwarder.returncode == 0, err[-2000:]
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)
        for proc in (forwarder, target):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    imported = {
        line.split("|")[2].strip()
        for line in err.splitlines()
        if line.startswith("import time:") and "cumulative" not in line
    }
    # The listing was read: the modes' own modules are in it.
    assert {"forwarder.serve", "forwarder.namespace", "pyslirp.nat.loop"} <= imported
    assert sorted(imported & NOT_IN_THE_PLAIN_MODE) == []
