"""Byte-exact TCP over a lossy guest link, end to end (bench/lossy.py).

The guest's namespace loses 5% of the frames each way (nftables on tap0's
ingress, an iptables NFQUEUE nobody reads on its output), and a real
forwarder carries SHA-256-checked transfers: one large one each way, and 20
concurrent ones each way. The test asserts that every byte arrives and that
the rules did drop frames each way; the times are printed for the record,
never asserted on. Run once in CI (not under every interpreter): it takes a
few minutes.
"""

import shutil
import subprocess

import pytest

from bench.lossy import run_case

pytestmark = pytest.mark.e2e

TIMEOUT = 300.0  # per transfer; today's worst case is well under a minute


def have_loss_tools() -> bool:
    if not (shutil.which("nft") and shutil.which("iptables")):
        return False
    probe = subprocess.run(["iptables", "-V"], capture_output=True, text=True, timeout=10)
    return "nf_tables" in probe.stdout


@pytest.fixture(scope="module", autouse=True)
def loss_tools():
    assert have_loss_tools(), "nftables and iptables-nft are needed (.ci/install)"


def check(result: dict, key: str) -> None:
    part = result[key]
    print(key, part)
    assert part["ok"], part
    assert part["dropped_toward_guest"] > 0 and part["dropped_from_guest"] > 0, part


def test_large_transfers_each_way_at_5_percent_loss_are_byte_exact():
    result = run_case("python", 5.0, 40 << 20, 0, 0, TIMEOUT)
    check(result, "single_down")
    check(result, "single_up")


def test_twenty_concurrent_transfers_each_way_at_5_percent_loss_are_byte_exact():
    result = run_case("python", 5.0, 0, 20, 5 << 20, TIMEOUT)
    check(result, "parallel_down")
    check(result, "parallel_up")
