"""The soak (bench/soak.py) for 60 s: mixed traffic through a real
forwarder, sampled every 5 s; descriptors and memory must not keep growing
and the guest's traffic must succeed. The one-hour run is
``python3 bench/soak.py --minutes 60``."""

import pytest

from bench.soak import run_soak

pytestmark = pytest.mark.e2e


def test_sixty_seconds_of_mixed_traffic_leave_descriptors_and_memory_flat():
    result = run_soak(60.0, interval=5.0, warmup=20.0)
    print(result["verdict"], result["traffic"])
    traffic = result["traffic"]
    assert not result["failures"], result["failures"]
    for kind in ("http", "dns", "udp-echo", "connect-burst", "icmp"):
        assert traffic[kind][0] > 0, kind
    assert traffic["stream-bytes"][0] > 1 << 20
    verdict = result["verdict"]
    assert verdict["samples_after_warmup"] >= 6
    assert not verdict["fds_growing"], result["samples"]
    assert not verdict["rss_growing"], result["samples"]
    # Every sample saw the flows the traffic keeps open, and nothing held
    # for the guest piled up.
    assert max(s["tcp"] for s in result["samples"]) >= 1
    assert result["samples"][-1]["held"] < 1 << 20
