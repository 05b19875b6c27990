"""DHCP server for the guest: one virtual link, one server, a small pool.

Read first: RFC 2131 section 4.1 (where a reply goes), 4.3 (the server:
4.3.1 DISCOVER, 4.3.2 the states of a REQUEST, 4.3.3 DECLINE, 4.3.4 RELEASE,
4.3.5 INFORM) and table 3 (the fields and options of each reply); RFC 2132
for the options; RFC 3396 (a long option split in parts); RFC 6842 (the
client identifier is echoed).

Pure logic, no sockets: ``handle(payload, src_mac, now)`` returns the replies
as (payload, destination IP, destination MAC); the UDP NAT sends them from
gateway:67 to port 68. A lease granted by an ACK is also reported as a
``DhcpLeaseGranted`` event (``next_event()``), so that the stack can learn the
guest's address without asking ARP.

Leases are keyed by the client's hardware address (chaddr) and the pool runs
from ``config.dhcp_start`` for ``config.dhcp_pool_size`` addresses. A client
keeps its address across renewals, and across its own restarts: an address
stays associated with its last client after release or expiry and is handed
to another client only when no never-used address is left.

Where this differs from a server on a shared LAN: we are the only server on a
point-to-point virtual link, so we act as an authoritative server. An
INIT-REBOOT or RENEWING request from a client we have no record of (after the
forwarder restarted, say) is ACKed when the address it asks for is free in our
pool, and NAKed otherwise, instead of the silence RFC 2131 4.3.2 asks of a
server that may share the link with others. Relayed messages (giaddr set)
cannot occur on this link and are dropped.
"""

from __future__ import annotations

import struct
from collections import Counter, deque

from pyslirp.log import get_logger
from pyslirp.settings import Settings

log = get_logger("pyslirp.dhcp")

# RFC 2131 section 2: the fixed part, then the magic cookie (RFC 2131 3).
HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128sI")
HEADER_LEN = HEADER.size  # 240, with the cookie
MAGIC_COOKIE = 0x63825363
BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHERNET = 1
FLAG_BROADCAST = 0x8000
# RFC 2131 2 and RFC 1542 3.3: a reply is at least a 300-byte BOOTP message.
MIN_REPLY_LEN = 300

# Message types (RFC 2132 9.6).
DISCOVER = 1
OFFER = 2
REQUEST = 3
DECLINE = 4
ACK = 5
NAK = 6
RELEASE = 7
INFORM = 8

# Option codes (RFC 2132).
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_MTU = 26
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_MESSAGE = 56
OPT_RENEWAL_TIME = 58
OPT_REBINDING_TIME = 59
OPT_CLIENT_ID = 61
OPT_END = 255
# An option's length octet (RFC 2132 2): longer values go out in parts.
MAX_OPTION_PART = 255

_ZERO = bytes(4)
_BROADCAST_IP = b"\xff\xff\xff\xff"
_BROADCAST_MAC = b"\xff" * 6


class MalformedDhcp(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DhcpMessage(Settings):
    """The fields of a client message the server looks at."""

    xid: int
    flags: int
    ciaddr: bytes
    giaddr: bytes
    chaddr: bytes  # 6 bytes
    options: dict  # code -> bytes (parts of a split option joined, RFC 3396)

    @property
    def message_type(self) -> int | None:
        value = self.options.get(OPT_MESSAGE_TYPE)
        return value[0] if value and len(value) == 1 else None

    def address_option(self, code: int) -> bytes | None:
        value = self.options.get(code)
        return value if value is not None and len(value) == 4 else None


class DhcpLeaseGranted(Settings):
    address: bytes
    mac: bytes
    lease_time: int


class Lease(Settings):
    address: bytes
    bound: bool  # False: offered and waiting for the REQUEST
    expires_at: float  # the offer's or the lease's end

    def active(self, now: float) -> bool:
        return self.expires_at > now


def parse(payload) -> DhcpMessage:
    """Parse a client message; raise MalformedDhcp with the reason."""
    if len(payload) < HEADER_LEN:
        raise MalformedDhcp("dhcp-truncated")
    (op, htype, hlen, _hops, xid, _secs, flags, ciaddr, _yiaddr, _siaddr, giaddr, chaddr,
     sname, file, cookie) = HEADER.unpack_from(payload, 0)  # fmt: skip
    if op != BOOTREQUEST:
        raise MalformedDhcp("dhcp-not-request")
    if htype != HTYPE_ETHERNET or hlen != 6:
        raise MalformedDhcp("dhcp-bad-hardware-address")
    if cookie != MAGIC_COOKIE:
        raise MalformedDhcp("dhcp-bad-cookie")
    options: dict[int, bytes] = {}
    _parse_options(bytes(payload[HEADER_LEN:]), options)
    overload = options.get(OPT_OVERLOAD)
    if overload is not None:  # RFC 2132 9.3: options continue in file, then sname
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            raise MalformedDhcp("dhcp-bad-option")
        if overload[0] & 1:
            _parse_options(file, options)
        if overload[0] & 2:
            _parse_options(sname, options)
    return DhcpMessage(xid, flags, ciaddr, giaddr, chaddr[:6], options)


def _parse_options(data: bytes, options: dict) -> None:
    i, end = 0, len(data)
    while i < end:
        code = data[i]
        if code == OPT_END:
            return
        if code == OPT_PAD:
            i += 1
            continue
        if i + 2 > end or i + 2 + data[i + 1] > end:
            raise MalformedDhcp("dhcp-bad-option")
        length = data[i + 1]
        value = data[i + 2 : i + 2 + length]
        options[code] = options[code] + value if code in options else value
        i += 2 + length
    # RFC 2131 4.1: the options end with the end option; a message cut short
    # anywhere, even between options, is not to be believed.
    raise MalformedDhcp("dhcp-no-end-option")


class DhcpServer:
    def __init__(self, config) -> None:
        self.config = config
        net = config.stack_config()  # the network's addresses, as bytes
        self.server_id = net.gateway
        self.netmask = net.netmask_int.to_bytes(4, "big")
        self.router = net.gateway
        self.dns = net.dns
        self._in_network = net.in_network
        start = int.from_bytes(config.host_bytes(15), "big")
        last = min(start + config.dhcp_pool_size, int.from_bytes(net.broadcast, "big"))
        self.pool = [n.to_bytes(4, "big") for n in range(start, last)]
        self._pool_set = set(self.pool)
        self.leases: dict[bytes, Lease] = {}  # chaddr -> lease (kept after it ends)
        self.owners: dict[bytes, bytes] = {}  # address -> chaddr of its last client
        self.declined: dict[bytes, float] = {}  # address -> end of quarantine
        self.drops: Counter = Counter()
        self.counters: Counter = Counter()
        self._events: deque = deque()
        # The decision trace (pyslirp/trace.py), or None: the loop's, set by
        # Loop.set_tracer (this server has no loop of its own).
        self.tracer = None

    # ---------------------------------------------------------------- verbs
    def handle(self, payload: bytes, src_mac: bytes, now: float) -> list:
        """Return [(reply payload, destination IP bytes, destination MAC bytes)]."""
        try:
            message = parse(payload)
            if message.giaddr != _ZERO:
                raise MalformedDhcp("dhcp-relayed")
            kind = message.message_type
            handler = self._handlers.get(kind)
            if handler is None:
                raise MalformedDhcp(
                    "dhcp-no-message-type" if kind is None else "dhcp-bad-message-type"
                )
            self.counters[f"dhcp-in-{kind}"] += 1
            if self.tracer is None:
                return handler(self, message, now)
            before = dict(self.drops)  # tracing: which reason the handler counts
            replies = handler(self, message, now)
            for reason, count in self.drops.items():
                if before.get(reason, 0) != count:
                    self._trace(
                        now,
                        "dhcp.ignored",
                        f"message type {kind} from {message.chaddr.hex(':')} ignored: {reason}",
                        reason=reason,
                        mac=message.chaddr.hex(":"),
                        message_type=kind,
                    )
            return replies
        except MalformedDhcp as exc:
            self.drops[exc.reason] += 1
            if self.tracer is not None:
                self._trace(now, "dhcp.ignored", f"ignored: {exc.reason}", reason=exc.reason)
        except Exception as exc:  # a bug: count it, never let the guest stop us
            self.drops["dhcp-internal-error"] += 1
            log.warning("DHCP internal error: %s: %s", type(exc).__name__, exc)
        return []

    def _trace(self, now: float, event: str, msg: str, **fields) -> None:
        self.tracer(now, event, None, msg, **fields)

    def next_event(self):
        """The next DhcpLeaseGranted, or None."""
        return self._events.popleft() if self._events else None

    def lease_for(self, mac: bytes, now: float) -> bytes | None:
        """The address bound to ``mac`` now, if any."""
        lease = self.leases.get(mac)
        if lease is not None and lease.bound and lease.active(now):
            return lease.address
        return None

    # ------------------------------------------------------------- messages
    def _discover(self, msg: DhcpMessage, now: float) -> list:
        # RFC 2131 4.3.1: the client's current or previous address, else the
        # address it asks for if free, else a free one.
        address = self._choose(msg.chaddr, msg.address_option(OPT_REQUESTED_IP), now)
        if address is None:
            self.drops["dhcp-pool-exhausted"] += 1
            log.warning("DHCP pool exhausted: no offer for %s", msg.chaddr.hex(":"))
            return []
        lease = self.leases.get(msg.chaddr)
        if lease is None or lease.address != address or not lease.active(now):
            self._assign(msg.chaddr, address, False, now + self.config.dhcp_offer_timeout)
        if self.tracer is not None:
            self._trace(
                now,
                "dhcp.offer",
                f"offer {_ip(address)} to {msg.chaddr.hex(':')}",
                address=_ip(address),
                mac=msg.chaddr.hex(":"),
            )
        return [self._reply(msg, OFFER, address)]

    def _request(self, msg: DhcpMessage, now: float) -> list:
        server_id = msg.options.get(OPT_SERVER_ID)
        requested = msg.address_option(OPT_REQUESTED_IP)
        if server_id is not None:
            # SELECTING: the answer to an OFFER, sent to every server.
            if server_id != self.server_id:
                self.drops["dhcp-other-server"] += 1
                lease = self.leases.get(msg.chaddr)
                if lease is not None and not lease.bound:
                    lease.expires_at = now  # it chose another server: free the offer
                return []
            if requested is None or msg.ciaddr != _ZERO:
                raise MalformedDhcp("dhcp-bad-request")
            return self._grant_or_refuse(msg, requested, now)
        if msg.ciaddr == _ZERO:
            # INIT-REBOOT: a client that remembers an address.
            if requested is None:
                raise MalformedDhcp("dhcp-bad-request")
            return self._grant_or_refuse(msg, requested, now)
        # RENEWING (unicast) or REBINDING (broadcast): the same answer here.
        return self._grant_or_refuse(msg, msg.ciaddr, now)

    def _grant_or_refuse(self, msg: DhcpMessage, address: bytes, now: float) -> list:
        if self._available(msg.chaddr, address, now):
            lease_time = self.config.dhcp_lease_time
            self._assign(msg.chaddr, address, True, now + lease_time)
            self._events.append(DhcpLeaseGranted(address, msg.chaddr, lease_time))
            log.info("DHCP lease %s to %s", _ip(address), msg.chaddr.hex(":"))
            if self.tracer is not None:
                self._trace(
                    now,
                    "dhcp.ack",
                    f"lease {_ip(address)} to {msg.chaddr.hex(':')} for {lease_time}s",
                    address=_ip(address),
                    mac=msg.chaddr.hex(":"),
                    lease_time=lease_time,
                )
            return [self._reply(msg, ACK, address)]
        self.counters["dhcp-nak"] += 1
        log.info("DHCP NAK: %s may not use %s", msg.chaddr.hex(":"), _ip(address))
        if self.tracer is not None:
            reason = self._refusal(msg.chaddr, address, now)
            self._trace(
                now,
                "dhcp.nak",
                f"NAK to {msg.chaddr.hex(':')}: {_ip(address)} {reason}",
                address=_ip(address),
                mac=msg.chaddr.hex(":"),
                reason=reason,
            )
        return [self._nak(msg, "requested address not available")]

    def _refusal(self, mac: bytes, address: bytes, now: float) -> str:
        """Why ``mac`` may not have ``address`` (for the trace)."""
        if address not in self._pool_set:
            return "is not in the pool"
        if self.declined.get(address, now) > now:
            return "was declined (in quarantine)"
        return "is leased to another client"

    def _decline(self, msg: DhcpMessage, now: float) -> list:
        # RFC 2131 4.3.3: the address is in use by someone else; keep it out
        # of the pool for a while.
        if msg.options.get(OPT_SERVER_ID) != self.server_id:
            self.drops["dhcp-other-server"] += 1
            return []
        address = msg.address_option(OPT_REQUESTED_IP)
        lease = self.leases.get(msg.chaddr)
        if address is None or lease is None or lease.address != address:
            self.drops["dhcp-decline-unknown"] += 1
            return []
        self._forget(msg.chaddr)
        self.declined[address] = now + self.config.dhcp_decline_timeout
        log.warning("DHCP client %s declined %s", msg.chaddr.hex(":"), _ip(address))
        if self.tracer is not None:
            self._trace(
                now,
                "dhcp.decline",
                f"{msg.chaddr.hex(':')} declined {_ip(address)}: out of the pool for "
                f"{self.config.dhcp_decline_timeout}s",
                address=_ip(address),
                mac=msg.chaddr.hex(":"),
            )
        return []

    def _release(self, msg: DhcpMessage, now: float) -> list:
        # RFC 2131 4.3.4: free the lease but remember the client, so it gets
        # the same address back while nobody else needs it.
        if msg.options.get(OPT_SERVER_ID, self.server_id) != self.server_id:
            self.drops["dhcp-other-server"] += 1
            return []
        lease = self.leases.get(msg.chaddr)
        if lease is None or lease.address != msg.ciaddr or not lease.bound:
            self.drops["dhcp-release-unknown"] += 1
            return []
        lease.expires_at = min(lease.expires_at, now)
        log.info("DHCP lease %s released by %s", _ip(lease.address), msg.chaddr.hex(":"))
        if self.tracer is not None:
            self._trace(
                now,
                "dhcp.release",
                f"{msg.chaddr.hex(':')} released {_ip(lease.address)}",
                address=_ip(lease.address),
                mac=msg.chaddr.hex(":"),
            )
        return []

    def _inform(self, msg: DhcpMessage, now: float) -> list:
        # RFC 2131 4.3.5: configuration only, unicast to ciaddr, no lease.
        if msg.ciaddr == _ZERO or not self._in_network(msg.ciaddr):
            self.drops["dhcp-inform-bad-ciaddr"] += 1
            return []
        return [self._reply(msg, ACK, None)]

    _handlers = {
        DISCOVER: _discover,
        REQUEST: _request,
        DECLINE: _decline,
        RELEASE: _release,
        INFORM: _inform,
    }

    # ---------------------------------------------------------------- pool
    def _usable(self, address: bytes, now: float) -> bool:
        until = self.declined.get(address)
        if until is not None:
            if until > now:
                return False
            del self.declined[address]
        return address in self._pool_set

    def _available(self, mac: bytes, address: bytes, now: float) -> bool:
        """May ``mac`` hold ``address`` now?"""
        if not self._usable(address, now):
            return False
        owner = self.owners.get(address)
        if owner is None or owner == mac:
            return True
        return not self.leases[owner].active(now)

    def _choose(self, mac: bytes, requested: bytes | None, now: float) -> bytes | None:
        lease = self.leases.get(mac)
        if lease is not None and self._available(mac, lease.address, now):
            return lease.address
        if requested is not None and self._available(mac, requested, now):
            return requested
        for address in self.pool:  # never used yet
            if address not in self.owners and self._usable(address, now):
                return address
        # Reuse the address whose last client left longest ago.
        free = [
            (self.leases[owner].expires_at, address)
            for address, owner in self.owners.items()
            if not self.leases[owner].active(now) and self._usable(address, now)
        ]
        return min(free)[1] if free else None

    def _assign(self, mac: bytes, address: bytes, bound: bool, expires_at: float) -> None:
        lease = self.leases.get(mac)
        if lease is not None and lease.address != address:
            self._forget(mac)
        previous = self.owners.get(address)
        if previous is not None and previous != mac:
            del self.leases[previous]
        self.owners[address] = mac
        self.leases[mac] = Lease(address, bound, expires_at)

    def _forget(self, mac: bytes) -> None:
        lease = self.leases.pop(mac, None)
        if lease is not None and self.owners.get(lease.address) == mac:
            del self.owners[lease.address]

    # -------------------------------------------------------------- replies
    def _reply(self, msg: DhcpMessage, kind: int, address: bytes | None) -> tuple:
        """An OFFER or ACK (``address`` None: the ACK to an INFORM)."""
        options = [
            (OPT_MESSAGE_TYPE, bytes([kind])),
            (OPT_SERVER_ID, self.server_id),
        ]
        if address is not None:
            lease_time = self.config.dhcp_lease_time
            options += [
                (OPT_LEASE_TIME, lease_time.to_bytes(4, "big")),
                # RFC 2131 4.4.5 defaults: T1 = 0.5, T2 = 0.875 of the lease.
                (OPT_RENEWAL_TIME, (lease_time // 2).to_bytes(4, "big")),
                (OPT_REBINDING_TIME, (lease_time * 7 // 8).to_bytes(4, "big")),
            ]
        options += [
            (OPT_SUBNET_MASK, self.netmask),
            (OPT_ROUTER, self.router),
            (OPT_DNS, self.dns),
            (OPT_MTU, self.config.mtu.to_bytes(2, "big")),
        ]
        client_id = msg.options.get(OPT_CLIENT_ID)
        if client_id is not None:
            options.append((OPT_CLIENT_ID, client_id))
        # Table 3: an ACK carries the request's ciaddr, an OFFER zero.
        ciaddr = msg.ciaddr if kind == ACK else _ZERO
        payload = self._emit(msg, address or _ZERO, ciaddr, options)
        # RFC 2131 4.1: to ciaddr if the client has one; else broadcast if it
        # asks; else to yiaddr at its hardware address.
        if msg.ciaddr != _ZERO:
            return payload, msg.ciaddr, msg.chaddr
        if msg.flags & FLAG_BROADCAST:
            return payload, _BROADCAST_IP, _BROADCAST_MAC
        return payload, address, msg.chaddr

    def _nak(self, msg: DhcpMessage, text: str) -> tuple:
        options = [
            (OPT_MESSAGE_TYPE, bytes([NAK])),
            (OPT_SERVER_ID, self.server_id),
            (OPT_MESSAGE, text.encode()),
        ]
        client_id = msg.options.get(OPT_CLIENT_ID)
        if client_id is not None:
            options.append((OPT_CLIENT_ID, client_id))
        # RFC 2131 4.3.2: with giaddr zero, a NAK is always broadcast.
        return self._emit(msg, _ZERO, _ZERO, options), _BROADCAST_IP, _BROADCAST_MAC

    @staticmethod
    def _emit(msg: DhcpMessage, yiaddr: bytes, ciaddr: bytes, options: list) -> bytes:
        header = HEADER.pack(
            BOOTREPLY, HTYPE_ETHERNET, 6, 0, msg.xid, 0, msg.flags, ciaddr, yiaddr,
            _ZERO, _ZERO, msg.chaddr.ljust(16, b"\0"), bytes(64), bytes(128), MAGIC_COOKIE,
        )  # fmt: skip
        parts = [header]
        for code, value in options:
            _append_option(parts, code, value)
        parts.append(bytes((OPT_END,)))
        message = b"".join(parts)
        return message.ljust(MIN_REPLY_LEN, b"\0")


def _append_option(parts: list, code: int, value: bytes) -> None:
    """One option, as consecutive instances of at most 255 bytes each when
    it is longer (RFC 3396 section 6: the client joins them in order). A
    client identifier may be that long (RFC 3396 concatenation on input),
    and it is echoed (RFC 6842)."""
    if not value:
        parts.append(bytes((code, 0)))
        return
    for start in range(0, len(value), MAX_OPTION_PART):
        part = value[start : start + MAX_OPTION_PART]
        parts.append(bytes((code, len(part))))
        parts.append(part)


def _ip(address: bytes) -> str:
    return ".".join(str(b) for b in address)
