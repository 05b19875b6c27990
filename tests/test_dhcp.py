"""DHCP server: exact replies to client messages built with scapy (RFC 2131)."""

import random

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from pyslirp.config import NetworkConfig
from pyslirp.nat.dhcp import DhcpLeaseGranted, DhcpServer
from tests.inprocess import InProcessNetwork

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
MAC_C = bytes.fromhex("020000000003")
BROADCAST_IP = bytes([255] * 4)
BROADCAST_MAC = b"\xff" * 6
SERVER = "10.0.2.2"


def ip(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


def client(mac, kind, xid=0x1234, flags=0, ciaddr="0.0.0.0", giaddr="0.0.0.0", options=()):
    """A client message, built by scapy independently of our parser."""
    return bytes(
        BOOTP(op=1, xid=xid, flags=flags, ciaddr=ciaddr, giaddr=giaddr, chaddr=mac)
        / DHCP(options=[("message-type", kind), *options, "end"])
    )


def decode(reply):
    payload, dst_ip, dst_mac = reply
    msg = BOOTP(payload)
    options = {}
    for opt in msg[DHCP].options:
        if isinstance(opt, tuple):
            options[opt[0]] = opt[1] if len(opt) == 2 else opt[1:]
    return msg, options, dst_ip, dst_mac


def server(**kw):
    return DhcpServer(NetworkConfig(random=random.Random(1), **kw))


def lease(srv, mac, now=0.0, xid=1):
    """DISCOVER, then REQUEST what was offered; return the ACKed address."""
    (offer,) = srv.handle(client(mac, "discover", xid=xid), mac, now)
    yiaddr = BOOTP(offer[0]).yiaddr
    (ack,) = srv.handle(
        client(
            mac,
            "request",
            xid=xid,
            options=[("server_id", SERVER), ("requested_addr", yiaddr)],
        ),
        mac,
        now,
    )
    msg, options, _, _ = decode(ack)
    assert options["message-type"] == 5
    return msg.yiaddr


# ------------------------------------------------------------------ DISCOVER
def test_discover_gets_offer_with_every_option():
    srv = server()
    replies = srv.handle(client(MAC_A, "discover", xid=0xDEADBEEF), MAC_A, 0.0)
    assert len(replies) == 1
    msg, options, dst_ip, dst_mac = decode(replies[0])
    assert (msg.op, msg.htype, msg.hlen, msg.hops) == (2, 1, 6, 0)
    assert msg.xid == 0xDEADBEEF
    assert msg.flags == 0
    assert msg.ciaddr == "0.0.0.0"
    assert msg.yiaddr == "10.0.2.15"
    assert msg.siaddr == "0.0.0.0"
    assert msg.giaddr == "0.0.0.0"
    assert msg.chaddr[:6] == MAC_A
    assert options == {
        "message-type": 2,
        "server_id": "10.0.2.2",
        "lease_time": 86400,
        "renewal_time": 43200,
        "rebinding_time": 75600,
        "subnet_mask": "255.255.255.0",
        "router": "10.0.2.2",
        "name_server": "10.0.2.3",
        "interface-mtu": 1500,
    }
    assert len(replies[0][0]) >= 300  # RFC 1542: a BOOTP message is 300 bytes or more
    # No broadcast flag, no ciaddr: unicast to yiaddr at chaddr (RFC 2131 4.1).
    assert (dst_ip, dst_mac) == (ip("10.0.2.15"), MAC_A)


def test_offer_carries_configured_mtu_and_network():
    import ipaddress

    srv = server(mtu=65520, cidr=ipaddress.IPv4Network("192.168.7.0/24"))
    msg, options, _, _ = decode(srv.handle(client(MAC_A, "discover"), MAC_A, 0.0)[0])
    assert msg.yiaddr == "192.168.7.15"
    assert options["interface-mtu"] == 65520
    assert options["router"] == options["server_id"] == "192.168.7.2"
    assert options["name_server"] == "192.168.7.3"


def test_offer_is_broadcast_when_the_client_asks():
    srv = server()
    msg, _, dst_ip, dst_mac = decode(
        srv.handle(client(MAC_A, "discover", flags=0x8000), MAC_A, 0.0)[0]
    )
    assert msg.flags == 0x8000
    assert (dst_ip, dst_mac) == (BROADCAST_IP, BROADCAST_MAC)


def test_client_identifier_is_echoed():
    srv = server()
    cid = b"\x01" + MAC_A
    _, options, _, _ = decode(
        srv.handle(client(MAC_A, "discover", options=[("client_id", cid)]), MAC_A, 0.0)[0]
    )
    assert options["client_id"] == cid


def _option_instances(payload: bytes) -> list:
    """(code, value) for every option instance of a reply, in order, read by
    hand (no joining), so that the parts of a split option are visible."""
    out, i = [], 240
    while payload[i] != 255:
        if payload[i] == 0:
            i += 1
            continue
        out.append((payload[i], payload[i + 2 : i + 2 + payload[i + 1]]))
        i += 2 + payload[i + 1]
    return out


def _with_long_client_id(mac, kind: int, cid: bytes, more: bytes = b"") -> bytes:
    """A client message whose client identifier is sent as consecutive
    parts of at most 255 bytes (RFC 3396), built by hand."""
    head = bytes(BOOTP(op=1, xid=7, chaddr=mac))[:236] + b"\x63\x82\x53\x63"
    parts = [bytes((61, len(cid[i : i + 255]))) + cid[i : i + 255] for i in range(0, len(cid), 255)]
    return head + bytes((53, 1, kind)) + more + b"".join(parts) + b"\xff"


@pytest.mark.parametrize("length", [255, 256, 600])
def test_a_long_client_identifier_is_echoed_in_rfc_3396_parts(length):
    cid = bytes([1]) + bytes(random.Random(length).randrange(256) for _ in range(length - 1))
    srv = server()
    discover = _with_long_client_id(MAC_A, 1, cid)
    # A request for an address outside the pool gets a NAK, which echoes it too.
    request = _with_long_client_id(MAC_B, 3, cid, bytes((50, 4)) + ip("10.0.2.200"))
    for message, mac, kind in ((discover, MAC_A, 2), (request, MAC_B, 6)):
        (reply,) = srv.handle(message, mac, 0.0)
        assert decode(reply)[1]["message-type"] == kind
        instances = _option_instances(reply[0])
        parts = [value for code, value in instances if code == 61]
        expected = [255] * (length // 255) + ([length % 255] if length % 255 else [])
        assert [len(p) for p in parts] == expected
        assert b"".join(parts) == cid
        # The parts are consecutive: nothing else between them.
        codes = [code for code, _ in instances]
        first = codes.index(61)
        assert codes[first : first + len(parts)] == [61] * len(parts)
        assert 61 not in codes[first + len(parts) :]
    assert srv.drops["dhcp-internal-error"] == 0


def test_discover_honours_a_free_requested_address():
    srv = server()
    msg, _, _, _ = decode(
        srv.handle(
            client(MAC_A, "discover", options=[("requested_addr", "10.0.2.20")]), MAC_A, 0.0
        )[0]
    )
    assert msg.yiaddr == "10.0.2.20"


# ------------------------------------------------------------------- REQUEST
def test_request_in_selecting_state_gets_ack_and_reports_the_lease():
    srv = server()
    srv.handle(client(MAC_A, "discover", xid=7), MAC_A, 0.0)
    (ack,) = srv.handle(
        client(
            MAC_A,
            "request",
            xid=7,
            flags=0x8000,
            options=[("server_id", SERVER), ("requested_addr", "10.0.2.15")],
        ),
        MAC_A,
        1.0,
    )
    msg, options, dst_ip, dst_mac = decode(ack)
    assert msg.yiaddr == "10.0.2.15" and msg.xid == 7
    assert options["message-type"] == 5
    assert options["lease_time"] == 86400
    assert options["interface-mtu"] == 1500
    assert (dst_ip, dst_mac) == (BROADCAST_IP, BROADCAST_MAC)
    assert srv.next_event() == DhcpLeaseGranted(ip("10.0.2.15"), MAC_A, 86400)
    assert srv.next_event() is None
    assert srv.lease_for(MAC_A, 2.0) == ip("10.0.2.15")


def test_request_for_an_address_we_did_not_offer_gets_nak():
    srv = server()
    srv.handle(client(MAC_A, "discover"), MAC_A, 0.0)
    lease(srv, MAC_B)  # MAC_B holds .16
    (nak,) = srv.handle(
        client(MAC_A, "request", options=[("server_id", SERVER), ("requested_addr", "10.0.2.16")]),
        MAC_A,
        1.0,
    )
    msg, options, dst_ip, dst_mac = decode(nak)
    assert options["message-type"] == 6
    assert options["server_id"] == SERVER
    assert "lease_time" not in options and "router" not in options
    assert msg.yiaddr == "0.0.0.0" and msg.ciaddr == "0.0.0.0"
    assert (dst_ip, dst_mac) == (BROADCAST_IP, BROADCAST_MAC)  # RFC 2131 4.3.2
    assert srv.next_event() is not None  # MAC_B's lease
    assert srv.next_event() is None


def test_request_naming_another_server_is_ignored_and_frees_the_offer():
    srv = server(dhcp_pool_size=1)
    srv.handle(client(MAC_A, "discover"), MAC_A, 0.0)
    assert srv.handle(client(MAC_B, "discover"), MAC_B, 0.0) == []  # pool held by the offer
    replies = srv.handle(
        client(
            MAC_A, "request", options=[("server_id", "10.0.2.99"), ("requested_addr", "10.0.2.15")]
        ),
        MAC_A,
        1.0,
    )
    assert replies == []
    assert srv.drops["dhcp-other-server"] == 1
    assert srv.next_event() is None
    msg, _, _, _ = decode(srv.handle(client(MAC_B, "discover"), MAC_B, 2.0)[0])
    assert msg.yiaddr == "10.0.2.15"


def test_renewal_keeps_the_address_and_is_unicast_to_ciaddr():
    srv = server()
    assert lease(srv, MAC_A) == "10.0.2.15"
    srv.next_event()
    (ack,) = srv.handle(client(MAC_A, "request", xid=9, ciaddr="10.0.2.15"), MAC_A, 40000.0)
    msg, options, dst_ip, dst_mac = decode(ack)
    assert options["message-type"] == 5
    assert msg.yiaddr == "10.0.2.15" and msg.ciaddr == "10.0.2.15"
    assert (dst_ip, dst_mac) == (ip("10.0.2.15"), MAC_A)
    # The renewal extended the lease: still bound past the first lease's end.
    assert srv.lease_for(MAC_A, 86400.0 + 100) == ip("10.0.2.15")


def test_rebinding_after_the_lease_ended_keeps_the_address():
    srv = server()
    lease(srv, MAC_A)
    (ack,) = srv.handle(client(MAC_A, "request", flags=0x8000, ciaddr="10.0.2.15"), MAC_A, 90000.0)
    msg, options, dst_ip, _ = decode(ack)
    assert options["message-type"] == 5 and msg.yiaddr == "10.0.2.15"
    assert dst_ip == ip("10.0.2.15")  # ciaddr wins over the broadcast flag


def test_renewing_an_address_held_by_another_client_gets_nak():
    srv = server()
    lease(srv, MAC_A)
    (nak,) = srv.handle(client(MAC_B, "request", ciaddr="10.0.2.15"), MAC_B, 1.0)
    assert decode(nak)[1]["message-type"] == 6


def test_init_reboot_known_client_gets_its_address_back():
    srv = server()
    lease(srv, MAC_A)
    (ack,) = srv.handle(
        client(MAC_A, "request", options=[("requested_addr", "10.0.2.15")]), MAC_A, 100.0
    )
    msg, options, _, _ = decode(ack)
    assert options["message-type"] == 5 and msg.yiaddr == "10.0.2.15"


def test_init_reboot_after_a_server_restart_is_acked_for_a_free_pool_address():
    # We are the only server on the link (see the module docstring).
    srv = server()
    (ack,) = srv.handle(
        client(MAC_A, "request", options=[("requested_addr", "10.0.2.15")]), MAC_A, 0.0
    )
    assert decode(ack)[0].yiaddr == "10.0.2.15"


@pytest.mark.parametrize("address", ["10.0.2.100", "192.168.1.15", "10.0.2.31"])
def test_init_reboot_outside_the_pool_gets_nak(address):
    srv = server()
    (nak,) = srv.handle(client(MAC_A, "request", options=[("requested_addr", address)]), MAC_A, 0.0)
    assert decode(nak)[1]["message-type"] == 6


def test_malformed_requests_are_dropped():
    srv = server()
    # SELECTING without a requested address; INIT-REBOOT without one either.
    assert srv.handle(client(MAC_A, "request", options=[("server_id", SERVER)]), MAC_A, 0) == []
    assert srv.handle(client(MAC_A, "request"), MAC_A, 0) == []
    assert srv.drops["dhcp-bad-request"] == 2


# ---------------------------------------------------------------- the pool
def test_two_clients_get_consecutive_addresses_and_keep_them():
    srv = server()
    assert lease(srv, MAC_A) == "10.0.2.15"
    assert lease(srv, MAC_B) == "10.0.2.16"
    assert lease(srv, MAC_A, now=10.0) == "10.0.2.15"
    assert lease(srv, MAC_B, now=10.0) == "10.0.2.16"


def test_pool_exhaustion_means_no_offer():
    srv = server(dhcp_pool_size=2)
    lease(srv, MAC_A)
    lease(srv, MAC_B)
    assert srv.handle(client(MAC_C, "discover"), MAC_C, 1.0) == []
    assert srv.drops["dhcp-pool-exhausted"] == 1


def test_release_frees_the_address_for_another_client():
    srv = server(dhcp_pool_size=2)
    lease(srv, MAC_A)
    lease(srv, MAC_B)
    release = client(MAC_A, "release", ciaddr="10.0.2.15", options=[("server_id", SERVER)])
    assert srv.handle(release, MAC_A, 5.0) == []
    assert srv.lease_for(MAC_A, 5.0) is None
    assert lease(srv, MAC_C, now=6.0) == "10.0.2.15"


def test_released_client_comes_back_to_its_address():
    srv = server()
    lease(srv, MAC_A)
    lease(srv, MAC_B)
    release = client(MAC_A, "release", ciaddr="10.0.2.15", options=[("server_id", SERVER)])
    srv.handle(release, MAC_A, 5.0)
    lease(srv, MAC_C, now=6.0)  # takes a never-used address, not A's
    assert lease(srv, MAC_A, now=7.0) == "10.0.2.15"


def test_release_of_someone_elses_address_is_ignored():
    srv = server()
    lease(srv, MAC_A)
    release = client(MAC_B, "release", ciaddr="10.0.2.15", options=[("server_id", SERVER)])
    assert srv.handle(release, MAC_B, 1.0) == []
    assert srv.drops["dhcp-release-unknown"] == 1
    assert srv.lease_for(MAC_A, 1.0) == ip("10.0.2.15")


def test_offer_and_lease_expire():
    srv = server(dhcp_pool_size=1, dhcp_lease_time=100)
    srv.handle(client(MAC_A, "discover"), MAC_A, 0.0)
    assert srv.handle(client(MAC_B, "discover"), MAC_B, 59.0) == []
    assert lease(srv, MAC_B, now=60.0) == "10.0.2.15"  # dhcp_offer_timeout is 60 s
    assert srv.handle(client(MAC_A, "discover"), MAC_A, 159.0) == []
    assert lease(srv, MAC_A, now=160.0) == "10.0.2.15"


def test_decline_takes_the_address_out_of_the_pool():
    srv = server()
    lease(srv, MAC_A)
    decline = client(
        MAC_A, "decline", options=[("server_id", SERVER), ("requested_addr", "10.0.2.15")]
    )
    assert srv.handle(decline, MAC_A, 1.0) == []
    assert lease(srv, MAC_A, now=2.0) == "10.0.2.16"
    assert lease(srv, MAC_B, now=3.0) == "10.0.2.17"


# ------------------------------------------------------------------- INFORM
def test_inform_gets_configuration_without_a_lease():
    srv = server()
    (ack,) = srv.handle(client(MAC_A, "inform", ciaddr="10.0.2.100"), MAC_A, 0.0)
    msg, options, dst_ip, dst_mac = decode(ack)
    assert options == {
        "message-type": 5,
        "server_id": "10.0.2.2",
        "subnet_mask": "255.255.255.0",
        "router": "10.0.2.2",
        "name_server": "10.0.2.3",
        "interface-mtu": 1500,
    }
    assert msg.yiaddr == "0.0.0.0" and msg.ciaddr == "10.0.2.100"
    assert (dst_ip, dst_mac) == (ip("10.0.2.100"), MAC_A)
    assert srv.next_event() is None


def test_inform_without_ciaddr_is_dropped():
    srv = server()
    assert srv.handle(client(MAC_A, "inform"), MAC_A, 0.0) == []
    assert srv.drops["dhcp-inform-bad-ciaddr"] == 1


# ---------------------------------------------------------------- malformed
def _raw(**fields):
    return bytes(BOOTP(**fields) / DHCP(options=[("message-type", "discover"), "end"]))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_raw(op=2, chaddr=MAC_A), "dhcp-not-request"),
        (_raw(chaddr=MAC_A, hlen=16), "dhcp-bad-hardware-address"),
        (_raw(chaddr=MAC_A, htype=6), "dhcp-bad-hardware-address"),
        (_raw(chaddr=MAC_A)[:236] + b"\x63\x82\x53\x64\x35\x01\x01\xff", "dhcp-bad-cookie"),
        (_raw(chaddr=MAC_A)[:239], "dhcp-truncated"),
        (b"", "dhcp-truncated"),
        (_raw(chaddr=MAC_A)[:240] + b"\x35\x05\x01", "dhcp-bad-option"),
        (_raw(chaddr=MAC_A)[:240] + b"\x35", "dhcp-bad-option"),
        (_raw(chaddr=MAC_A)[:240] + b"\xff", "dhcp-no-message-type"),
        (_raw(chaddr=MAC_A)[:243], "dhcp-no-end-option"),
        (client(MAC_A, "offer"), "dhcp-bad-message-type"),
        (client(MAC_A, "discover", giaddr="10.9.9.9"), "dhcp-relayed"),
    ],
)
def test_malformed_messages_are_counted_and_dropped(payload, reason):
    srv = server()
    assert srv.handle(payload, MAC_A, 0.0) == []
    assert srv.drops == {reason: 1}


def test_every_truncation_of_a_discover_is_dropped_without_raising():
    srv = server()
    whole = client(MAC_A, "discover", options=[("param_req_list", [1, 3, 6, 26])])
    body_end = whole.index(b"\xff", 240)
    for cut in range(body_end + 1):
        assert srv.handle(whole[:cut], MAC_A, 0.0) == [], cut
    assert sum(srv.drops.values()) == body_end + 1
    assert "dhcp-internal-error" not in srv.drops


def test_garbage_never_escapes():
    rng = random.Random(7)
    srv = server()
    valid = client(MAC_A, "request", options=[("requested_addr", "10.0.2.15")])
    for _ in range(3000):
        data = bytearray(valid)
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        srv.handle(bytes(data[: rng.randrange(len(data) + 1)]), MAC_A, 0.0)
    assert "dhcp-internal-error" not in srv.drops
    assert len(srv.leases) <= srv.config.dhcp_pool_size


def test_options_continued_in_the_file_field_are_read():
    # RFC 2132 9.3: option overload 1 puts more options in 'file'.
    file_field = b"\x35\x01\x01\xff".ljust(128, b"\0")
    head = bytes(BOOTP(chaddr=MAC_A, file=file_field))[:236]
    payload = head + b"\x63\x82\x53\x63" + b"\x34\x01\x01\xff"
    (offer,) = server().handle(payload, MAC_A, 0.0)
    assert decode(offer)[1]["message-type"] == 2


# --------------------------------------------------- through the real loop
GW_MAC = "52:55:0a:00:02:02"


def _guest_dhcp(kind, options=()):
    return bytes(
        Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff")
        / IP(src="0.0.0.0", dst="255.255.255.255")
        / UDP(sport=68, dport=67)
        / BOOTP(chaddr=MAC_A, xid=42)
        / DHCP(options=[("message-type", kind), *options, "end"])
    )


def _is_dhcp(frame):
    return BOOTP in Ether(frame)


def test_lease_through_the_loop_and_the_stack_learns_the_guest():
    with InProcessNetwork() as net:
        net.send(_guest_dhcp("discover"))
        offer = Ether(net.receive(predicate=_is_dhcp))
        assert (offer.src, offer.dst) == (GW_MAC, "02:00:00:00:00:01")
        assert (offer[IP].src, offer[IP].dst) == ("10.0.2.2", "10.0.2.15")
        assert (offer[UDP].sport, offer[UDP].dport) == (67, 68)
        assert offer[BOOTP].yiaddr == "10.0.2.15"
        assert net.loop.stack.guest_mac is None  # nothing taught it yet
        net.send(_guest_dhcp("request", [("server_id", SERVER), ("requested_addr", "10.0.2.15")]))
        ack = Ether(net.receive(predicate=_is_dhcp))
        assert dict(o for o in ack[DHCP].options if isinstance(o, tuple))["message-type"] == 5
        assert net.loop.stack.guest_mac == MAC_A


# ------------------------------------------------- end to end: real clients
# The clients' own scripts would rewrite /etc/resolv.conf; ours only record
# what they were given and configure the interface, inside the namespace.
DHCLIENT_SCRIPT = """#!/bin/sh
env | grep -E '^(reason|interface|new_[a-z0-9_]*)=' | sort >> {out}
echo ---- >> {out}
case "$reason" in
PREINIT) ip link set dev "$interface" up ;;
BOUND|RENEW|REBIND|REBOOT)
    ip addr replace "$new_ip_address/$new_subnet_mask" dev "$interface"
    [ -n "$new_interface_mtu" ] && ip link set dev "$interface" mtu "$new_interface_mtu"
    for router in $new_routers; do ip route replace default via "$router" dev "$interface"; done
    ;;
esac
exit 0
"""

UDHCPC_SCRIPT = """#!/bin/sh
env | grep -E '^(ip|subnet|router|dns|mtu|interface|serverid|lease)=' | sort >> {out}
echo "event=$1" >> {out}
echo ---- >> {out}
case "$1" in
deconfig) ip link set dev "$interface" up ;;
bound|renew)
    ip addr replace "$ip/$subnet" dev "$interface"
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    for r in $router; do ip route replace default via "$r" dev "$interface"; done
    ;;
esac
exit 0
"""


def _script(tmp_path, text):
    out = tmp_path / "env.txt"
    script = tmp_path / "script.sh"
    script.write_text(text.format(out=out))
    script.chmod(0o755)
    return script, out


def _last_record(out) -> dict:
    records = [r for r in out.read_text().split("----\n") if r.strip()]
    return dict(line.split("=", 1) for line in records[-1].splitlines())


def _check_guest_configured(fwd):
    addr = fwd.run(["ip", "-4", "-o", "addr", "show", "dev", "tap0"]).stdout
    assert "inet 10.0.2.15/24" in addr, addr
    route = fwd.run(["ip", "-4", "route", "show", "default"]).stdout
    assert route.startswith("default via 10.0.2.2 dev tap0"), route
    link = fwd.run(["ip", "-o", "link", "show", "dev", "tap0"]).stdout
    assert " mtu 1500 " in link, link


@pytest.mark.e2e
def test_dhclient_gets_a_lease_and_keeps_it_across_a_restart(tmp_path):
    from tests import harness

    script, out = _script(tmp_path, DHCLIENT_SCRIPT)
    lease_file, pid_file = tmp_path / "lease", tmp_path / "pid"
    base = ["dhclient", "-v", "-lf", str(lease_file), "-pf", str(pid_file), "-sf", str(script)]
    with harness.forwarder(configure=False) as fwd:
        try:
            first = fwd.run([*base, "-1", "tap0"], timeout=30)
            assert first.returncode == 0, first.stderr
            assert "DHCPACK of 10.0.2.15 from 10.0.2.2" in first.stderr
            got = _last_record(out)
            assert got["reason"] == "BOUND"
            assert got["new_ip_address"] == "10.0.2.15"
            assert got["new_subnet_mask"] == "255.255.255.0"
            assert got["new_routers"] == "10.0.2.2"
            assert got["new_domain_name_servers"] == "10.0.2.3"
            assert got["new_interface_mtu"] == "1500"
            assert got["new_dhcp_server_identifier"] == "10.0.2.2"
            assert got["new_dhcp_lease_time"] == "86400"
            _check_guest_configured(fwd)
            # Stop the client (it daemonised) and start it again: it asks for
            # its old address straight away (INIT-REBOOT) and gets it.
            fwd.run([*base, "-x", "tap0"], timeout=30, check=True)
            again = fwd.run([*base, "-1", "tap0"], timeout=30)
            assert again.returncode == 0, again.stderr
            assert "DHCPDISCOVER" not in again.stderr
            assert "DHCPREQUEST for 10.0.2.15" in again.stderr
            assert "DHCPACK of 10.0.2.15" in again.stderr
            assert _last_record(out)["reason"] == "REBOOT"
        finally:
            fwd.run([*base, "-x", "tap0"], timeout=30)
            _kill_from_pid_file(pid_file)


def _kill_from_pid_file(pid_file) -> None:
    import os
    import signal

    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"dhclient" not in f.read():
                return
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


@pytest.mark.e2e
def test_udhcpc_gets_a_lease(tmp_path):
    from tests import harness

    script, out = _script(tmp_path, UDHCPC_SCRIPT)
    with harness.forwarder(configure=False) as fwd:
        # -q: quit once bound, so nothing is left running.
        result = fwd.run(
            ["udhcpc", "-i", "tap0", "-f", "-q", "-n", "-t", "5", "-T", "1", "-s", str(script)],
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        got = _last_record(out)
        assert got["event"] == "bound"
        assert got["ip"] == "10.0.2.15"
        assert got["subnet"] == "255.255.255.0"
        assert got["router"] == "10.0.2.2"
        assert got["dns"].split() == ["10.0.2.3"]
        assert got["serverid"] == "10.0.2.2"
        assert got["lease"] == "86400"
        _check_guest_configured(fwd)


@pytest.mark.e2e
def test_dhclient_with_a_300_byte_client_identifier_gets_it_echoed(tmp_path):
    """ISC dhclient sends a long client identifier in RFC 3396 parts; the
    OFFER and ACK (seen in the forwarder's --pcap) carry it back intact."""
    from scapy.utils import rdpcap

    from tests import harness

    cid = bytes([0xFF]) + bytes(range(1, 256)) + bytes(range(44))
    assert len(cid) == 300
    conf = tmp_path / "dhclient.conf"
    text = ":".join(f"{b:02x}" for b in cid)
    conf.write_text(f"send dhcp-client-identifier {text};\ntimeout 20;\n")  # then it gives up
    script, _ = _script(tmp_path, DHCLIENT_SCRIPT)
    lease_file, pid_file, pcap = tmp_path / "lease", tmp_path / "pid", tmp_path / "frames.pcap"
    base = ["dhclient", "-v", "-cf", str(conf), "-lf", str(lease_file), "-pf", str(pid_file)]
    base += ["-sf", str(script)]
    with harness.forwarder("--pcap", str(pcap), configure=False) as fwd:
        try:
            result = fwd.run([*base, "-1", "tap0"], timeout=40)
            assert result.returncode == 0, result.stderr
            assert "DHCPOFFER of 10.0.2.15 from 10.0.2.2" in result.stderr
            assert "DHCPACK of 10.0.2.15 from 10.0.2.2" in result.stderr
        finally:
            fwd.run([*base, "-x", "tap0"], timeout=30)
            _kill_from_pid_file(pid_file)
        assert "DHCP internal error" not in fwd.log()
    replies = {}
    for frame in rdpcap(str(pcap)):
        # (not a reply quoted in an ICMP error: the last ACK may find dhclient gone)
        if BOOTP in frame and frame[BOOTP].op == 2 and frame[IP].proto == 17:
            payload = bytes(frame[BOOTP])
            instances = _option_instances(payload)
            kind = dict(instances)[53][0]
            replies[kind] = b"".join(value for code, value in instances if code == 61)
    assert replies.get(2) == cid  # the OFFER
    assert replies.get(5) == cid  # the ACK
