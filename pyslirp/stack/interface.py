"""The stack's face: one guest-facing Ethernet interface, sans-IO.

Verbs (after aioquic): ``receive_frame(frame, now)``, ``frames_to_send(now)``,
``get_timer()`` (and its cheap lower bound ``next_wake()``), ``handle_timer(now)``,
``next_event()``; and the commands the
NAT side calls: ``send_udp``, ``send_icmp_error``, ``send_echo_reply`` (and the
TCP commands on ``stack.tcp``, the TcpLayer the Stack builds from
``config.tcp``: a bare Stack speaks TCP).

The seam (what the loop and the layers use, and nothing private):
``stack.events`` (the event deque ``next_event`` pops; ``drain_events()`` takes
them all), ``stack.out`` (frames queued for the guest, replaced by a new list
at each ``vnet_frames_to_send``: look it up, do not keep it),
``next_ip_ident()`` (the IPv4 identification for the next datagram),
``neighbour_mac(addr)`` (the guest's MAC for an address, if known) and
``learn_neighbor(addr, mac)``, ``send_packet(dst, packet, now)`` (an IPv4
packet, ARP first if need be), ``arp_cache``, ``arp_pending`` and
``reassembler`` (read-only outside the Stack: the TCP layer's fast path and
tests read them), ``broadcast`` (the network's broadcast address).

Ingress never raises: MalformedFrame is counted by its reason in
``stack.drops`` and the frame is dropped; any other exception is a bug, counted
under "internal-error" (its text kept in ``stack.last_internal_error``), so a
hostile guest cannot stop the process.
"""

from __future__ import annotations

from collections import Counter, deque

from . import arp, checksum, ethernet, icmpv4, ipv4, udp, virtio
from .budget import MemoryBudget
from .config import StackConfig
from .errors import MalformedFrame
from .events import IcmpEchoRequested, MemoryPressureChanged, UdpDatagramReceived
from .reassembly import Reassembler
from .tcp_layer import TcpLayer

_ZERO_IP = bytes(4)
_LIMITED_BROADCAST = b"\xff\xff\xff\xff"


_VNET_LEN = virtio.HEADER_LEN
_ETH_LEN = ethernet.HEADER_LEN
_ETH_HEADER = ethernet.HEADER
_VNET_GSO_TCP = frozenset((virtio.GSO_NONE, virtio.GSO_TCPV4, virtio.GSO_TCPV6))


class _PendingArp:
    __slots__ = ("packets", "size", "attempts", "retry_at")

    def __init__(self, retry_at: float) -> None:
        self.packets: list[bytes] = []
        self.size = 0  # bytes in packets, charged to the memory budget
        self.attempts = 1
        self.retry_at = retry_at


class Stack:
    def __init__(self, config: StackConfig, random) -> None:
        """``random`` is a random.Random-like object (``getrandbits``)."""
        self.config = config
        self.random = random
        self.gateway_mac = config.gateway_mac
        self.guest_mac: bytes | None = None
        self.drops: Counter = Counter()
        self.counters: Counter = Counter()
        self.last_internal_error = ""
        # The decision trace (pyslirp/trace.py): None, or a callable
        # tracer(now, event, flow, msg, **fields); set with set_tracer.
        self.tracer = None
        # The one ceiling on bytes held for the guest (budget.py): every
        # holder, here and on the NAT side, charges and releases it.
        self.budget = MemoryBudget(config.memory_budget)
        # The seam (see the module's docstring): frames for the guest, events
        # for the NAT side, the ARP cache (address -> MAC) and the addresses
        # waiting for ARP, written here only.
        self.out: list = []
        self.events: deque = deque()
        self.arp_cache: dict[bytes, bytes] = {}
        self.arp_pending: dict[bytes, _PendingArp] = {}
        self._ip_ident = random.getrandbits(16)
        self.reassembler = Reassembler(
            config.reassembly_timeout,
            config.reassembly_max_datagrams,
            config.reassembly_max_bytes,
            config.reassembly_max_fragments,
            self.budget,
        )
        self._local = {config.gateway, config.dns}
        self.broadcast = config.broadcast  # a computed property: once, not per packet
        # Set for the length of one receive_vnet_frame call: the guest's
        # checksum is partial or checked, and the frame may be a GSO one.
        self.rx_checksum_trusted = False
        self.rx_gso = False
        # IPv6 (config.ipv6): ingress, neighbour discovery, RAs, egress.
        self.ipv6 = None
        if config.ipv6:  # imported only then: it and ndp cost 1 ms of a start without -6
            from .ipv6_layer import Ipv6Layer

            self.ipv6 = Ipv6Layer(self)
        # TCP (config.tcp): connections, their timers, the NAT side's commands.
        self.tcp = TcpLayer(self)

    # ------------------------------------------------------------ the verbs
    def receive_frame(self, frame, now: float) -> None:
        self.counters["frames-in"] += 1
        try:
            if not self.tcp.receive_fast(frame, 0, False, False, now):
                self._receive(memoryview(frame), now)
        except MalformedFrame as exc:
            self.drops[exc.reason] += 1
        except Exception as exc:  # a bug: count it, never let the guest stop us
            self.drops["internal-error"] += 1
            self.last_internal_error = f"{type(exc).__name__}: {exc}"

    def receive_vnet_frame(self, data, now: float) -> None:
        """``receive_frame`` for a TAP with IFF_VNET_HDR: ``data`` is the
        virtio_net_hdr followed by the frame. A partial or already checked
        checksum is not verified; a GSO frame may exceed the MTU."""
        self.counters["frames-in"] += 1
        try:
            if len(data) < _VNET_LEN:
                raise MalformedFrame("vnet-truncated")
            flags = data[0]
            gso_type = data[1]
            tcp = self.tcp
            if (not gso_type or gso_type == virtio.GSO_TCPV4) and tcp.receive_fast(
                data, _VNET_LEN, flags or gso_type, gso_type, now
            ):
                if gso_type:
                    self.counters["gso-frames-in"] += 1
                return
            frame = memoryview(data)[_VNET_LEN:]
            if not gso_type:
                if not flags:
                    self._receive(frame, now)
                    return
            elif gso_type & ~virtio.GSO_ECN not in _VNET_GSO_TCP:
                raise MalformedFrame("vnet-gso-unsupported")
            verify = tcp.verify_checksum
            self.rx_checksum_trusted = True
            if gso_type:
                self.rx_gso = True
                self.counters["gso-frames-in"] += 1
            tcp.verify_checksum = False
            try:
                self._receive(frame, now)
            finally:
                self.rx_checksum_trusted = False
                self.rx_gso = False
                tcp.verify_checksum = verify
        except MalformedFrame as exc:
            self.drops[exc.reason] += 1
        except Exception as exc:  # a bug: count it, never let the guest stop us
            self.drops["internal-error"] += 1
            self.last_internal_error = f"{type(exc).__name__}: {exc}"

    def frames_to_send(self, now: float) -> list[bytes]:
        """The frames for the guest. With ``config.offload`` their TCP
        checksums are partial: a TAP with IFF_VNET_HDR wants vnet_frames_to_send."""
        out = self.vnet_frames_to_send(now)
        return [item[1] if item.__class__ is tuple else item for item in out]

    def vnet_frames_to_send(self, now: float) -> list:
        """The frames for the guest, each either a frame (its virtio_net_hdr
        is virtio.NO_OFFLOAD) or a (virtio_net_hdr, frame) pair."""
        budget = self.budget
        held = budget.held
        if held > budget.peak:  # hot paths charge without looking at peak
            budget.peak = held
        if held >= budget.relief or budget.pressed:
            self.check_memory_pressure()
        self.tcp.flush(now)
        out, self.out = self.out, []
        self.counters["frames-out"] += len(out)
        return out

    def check_memory_pressure(self) -> None:
        """Once per wake-up near the budget's marks (and where a holder lets
        go of much): tell the NAT side when
        pressure begins or ends, and when it ends, the connections that it
        held back (their windows and send space open again)."""
        budget = self.budget
        changed = budget.pressure_changed()
        if changed is None:
            return
        self.counters["memory-pressure-entered" if changed else "memory-pressure-left"] += 1
        self.events.append(MemoryPressureChanged(changed, budget.held, budget.limit))
        if not changed:
            self.tcp.memory_relieved()  # window updates go at the next flush

    def memory_held(self) -> dict:
        """What each holder holds, recounted from its buffers (tests compare
        the sum with budget.held; holders on the NAT side add their own)."""
        held = {
            "tcp": self.tcp.held_bytes(),
            "reassembly": self.reassembler.held_bytes,
            "arp": sum(p.size for p in self.arp_pending.values()),
        }
        if self.ipv6 is not None:
            held["nd"] = sum(p.size for p in self.ipv6.pending.values())
        return held

    def set_tracer(self, tracer) -> None:
        """Trace every decision to ``tracer`` (None: stop tracing). Tracing
        switches the stack, its TCP layer and connections to the traced
        subclasses of tracing.py: off, the plain classes pay nothing."""
        from . import tracing  # it subclasses Stack: imported once both exist

        self.tracer = tracer
        if tracer is None:
            tracing.switch_off(self)
        else:
            tracing.switch_on(self)

    def next_event(self):
        return self.events.popleft() if self.events else None

    def drain_events(self) -> list:
        """Every event waiting, oldest first (next_event until None)."""
        events = list(self.events)
        self.events.clear()
        return events

    def next_ip_ident(self) -> int:
        """The identification field of the next IPv4 datagram toward the guest."""
        ident = self._ip_ident = (self._ip_ident + 1) & 0xFFFF
        return ident

    def neighbour_mac(self, addr: bytes) -> bytes | None:
        """The MAC of a guest address (IPv4's ARP cache, IPv6's neighbour
        cache), or None while unknown."""
        if len(addr) == 16:
            return self.ipv6.neighbors.get(addr) if self.ipv6 is not None else None
        return self.arp_cache.get(addr)

    def next_wake(self):
        """A time no later than get_timer()'s, perhaps earlier (then nothing
        is due yet when it comes): the cheap question for a loop's sleep,
        asked at every wake-up. get_timer() is exact."""
        if not self.arp_pending and not self.reassembler.datagrams and self.ipv6 is None:
            return self.tcp.wake_at  # the common case
        return self.get_timer()

    def get_timer(self):
        if not self.arp_pending and not self.reassembler.datagrams and self.ipv6 is None:
            return self.tcp.get_timer()  # the common case
        deadlines = [p.retry_at for p in self.arp_pending.values()]
        reassembly = self.reassembler.next_deadline()
        if reassembly is not None:
            deadlines.append(reassembly)
        if self.ipv6 is not None:
            due = self.ipv6.next_deadline()
            if due is not None:
                deadlines.append(due)
        tcp = self.tcp.get_timer()
        if tcp is not None:
            deadlines.append(tcp)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        for addr, pending in list(self.arp_pending.items()):
            if pending.retry_at > now:
                continue
            if pending.attempts >= self.config.arp_attempts:
                del self.arp_pending[addr]
                self.drops["arp-unresolved"] += len(pending.packets)
                self.budget.release(pending.size)
                continue
            pending.attempts += 1
            pending.retry_at = now + self.config.arp_retry_interval
            self._send_arp_request(addr)
        for key, header, first in self.reassembler.expire(now):
            self.drops["reassembly-timeout"] += 1
            if len(key[0]) == 16:
                if self.ipv6 is not None:
                    self.ipv6.reassembly_expired(header, first, now)
            # RFC 792: time exceeded, code 1, only if the first fragment came.
            elif header:
                self.send_icmp_error(icmpv4.TIME_EXCEEDED, 1, header + first[:8], now)
        if self.ipv6 is not None:
            self.ipv6.handle_timer(now)
        self.tcp.handle_timer(now)

    # ------------------------------------------------------------ commands
    def send_udp(
        self,
        src: bytes,
        src_port: int,
        dst: bytes,
        dst_port: int,
        payload,
        now: float,
        dst_mac: bytes | None = None,
    ) -> None:
        """Send a UDP datagram to the guest (fragmented if it exceeds the MTU)."""
        self.send_ip(
            src,
            dst,
            ipv4.PROTO_UDP,
            udp.emit(src, dst, src_port, dst_port, payload),
            now,
            dst_mac=dst_mac,
        )

    def send_echo_reply(
        self, src: bytes, dst: bytes, ident: int, sequence: int, payload, now: float
    ) -> None:
        if len(dst) == 16:
            from . import icmpv6  # IPv6 only (as the layer): an IPv4 forwarder never loads it

            word = (ident << 16) | sequence
            message = icmpv6.emit(src, dst, icmpv6.ECHO_REPLY, 0, word, payload)
            self.send_ip(src, dst, icmpv6.PROTOCOL, message, now)
            return
        self.send_ip(
            src,
            dst,
            ipv4.PROTO_ICMP,
            icmpv4.emit(icmpv4.ECHO_REPLY, 0, ident, sequence, payload),
            now,
        )

    def send_icmp_error(
        self,
        icmp_type: int,
        code: int,
        original,
        now: float,
        mtu: int = 0,
        src: bytes | None = None,
    ) -> None:
        """Send an ICMP error about ``original`` (an IP packet the guest sent,
        or at least its header and first 8 payload bytes) back to its sender.

        The type and code are ICMP's (v4); about an IPv6 packet the matching
        ICMPv6 error goes (Ipv6Layer.send_error_v4_style), so the NAT side
        names errors one way for both families."""
        if original and original[0] >> 4 == 6:
            if self.ipv6 is not None:
                self.ipv6.send_error_v4_style(icmp_type, code, original, now, mtu, src)
            return
        original = bytes(original)
        if len(original) < ipv4.HEADER_LEN:
            return
        orig_src = original[12:16]
        orig_dst = original[16:20]
        proto = original[9]
        # RFC 1122 3.2.2: never about a datagram from an address that does not
        # name one host, to a broadcast or multicast address, or about a
        # fragment other than the first.
        if orig_src == _ZERO_IP or orig_src[0] >= 224 or orig_src == self.config.broadcast:
            return
        if orig_dst[0] >= 224 or orig_dst == self.config.broadcast:
            return
        if (original[6] & 0x1F) or original[7]:
            return
        if proto == ipv4.PROTO_ICMP:  # RFC 1122 3.2.2: never about an ICMP error
            hl = (original[0] & 0x0F) * 4
            if len(original) > hl and original[hl] in icmpv4.ERROR_TYPES:
                return
        word2 = mtu if icmp_type == icmpv4.DEST_UNREACHABLE else 0
        body = original[: icmpv4.MAX_QUOTE]
        self.counters["icmp-errors-out"] += 1
        self.send_ip(
            src or self.config.gateway,
            orig_src,
            ipv4.PROTO_ICMP,
            icmpv4.emit(icmp_type, code, 0, word2, body),
            now,
        )

    def send_ip(
        self,
        src: bytes,
        dst: bytes,
        protocol: int,
        payload,
        now: float,
        dst_mac: bytes | None = None,
        ttl: int = ipv4.DEFAULT_TTL,
    ) -> None:
        """Send an IP datagram to the guest, fragmenting it to the MTU."""
        if len(dst) == 16:
            if self.ipv6 is not None:
                self.ipv6.send(src, dst, protocol, payload, now, dst_mac, ttl)
            return
        if ipv4.HEADER_LEN + len(payload) > ipv4.MAX_PACKET:
            self.drops["ipv4-too-long-out"] += 1
            return
        ident = self.next_ip_ident()
        if ipv4.HEADER_LEN + len(payload) <= self.config.mtu:
            packets = [ipv4.header(src, dst, protocol, len(payload), ident, ttl) + bytes(payload)]
        else:
            packets = ipv4.fragment(src, dst, protocol, payload, ident, self.config.mtu, ttl)
            self.counters["fragmented-out"] += 1
        for packet in packets:
            self.send_packet(dst, packet, now, dst_mac)

    def udp_quote(self, src: bytes, src_port: int, dst: bytes, dst_port: int) -> bytes:
        """A plausible copy of a guest datagram's first bytes, for an ICMP error
        about a flow whose original packet is gone."""
        if len(src) == 16:
            from . import ipv6  # IPv6 only, as above

            head = ipv6.header(src, dst, ipv6.PROTO_UDP, 8)
            return head + udp.HEADER.pack(src_port, dst_port, 8, 0)
        head = ipv4.header(src, dst, ipv4.PROTO_UDP, 8, 0)
        return head + udp.HEADER.pack(src_port, dst_port, 8, 0)

    # ------------------------------------------------------------ ingress
    def _receive(self, frame: memoryview, now: float) -> None:
        if len(frame) < _ETH_LEN:  # ethernet.parse, inlined
            raise MalformedFrame("ethernet-truncated")
        dst_mac, src_mac, ethertype = _ETH_HEADER.unpack_from(frame, 0)
        if src_mac[0] & 1:
            raise MalformedFrame("ethernet-multicast-source")
        if ethertype == ethernet.ETHERTYPE_IPV4:
            self._receive_ipv4(frame[ethernet.HEADER_LEN :], src_mac, now)
        elif ethertype == ethernet.ETHERTYPE_ARP:
            self._receive_arp(frame[ethernet.HEADER_LEN :], src_mac, now)
        elif ethertype == ethernet.ETHERTYPE_IPV6 and self.ipv6 is not None:
            self.ipv6.receive(frame[ethernet.HEADER_LEN :], src_mac, now)
        else:
            self.drops["ethertype-unsupported"] += 1

    def _receive_arp(self, data, src_mac: bytes, now: float) -> None:
        oper, sha, spa, _tha, tpa = arp.parse(data)
        if spa != _ZERO_IP and self.config.in_network(spa) and spa not in self._local:
            self._learn(spa, sha, now)
        if oper == arp.REQUEST and tpa in self._local and spa != tpa and not sha[0] & 1:
            mac = self.config.mac_for(tpa)
            reply = arp.emit(arp.REPLY, mac, tpa, sha, spa)
            self.out.append(ethernet.header(sha, mac, ethernet.ETHERTYPE_ARP) + reply)

    def _learn(self, addr: bytes, mac: bytes, now: float) -> None:
        if mac[0] & 1:
            return
        self.guest_mac = mac
        if addr not in self.arp_cache and len(self.arp_cache) >= self.config.arp_cache_size:
            self.arp_cache.pop(next(iter(self.arp_cache)))
        self.arp_cache[addr] = mac
        pending = self.arp_pending.pop(addr, None)
        if pending is not None:
            head = ethernet.header(mac, self.gateway_mac, ethernet.ETHERTYPE_IPV4)
            self.out.extend(head + packet for packet in pending.packets)
            self.budget.release(pending.size)

    def _receive_ipv4(self, data, src_mac: bytes, now: float) -> None:
        header = ipv4.parse(data)
        packet = data[: header.total_len]
        src, dst = header.src, header.dst
        if src[0] >= 224 or src[0] == 127 or src == self.broadcast:
            raise MalformedFrame("ipv4-bad-source")
        if (
            self.arp_cache.get(src) != src_mac
            and src != _ZERO_IP
            and self.config.in_network(src)
            and src not in self._local
        ):
            self._learn(src, src_mac, now)
        if header.total_len > self.config.mtu and header.dont_fragment and not self.rx_gso:
            # Larger than our link MTU (RFC 1191): tell the guest the size to use.
            self.send_icmp_error(
                icmpv4.DEST_UNREACHABLE,
                icmpv4.FRAGMENTATION_NEEDED,
                packet,
                now,
                mtu=self.config.mtu,
            )
            self.drops["ipv4-too-big"] += 1
            return
        local = dst in self._local
        broadcast = dst == _LIMITED_BROADCAST or dst == self.broadcast
        if dst[0] >= 224 and not broadcast:
            self.drops["ipv4-multicast"] += 1
            return
        if not local and not broadcast and header.ttl <= 1:
            self.send_icmp_error(icmpv4.TIME_EXCEEDED, 0, packet, now)
            self.drops["ipv4-ttl-exceeded"] += 1
            return
        payload = packet[header.header_len :]
        if header.more_fragments or header.fragment_offset:  # header.is_fragment
            whole = self.reassembler.add(
                (src, dst, header.protocol, header.ident),
                packet[: header.header_len],
                header.fragment_offset,
                header.more_fragments,
                payload,
                now,
            )
            if whole is None:
                return
            packet = memoryview(whole)
            header = ipv4.parse(packet)  # the first fragment's header, made whole
            payload = packet[header.header_len :]
            self.counters["reassembled"] += 1
        proto = header.protocol
        if proto == ipv4.PROTO_UDP:
            self._receive_udp(header, packet, payload, src_mac, broadcast, now)
        elif proto == ipv4.PROTO_TCP:
            if broadcast:
                self.drops["tcp-broadcast"] += 1
            else:
                self.tcp.receive_segment(header, packet, payload, now)
        elif proto == ipv4.PROTO_ICMP:
            self._receive_icmp(header, packet, payload, local, broadcast, now)
        else:
            # RFC 1122 3.2.2.1: protocol unreachable for what we cannot carry.
            self.drops["ipv4-protocol-unsupported"] += 1
            if not broadcast:
                src = dst if local else None
                self.send_icmp_error(icmpv4.DEST_UNREACHABLE, 2, packet, now, src=src)

    def _receive_udp(self, header, packet, payload, src_mac, broadcast, now) -> None:
        sport, dport, length = udp.parse(
            payload, header.src, header.dst, not self.rx_checksum_trusted
        )
        self.counters["udp-in"] += 1
        self.events.append(
            UdpDatagramReceived(
                header.src,
                sport,
                header.dst,
                dport,
                bytes(payload[8:length]),
                src_mac,
                bytes(packet[: header.header_len + 8]),
            )
        )

    def _receive_icmp(self, header, packet, payload, local, broadcast, now) -> None:
        icmp_type, code, word1, word2 = icmpv4.parse(payload)
        if icmp_type != icmpv4.ECHO_REQUEST:
            self.drops["icmp-type-ignored"] += 1
            return
        if broadcast:
            self.drops["icmp-echo-broadcast"] += 1  # RFC 1122 3.2.2.6 allows silence
            return
        body = payload[icmpv4.HEADER_LEN :]
        if local:
            self.counters["icmp-echo-answered"] += 1
            self.send_ip(
                header.dst,
                header.src,
                ipv4.PROTO_ICMP,
                icmpv4.emit(icmpv4.ECHO_REPLY, 0, word1, word2, body),
                now,
            )
            return
        self.events.append(
            IcmpEchoRequested(
                header.src,
                header.dst,
                word1,
                word2,
                bytes(body),
                header.ttl,
                bytes(packet[: header.header_len + 8]),
            )
        )

    # ------------------------------------------------------------ egress
    def send_packet(
        self, dst: bytes, packet: bytes, now: float, dst_mac: bytes | None = None
    ) -> None:
        if dst_mac is None:
            if dst == _LIMITED_BROADCAST or dst == self.config.broadcast:
                dst_mac = ethernet.BROADCAST
            else:
                dst_mac = self.arp_cache.get(dst)
        if dst_mac is not None:
            self.out.append(
                ethernet.header(dst_mac, self.gateway_mac, ethernet.ETHERTYPE_IPV4) + packet
            )
            return
        pending = self.arp_pending.get(dst)
        if pending is None:
            if len(self.arp_pending) >= self.config.arp_pending_addresses:
                self.drops["arp-pending-full"] += 1
                return
            pending = self.arp_pending[dst] = _PendingArp(now + self.config.arp_retry_interval)
            self._send_arp_request(dst)
        size = len(packet)
        if (
            len(pending.packets) >= self.config.arp_queue_per_address
            or pending.size + size > self.config.arp_queue_bytes_per_address
        ):
            self.drops["arp-queue-full"] += 1
            return
        if not self.budget.charge(size):
            self.drops["arp-memory-budget"] += 1
            return
        pending.packets.append(packet)
        pending.size += size

    def _send_arp_request(self, addr: bytes) -> None:
        request = arp.emit(arp.REQUEST, self.gateway_mac, self.config.gateway, bytes(6), addr)
        self.out.append(
            ethernet.header(ethernet.BROADCAST, self.gateway_mac, ethernet.ETHERTYPE_ARP) + request
        )

    def learn_neighbor(self, addr: bytes, mac: bytes) -> None:
        """Teach the stack a guest address (the DHCP server does on ACK)."""
        if len(addr) == 16:
            if self.ipv6 is not None:
                self.ipv6.learn_neighbor(addr, mac)
            return
        self._learn(addr, mac, 0.0)

    @property
    def guest_address6(self) -> bytes | None:
        """The guest's IPv6 address in the prefix, once learned."""
        return self.ipv6.guest_address if self.ipv6 is not None else None


def checksum_ok(data) -> bool:  # re-exported for tools
    return checksum.is_valid(data)
