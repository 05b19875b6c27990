"""The API socket (-a/--api-socket): slirp4netns's protocol, byte for byte.

One JSON request per connection on a unix stream socket; one compact JSON
reply; then the connection is closed. slirp4netns 1.2 answers:

    {"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_addr":
     "0.0.0.0", "host_port": 8080, "guest_addr": "10.0.2.100", "guest_port": 80}}
        -> {"return":{"id":1}}
    {"execute": "list_hostfwd"}
        -> {"entries":[{"id":1,"proto":"tcp","host_addr":"0.0.0.0",...}]}
    {"execute": "remove_hostfwd", "arguments": {"id": 1}}
        -> {"return":{}}

and errors as {"error":{"desc":"bad request: ..."}} with the wording below
(checked against slirp4netns 1.2.0 itself). With IPv6 enabled (-6),
add_hostfwd also takes an IPv6 host_addr ("::1"), our extension: its
guest_addr is an IPv6 address in the prefix, or "::" (the default) for the
guest's own address as learned from neighbour discovery. Beside them, ours:

    {"execute": "list_connections"}
        -> {"return":{"connections":[{"proto":"tcp","guest":...},...]}}
    {"execute": "stats"}
        -> {"return":{"backend":"python","uptime":12.3,"drops":{...},...}}
          (the fields: pyslirp.backend.Backend.stats)

The request ends when the client shuts down its writing side (as rootlesskit
and podman do), or as soon as the bytes received form a whole JSON object
(slirp4netns answers its first read, so clients that never shut down work
with it too). 4096 bytes or more is "too large", as in slirp4netns.

The socket file is made mode 0600 and removed at exit (slirp4netns leaves it
755 and behind after a signal).

With no descriptor left (EMFILE, ENFILE) a waiting client is accepted with
a spare descriptor and closed at once (``AcceptGuard``): the listener never
spins, one warning per ``log_interval``, and requests are served again as
soon as a descriptor is free. If even that fails, the listener rests for
``accept_pause`` seconds, on the same timer that drops slow clients.

Nothing here blocks the loop that also carries the guest's traffic: client
sockets are non-blocking, a reply is written as the client takes it (the
descriptor watched for writing), and a client that has not sent its request
and read its reply within CLIENT_TIMEOUT is dropped, by a timer in the loop.
The replies waiting for their readers are bounded in total
(MAX_PENDING_REPLY_BYTES): past it the oldest waiting client is dropped.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import stat
import time

from pyslirp.log import get_logger

from .oneshot import OneRequestServer

log = get_logger("pyslirp.api")

MAX_MESSAGE = 4096  # slirp4netns's buffer: a read that fills it is "too large"
MAX_CLIENTS = 16  # connections waiting for their request at once; oldest dropped
# Seconds a client may keep its connection, to send its request and read
# the reply (a client that reads nothing must not hold a descriptor forever).
CLIENT_TIMEOUT = 10.0
# Bytes of replies waiting, in total, for clients to read them. One reply is
# at most about 1 MiB (list_connections with every flow the limits allow,
# ~5,000 entries of ~200 bytes); MAX_CLIENTS stuck readers could otherwise
# hold 16 of them.
MAX_PENDING_REPLY_BYTES = 4 << 20
SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path)


class ApiError(Exception):
    """Could not set up the API socket; one line for the user."""


def _error(desc: str) -> bytes:
    return json.dumps({"error": {"desc": f"bad request: {desc}"}}, separators=(",", ":")).encode()


def _compact(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


E_PARSE = _error("cannot parse JSON")
E_NOT_OBJECT = _error("json_object() failed")
E_NO_EXECUTE = _error("no execute found")
E_UNKNOWN = _error("unknown execute")
E_TOO_LARGE = _error("too large message")
OK_EMPTY = b'{"return":{}}'


def _reject_constant(name):
    raise ValueError(f"not JSON: {name}")  # NaN and Infinity, which parson refuses


def parse_request(data: bytes):
    """The request object, or an error reply (bytes)."""
    # slirp4netns hands parson a C string: it ends at the first NUL.
    data = data.split(b"\0", 1)[0]
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return E_PARSE
    if not isinstance(value, dict):
        return E_NOT_OBJECT
    if not isinstance(value.get("execute"), str):
        return E_NO_EXECUTE
    return value


def _argument(request: dict, name: str):
    arguments = request.get("arguments")
    if isinstance(arguments, dict):
        return arguments.get(name)
    return None


def _string(request: dict, name: str) -> str | None:
    """parson's json_object_dotget_string: None unless a string."""
    value = _argument(request, name)
    return value if isinstance(value, str) else None


def _number(request: dict, name: str) -> int:
    """parson's json_object_dotget_number cast to int: 0 unless a number."""
    value = _argument(request, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    try:
        return int(value)
    except (OverflowError, ValueError):
        return 0


def _ipv4(text: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, text)
    except OSError:
        return False
    return True


def _ipv6(text: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6, text)
    except OSError:
        return False
    return True


class Api:
    """The requests, over a backend (pyslirp.backend.Backend)."""

    def __init__(self, backend, config) -> None:
        self.backend = backend
        self.config = config
        self.default_guest = str(config.recommended_guest)

    def handle(self, data: bytes) -> bytes:
        request = parse_request(data)
        if isinstance(request, bytes):
            return request
        execute = request["execute"]
        handler = {
            "add_hostfwd": self.add_hostfwd,
            "list_hostfwd": self.list_hostfwd,
            "remove_hostfwd": self.remove_hostfwd,
            "list_connections": self.list_connections,
            "stats": self.stats,
        }.get(execute)
        if handler is None:
            return E_UNKNOWN
        return handler(request)

    def add_hostfwd(self, request: dict) -> bytes:
        def bad(name: str) -> bytes:
            return _error(f"add_hostfwd: bad arguments.{name}")

        proto = _string(request, "proto")
        if proto not in ("tcp", "udp"):
            return bad("proto")
        host_addr = _string(request, "host_addr") or "0.0.0.0"
        v6 = bool(getattr(self.config, "enable_ipv6", False)) and _ipv6(host_addr)
        if not (v6 or _ipv4(host_addr)):
            return bad("host_addr")
        host_port = _number(request, "host_port")
        # slirp4netns only refuses 0; a port outside 1-65535 is refused too.
        if not 1 <= host_port <= 65535:
            return bad("host_port")
        if v6:
            guest_addr = _string(request, "guest_addr") or "::"
            if not _ipv6(guest_addr) or not self._guest_address6(guest_addr):
                return bad("guest_addr")
        else:
            guest_addr = _string(request, "guest_addr") or self.default_guest
            if not _ipv4(guest_addr) or not self._guest_address(guest_addr):
                return bad("guest_addr")
        guest_port = _number(request, "guest_port")
        if not 1 <= guest_port <= 65535:
            return bad("guest_port")
        try:
            forward_id = self.backend.add_hostfwd(
                proto, host_addr, host_port, guest_addr, guest_port
            )
        except (OSError, ValueError, RuntimeError, NotImplementedError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.warning(
                "add_hostfwd %s %s:%d -> %s:%d failed: %s",
                proto,
                host_addr,
                host_port,
                guest_addr,
                guest_port,
                reason,
            )
            return _error("add_hostfwd: slirp_add_hostfwd failed")
        return _compact({"return": {"id": forward_id}})

    def _guest_address(self, text: str) -> bool:
        address = ipaddress.IPv4Address(text)
        config = self.config
        return address in ipaddress.IPv4Network(config.cidr) and str(address) not in (
            config.network_address,
            config.broadcast,
            config.gateway,
            config.dns,
        )

    def _guest_address6(self, text: str) -> bool:
        address = ipaddress.IPv6Address(text)
        config = self.config
        if address == ipaddress.IPv6Address("::"):
            return True
        prefix = ipaddress.IPv6Network(config.ipv6_prefix)
        return address in prefix and address not in (
            prefix.network_address,
            ipaddress.IPv6Address(config.ipv6_gateway),
            ipaddress.IPv6Address(config.ipv6_dns),
        )

    def list_hostfwd(self, request: dict) -> bytes:
        try:
            entries = self.backend.list_hostfwd()
        except NotImplementedError:
            entries = []
        # slirp4netns 1.2 answers without a "return" wrapper.
        return _compact({"entries": entries})

    def remove_hostfwd(self, request: dict) -> bytes:
        forward_id = _number(request, "id")
        try:
            self.backend.remove_hostfwd(forward_id)
        except KeyError:
            return _error("remove_hostfwd: bad arguments.id")
        except (OSError, RuntimeError, NotImplementedError) as exc:
            log.warning("remove_hostfwd %d failed: %s", forward_id, exc)
            return _error("remove_hostfwd: slirp_remove_hostfwd failed")
        return OK_EMPTY

    def list_connections(self, request: dict) -> bytes:
        try:
            connections = self.backend.list_connections()
        except NotImplementedError:
            return _error(f"list_connections: not supported by the {self.backend.name} backend")
        reply = {"connections": connections}
        held = getattr(self.backend, "held_bytes", None)
        if held is not None:  # the python backend: bytes held for the guest (budget.py)
            reply["held_bytes"] = held()
        return _compact({"return": reply})

    def stats(self, request: dict) -> bytes:
        try:
            stats = self.backend.stats()
        except NotImplementedError:
            return _error(f"stats: not supported by the {self.backend.name} backend")
        return _compact({"return": stats})


class ApiServer(OneRequestServer):
    """The API socket: slirp4netns's requests, one per connection
    (forwarder/oneshot.py serves them)."""

    name = "api"
    max_clients = MAX_CLIENTS
    client_timeout = CLIENT_TIMEOUT
    max_request = MAX_MESSAGE

    @property
    def max_pending_bytes(self) -> int:
        return MAX_PENDING_REPLY_BYTES  # the module's constant, read when used

    def __init__(self, path: str, api: Api) -> None:
        config = api.config
        super().__init__(
            getattr(config, "accept_pause", 1.0), getattr(config, "log_interval", 10.0)
        )
        self.path = path
        self.api = api
        self._identity = None  # (st_dev, st_ino) of our socket file

    # ------------------------------------------------------------ set-up
    def listen(self) -> None:
        """Bind and listen (raises ApiError with slirp4netns's wording)."""
        path = self.path
        if len(os.fsencode(path)) >= SUN_PATH_MAX:
            raise ApiError(f"the specified API socket path is too long (>= {SUN_PATH_MAX})")
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket, as slirp4netns does: avoid EADDRINUSE
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ApiError(f"api socket {path}: {exc.strerror}") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # the file is born 0600: no window for others
        try:
            sock.bind(path)
            sock.listen(MAX_CLIENTS)
        except OSError as exc:
            sock.close()
            raise ApiError(f"api_bindlisten: bind {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        sock.setblocking(False)
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino)
        self.sock = sock

    # ------------------------------------------------------------ requests
    def complete(self, buffer: bytearray) -> bool:
        return _complete(buffer)

    def too_large(self, size: int) -> bytes | None:
        if size < MAX_MESSAGE:
            return None
        log.warning("api: too large message (>= %d bytes)", MAX_MESSAGE)
        return E_TOO_LARGE

    def handle(self, data: bytes) -> bytes:
        log.info("api: got request: %s", data.decode("utf-8", "replace").strip())
        return self.api.handle(data)

    def internal_error(self) -> bytes:
        return _error("internal error")

    # ------------------------------------------------------------ the end
    def close(self) -> None:
        super().close()
        self.remove_file()

    def hand_over_file(self) -> tuple | None:
        """(path, (st_dev, st_ino)) of our socket file, for another process
        to remove at exit (the sandbox's keeper, which keeps the mount rights
        that we give up); from then on ``close`` leaves the file alone. None
        when there is no file of ours."""
        if self._identity is None:
            return None
        identity, self._identity = self._identity, None
        return self.path, identity

    def remove_file(self) -> None:
        """Unlink the socket file if it is still ours."""
        if self._identity is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        except OSError:
            pass
        self._identity = None


def _complete(buffer: bytearray) -> bool:
    """Whether the bytes so far are a whole JSON object (answer now, without
    waiting for the client to shut down its side)."""
    text = bytes(buffer).split(b"\0", 1)[0].strip()
    if not text.endswith(b"}"):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False


def request(path: str, message, timeout: float = 5.0) -> dict:
    """A client: send one request (a dict or bytes), return the parsed reply."""
    data = message if isinstance(message, bytes) else json.dumps(message).encode()
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return json.loads(b"".join(chunks))
