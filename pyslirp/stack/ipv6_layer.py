"""The stack's IPv6 side: ingress, neighbour discovery, router
advertisements, ICMPv6 echo and errors, fragments, and egress toward the guest.

Read first: RFC 8200 (IPv6), RFC 4861 (neighbour discovery and router
advertisements), RFC 4862 (SLAAC), RFC 4443 (ICMPv6), RFC 8106 (RDNSS and
DNSSL), RFC 4291 (addresses).

The guest's link has one router, us: the gateway address (fd00::2 by
default) also answers as the link-local fe80::2, which is the source of our
router advertisements and so the guest's default router; the DNS address
(fd00::3) answers neighbour solicitations and echo too. Each answers
neighbour solicitations with libslirp's MAC for it (52:56 and the low 32
bits of the address). Router advertisements go out in answer to
solicitations (unicast to a solicitor with an address, else multicast at
most once per 3 s) and periodically, with the prefix (on-link,
autonomous), the MTU, RDNSS naming the DNS address and, when there is a
search list, DNSSL; the O flag says stateless DHCPv6 is there too.

The guest's addresses are learned from the sources of its packets, its
neighbour solicitations and advertisements, and the targets of its duplicate
address detection (which name the address it is about to use): the latest
address in the prefix is ``guest_address``, the address port forwards go to.
A guest that skips duplicate address detection (podman turns it off) and has
sent nothing from its new address yet is asked: after each router
advertisement, while the address is unknown, an echo request goes from the
gateway address to all nodes, and Linux answers it from the address it
would use toward the gateway, its SLAAC one.

Frames are answered at once: RFC 4861 6.2.6 asks for a random delay of up
to 0.5 s before a solicited RA, which on a link with one host only slows
the guest down; the multicast rate limit is kept.
"""

from __future__ import annotations

from . import ethernet, icmpv4, icmpv6, ipv6, ndp, udp
from .errors import MalformedFrame
from .events import IcmpEchoRequested, UdpDatagramReceived

_UNSPECIFIED = ipv6.UNSPECIFIED
_ACCEPTED_GROUPS_BASE = (ipv6.ALL_NODES, ipv6.ALL_ROUTERS, ipv6.ALL_DHCP_AGENTS)
_ND_TYPES = frozenset(
    {
        icmpv6.ROUTER_SOLICITATION,
        icmpv6.ROUTER_ADVERTISEMENT,
        icmpv6.NEIGHBOR_SOLICITATION,
        icmpv6.NEIGHBOR_ADVERTISEMENT,
        icmpv6.REDIRECT,
    }
)
_MLD_TYPES = frozenset({icmpv6.MLD_QUERY, icmpv6.MLD_REPORT, icmpv6.MLD_DONE, icmpv6.MLD2_REPORT})
_WALKED = frozenset({ipv6.PROTO_HOP_BY_HOP, ipv6.PROTO_ROUTING, ipv6.PROTO_DEST_OPTIONS})
PROBE_IDENT = 0x7073  # "ps": the identifier of our echo requests to all nodes

# ICMP (v4) errors the NAT side reports, as ICMPv6 (type, code): the NAT
# side speaks one vocabulary for both families.
_FROM_V4_UNREACHABLE = {
    icmpv4.NET_UNREACHABLE: icmpv6.NO_ROUTE,
    icmpv4.HOST_UNREACHABLE: icmpv6.ADDRESS_UNREACHABLE,
    icmpv4.PORT_UNREACHABLE: icmpv6.PORT_UNREACHABLE,
    icmpv4.ADMIN_PROHIBITED: icmpv6.ADMIN_PROHIBITED,
    9: icmpv6.ADMIN_PROHIBITED,  # network administratively prohibited
    10: icmpv6.ADMIN_PROHIBITED,  # host administratively prohibited
}


class _Pending:
    __slots__ = ("packets", "size", "attempts", "retry_at")

    def __init__(self, retry_at: float) -> None:
        self.packets: list[bytes] = []
        self.size = 0  # bytes in packets, charged to the memory budget
        self.attempts = 1
        self.retry_at = retry_at


class Ipv6Layer:
    def __init__(self, stack) -> None:
        config = stack.config
        if config.mtu < ipv6.MIN_MTU:
            raise ValueError(f"IPv6 needs an MTU of at least {ipv6.MIN_MTU}, not {config.mtu}")
        self.stack = stack
        self.config = config
        self.gateway = config.ipv6_gateway
        self.dns = config.ipv6_dns
        self.link_local = config.ipv6_link_local
        self.local = frozenset({self.gateway, self.dns, self.link_local})
        self.routers = frozenset({self.gateway, self.link_local})
        self.mac = config.mac_for(self.gateway)
        self.groups = frozenset(
            (*_ACCEPTED_GROUPS_BASE, *(ipv6.solicited_node(a) for a in self.local))
        )
        self.neighbors: dict[bytes, bytes] = {}
        self.pending: dict[bytes, _Pending] = {}
        self.guest_address: bytes | None = None
        self.ident = stack.random.getrandbits(32)
        # The first periodic RA at the first timer pass, then the initial ones.
        self.ra_at: float | None = 0.0
        self.ras_sent = 0
        self.last_multicast_ra: float | None = None
        self.tokens = float(config.icmpv6_error_burst)
        self.tokens_at: float | None = None
        self.probe_at: float | None = None  # the next echo to all nodes, if any
        self.probes_due: list[float] = []  # the ones after it (absolute times)
        self.probe_sequence = 0

    # ------------------------------------------------------------ ingress
    def receive(self, data, src_mac: bytes, now: float) -> None:
        try:
            header = ipv6.parse(data)
        except ipv6.ParameterProblem as exc:
            self._parameter_problem(data, exc, now)
            raise
        stack = self.stack
        src, dst = header.src, header.dst
        packet = data[: header.total_len]
        if src[0] == 0xFF or src == ipv6.LOOPBACK:
            raise MalformedFrame("ipv6-bad-source")
        if (
            src != _UNSPECIFIED
            and self.neighbors.get(src) != src_mac
            and src not in self.local
            and (ipv6.is_link_local(src) or self.config.in_prefix6(src))
        ):
            self._learn(src, src_mac, now)
        multicast = dst[0] == 0xFF
        if multicast:
            # Our groups, and any solicited-node group: the guest's duplicate
            # address detection names the address it is about to take.
            if dst not in self.groups and dst[:13] != ipv6.SOLICITED_NODE_PREFIX:
                stack.drops["ipv6-multicast"] += 1
                return
            local = True
        else:
            local = dst in self.local
        if header.total_len > self.config.mtu and not stack.rx_gso:
            # RFC 8200 5 and RFC 8201: routers do not fragment; tell the guest.
            self.send_error(
                icmpv6.PACKET_TOO_BIG, 0, self.config.mtu, packet, now, allow_multicast=True
            )
            stack.drops["ipv6-too-big"] += 1
            return
        if not local and header.hop_limit <= 1:
            self.send_error(icmpv6.TIME_EXCEEDED, 0, 0, packet, now)
            stack.drops["ipv6-hop-limit-exceeded"] += 1
            return
        if header.fragment_id >= 0 and header.is_fragment:
            at = header.fragment_at + ipv6.FRAGMENT_LEN
            whole = stack.reassembler.add(
                (src, dst, header.fragment_id),
                packet[:at],
                header.fragment_offset,
                header.more_fragments,
                packet[at:],
                now,
                ipv6.finish_reassembly,
                ipv6.MAX_PAYLOAD,
            )
            if whole is None:
                return
            packet = memoryview(whole)
            header = ipv6.parse(packet)
            if header.fragment_id >= 0:
                raise MalformedFrame("fragment-nested")
            stack.counters["reassembled"] += 1
        proto = header.protocol
        payload = packet[header.header_len :]
        if src == _UNSPECIFIED and proto != icmpv6.PROTOCOL:
            raise MalformedFrame("ipv6-bad-source")
        if proto == ipv6.PROTO_UDP:
            if multicast and dst != ipv6.ALL_DHCP_AGENTS:
                stack.drops["ipv6-multicast"] += 1
                return
            sport, dport, length = udp.parse(payload, src, dst, not stack.rx_checksum_trusted)
            stack.counters["udp-in"] += 1
            stack.events.append(
                UdpDatagramReceived(
                    src,
                    sport,
                    dst,
                    dport,
                    bytes(payload[8:length]),
                    src_mac,
                    bytes(packet[: header.header_len + 8]),
                )
            )
        elif proto == ipv6.PROTO_TCP:
            if multicast:
                stack.drops["tcp-multicast"] += 1
            elif stack.tcp is not None:
                stack.tcp.receive_segment(header, packet, payload, now)
            else:
                self.send_error(icmpv6.DEST_UNREACHABLE, icmpv6.PORT_UNREACHABLE, 0, packet, now)
        elif proto == icmpv6.PROTOCOL:
            self._receive_icmp(header, packet, payload, src_mac, local, multicast, now)
        elif proto == ipv6.PROTO_NONE:
            stack.drops["ipv6-no-next-header"] += 1
        else:
            # RFC 8200 4: an unrecognised next header is a parameter problem.
            stack.drops["ipv6-protocol-unsupported"] += 1
            if not multicast:
                self.send_error(
                    icmpv6.PARAMETER_PROBLEM,
                    ipv6.UNRECOGNIZED_NEXT_HEADER,
                    header.next_header_at,
                    packet,
                    now,
                    src=dst if local else None,
                )

    def _parameter_problem(self, data, exc: ipv6.ParameterProblem, now: float) -> None:
        if len(data) < ipv6.HEADER_LEN:
            return
        total = min(len(data), ipv6.HEADER_LEN + int.from_bytes(data[4:6], "big"))
        dst = bytes(data[24:40])
        multicast = dst[0] == 0xFF
        if multicast and exc.unless_multicast:
            return
        self.send_error(
            icmpv6.PARAMETER_PROBLEM,
            exc.code,
            exc.pointer,
            data[:total],
            now,
            allow_multicast=exc.code == ipv6.UNRECOGNIZED_OPTION,
            src=dst if dst in self.local else None,
        )

    def _receive_icmp(self, header, packet, payload, src_mac, local, multicast, now) -> None:
        stack = self.stack
        src, dst = header.src, header.dst
        icmp_type, code, word = icmpv6.parse(payload, src, dst)
        body = payload[icmpv6.HEADER_LEN :]
        if icmp_type == icmpv6.ECHO_REQUEST:
            if multicast:
                stack.drops["icmpv6-echo-multicast"] += 1
                return
            if src == _UNSPECIFIED:
                raise MalformedFrame("ipv6-bad-source")
            if local:
                stack.counters["icmp-echo-answered"] += 1
                self.send(
                    dst,
                    src,
                    icmpv6.PROTOCOL,
                    icmpv6.emit(dst, src, icmpv6.ECHO_REPLY, 0, word, body),
                    now,
                )
                return
            stack.events.append(
                IcmpEchoRequested(
                    src,
                    dst,
                    word >> 16,
                    word & 0xFFFF,
                    bytes(body),
                    header.hop_limit,
                    bytes(packet[: header.header_len + 8]),
                )
            )
            return
        if icmp_type in _ND_TYPES:
            # RFC 4861 6.1.1, 7.1.1, 7.1.2: only from on the link, code 0.
            if header.hop_limit != ndp.HOP_LIMIT or code != 0:
                raise MalformedFrame("ndp-not-on-link")
            if icmp_type == icmpv6.NEIGHBOR_SOLICITATION:
                self._receive_solicitation(header, body, src_mac, now)
                return
            if multicast and header.dst not in self.groups:
                stack.drops["ipv6-multicast"] += 1
            elif icmp_type == icmpv6.NEIGHBOR_ADVERTISEMENT:
                self._receive_advertisement(header, word, body, src_mac, now)
            elif icmp_type == icmpv6.ROUTER_SOLICITATION:
                self._receive_router_solicitation(header, body, src_mac, now)
            else:
                stack.drops["ndp-from-another-router"] += 1  # RA, redirect: we route
            return
        if src == _UNSPECIFIED and icmp_type not in _MLD_TYPES:
            raise MalformedFrame("ipv6-bad-source")
        if icmp_type == icmpv6.ECHO_REPLY and local:
            stack.counters["icmpv6-probe-answers"] += 1  # its source taught us already
        elif icmp_type in _MLD_TYPES:
            stack.drops["icmpv6-mld"] += 1  # one link, one listener: nothing to track
        elif icmpv6.is_error(icmp_type):
            stack.drops["icmpv6-error-from-guest"] += 1
        else:
            stack.drops["icmpv6-type-ignored"] += 1

    def _receive_solicitation(self, header, body, src_mac: bytes, now: float) -> None:
        target, options = ndp.parse_solicitation(body)
        source_mac = ndp.link_address(options, ndp.OPT_SOURCE_LINK_ADDRESS)
        src = header.src
        stack = self.stack
        if src == _UNSPECIFIED:
            # Duplicate address detection (RFC 4862 5.4.2): to the
            # solicited-node group, with no link-layer option.
            if header.dst[:13] != ipv6.SOLICITED_NODE_PREFIX or source_mac is not None:
                raise MalformedFrame("ndp-bad-dad")
            if target in self.local:  # defend our address (RFC 4862 5.4.3)
                stack.counters["ndp-dad-defended"] += 1
                self._advertise(target, ipv6.ALL_NODES, None, solicited=False, now=now)
            elif self.config.in_prefix6(target):
                self.guest_address = target
                stack.counters["ndp-guest-address-learned"] += 1
            return
        if source_mac is not None and not source_mac[0] & 1:
            self._learn(src, source_mac, now)
        if target not in self.local:
            stack.drops["ndp-not-ours"] += 1
            return
        stack.counters["ndp-advertisements-out"] += 1
        self._advertise(target, src, source_mac or src_mac, solicited=True, now=now)

    def _advertise(self, target: bytes, dst: bytes, dst_mac, solicited: bool, now: float) -> None:
        flags = ndp.NA_OVERRIDE
        if solicited:
            flags |= ndp.NA_SOLICITED
        if target in self.routers:
            flags |= ndp.NA_ROUTER
        body = ndp.neighbor_advertisement(target, self.config.mac_for(target))
        message = icmpv6.emit(target, dst, icmpv6.NEIGHBOR_ADVERTISEMENT, 0, flags, body)
        self.send(target, dst, icmpv6.PROTOCOL, message, now, dst_mac, ndp.HOP_LIMIT)

    def _receive_advertisement(self, header, word: int, body, src_mac: bytes, now: float) -> None:
        target, options = ndp.parse_solicitation(body)
        if header.dst[0] == 0xFF and word & ndp.NA_SOLICITED:
            raise MalformedFrame("ndp-solicited-to-multicast")  # RFC 4861 7.1.2
        if target in self.local:
            self.stack.drops["ndp-address-conflict"] += 1
            return
        if ipv6.is_link_local(target) or self.config.in_prefix6(target):
            mac = ndp.link_address(options, ndp.OPT_TARGET_LINK_ADDRESS) or src_mac
            if not mac[0] & 1:
                self._learn(target, mac, now)

    def _receive_router_solicitation(self, header, body, src_mac: bytes, now: float) -> None:
        options = ndp.parse_options(body)
        source_mac = ndp.link_address(options, ndp.OPT_SOURCE_LINK_ADDRESS)
        src = header.src
        self.stack.counters["ndp-router-solicitations"] += 1
        if src == _UNSPECIFIED:
            if source_mac is not None:
                raise MalformedFrame("ndp-bad-solicitation")  # RFC 4861 6.1.1
            last = self.last_multicast_ra
            if last is None or now - last >= self.config.ra_min_delay:
                self._send_router_advertisement(ipv6.ALL_NODES, None, now)
            else:  # RFC 4861 6.2.6: the next multicast one comes soon enough
                due = last + self.config.ra_min_delay
                if self.ra_at is None or due < self.ra_at:
                    self.ra_at = due
            return
        if source_mac is not None and not source_mac[0] & 1:
            self._learn(src, source_mac, now)
        self._send_router_advertisement(src, source_mac or src_mac, now)

    def _send_router_advertisement(self, dst: bytes, dst_mac, now: float) -> None:
        config = self.config
        if dst == ipv6.ALL_NODES:
            self.last_multicast_ra = now
        word = ndp.router_advertisement_word(
            ipv6.DEFAULT_HOP_LIMIT, ndp.RA_OTHER, config.router_lifetime
        )
        body = ndp.router_advertisement(
            self.mac,
            config.ipv6_prefix,
            config.ipv6_prefix_len,
            config.prefix_valid_lifetime,
            config.prefix_preferred_lifetime,
            config.mtu,
            [self.dns],
            config.dns_lifetime,
            list(config.dns_search),
        )
        src = self.link_local
        message = icmpv6.emit(src, dst, icmpv6.ROUTER_ADVERTISEMENT, 0, word, body)
        self.stack.counters["ndp-router-advertisements-out"] += 1
        self.send(src, dst, icmpv6.PROTOCOL, message, now, dst_mac, ndp.HOP_LIMIT)
        if self.guest_address is None and config.guest_probe_delays and self.probe_at is None:
            due = [now + delay for delay in config.guest_probe_delays]
            self.probe_at, self.probes_due = due[0], due[1:]

    def _probe_guest(self, now: float) -> None:
        """An echo request from the gateway to all nodes (see the module text)."""
        self.probe_sequence = (self.probe_sequence + 1) & 0xFFFF
        word = (PROBE_IDENT << 16) | self.probe_sequence
        message = icmpv6.emit(self.gateway, ipv6.ALL_NODES, icmpv6.ECHO_REQUEST, 0, word)
        self.stack.counters["icmpv6-guest-probes"] += 1
        self.send(self.gateway, ipv6.ALL_NODES, icmpv6.PROTOCOL, message, now)

    def _learn(self, addr: bytes, mac: bytes, now: float) -> None:
        if mac[0] & 1:
            return
        stack = self.stack
        stack.guest_mac = mac
        neighbors = self.neighbors
        if addr not in neighbors and len(neighbors) >= self.config.arp_cache_size:
            neighbors.pop(next(iter(neighbors)))
        neighbors[addr] = mac
        if self.guest_address is None and self.config.in_prefix6(addr):
            self.guest_address = addr
        pending = self.pending.pop(addr, None)
        if pending is not None:
            head = ethernet.header(mac, self.mac, ethernet.ETHERTYPE_IPV6)
            stack.out.extend(head + packet for packet in pending.packets)
            stack.budget.release(pending.size)

    def learn_neighbor(self, addr: bytes, mac: bytes) -> None:
        self._learn(addr, mac, 0.0)

    # ------------------------------------------------------------ egress
    def send(
        self,
        src: bytes,
        dst: bytes,
        next_header: int,
        payload,
        now: float,
        dst_mac: bytes | None = None,
        hop_limit: int = ipv6.DEFAULT_HOP_LIMIT,
    ) -> None:
        """Send an IPv6 packet to the guest, in fragments if it exceeds the MTU."""
        size = len(payload)
        if size > ipv6.MAX_PAYLOAD:
            self.stack.drops["ipv6-too-long-out"] += 1
            return
        if ipv6.HEADER_LEN + size <= self.config.mtu:
            packet = ipv6.header(src, dst, next_header, size, hop_limit) + bytes(payload)
            self._send_packet(dst, packet, now, dst_mac)
            return
        self.ident = (self.ident + 1) & 0xFFFFFFFF
        self.stack.counters["fragmented-out"] += 1
        for packet in ipv6.fragment(
            src, dst, next_header, payload, self.ident, self.config.mtu, hop_limit
        ):
            self._send_packet(dst, packet, now, dst_mac)

    def send_segment(self, src: bytes, dst: bytes, parts: tuple, size: int, now: float) -> None:
        """A TCP segment (its pieces, ``size`` bytes in all, sized to the MTU
        by the MSS) to the guest, in one join when its MAC is known."""
        head = ipv6.header(src, dst, ipv6.PROTO_TCP, size)
        mac = self.neighbors.get(dst)
        if mac is not None:
            eth = ethernet.header(mac, self.mac, ethernet.ETHERTYPE_IPV6)
            self.stack.out.append(b"".join((eth, head, *parts)))
        else:
            self._send_packet(dst, b"".join((head, *parts)), now)

    def send_offload_segment(self, src, dst, mac: bytes, vnet: bytes, parts: tuple, size: int):
        """send_segment for a TAP with offloads, to a known neighbour: the
        segment may exceed the MTU (``vnet`` says how the guest cuts it)."""
        head = ipv6.header(src, dst, ipv6.PROTO_TCP, size)
        eth = ethernet.header(mac, self.mac, ethernet.ETHERTYPE_IPV6)
        self.stack.out.append((vnet, b"".join((eth, head, *parts))))

    def _send_packet(self, dst: bytes, packet: bytes, now: float, dst_mac=None) -> None:
        if dst_mac is None:
            if dst[0] == 0xFF:
                dst_mac = ipv6.multicast_mac(dst)
            else:
                dst_mac = self.neighbors.get(dst)
        if dst_mac is not None:
            self.stack.out.append(
                ethernet.header(dst_mac, self.mac, ethernet.ETHERTYPE_IPV6) + packet
            )
            return
        config = self.config
        pending = self.pending.get(dst)
        if pending is None:
            if len(self.pending) >= config.arp_pending_addresses:
                self.stack.drops["nd-pending-full"] += 1
                return
            pending = self.pending[dst] = _Pending(now + config.nd_retry_interval)
            self._solicit(dst, now)
        size = len(packet)
        if (
            len(pending.packets) >= config.arp_queue_per_address
            or pending.size + size > config.arp_queue_bytes_per_address
        ):
            self.stack.drops["nd-queue-full"] += 1
            return
        if not self.stack.budget.charge(size):
            self.stack.drops["nd-memory-budget"] += 1
            return
        pending.packets.append(packet)
        pending.size += size

    def _solicit(self, target: bytes, now: float) -> None:
        """RFC 4861 7.2.2: a solicitation to the target's solicited-node group."""
        src = self.link_local if ipv6.is_link_local(target) else self.gateway
        group = ipv6.solicited_node(target)
        body = ndp.neighbor_solicitation(target, self.mac)
        message = icmpv6.emit(src, group, icmpv6.NEIGHBOR_SOLICITATION, 0, 0, body)
        packet = ipv6.header(src, group, icmpv6.PROTOCOL, len(message), ndp.HOP_LIMIT) + message
        self._send_packet(group, packet, now)

    def send_error(
        self,
        icmp_type: int,
        code: int,
        word: int,
        original,
        now: float,
        src: bytes | None = None,
        allow_multicast: bool = False,
    ) -> None:
        """An ICMPv6 error about ``original`` (a packet the guest sent, or at
        least its start) back to its sender, within RFC 4443 2.4's rules."""
        original = bytes(original)
        if len(original) < ipv6.HEADER_LEN:
            return
        orig_src = original[8:24]
        orig_dst = original[24:40]
        if orig_src == _UNSPECIFIED or orig_src[0] == 0xFF:
            return  # 2.4(e.6): not to an address that names no single node
        if orig_dst[0] == 0xFF and not allow_multicast:
            return  # 2.4(e.3), except packet too big and unknown options
        if _is_icmp_error(original):
            return  # 2.4(e.1): never about an error
        if not self._take_token(now):
            self.stack.drops["icmpv6-error-rate-limited"] += 1
            return
        if src is None:
            src = self.link_local if ipv6.is_link_local(orig_src) else self.gateway
        body = original[: icmpv6.MAX_QUOTE]
        self.stack.counters["icmp-errors-out"] += 1
        message = icmpv6.emit(src, orig_src, icmp_type, code, word, body)
        self.send(src, orig_src, icmpv6.PROTOCOL, message, now)

    def send_error_v4_style(self, icmp_type, code, original, now, mtu=0, src=None) -> None:
        """An error the NAT side names in ICMP (v4) terms, as ICMPv6."""
        if icmp_type == icmpv4.DEST_UNREACHABLE:
            if code == icmpv4.FRAGMENTATION_NEEDED:
                self.send_error(
                    icmpv6.PACKET_TOO_BIG, 0, max(mtu, ipv6.MIN_MTU), original, now, src, True
                )
                return
            if code == 2:  # protocol unreachable
                self.send_error(
                    icmpv6.PARAMETER_PROBLEM, ipv6.UNRECOGNIZED_NEXT_HEADER, 6, original, now, src
                )
                return
            code6 = _FROM_V4_UNREACHABLE.get(code, icmpv6.ADDRESS_UNREACHABLE)
            self.send_error(icmpv6.DEST_UNREACHABLE, code6, 0, original, now, src)
        elif icmp_type == icmpv4.TIME_EXCEEDED:
            self.send_error(icmpv6.TIME_EXCEEDED, code, 0, original, now, src)

    def _take_token(self, now: float) -> bool:
        config = self.config
        if self.tokens_at is not None:
            self.tokens = min(
                float(config.icmpv6_error_burst),
                self.tokens + (now - self.tokens_at) * config.icmpv6_error_rate,
            )
        self.tokens_at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    # ------------------------------------------------------------ timers
    def next_deadline(self):
        at = self.ra_at
        if self.probe_at is not None and (at is None or self.probe_at < at):
            at = self.probe_at
        for pending in self.pending.values():
            if at is None or pending.retry_at < at:
                at = pending.retry_at
        return at

    def handle_timer(self, now: float) -> None:
        config = self.config
        for addr, pending in list(self.pending.items()):
            if pending.retry_at > now:
                continue
            if pending.attempts >= config.nd_attempts:
                del self.pending[addr]
                self.stack.drops["nd-unresolved"] += len(pending.packets)
                self.stack.budget.release(pending.size)
                # RFC 4861 7.2.2: address unreachable for what waited.
                continue
            pending.attempts += 1
            pending.retry_at = now + config.nd_retry_interval
            self._solicit(addr, now)
        if self.probe_at is not None and self.probe_at <= now:
            if self.guest_address is None:
                self._probe_guest(now)
            if self.guest_address is None and self.probes_due:
                self.probe_at = self.probes_due.pop(0)
            else:
                self.probe_at = None
                self.probes_due = []
        if self.ra_at is not None and self.ra_at <= now:
            self._send_router_advertisement(ipv6.ALL_NODES, None, now)
            self.ras_sent += 1
            if self.ras_sent < config.ra_initial_count:
                self.ra_at = now + config.ra_initial_interval
            else:
                span = config.ra_interval_max - config.ra_interval_min
                fraction = self.stack.random.getrandbits(16) / 65536.0
                self.ra_at = now + config.ra_interval_min + span * fraction

    def reassembly_expired(self, header: bytes, first: bytes, now: float) -> None:
        """RFC 8200 4.5: time exceeded, code 1, when the first fragment came."""
        if header:
            self.send_error(icmpv6.TIME_EXCEEDED, 1, 0, header + first[: icmpv6.MAX_QUOTE], now)


def _is_icmp_error(packet: bytes) -> bool:
    """Whether ``packet`` (maybe cut short) carries an ICMPv6 error message."""
    next_header = packet[6]
    offset = ipv6.HEADER_LEN
    for _ in range(ipv6.MAX_EXTENSION_HEADERS):
        if next_header not in _WALKED or offset + 2 > len(packet):
            break
        next_header = packet[offset]
        offset += (packet[offset + 1] + 1) * 8
    return next_header == icmpv6.PROTOCOL and offset < len(packet) and packet[offset] < 128
