"""Guest-triggered warnings, rate-limited per kind (forwarder.ratelimit)."""

import io
import logging
import select
import time

import pytest

from forwarder.ratelimit import WarningLimits, install, serve


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged():
    """A handler writing to a string, with the filter on it and a fake clock;
    yields (logger, filter, clock, lines())."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    limiter = install(handler, WarningLimits(burst=5, interval=10.0))
    clock = limiter.clock = Clock()
    wakes = []
    limiter.wake = wakes.append
    logger = logging.getLogger("pyslirp.test-ratelimit")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield logger, limiter, clock, wakes, lambda: stream.getvalue().splitlines()
    finally:
        logger.removeHandler(handler)


def test_five_per_kind_then_one_summary_when_the_interval_ends(logged):
    logger, limiter, clock, wakes, lines = logged
    for n in range(20):
        logger.warning("DHCP pool exhausted: no offer for %s", f"02:00:00:00:00:{n:02x}")
        clock.now += 0.1
    assert lines() == [
        f"WARNING pyslirp.test-ratelimit: DHCP pool exhausted: no offer for 02:00:00:00:00:{n:02x}"
        for n in range(5)
    ]
    assert wakes == [110.0]  # the loop is asked once, for the end of the interval
    limiter.flush(109.9)
    assert len(lines()) == 5  # not before
    limiter.flush(110.0)
    assert lines()[5:] == [
        "WARNING pyslirp.test-ratelimit: suppressed 15 similar messages: "
        "DHCP pool exhausted: no offer for %s"
    ]
    assert limiter.next_deadline() is None
    # A new interval: five more lines pass.
    clock.now = 111.0
    for _ in range(7):
        logger.warning("DHCP pool exhausted: no offer for %s", "x")
    assert len(lines()) == 6 + 5
    assert limiter.suppressed_total == 17


def test_kinds_are_counted_apart_and_info_is_not_limited(logged):
    logger, limiter, clock, wakes, lines = logged
    for _ in range(8):
        logger.warning("tcp %s refused: %d connections open", "a", 1)
        logger.warning("DHCP client %s declined %s", "b", "c")
        logger.info("tcp %s opened", "d")
    text = lines()
    assert sum("refused" in line for line in text) == 5
    assert sum("declined" in line for line in text) == 5
    assert sum("opened" in line for line in text) == 8
    clock.now += 10
    limiter.flush()
    assert lines()[-2:] == [
        "WARNING pyslirp.test-ratelimit: suppressed 3 similar messages: "
        "tcp %s refused: %d connections open",
        "WARNING pyslirp.test-ratelimit: suppressed 3 similar messages: "
        "DHCP client %s declined %s",
    ]


def test_a_warning_after_the_interval_brings_the_summary_without_a_flush(logged):
    logger, limiter, clock, wakes, lines = logged
    for _ in range(6):
        logger.warning("cannot open a UDP socket: %s", "EMFILE")
    clock.now += 10.5
    logger.warning("cannot open a UDP socket: %s", "EMFILE")
    assert lines()[5:] == [
        "WARNING pyslirp.test-ratelimit: suppressed 1 similar messages: "
        "cannot open a UDP socket: %s",
        "WARNING pyslirp.test-ratelimit: cannot open a UDP socket: EMFILE",
    ]


def test_the_kinds_tracked_are_bounded(logged):
    logger, limiter, clock, wakes, lines = logged
    limiter.limits.max_kinds = 4
    for n in range(50):
        for _ in range(7):
            logger.warning(f"built per call {n}")  # a template per call: many kinds
    assert limiter.kinds_tracked <= 4
    # Every kind evicted early wrote its summary: nothing is lost unsaid.
    assert sum("suppressed 2 similar" in line for line in lines()) == 46


def test_the_loop_writes_the_summary_when_the_interval_ends():
    """serve(): a timerfd in a loop (here a plain select) flushes on time."""

    class Loop:
        handlers = {}

        def register(self, fd, events, handler):
            self.handlers[fd] = handler

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    limiter = install(handler, WarningLimits(burst=1, interval=0.3))
    logger = logging.getLogger("pyslirp.test-ratelimit-loop")
    logger.propagate = False
    logger.addHandler(handler)
    loop = Loop()
    timer = serve(limiter, loop)
    try:
        for _ in range(3):
            logger.warning("flood %d", 1)
        started = time.monotonic()
        while "suppressed" not in stream.getvalue() and time.monotonic() - started < 10:
            ready, _, _ = select.select(list(loop.handlers), [], [], 1.0)
            for fd in ready:
                loop.handlers[fd](1, time.monotonic())
        expected = ["flood 1", "suppressed 2 similar messages: flood %d"]
        assert stream.getvalue().splitlines() == expected
    finally:
        logger.removeHandler(handler)
        timer.close()



# ------------------------------------------------------------- end to end
GUEST_FLOOD = r"""
import socket, sys
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

count = int(sys.argv[1])
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind(("tap0", 0))
for n in range(count):
    mac = bytes([2, 0, 0, 0, n >> 8, n & 255])
    frame = (
        Ether(src=mac, dst="ff:ff:ff:ff:ff:ff")
        / IP(src="0.0.0.0", dst="255.255.255.255")
        / UDP(sport=68, dport=67)
        / BOOTP(chaddr=mac, xid=n)
        / DHCP(options=[("message-type", "discover"), "end"])
    )
    sock.send(bytes(frame))
print("sent", count)
"""


@pytest.mark.e2e
# --enable-sandbox: the first warning comes after pivot_root, when logging
# could no longer be imported (pyslirp.log.load sets it up before).
@pytest.mark.parametrize("flags", [[], ["--enable-sandbox"]], ids=["plain", "sandbox"])
def test_a_guest_flooding_dhcp_discovers_gets_five_lines_and_one_summary(flags):
    """Each DISCOVER from a new hardware address past the pool (16) warns;
    the forwarder's log has five of them and then one summary line."""
    import sys

    from tests import harness

    sent, pool = 200, 16
    with harness.forwarder(*flags) as fwd:
        result = fwd.run([sys.executable, "-c", GUEST_FLOOD, str(sent)], timeout=60)
        assert result.stdout.strip() == f"sent {sent}", result.stderr
        deadline = time.monotonic() + 30  # the interval is 10 s
        while "suppressed" not in fwd.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        log = fwd.log().splitlines()
        assert fwd.proc.poll() is None  # still serving
    warnings = [line for line in log if "DHCP pool exhausted: no offer for" in line]
    summaries = [line for line in warnings if "suppressed" in line]
    assert len(warnings) - len(summaries) == 5, "\n".join(log)
    assert len(summaries) == 1, "\n".join(log)
    assert summaries[0].endswith(
        f"suppressed {sent - pool - 5} similar messages: DHCP pool exhausted: no offer for %s"
    )
