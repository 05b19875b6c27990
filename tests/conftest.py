import socket

import pytest


def _resolv_conf_is_ours() -> bool:
    try:
        with open("/etc/resolv.conf") as f:
            servers = [line.split()[1] for line in f if line.startswith("nameserver")]
    except OSError:
        return True
    return all(s.startswith("127.") for s in servers)


def pytest_collection_modifyitems(config, items):
    # The forwarder proxies whatever the guest asks, and some tools resolve
    # names behind our back: end-to-end tests run only inside .ci/sandbox,
    # where /etc/resolv.conf names 127.0.0.1 and never the host's resolver.
    if any("e2e" in item.keywords for item in items) and not _resolv_conf_is_ours():
        pytest.exit(
            "end-to-end tests must run inside .ci/sandbox "
            "(/etc/resolv.conf names a resolver that is not ours)",
            returncode=3,
        )


@pytest.fixture
def echo_server():
    """A UDP socket on 127.0.0.1 for the tests to answer from (2 s timeout)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    yield sock
    sock.close()
