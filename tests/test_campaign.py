"""The hostile-frame campaign (bench/campaign.py), short: CI's run.

The million-frame run is ``python3 bench/campaign.py``; this one feeds
60,000 frames of the same mix and holds it to the same rules: no internal
error, live TCP connections among the garbage carried data, and when every
timer has run out the stack holds nothing.
"""

from bench.campaign import run_campaign


def test_short_campaign_no_internal_error_and_nothing_held_at_the_end():
    result = run_campaign(60_000, seed=3)
    assert result["internal_errors"] == 0, result["last_internal_error"]
    # Both families and every kind of frame went in, and reached deep.
    assert min(result["kinds"].values()) > 200
    counters = result["counters"]
    assert counters["tcp-connect-requests"] > 100
    assert result["tcp_bytes_delivered"] > 100_000
    assert counters["reassembled"] > 0 and counters["udp-in"] > 0
    assert counters["icmp-echo-answered"] > 0 and counters["gso-frames-in"] > 0
    assert any(reason.startswith("ipv6-") for reason in result["drops"])
    assert any(reason.startswith("tcp-") for reason in result["drops"])
    # The memory budget was used, and everything charged was released.
    assert result["peak_held_bytes"] > 0
    assert result["held_bytes"] == 0 and sum(result["held_by"].values()) == 0
    assert result["connections_left"] == 0
    assert result["reassembly_datagrams"] == 0 and result["arp_pending"] == 0
