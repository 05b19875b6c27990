"""Serving: attach to the target with validated Options and carry its traffic.

Lifecycle, as slirp4netns: set up the TAP, the forwards (-p) and the API
socket; enter the sandbox and the seccomp filter if asked; write "1" to the
ready fd and close it; serve until SIGINT/SIGTERM or a hang-up on the exit
fd; then close every host socket, remove the API socket and the bind mount,
and exit 0.

Every resource is entered into one ``Cleanup`` as soon as it exists, so
that whatever step fails (or when serving ends) what was set up is undone
in the reverse order, and an error is one line on stderr and exit
status 1 with no mount, namespace, TAP or socket file left behind.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import sys

from pyslirp.backend import READ
from pyslirp.log import get_logger

from .errors import PROG, SetupError, fail
from .options import Options, VmSocket

log = get_logger("pyslirp")


# ---------------------------------------------------------------- banner
def banner(options: Options) -> str:
    """What the forwarder says on stdout when it starts (slirp4netns's layout)."""
    config = options.config
    dhcp_end = config.host(15 + config.dhcp_pool_size - 1)  # the pool starts at .15
    upstreams = ", ".join(f"{a}:{p}" for a, p in config.dns_upstreams) or "none"
    lines = [
        f"Starting slirp ({PROG}, backend {options.backend})",
        f"* MTU:             {config.mtu}",
        f"* Network:         {config.network_address}",
        f"* Netmask:         {config.netmask}",
        f"* Gateway:         {config.gateway}",
        f"* DNS:             {config.dns}",
        f"* DHCP begin:      {config.dhcp_start}",
        f"* DHCP end:        {dhcp_end}",
        f"* Recommended IP:  {config.recommended_guest}",
        *_where_lines(options),
        f"* DNS upstreams:   {upstreams} (from {options.upstreams_from})",
    ]
    if config.enable_ipv6:
        lines += [
            f"* IPv6 prefix:     {config.ipv6_prefix} (the guest takes its address by SLAAC)",
            f"* IPv6 gateway:    {config.ipv6_gateway} (also fe80::2)",
            f"* IPv6 DNS:        {config.ipv6_dns}",
        ]
        if config.dns_search:
            lines.append(f"* DNS search:      {' '.join(config.dns_search)}")
        if config.outbound_addr6:
            lines.append(f"* Outbound IPv6:   {config.outbound_addr6}")
    if options.api_socket:
        lines.append(f"* API Socket:      {options.api_socket}")
    if options.metrics is not None:
        addr, port = options.metrics
        host = f"[{addr}]" if ":" in addr else addr
        lines.append(f"* Metrics:         http://{host}:{port}/metrics")
    if config.outbound_addr:
        lines.append(f"* Outbound IPv4:   {config.outbound_addr}")
    if options.macaddress:
        lines.append(f"* MAC address:     {options.macaddress}")
    for proto, addr, host_port, guest, guest_port in options.publish:
        if ":" in addr:
            target = "the guest's IPv6 address" if guest == "::" else f"[{guest}]"
            source = f"[{addr}]:{host_port}"
        else:
            target, source = guest, f"{addr}:{host_port}"
        lines.append(f"* Publish:         {proto} {source} -> {target}:{guest_port}")
    if config.pcap_path:
        lines.append(f"* Pcap:            {config.pcap_path}")
    if config.disable_dns:
        lines.append(f"* DNS proxy:       disabled ({config.dns} answers port unreachable)")
    if not config.disable_host_loopback:
        lines.append(
            f"WARNING: 127.0.0.1:* on the host is accessible as {config.gateway} "
            "(set --disable-host-loopback to prohibit connecting to 127.0.0.1:*)"
        )
        if config.enable_ipv6:
            lines.append(
                f"WARNING: [::1]:* on the host is accessible as [{config.ipv6_gateway}] "
                "(set --disable-host-loopback to prohibit connecting to [::1]:*)"
            )
    if not config.dns_upstreams and not config.disable_dns:
        lines.append(f"WARNING: no DNS upstream: queries to {config.dns} will go unanswered")
    return "\n".join(lines) + "\n"


def _where_lines(options: Options) -> list[str]:
    """The TAP, or the VM's socket and the QEMU options that reach it."""
    target = options.target
    if not isinstance(target, VmSocket):
        return [f"* TAP:             {options.tap} in the {options.where}"]
    mtu = options.config.mtu
    card = "-device virtio-net-pci,netdev=n0" + (f",host_mtu={mtu}" if mtu > 1500 else "")
    if target.kind == "dgram":
        netdev = (
            "-netdev dgram,id=n0,local.type=unix,local.path=VM_SOCKET,"
            f"remote.type=unix,remote.path={target.path}"
        )
    else:
        netdev = f"-netdev stream,id=n0,server=off,addr.type=unix,addr.path={target.path}"
    once = "exit when it disconnects" if target.one_off else "the next when it disconnects"
    return [
        f"* Socket:          {target.path} ({target.kind}; one VM at a time, {once})",
        f"* QEMU options:    {netdev} {card}",
    ]


# ----------------------------------------------------------------- serve
def serve(options: Options, on_signal=None, on_ready=None) -> int:
    """Attach to options.target and carry its traffic until told to stop;
    returns the exit status.

    ``on_signal(signum)`` may claim SIGINT/SIGTERM (return True) instead of
    stopping; ``on_ready(backend, request_stop)`` runs once everything is set
    up, before the sandbox and the ready fd (the run mode uses both)."""
    from pyslirp.nat.descriptors import raise_soft_limit

    # Container runtimes start us with a soft RLIMIT_NOFILE of 1024: take the
    # hard limit, from which the flow tables are sized (pyslirp/nat/descriptors.py).
    raise_soft_limit()
    with Cleanup() as cleanup:
        stop = _StopPipe(cleanup)
        _take_signals(cleanup, stop, on_signal)
        try:
            backend = _open_backend(cleanup, options)
            attachment = _attach(cleanup, options)
            backend.link = getattr(attachment, "link", None)  # --socket
        except SetupError as exc:
            return fail(str(exc))
        try:
            _start(cleanup, options, backend, attachment, stop, on_ready)
            backend.run(attachment.tap_fd, stop.read_fd)
        except SetupError as exc:
            return fail(str(exc))
        except Exception as exc:
            log.debug("backend failed", exc_info=True)
            return fail(f"backend {options.backend} failed: {exc}")
    return 0


class Cleanup:
    """What was set up, undone in the reverse order when the ``with`` block
    ends, however it ends: contextlib.ExitStack's ``callback`` alone
    (contextlib would be 0.07 MB of an idle forwarder's RSS). A step that
    raises does not keep the others from running; the first such error is
    raised once they have."""

    def __init__(self) -> None:
        self._steps: list[tuple] = []

    def callback(self, undo, *args) -> None:
        self._steps.append((undo, args))

    def __enter__(self) -> Cleanup:
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        failed = None
        while self._steps:
            undo, args = self._steps.pop()
            try:
                undo(*args)
            except BaseException as error:  # noqa: BLE001 (raised below, after the rest)
                failed = failed or error
        if failed is not None:
            raise failed


class _StopPipe:
    """SIGINT/SIGTERM (and the exit fd, and the run mode's COMMAND) stop
    the backend through a pipe that it watches: a request during start-up
    makes it return at once."""

    def __init__(self, cleanup: Cleanup) -> None:
        self.read_fd, self._write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        cleanup.callback(os.close, self._write_fd)
        cleanup.callback(os.close, self.read_fd)

    def request(self) -> None:
        try:
            os.write(self._write_fd, b"s")
        except OSError:
            pass


def _take_signals(cleanup: Cleanup, stop: _StopPipe, on_signal) -> None:
    """SIGINT and SIGTERM request a stop (unless ``on_signal`` claims them)
    until serving ends; then the previous handlers come back."""

    def handle_signal(signum, frame):
        if on_signal is not None and on_signal(signum):
            return
        stop.request()

    for signum in (signal.SIGINT, signal.SIGTERM):
        cleanup.callback(signal.signal, signum, signal.signal(signum, handle_signal))


def _open_backend(cleanup: Cleanup, options: Options):
    """The backend, made before the namespace work so that one that cannot
    start (a missing library) or lacks an option leaves nothing to undo."""
    from pyslirp.backend import create_backend

    config = options.config
    try:
        backend = create_backend(options.backend, config)
    except Exception as exc:
        raise SetupError(str(exc).splitlines()[0] if str(exc) else repr(exc)) from None
    cleanup.callback(backend.close)
    for option, wanted in (
        ("outbound_addr", config.outbound_addr),
        ("disable_dns", config.disable_dns),
        ("enable_ipv6", config.enable_ipv6),
        ("outbound_addr6", config.outbound_addr6),
    ):
        if wanted and option not in backend.supported_options:
            flag = "--" + option.replace("_", "-")
            raise SetupError(f"{flag} is not supported by the {backend.name} backend yet")
    return backend


class _SocketAttachment:
    """--socket: the listening link stands for the TAP (no namespace)."""

    netlink_fd = -1
    mounted_path = None
    mounted_identity = None

    def __init__(self, link) -> None:
        self.link = link
        self.tap_fd = link.fd


def _attach(cleanup: Cleanup, options: Options):
    """The TAP in the target namespace, set up as -c and -6 ask; or with
    --socket, the VM's socket, listening before anything says ready (QEMU
    connects once and does not retry)."""
    from .namespace import LinkSetup, NewNamespace, StartupError, attach

    config = options.config
    if isinstance(options.target, VmSocket):
        from pyslirp.link import open_link

        try:
            link = open_link(options.target.path, options.target.kind)
        except OSError as exc:
            raise SetupError(
                f"cannot listen on {options.target.path}: {exc.strerror or exc}"
            ) from None
        cleanup.callback(link.close)
        link.reconnect = not options.target.one_off
        config.offload = False
        return _SocketAttachment(link)
    setup = LinkSetup(
        loopback_up=isinstance(options.target, NewNamespace) or options.configure,
        configure=options.configure,
        mtu=config.mtu,
        address=config.recommended_guest,
        prefix_len=config.prefix_len,
        gateway=config.gateway,
        mac=options.macaddress,
        report=not options.quiet,
        ipv6=config.enable_ipv6,
        offload=options.offload,
    )
    try:
        attachment = attach(options.target, options.tap, setup)
    except StartupError as exc:
        raise SetupError(str(exc)) from None
    cleanup.callback(attachment.close)
    config.offload = attachment.offload
    return attachment


def _start(cleanup: Cleanup, options: Options, backend, attachment, stop, on_ready):
    """Everything between the attached TAP and serving: the banner, the
    backend's start, -p, -e, the log timer, -a, --metrics, the SLAAC watch
    (-c -6), the sandbox and seccomp, -r."""
    for line in options.warnings:
        print(line, file=sys.stderr if options.quiet else sys.stdout)
    if not options.quiet:
        sys.stdout.write(banner(options))
        sys.stdout.flush()
    backend.start(attachment.tap_fd, stop.read_fd)
    _publish(options, backend)
    if options.exit_fd is not None:
        _watch_exit_fd(backend, options.exit_fd, stop.request)
    log_timer = _serve_log_limits(backend)
    if log_timer is not None:
        cleanup.callback(log_timer.close)
    api = None
    if options.api_socket is not None:
        api = _serve_api(cleanup, options, backend)
    if options.metrics is not None:
        _serve_metrics(cleanup, options.metrics, backend)
    slaac = None
    if attachment.netlink_fd >= 0:
        # -c -6: ready (and COMMAND) once the guest has done SLAAC.
        slaac = _watch_slaac(options, backend, attachment, stop.request, on_ready)
        cleanup.callback(slaac.close)
    elif on_ready is not None:
        on_ready(backend, stop.request)
    if options.enable_sandbox or options.enable_seccomp:
        _lock_down(cleanup, options, backend, attachment, api)
    if options.ready_fd is not None and slaac is None:
        _signal_ready(options.ready_fd)
        options.ready_fd = None
    # What start-up made lives as long as the process: the cycle collector
    # need not look at it again (only connections come and go from here on).
    # Connections leave no cycles (see TcpNat._release), so reference
    # counting frees them; the collector is a safety net. It looks at
    # new objects after 20,000 rather than 700 of them, and at old ones
    # (thousands of TIME-WAIT connections) 50 and 5,000 times less
    # often than by default: it cost a few per cent of a connect/close run.
    if hasattr(gc, "freeze"):  # not in PyPy
        gc.freeze()
        gc.set_threshold(20000, 50, 100)


def _publish(options: Options, backend) -> None:
    """-p: the host sockets of the forwards."""
    for proto, addr, host_port, guest, guest_port in options.publish:
        try:
            backend.add_hostfwd(proto, addr, host_port, guest, guest_port)
        except OSError as exc:
            raise SetupError(
                f"cannot publish {proto} {addr}:{host_port}: {exc.strerror or exc}"
            ) from None
        except (ValueError, NotImplementedError) as exc:
            raise SetupError(f"cannot publish {proto} {addr}:{host_port}: {exc}") from None


def _watch_exit_fd(backend, fd: int, request_stop) -> None:
    """-e: stop when the descriptor reports hang-up (or an error); data on
    it is read and ignored."""

    def on_ready(mask: int, now: float) -> None:
        poller = select.poll()
        poller.register(fd, 0)  # only POLLHUP, POLLERR, POLLNVAL are reported
        if poller.poll(0):
            log.info("exitfd event")
            backend.unregister(fd)
            request_stop()
            return
        try:
            if os.read(fd, 4096) == b"":
                backend.unregister(fd)
                request_stop()
        except OSError:
            pass

    backend.register(fd, READ, on_ready)


def _serve_log_limits(backend):
    """The rate limit's summaries come when its interval ends (a timer in
    the loop); None where no limit is installed or the backend cannot."""
    from .ratelimit import installed, serve

    limiter = installed()
    if limiter is None:
        return None
    try:
        return serve(limiter, backend)
    except NotImplementedError:
        return None  # summaries then come with the next warning of the kind


def _serve_api(cleanup: Cleanup, options: Options, backend):
    """-a: the API socket, served in the backend's loop."""
    from .api import Api, ApiError, ApiServer

    api = ApiServer(options.api_socket, Api(backend, options.config))
    cleanup.callback(api.close)
    try:
        api.listen()
    except ApiError as exc:
        raise SetupError(str(exc)) from None
    api.attach(backend)
    return api


def _serve_metrics(cleanup: Cleanup, where: tuple, backend) -> None:
    """--metrics: the Prometheus text endpoint, served in the backend's loop
    (forwarder/metrics.py, imported only here)."""
    from .metrics import MetricsServer

    address, port = where
    server = MetricsServer(address, port)
    try:
        server.listen()
    except OSError as exc:
        shown = f"[{address}]" if ":" in address else address
        raise SetupError(f"--metrics: cannot listen on {shown}:{port}: {exc.strerror}") from None
    cleanup.callback(server.close)
    server.attach(backend)


def _watch_slaac(options: Options, backend, attachment, request_stop, on_ready):
    """Start watching the guest's IPv6 configuration; when it is done (or
    given up on), run ``on_ready`` and write the ready fd."""
    from .slaac import SlaacWatch

    config = options.config

    def done(ok: bool) -> None:
        if on_ready is not None:
            on_ready(backend, request_stop)
        if options.ready_fd is not None:
            _signal_ready(options.ready_fd)
            options.ready_fd = None

    fd, attachment.netlink_fd = attachment.netlink_fd, -1
    prefix, router = config.ipv6_prefix, config.stack_config().ipv6_link_local
    watch = SlaacWatch(backend, fd, prefix, router, done)
    watch.start()
    return watch


def _signal_ready(fd: int) -> None:
    """-r: write "1" and close the descriptor."""
    try:
        while True:
            try:
                os.write(fd, b"1")
                break
            except InterruptedError:
                continue
    except OSError as exc:
        log.warning("ready-fd %d: %s", fd, exc.strerror)
    finally:
        os.close(fd)


def _lock_down(cleanup: Cleanup, options: Options, backend, attachment, api):
    """--enable-sandbox and --enable-seccomp. First the bind mount and the
    API socket file are handed to a keeper process, which removes them at
    exit, when we may no longer touch them."""
    from .sandbox import (
        Keeper,
        SandboxError,
        create_own_sandbox,
        create_sandbox,
        enable_seccomp,
        join_user_namespace,
        resolv_conf_warning,
    )

    remove = api.hand_over_file() if api is not None else None
    if attachment.mounted_path is not None or remove is not None:
        unmount = None
        if attachment.mounted_path is not None:
            unmount = (attachment.mounted_path, attachment.mounted_identity)
        keeper = Keeper(unmount, remove)
        cleanup.callback(keeper.finish)
        attachment.mounted_path = None
    link = getattr(attachment, "link", None)
    if link is not None:  # --socket: its file, out of reach after pivot_root
        st = os.stat(link.path)
        cleanup.callback(Keeper(None, (link.path, (st.st_dev, st.st_ino))).finish)
    _preload(backend)
    try:
        if options.enable_sandbox:
            warning = resolv_conf_warning()
            if warning:
                print(warning, file=sys.stderr, flush=True)
            userns = getattr(options.target, "userns_path", None)
            if os.geteuid() == 0:
                create_sandbox()
            elif userns is not None:
                join_user_namespace(userns)
                create_sandbox()
            elif link is not None:  # --socket: no namespace to join, one of our own
                skipped = create_own_sandbox()
                if skipped:
                    print(skipped, file=sys.stderr, flush=True)
            else:
                raise SandboxError("--enable-sandbox needs root or a target user namespace")
        if options.enable_seccomp:
            blocked = enable_seccomp()
            print(f"seccomp: The following syscalls are blocked: {' '.join(blocked)}", flush=True)
    except SandboxError as exc:
        raise SetupError(str(exc)) from None


def _preload(backend) -> None:
    """Import now what the loop may import later: after pivot_root the
    Python library is out of reach. The services made on first use
    (Loop.on_first_use) among them, and ipaddress for IPv6 names."""
    import ipaddress  # noqa: F401

    import pyslirp.nat.dhcp  # noqa: F401
    import pyslirp.nat.dns  # noqa: F401
    import pyslirp.nat.forward  # noqa: F401
    import pyslirp.nat.icmp  # noqa: F401
    import pyslirp.pcap  # noqa: F401
    from pyslirp import log

    log.load()  # logging and the console handler (pyslirp.log imports them at the first line)

    if backend.name == "libslirp":
        import pyslirp.libslirp  # noqa: F401
