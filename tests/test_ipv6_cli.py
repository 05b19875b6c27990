"""The IPv6 parts of the command line, the configuration and the API, in process."""

import ipaddress
import json

import pytest
from scapy.layers.dhcp6 import DHCP6_Reply

from forwarder import options
from forwarder.api import Api
from forwarder.serve import banner
from pyslirp.config import NetworkConfig, read_resolv_conf, read_resolv_conf_search
from pyslirp.nat.dhcpv6 import Dhcpv6Server


def parse(*argv: str, tmp_path) -> options.Options:
    ns_file = tmp_path / "net"
    ns_file.touch()
    text, opts = options.parse([*argv, "--dns-upstream", "127.0.0.1:9", str(ns_file)])
    assert text is None
    return opts


def test_defaults_with_enable_ipv6(tmp_path):
    opts = parse("-6", tmp_path=tmp_path)
    config = opts.config
    assert config.enable_ipv6
    assert str(config.ipv6_prefix) == "fd00::/64"
    assert (str(config.ipv6_gateway), str(config.ipv6_dns)) == ("fd00::2", "fd00::3")
    stack = config.stack_config()
    assert stack.ipv6 and stack.ipv6_link_local == ipaddress.IPv6Address("fe80::2").packed
    assert stack.mac_for(stack.ipv6_gateway) == bytes.fromhex("525600000002")
    text = banner(opts)
    assert "* IPv6 prefix:     fd00::/64" in text
    assert "* IPv6 gateway:    fd00::2 (also fe80::2)" in text
    assert "[::1]:* on the host is accessible as [fd00::2]" in text


def test_ipv6_off_by_default(tmp_path):
    config = parse(tmp_path=tmp_path).config
    assert not config.enable_ipv6 and not config.stack_config().ipv6


def test_random_prefix_is_a_unique_local_64():
    first, second = options.parse_ipv6_prefix("random"), options.parse_ipv6_prefix("random")
    for text in (first, second):
        prefix = ipaddress.IPv6Network(text)
        assert prefix.prefixlen == 64
        assert prefix.network_address.packed[0] == 0xFD  # RFC 4193: fd00::/8, L = 1
        assert prefix.network_address.packed[6:8] == b"\0\0"  # subnet 0
    assert first != second  # 40 random bits


@pytest.mark.parametrize(
    ("text", "expected"),
    [("fd12:3456:789a:1::", "fd12:3456:789a:1::/64"), ("2001:db8:5::/64", "2001:db8:5::/64")],
)
def test_prefix_forms(text, expected):
    assert str(options.parse_ipv6_prefix(text)) == expected


@pytest.mark.parametrize("text", ["fd00::/48", "fe80::/64", "ff02::/64", "::/64", "nonsense"])
def test_bad_prefixes_refused(text):
    with pytest.raises(options.UsageError):
        options.parse_ipv6_prefix(text)


def test_publish_ipv6_goes_to_the_learned_guest_address(tmp_path):
    opts = parse("-6", "-p", "[::1]:8080:80", "-p", "[::]:5353:53/udp", tmp_path=tmp_path)
    assert opts.publish == [("tcp", "::1", 8080, "::", 80), ("udp", "::", 5353, "::", 53)]
    assert "tcp [::1]:8080 -> the guest's IPv6 address:80" in banner(opts)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("::1", ("::1", 53)), ("[::1]:5353", ("::1", 5353)), ("10.0.0.1:54", ("10.0.0.1", 54))],
)
def test_dns_upstreams_of_either_family(text, expected):
    assert options.parse_upstream(text) == expected


def test_resolv_conf_nameservers_and_search(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "nameserver 127.0.0.53\nnameserver ::1\nnameserver fe80::1%eth0\n"
        "search example.test corp.test bad_label!\n"
    )
    assert read_resolv_conf(str(conf)) == [("127.0.0.53", 53)]
    assert read_resolv_conf(str(conf), ipv6=True) == [
        ("127.0.0.53", 53),
        ("::1", 53),
        ("fe80::1%eth0", 53),
    ]
    assert read_resolv_conf_search(str(conf)) == ["example.test", "corp.test"]


def test_mtu_below_1280_refused_with_ipv6_only():
    NetworkConfig(mtu=1000)
    with pytest.raises(ValueError, match="1280"):
        NetworkConfig(mtu=1000, enable_ipv6=True)


class FakeBackend:
    name = "fake"

    def __init__(self) -> None:
        self.added = []

    def add_hostfwd(self, *args) -> int:
        self.added.append(args)
        return len(self.added)


@pytest.mark.parametrize(
    ("arguments", "reply"),
    [
        ({"proto": "tcp", "host_addr": "::1", "host_port": 8080, "guest_port": 80}, 1),
        (
            {
                "proto": "udp",
                "host_addr": "::",
                "host_port": 53,
                "guest_addr": "fd00::1234",
                "guest_port": 53,
            },
            1,
        ),
        (
            {
                "proto": "tcp",
                "host_addr": "::1",
                "host_port": 1,
                "guest_addr": "fd00::2",
                "guest_port": 1,
            },
            "guest_addr",
        ),
        (
            {
                "proto": "tcp",
                "host_addr": "::1",
                "host_port": 1,
                "guest_addr": "10.0.2.100",
                "guest_port": 1,
            },
            "guest_addr",
        ),
    ],
)
def test_api_add_hostfwd_with_an_ipv6_host_address(arguments, reply):
    backend = FakeBackend()
    api = Api(backend, NetworkConfig(enable_ipv6=True))
    answer = json.loads(
        api.handle(json.dumps({"execute": "add_hostfwd", "arguments": arguments}).encode())
    )
    if reply == 1:
        assert answer == {"return": {"id": 1}}
        guest = arguments.get("guest_addr", "::")
        assert backend.added == [
            (
                arguments["proto"],
                arguments["host_addr"],
                arguments["host_port"],
                guest,
                arguments["guest_port"],
            )
        ]
    else:
        assert answer == {"error": {"desc": f"bad request: add_hostfwd: bad arguments.{reply}"}}


def test_api_ipv6_host_address_refused_without_ipv6():
    api = Api(FakeBackend(), NetworkConfig())
    request = {
        "execute": "add_hostfwd",
        "arguments": {"proto": "tcp", "host_addr": "::1", "host_port": 1, "guest_port": 1},
    }
    answer = json.loads(api.handle(json.dumps(request).encode()))
    assert answer == {"error": {"desc": "bad request: add_hostfwd: bad arguments.host_addr"}}


def test_dhcpv6_information_request_and_what_is_ignored():
    server = Dhcpv6Server(NetworkConfig(enable_ipv6=True, dns_search=["example.test"]))
    client_id = b"\x00\x01\x02\x03"
    request = (
        bytes([11])
        + b"\x12\x34\x56"
        + (1).to_bytes(2, "big")
        + len(client_id).to_bytes(2, "big")
        + client_id
        + (6).to_bytes(2, "big")
        + (6).to_bytes(2, "big")
        + bytes([0, 23, 0, 24, 0, 32])
    )
    reply = server.handle(request)
    parsed = DHCP6_Reply(reply)
    assert parsed.trid == 0x123456
    assert parsed["DHCP6OptServerId"].duid.lladdr == "52:56:00:00:00:02"
    assert bytes(parsed["DHCP6OptClientId"].duid) == client_id
    assert parsed["DHCP6OptDNSServers"].dnsservers == ["fd00::3"]
    assert parsed["DHCP6OptDNSDomains"].dnsdomains == ["example.test."]
    assert parsed["DHCP6OptInfoRefreshTime"].reftime == 86400
    # Stateful requests, requests with an IA, requests for another server: silence.
    solicit = bytes([1]) + b"\x00\x00\x01"
    with_ia = (
        bytes([11]) + b"\x00\x00\x02" + (3).to_bytes(2, "big") + (12).to_bytes(2, "big") + bytes(12)
    )
    other = (
        bytes([11]) + b"\x00\x00\x03" + (2).to_bytes(2, "big") + (4).to_bytes(2, "big") + b"abcd"
    )
    truncated = bytes([11, 0])
    for message in (solicit, with_ia, other, truncated):
        assert server.handle(message) is None
    assert server.drops["dhcpv6-information-request-with-ia"] == 1
    assert server.drops["dhcpv6-other-server"] == 1


def test_slaac_watch_gives_up_by_a_timer_in_the_loop_without_a_thread():
    """The time limit is an fd that the loop serves: no thread is started
    (a sandbox set up later must be able to setns(CLONE_NEWUSER))."""
    import select
    import socket
    import threading
    import time

    from forwarder.slaac import SlaacWatch

    class Loop:
        def __init__(self):
            self.handlers = {}

        def register(self, fd, events, handler):
            self.handlers[fd] = handler

        def unregister(self, fd):
            del self.handlers[fd]

    silent, other = socket.socketpair()  # a netlink socket that never answers
    loop, results = Loop(), []
    threads = threading.active_count()
    watch = SlaacWatch(
        loop, silent.detach(), ipaddress.IPv6Network("fd00::/64"), bytes(16), results.append
    )
    watch.start(timeout=0.3)
    assert threading.active_count() == threads
    started = time.monotonic()
    while not results and time.monotonic() - started < 10:
        ready, _, _ = select.select(list(loop.handlers), [], [], 1.0)
        for fd in ready:
            if fd in loop.handlers:
                loop.handlers[fd](1, time.monotonic())
    assert results == [False]
    assert time.monotonic() - started >= 0.25
    assert loop.handlers == {}  # both descriptors handed back
    other.close()
