"""Ten thousand concurrent TCP connections from one guest to the host, each
passing data (bench/connections.py): all open at once through a real
forwarder, its memory within 150 MiB, and its descriptors back to the
baseline within a minute of the close. Run once in CI (not under every
interpreter): it takes about a minute."""

import pytest

from bench.connections import CLOSE_WAIT_LIMIT, run

pytestmark = pytest.mark.e2e

COUNT = 10_000
PEAK_RSS_LIMIT = 150 << 20  # issue 18: 10,000 connections under 150 MB


def test_ten_thousand_connections_pass_data_and_give_their_descriptors_back():
    result = run(COUNT)
    print(result)
    assert result["echo_failures"] == 0  # every connection echoed twice, the second with all open
    # One host socket per guest connection while all are open.
    assert result["peak_fds"] >= result["baseline_fds"] + COUNT
    assert result["peak_rss"] < PEAK_RSS_LIMIT, result
    assert result["fds_after_close"] <= result["baseline_fds"], result
    assert result["seconds_to_baseline"] < CLOSE_WAIT_LIMIT
