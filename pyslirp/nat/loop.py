"""The event loop of the python backend: the TAP, host sockets and one timer.

Per wake-up: read the TAP until EAGAIN (at most ``tap_batch`` frames), feed
every frame to the stack, hand the stack's events to the services, serve the
host sockets that are ready, run what is due, then write everything the stack
has queued for the guest in one flush and sleep until the next deadline:
after a wake-up that found work, first poll without sleeping for up to
``config.busy_poll`` (busy polling, as Linux's busy_read does for sockets).
This module is the one reader of ``time.monotonic()``.

The barrier: a handler that raises (a socket's, a stack event's, a
service's timer) takes down its own flow and nothing else. The loop counts
it (``counters["internal-error"]``, the text in ``last_internal_error``),
logs it at most once per ``config.log_interval`` for each kind, and calls
the ``on_error`` given with the handler (``register`` and ``on_event``) or
the service's ``timer_failed``, which close just that flow (a RST or an
ICMP error for the guest, the host socket closed). A socket handler without
one is unregistered, so that it cannot fail again on every turn. The
``try`` costs nothing while nothing is raised (CPython 3.11's exception
tables), and no call is added per packet.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import select
import time

from pyslirp.config import NetworkConfig
from pyslirp.log import ERROR, get_logger
from pyslirp.stack import virtio
from pyslirp.stack.events import MemoryPressureChanged
from pyslirp.stack.interface import Stack
from pyslirp.tap import MAX_FRAME, write_tap

from .descriptors import DescriptorBudget, LogLimiter

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2 ms at start-up)
if TYPE_CHECKING:
    from .tcp import TcpNat
    from .udp import UdpNat

log = get_logger("pyslirp")

READ = 1  # selectors.EVENT_READ (selectors itself is not imported: 0.5 MB)
WRITE = 2  # selectors.EVENT_WRITE


_NOT_OUT = ~select.EPOLLOUT
_NOT_IN = ~select.EPOLLIN
# epoll's bits (IN, PRI, OUT, ERR, HUP: the low five) as selectors' mask:
# errors and hang-ups wake both directions, as selectors reads epoll.
_MASKS = tuple(
    (READ if bits & _NOT_OUT else 0) | (WRITE if bits & _NOT_IN else 0) for bits in range(32)
)


def _epoll_events(events: int) -> int:
    bits = 0
    if events & READ:
        bits |= select.EPOLLIN
    if events & WRITE:
        bits |= select.EPOLLOUT
    return bits


class Loop:
    """The loop of one network: its stack, the TAP, host sockets, timers.

    The services are fields, set once by ``build_loop``
    (pyslirp/nat/backend.py), which makes each of them with this loop and
    routes the stack's events to them; a bare ``Loop`` has none (None).
    """

    def __init__(
        self,
        config: NetworkConfig,
        tap_fd: int,
        stop_fd: int | None = None,
        capture=None,
        link=None,
        recordings=None,
    ) -> None:
        self.config = config
        # A VM's socket (pyslirp/link.py) instead of the TAP: its fd stands
        # for the TAP's in the epoll, and its reader and flush replace ours.
        self.link = link
        if link is not None:
            tap_fd = link.fd
            config.offload = False
        self.tap_fd = tap_fd
        self.stop_fd = stop_fd
        self.capture = capture
        if recordings is not None:  # --record: a proxy that records (pyslirp/record.py)
            self.stack = recordings.stack(config)  # the next file (a VM after another)
        elif config.record_path:
            from pyslirp.record import recording_stack

            self.stack = recording_stack(config)
        else:
            self.stack = Stack(config.stack_config(), config.random)
        # config.offload: the TAP was opened with IFF_VNET_HDR and offloads,
        # so every frame read and written starts with a virtio_net_hdr.
        self.vnet = config.offload
        # One epoll, used directly: selectors' keys and per-call lists cost a
        # few microseconds per wake-up, which a request/response pays twice.
        # (Public so that a test can watch how long the loop sleeps: run()
        # takes its poll once, at the start.)
        self.epoll = select.epoll()
        # The TAP alone, to ask "more frames?" without a failing read (an
        # EAGAIN costs an exception; a poll of nothing costs a fifth of it).
        self._tap_poll = select.epoll()
        self._tap_poll.register(tap_fd, select.EPOLLIN)
        self.counters: dict[str, int] = {"tap-write-dropped": 0, "internal-error": 0}
        self.last_internal_error: str | None = None  # "where: Type: text" of the last one
        self.limiter = LogLimiter(log, config.log_interval)
        # Host descriptors for flows, against RLIMIT_NOFILE (counted now,
        # before the services open anything).
        self.descriptors = DescriptorBudget.for_process(config)
        self._running = False
        # fd -> (selectors events, handler, fileobj, quiet, on_error)
        self._handlers: dict[int, tuple] = {}
        self._timers = _Timers()
        # objects with next_deadline() and handle_timer(now)
        self.services: list = [self._timers]
        # The services' earliest deadline, asked again only after something
        # that may have made one earlier: a handler that is not quiet, an
        # event whose type is not quiet, timers, or timers_changed().
        self._services_due: float | None = None
        self._services_stale = True
        self._event_handlers: dict[type, object] = {}
        self._event_errors: dict[type, object] = {}
        self._quiet_events: set[type] = set()
        if link is None:
            os.set_blocking(tap_fd, False)
        else:
            self._read_tap = self._read_link
            self.flush = self._flush_link
        self.epoll.register(tap_fd, select.EPOLLIN)
        self._receive = self.stack.receive_vnet_frame if self.vnet else self.stack.receive_frame
        self._read_size = MAX_FRAME + virtio.HEADER_LEN if self.vnet else MAX_FRAME
        if stop_fd is not None:
            self.epoll.register(stop_fd, select.EPOLLIN)
        self.on_event(MemoryPressureChanged, self._memory_pressure_changed)
        # The services. build_loop sets these two:
        self.udp: UdpNat | None = None  # UDP NAT (and, through it, DHCP and DNS over UDP)
        self.tcp: TcpNat | None = None  # TCP NAT (and DNS over TCP)
        # and says how to make the others, which are made when first asked
        # for (``loop.dhcp``: see on_first_use):
        #   dhcp: DhcpServer, DHCPv4 for the guest (its datagrams come via udp)
        #   dns: DnsProxy, the DNS proxy at the DNS address
        #   icmp: IcmpRelay, echo requests through host ping sockets
        #   forwards: Forwards, published ports (-p, add_hostfwd)
        self._makers: dict[str, tuple] = {}

    # -------------------------------------------------------- registration
    def on_event(self, event_type: type, handler, quiet: bool = False, on_error=None) -> None:
        """Route stack events of ``event_type`` to ``handler(event, now)``.
        A ``quiet`` handler never makes a service's deadline earlier (or
        calls timers_changed when it does). If the handler raises,
        ``on_error(event, exc, now)`` closes the flow the event is about."""
        self._event_handlers[event_type] = handler
        self._event_errors[event_type] = on_error
        if quiet:
            self._quiet_events.add(event_type)
        else:
            self._quiet_events.discard(event_type)

    @staticmethod
    def _memory_pressure_changed(event, now: float) -> None:
        if event.entered:
            log.info(
                "memory budget: under pressure, %d of %d bytes held; windows close",
                event.held,
                event.limit,
            )
        else:
            log.info(
                "memory budget: pressure over, %d of %d bytes held", event.held, event.limit
            )

    def on_first_use(self, name: str, make, timed: bool = False) -> None:
        """Make the service ``loop.NAME`` by calling ``make()`` when it is
        first asked for; a ``timed`` one then joins ``services`` (its
        next_deadline and handle_timer are called from then on). A forwarder
        whose guest never asks for DHCP, never pings and publishes no port
        never imports those services (a third of a megabyte of its RSS)."""
        self._makers[name] = (make, timed)

    def __getattr__(self, name: str):
        # Only for a name that is not set: a service made on first use.
        try:
            make, timed = self.__dict__["_makers"].pop(name)
        except KeyError:
            raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}") from None
        service = make()
        setattr(self, name, service)
        if timed:
            self.services.append(service)
            self._services_stale = True
        return service

    def made(self, name: str):
        """The service ``name`` if it has been made, else None (and not made now)."""
        return self.__dict__.get(name)

    def timers_changed(self) -> None:
        """A service's next_deadline() may have become earlier."""
        self._services_stale = True

    def register(self, fileobj, events: int, handler, quiet: bool = False, on_error=None) -> None:
        """Call ``handler(mask, now)`` when ``fileobj`` is ready (``events``
        and ``mask`` in selectors' bits: EVENT_READ, EVENT_WRITE). A
        ``quiet`` handler is as in on_event. If the handler raises,
        ``on_error(exc, now)`` closes its flow; without one, ``fileobj`` is
        unregistered."""
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd in self._handlers:
            raise KeyError(f"{fileobj!r} (fd {fd}) is already registered")
        self.epoll.register(fd, _epoll_events(events))
        self._handlers[fd] = (events, handler, fileobj, quiet, on_error)

    def modify(self, fileobj, events: int, handler) -> None:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd not in self._handlers:
            raise KeyError(f"{fileobj!r} (fd {fd}) is not registered")
        entry = self._handlers[fd]
        if entry[0] != events:
            self.epoll.modify(fd, _epoll_events(events))
        self._handlers[fd] = (events, handler, fileobj, entry[3], entry[4])

    def unregister(self, fileobj) -> None:
        try:
            fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        except (OSError, ValueError):
            fd = -1
        if fd < 0:  # closed before it was unregistered: find it as selectors does
            fd = next((k for k, v in self._handlers.items() if v[2] is fileobj), -1)
        if self._handlers.pop(fd, None) is None:
            return
        try:
            self.epoll.unregister(fd)
        except OSError:
            pass  # closed already: the kernel dropped it from the epoll

    def forget(self, fileobj) -> None:
        """``unregister`` for a socket about to be closed by the caller, its
        only holder: closing it takes it out of the epoll, so no epoll_ctl."""
        try:
            fd = fileobj.fileno()
        except (OSError, ValueError):
            fd = -1
        if fd < 0 or self._handlers.pop(fd, None) is None:
            self.unregister(fileobj)

    def call_at(self, at: float, callback) -> None:
        """Call ``callback(now)`` once, at ``at`` (monotonic seconds)."""
        self._timers.add(at, callback)
        self._services_stale = True

    @staticmethod
    def now() -> float:
        return time.monotonic()

    # -------------------------------------------------------------- tracing
    @property
    def tracer(self):
        """The decision trace (pyslirp/trace.py), the stack's: None, or
        ``tracer(now, event, flow, msg, **fields)``. The services read it
        here, where they take a decision, and test it against None."""
        return self.stack.tracer

    def set_tracer(self, tracer) -> None:
        """Trace the stack's decisions and the services' to ``tracer`` (None:
        stop). The stack changes class while tracing, so the frame reader is
        bound again."""
        self.stack.set_tracer(tracer)
        dhcp = self.made("dhcp")
        if dhcp is not None:
            dhcp.tracer = tracer  # a server without a loop: told here
        self._receive = self.stack.receive_vnet_frame if self.vnet else self.stack.receive_frame

    # -------------------------------------------------------- the barrier
    def internal_error(self, where: str, exc: BaseException, now: float) -> None:
        """Count and log (rate-limited) an exception a handler raised."""
        text = f"{where}: {type(exc).__name__}: {exc}"
        self.counters["internal-error"] += 1
        self.last_internal_error = text
        self.limiter.log(
            ERROR,
            "internal-error " + where.split(" ", 1)[0],
            now,
            "internal error in %s; its flow is closed, the others carry on",
            text,
            exc_info=exc,
        )

    def _handler_failed(self, fd: int, entry: tuple, exc: Exception, now: float) -> None:
        handler = entry[1]
        self.internal_error(
            f"socket handler {getattr(handler, '__qualname__', handler)!s} (fd {fd})", exc, now
        )
        on_error = entry[4]
        if on_error is not None:
            try:
                on_error(exc, now)
            except Exception as again:  # the clean-up failed too
                self.internal_error(f"socket error handler (fd {fd})", again, now)
        current = self._handlers.get(fd)
        if current is not None and current[1] == handler:
            self.unregister(fd)  # still there: it must not fail again on every turn

    def _event_failed(self, kind: type, event, exc: Exception, now: float) -> None:
        self.internal_error(f"event handler for {kind.__name__}", exc, now)
        on_error = self._event_errors.get(kind)
        if on_error is not None:
            try:
                on_error(event, exc, now)
            except Exception as again:
                self.internal_error(f"event error handler for {kind.__name__}", again, now)

    def _timer_failed(self, service, exc: Exception, now: float) -> None:
        self.internal_error(f"timer of {type(service).__name__}", exc, now)
        failed = getattr(service, "timer_failed", None)
        if failed is not None:
            try:
                failed(exc, now)
            except Exception as again:
                self.internal_error(f"timer error handler of {type(service).__name__}", again, now)

    # -------------------------------------------------------------- running
    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        self._running = True
        stack = self.stack
        events = stack.events
        poll = self.epoll.poll
        handlers = self._handlers
        tap_fd = self.tap_fd
        stop_fd = self.stop_fd
        tcp = stack.tcp
        stack_timer = stack.next_wake
        services = self.services
        monotonic = time.monotonic
        flush = self._flush_vnet if self.vnet else self.flush
        read_tap = self._read_tap
        busy = self.config.busy_poll
        spin = 0.0  # this turn's busy polling: set by a wake-up that found work
        while self._running:
            # One pass over the timers per wake-up: the earliest deadline sets
            # the sleep, and the timers run after it only if it has come
            # (this runs twice per request/response).
            if self._services_stale:
                self._services_stale = False
                due = None
                for service in services:
                    at = service.next_deadline()
                    if at is not None and (due is None or at < due):
                        due = at
                self._services_due = due
            deadline = stack_timer()
            due = self._services_due
            if due is not None and (deadline is None or due < deadline):
                deadline = due
            ready = self.busy_poll(spin, deadline) if spin else None
            if ready is None:
                if deadline is None:
                    timeout = -1
                else:
                    timeout = deadline - monotonic()
                    if timeout < 0.0:
                        timeout = 0.0
                ready = poll(timeout)
            now = monotonic()
            spin = busy if ready else 0.0
            for fd, happened in ready:
                if fd == tap_fd:
                    read_tap(now)
                elif fd == stop_fd:
                    self._running = False
                else:
                    entry = handlers.get(fd)
                    if entry is None:
                        continue
                    mask = _MASKS[happened & 31] & entry[0]
                    if mask:
                        if not entry[3]:
                            self._services_stale = True
                        try:
                            entry[1](mask, now)
                        except Exception as exc:
                            self._handler_failed(fd, entry, exc, now)
            if events:
                self._dispatch_events(now)
            if deadline is not None and deadline <= now:
                self._run_timers(now)
                if events:
                    self._dispatch_events(now)
            if stack.out or (tcp is not None and tcp.dirty):
                flush(now)
                if events:  # news from the flush (the memory budget's pressure)
                    self._dispatch_events(now)

    def busy_poll(self, spin: float, deadline):
        """Poll without sleeping for up to ``spin`` seconds (not past
        ``deadline``): the ready list as soon as there is one, else None.
        A peer that answers within that time finds us awake: no sleep, no
        wake-up (on a VM each costs tens of microseconds, a round trip's worth)."""
        poll = self.epoll.poll
        ready = poll(0.0)
        if ready:
            return ready
        monotonic = time.monotonic
        limit = monotonic() + spin
        if deadline is not None and deadline < limit:
            limit = deadline
        while monotonic() < limit:
            ready = poll(0.0)
            if ready:
                return ready
        return None

    def _run_timers(self, now: float) -> None:
        self._services_stale = True
        stack = self.stack
        deadline = stack.get_timer()
        if deadline is not None and deadline <= now:
            try:
                stack.handle_timer(now)
            except Exception as exc:  # the stack's own: no flow of ours to close
                self.internal_error("timer of the stack", exc, now)
        for service in self.services:
            try:
                due = service.next_deadline()
                if due is not None and due <= now:
                    service.handle_timer(now)
            except Exception as exc:
                self._timer_failed(service, exc, now)

    def _read_tap(self, now: float) -> None:
        """Read and feed frames. After the first one, ask for more only if
        the stack has something to send: a frame that leaves it idle is a
        guest waiting for the host (request/response), and a frame left
        unread wakes the next poll anyway."""
        stack = self.stack
        events = stack.events
        tcp = stack.tcp
        receive = self._receive
        capture = self.capture
        fd = self.tap_fd
        size = self._read_size
        count = 0
        while True:
            try:
                frame = os.read(fd, size)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN):
                    return
                raise
            if not frame:
                return
            if capture is not None:
                capture.write(memoryview(frame)[virtio.HEADER_LEN :] if self.vnet else frame)
            receive(frame, now)
            # Dispatch as we go so that per-flow back-pressure stays accurate.
            if events:
                self._dispatch_events(now)
            count += 1
            if count == 1 and (
                not (stack.out or (tcp is not None and tcp.dirty)) or not self._tap_poll.poll(0)
            ):
                return  # one frame and no more (request/response): no EAGAIN read
            if count >= self.config.tap_batch:
                return

    def _read_link(self, now: float) -> None:
        """``_read_tap`` for a link: every whole frame of one batched read."""
        frames = self.link.read_frames()
        if not frames:
            return
        receive = self._receive
        capture = self.capture
        events = self.stack.events
        for frame in frames:
            if capture is not None:
                capture.write(frame)
            receive(frame, now)
            if events:
                self._dispatch_events(now)

    def _flush_link(self, now: float) -> None:
        """``flush`` for a link: the whole batch in one write."""
        frames = self.stack.frames_to_send(now)
        if not frames:
            return
        capture = self.capture
        if capture is not None:
            for frame in frames:
                capture.write(frame)
            capture.flush()
        self.link.write_frames(frames)

    def _dispatch_events(self, now: float) -> None:
        events = self.stack.events  # Stack.next_event, inlined
        handlers = self._event_handlers
        quiet = self._quiet_events
        while events:
            event = events.popleft()
            kind = event.__class__
            if kind not in quiet:
                self._services_stale = True
            handler = handlers.get(kind)
            if handler is not None:
                try:
                    handler(event, now)
                except Exception as exc:
                    self._event_failed(kind, event, exc, now)

    def flush(self, now: float) -> None:
        if self.vnet:
            self._flush_vnet(now)
            return
        frames = self.stack.frames_to_send(now)
        if not frames:
            return
        capture = self.capture
        fd = self.tap_fd
        for frame in frames:
            if capture is not None:
                capture.write(frame)
            if not write_tap(fd, frame):
                self.counters["tap-write-dropped"] += 1
        if capture is not None:
            capture.flush()

    def _flush_vnet(self, now: float) -> None:
        items = self.stack.vnet_frames_to_send(now)
        capture = self.capture
        fd = self.tap_fd
        plain = virtio.NO_OFFLOAD
        for item in items:
            if item.__class__ is tuple:
                header, frame = item
            else:
                header, frame = plain, item
            if capture is not None:
                capture.write(frame)
            if not write_tap(fd, frame, header):
                self.counters["tap-write-dropped"] += 1
        if capture is not None and items:
            capture.flush()

    def close(self) -> None:
        for service in self.services:
            close = getattr(service, "close", None)
            if close is not None:
                close()
        self.epoll.close()
        self._tap_poll.close()
        close_recording = getattr(self.stack, "close_recording", None)
        if close_recording is not None:  # a recording stack (not a VM's past the limit)
            close_recording()


class _Timers:
    """One-shot callbacks at given times (``Loop.call_at``), as a service."""

    def __init__(self) -> None:
        self._heap: list = []
        self._order = itertools.count()

    def add(self, at: float, callback) -> None:
        heapq.heappush(self._heap, (at, next(self._order), callback))

    def next_deadline(self):
        return self._heap[0][0] if self._heap else None

    def handle_timer(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            callback = heapq.heappop(heap)[2]
            callback(now)  # popped first: one that raises is not called again


__all__ = ["Loop", "READ", "WRITE"]
