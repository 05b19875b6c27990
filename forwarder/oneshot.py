"""A listener that takes one request per connection and writes one reply,
served in the backend's loop without ever blocking it: the API socket
(forwarder/api.py) and the metrics endpoint (forwarder/metrics.py).

The bounds every such server keeps, whatever its clients do:

- ``max_clients`` connections at once; a new one drops the oldest, so
  clients that never speak cannot take the listener away;
- ``client_timeout`` seconds to send the request and read the reply (one
  timerfd, ``Deadline``, for all the clients);
- ``max_request`` bytes per request (``too_large`` answers past it);
- ``max_pending_bytes`` of replies not yet read, all clients together: past
  it the clients that have waited longest to read are dropped;
- accept() without a descriptor (EMFILE): the waiting client is taken with a
  spare descriptor and closed (``AcceptGuard``); if even that fails the
  listener rests ``accept_pause`` seconds, so the loop never spins.

A subclass makes ``self.sock`` (``listen``) and says what a request is:
``complete(buffer)``, ``handle(data) -> reply``, ``too_large(size)``.
"""

from __future__ import annotations

import errno
import socket
import time

from pyslirp.backend import READ
from pyslirp.log import get_logger

from .timerfd import Deadline

log = get_logger("pyslirp.forwarder")


class Client:
    __slots__ = ("sock", "buffer", "since", "out", "replied_at")

    def __init__(self, sock, since: float) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.since = since
        self.out: memoryview | None = None  # the rest of the reply, once there is one
        self.replied_at = 0.0


class OneRequestServer:
    """The listening socket and its clients (see the module's docstring)."""

    name = "server"  # in log lines
    max_clients = 16
    client_timeout = 10.0
    max_request = 4096
    max_pending_bytes = 4 << 20
    # Whether a client that shuts down its side before ``complete`` says so
    # still gets an answer to what it sent (the API: slirp4netns's clients
    # end their request that way) or is dropped (HTTP).
    answer_at_eof = True

    def __init__(self, accept_pause: float = 1.0, log_interval: float = 10.0) -> None:
        # (here, not at the top: the libslirp backend loads nothing of pyslirp.nat)
        from pyslirp.nat.descriptors import AcceptGuard, LogLimiter

        self.sock: socket.socket | None = None
        self.served = 0  # replies written whole
        self._clients: dict[int, Client] = {}
        self._backend = None
        self._pause = accept_pause
        self._guard = AcceptGuard(self.name, LogLimiter(log, log_interval))
        self._pending_bytes = 0  # of replies not yet taken by their clients
        self._deadline: Deadline | None = None  # drops clients past client_timeout (attach)
        self._resume_at: float | None = None  # when a resting listener is polled again

    # ------------------------------------------------------ the subclass's
    def complete(self, buffer: bytearray) -> bool:
        """Whether the bytes so far are a whole request."""
        raise NotImplementedError

    def handle(self, data: bytes) -> bytes:
        """The reply to a whole request."""
        raise NotImplementedError

    def too_large(self, size: int) -> bytes | None:
        """The reply to a request that has grown to ``size`` bytes, if that
        is too large (None: read on)."""
        raise NotImplementedError

    def internal_error(self) -> bytes:
        """The reply when ``handle`` raised (a bug)."""
        raise NotImplementedError

    @property
    def pending_bytes(self) -> int:
        """Bytes of replies that their clients have not taken yet (kept
        near ``max_pending_bytes`` by dropping the oldest clients)."""
        return self._pending_bytes

    # ------------------------------------------------------------ serving
    def attach(self, backend) -> None:
        """Serve the socket in the backend's loop."""
        self._backend = backend
        self._deadline = Deadline(backend, self._on_timer)
        backend.register(self.sock.fileno(), READ, self._on_listen)

    def _on_listen(self, mask: int, now: float) -> None:
        for _ in range(self.max_clients):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # EMFILE: shed one client; never spin
                if self._guard.accept_failed(self.sock, exc, now):
                    self._rest()
                break
            conn.setblocking(False)
            self._evict(now)
            client = Client(conn, now)
            self._clients[conn.fileno()] = client
            try:
                self._backend.register(conn.fileno(), READ, lambda m, t, c=client: self._read(c))
            except Exception as exc:  # noqa: BLE001 - the client goes, the loop stays
                log.info("%s: cannot serve a client: %s", self.name, exc)
                self._drop(client)
                continue
            self._read(client)

    def _rest(self) -> None:
        """Stop polling the listener for ``accept_pause`` seconds (accept
        keeps failing); the clients' timer brings it back."""
        if self.sock is None or self._resume_at is not None:
            return
        self._backend.unregister(self.sock.fileno())
        self._resume_at = time.monotonic() + self._pause
        self._deadline.by(self._resume_at)

    def _evict(self, now: float) -> None:
        """Drop clients that said nothing for too long, and the oldest ones
        past ``max_clients``."""
        clients = sorted(self._clients.values(), key=lambda c: c.since)
        excess = len(clients) - self.max_clients + 1
        for index, client in enumerate(clients):
            if index < excess or now - client.since > self.client_timeout:
                self._drop(client)

    def _read(self, client: Client) -> None:
        sock = client.sock
        if sock.fileno() < 0 or client.out is not None:
            return
        self._deadline.by(client.since + self.client_timeout)
        eof = False
        while True:
            try:
                chunk = sock.recv(self.max_request)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                eof = True
                break
            if not chunk:
                eof = True
                break
            client.buffer += chunk
            reply = self.too_large(len(client.buffer))
            if reply is not None:
                self._reply(client, reply)
                return
        if self.complete(client.buffer) or (eof and self.answer_at_eof):
            try:
                reply = self.handle(bytes(client.buffer))
            except Exception:  # a bug must not stop the network
                log.exception("%s: request failed", self.name)
                reply = self.internal_error()
            self._reply(client, reply)
        elif eof:
            self._drop(client)  # gone before a whole request

    def _reply(self, client: Client, reply: bytes) -> None:
        """Queue the reply and write what the socket takes now; the rest
        when it is writable (never blocking the loop)."""
        fd = client.sock.fileno()
        if fd < 0:
            return
        client.out = memoryview(reply)
        client.replied_at = time.monotonic()
        self._pending_bytes += len(reply)
        try:
            self._backend.unregister(fd)
            self._backend.register(
                fd, getattr(self._backend, "write_event", 2), lambda m, t, c=client: self._write(c)
            )
        except Exception as exc:  # noqa: BLE001 - the client goes, the loop stays
            log.info("%s: cannot wait to write a reply: %s", self.name, exc)
            self._drop(client)
            return
        self._write(client)
        if client.out is not None:
            self._limit_pending(client)

    def _write(self, client: Client) -> None:
        sock = client.sock
        if sock.fileno() < 0 or client.out is None:
            return
        while client.out:
            try:
                sent = sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                return  # the rest when the client reads
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    log.info("%s: reply not delivered: %s", self.name, exc)
                self._drop(client)
                return
            self._pending_bytes -= sent
            client.out = client.out[sent:]
        self.served += 1
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._drop(client)

    def _limit_pending(self, newest: Client) -> None:
        """Past ``max_pending_bytes``, drop the clients that have waited
        longest to read (never the newest: its reply is within the bound)."""
        waiting = sorted(
            (c for c in self._clients.values() if c.out is not None and c is not newest),
            key=lambda c: c.replied_at,
        )
        for client in waiting:
            if self._pending_bytes <= self.max_pending_bytes:
                break
            log.info(
                "%s: a client that does not read its reply dropped (%d bytes of replies wait)",
                self.name,
                self._pending_bytes,
            )
            self._drop(client)

    def _on_timer(self, now: float) -> None:
        now = time.monotonic()
        for client in list(self._clients.values()):
            if now - client.since >= self.client_timeout:
                if client.out is not None:
                    log.info(
                        "%s: a client did not read its reply in %.0f s",
                        self.name,
                        self.client_timeout,
                    )
                self._drop(client)
        resume_at = self._resume_at
        if resume_at is not None and resume_at <= now:
            self._resume_at = resume_at = None
            if self.sock is not None:
                self._backend.register(self.sock.fileno(), READ, self._on_listen)
        if self._clients:
            self._deadline.by(min(c.since for c in self._clients.values()) + self.client_timeout)
        if resume_at is not None:
            self._deadline.by(resume_at)

    def _drop(self, client: Client) -> None:
        if client.out is not None:
            self._pending_bytes -= len(client.out)
            client.out = None
        fd = client.sock.fileno()
        if fd >= 0:
            self._clients.pop(fd, None)
            try:
                self._backend.unregister(fd)
            except Exception:  # noqa: BLE001 - the loop may be gone at exit
                pass
        client.sock.close()

    # ------------------------------------------------------------ the end
    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        if self._deadline is not None:
            self._deadline.close()
        if self.sock is not None:
            if self._backend is not None:
                try:
                    self._backend.unregister(self.sock.fileno())
                except Exception:  # noqa: BLE001 - the loop may be gone at exit
                    pass
            self.sock.close()
            self.sock = None
        self._guard.close()
