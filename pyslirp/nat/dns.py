"""DNS proxy at the virtual DNS address. STUB: being written."""


class DnsProxy:
    def __init__(self, loop) -> None:
        self.loop = loop

    def query(self, guest: bytes, guest_port: int, payload: bytes, now: float) -> None:
        pass

    def next_deadline(self):
        return None

    def handle_timer(self, now: float) -> None:
        pass
