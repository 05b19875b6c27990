"""Stateless DHCPv6 for the guest: DNS servers and the domain list.

Read first: RFC 8415 (section 8 the message format, 16.12 what a server
discards, 18.3.6 the Information-request, 21.2 and 21.3 the identifiers,
21.7 the option request option, 21.23 the refresh time), RFC 3646 (the DNS
servers and domain list options), RFC 8415 11.4 (DUID-LL).

Addresses come from SLAAC (our router advertisements), so this server hands
out no addresses: it answers Information-request with Reply, and stays
silent for Solicit, Request and the other stateful messages (RFC 8415 allows
a server to ignore what it will not serve; our RA sets the O flag, not M).

Pure logic, no sockets: ``handle(payload)`` returns the reply payload or
None; the UDP NAT sends it from fe80::2 port 547 to the client's port 546.
"""

from __future__ import annotations

import struct
from collections import Counter

from pyslirp.stack.ndp import encode_name

SOLICIT = 1
REQUEST = 3
REPLY = 7
INFORMATION_REQUEST = 11

OPTION_CLIENTID = 1
OPTION_SERVERID = 2
OPTION_IA_NA = 3
OPTION_IA_TA = 4
OPTION_ORO = 6
OPTION_DNS_SERVERS = 23
OPTION_DOMAIN_LIST = 24
OPTION_IA_PD = 25
OPTION_INFORMATION_REFRESH_TIME = 32
_IA_OPTIONS = frozenset({OPTION_IA_NA, OPTION_IA_TA, OPTION_IA_PD})

CLIENT_PORT = 546
SERVER_PORT = 547
DUID_LL = 3  # RFC 8415 11.4
HARDWARE_ETHERNET = 1
MAX_OPTIONS = 64  # a client's Information-request carries a handful

_OPTION = struct.Struct("!HH")


class MalformedDhcpv6(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse(payload) -> tuple[int, bytes, dict]:
    """(message type, transaction id, {option code: value}) of a client message."""
    if len(payload) < 4:
        raise MalformedDhcpv6("dhcpv6-truncated")
    options: dict[int, bytes] = {}
    i, end = 4, len(payload)
    while i < end:
        if i + 4 > end:
            raise MalformedDhcpv6("dhcpv6-bad-option")
        code, length = _OPTION.unpack_from(payload, i)
        if i + 4 + length > end:
            raise MalformedDhcpv6("dhcpv6-bad-option")
        if len(options) >= MAX_OPTIONS:
            raise MalformedDhcpv6("dhcpv6-too-many-options")
        options.setdefault(code, bytes(payload[i + 4 : i + 4 + length]))
        i += 4 + length
    return payload[0], bytes(payload[1:4]), options


def option(code: int, value: bytes) -> bytes:
    return _OPTION.pack(code, len(value)) + value


class Dhcpv6Server:
    def __init__(self, config) -> None:
        stack = config.stack_config()
        mac = stack.mac_for(stack.ipv6_gateway)
        self.duid = struct.pack("!HH", DUID_LL, HARDWARE_ETHERNET) + mac
        self.dns = stack.ipv6_dns
        self.search = [name for name in config.dns_search]
        self.refresh_time = config.dhcpv6_refresh_time
        self.drops: Counter = Counter()
        self.counters: Counter = Counter()

    def handle(self, payload) -> bytes | None:
        try:
            kind, transaction, options = parse(payload)
        except MalformedDhcpv6 as exc:
            self.drops[exc.reason] += 1
            return None
        if kind != INFORMATION_REQUEST:
            # Stateful DHCPv6 (Solicit, Request, ...) is not served: SLAAC is.
            self.drops[f"dhcpv6-message-{kind}-not-served"] += 1
            return None
        # RFC 8415 16.12: discarded if for another server or asking for addresses.
        server = options.get(OPTION_SERVERID)
        if server is not None and server != self.duid:
            self.drops["dhcpv6-other-server"] += 1
            return None
        if _IA_OPTIONS.intersection(options):
            self.drops["dhcpv6-information-request-with-ia"] += 1
            return None
        requested = options.get(OPTION_ORO, b"")
        wanted = {
            int.from_bytes(requested[i : i + 2], "big") for i in range(0, len(requested) - 1, 2)
        }
        parts = [bytes((REPLY,)), transaction, option(OPTION_SERVERID, self.duid)]
        client = options.get(OPTION_CLIENTID)
        if client is not None:
            parts.append(option(OPTION_CLIENTID, client))
        parts.append(option(OPTION_DNS_SERVERS, self.dns))
        if self.search:
            names = b"".join(encode_name(name) for name in self.search)
            parts.append(option(OPTION_DOMAIN_LIST, names))
        if OPTION_INFORMATION_REFRESH_TIME in wanted:
            parts.append(
                option(OPTION_INFORMATION_REFRESH_TIME, self.refresh_time.to_bytes(4, "big"))
            )
        self.counters["dhcpv6-replies"] += 1
        return b"".join(parts)
