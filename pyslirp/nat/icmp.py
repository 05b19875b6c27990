"""ICMP echo relay through host ping sockets. STUB: being written."""

from pyslirp.stack import icmpv4


class IcmpRelay:
    def __init__(self, loop) -> None:
        self.loop = loop

    def on_echo(self, event, now: float) -> None:
        self.loop.stack.send_icmp_error(
            icmpv4.DEST_UNREACHABLE, icmpv4.ADMIN_PROHIBITED, event.packet, now
        )

    def next_deadline(self):
        return None

    def handle_timer(self, now: float) -> None:
        pass
