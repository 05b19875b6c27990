"""The study tools together on one real session: a run-mode guest (curl, dig
through a failing-over DNS proxy, a download while nftables drops segments on
their way into the guest) under --trace, --record and --pcap at once.

- The trace holds one connection's transitions in order under one name, a
  retransmission with its cause, and the DNS proxy's failover.
- The recording replays with zero divergence, and the replayed stack's trace
  is the live one, line for line, for every decision the stack itself took
  (the replay is the session; the NAT side's decisions are not replayed).
"""

import json
import os
import subprocess

import pytest

from tests import harness
from tests.test_record import web_server

pytestmark = pytest.mark.e2e

# What the stack decides (the replay's trace has these); the NAT side's
# (dns.*, dhcp.*, tcp.host-*, udp.*, icmp.*) happen outside the stack.
STACK_EVENTS = ("tcp.state", "tcp.retransmit", "tcp.congestion", "tcp.window", "tcp.keepalive")


def guest_script(web: int) -> str:
    get = f"http://10.0.2.2:{web}"
    return "; ".join(
        [
            "set -e",
            f"curl -sS --max-time 60 -o /dev/null -w 'down %{{size_download}}\\n' {get}/200000",
            "dig +short +time=8 +tries=1 @10.0.2.3 example.test",
            # one in ten segments toward the guest's curl is lost on its way in:
            # the stack sees duplicate ACKs and must resend (fast retransmit, NewReno)
            "nft add table inet lossy",
            "nft add chain inet lossy in '{ type filter hook input priority 0; }'",
            f"nft add rule inet lossy in tcp sport {web} numgen random mod 10 0 drop",
            f"curl -sS --max-time 120 -o /dev/null -w 'lossy %{{size_download}}\\n' {get}/6000000",
            "nft delete table inet lossy",
            # curl is done once it has the bytes; the rule may have dropped our
            # FIN, which the stack resends: wait (bounded) until the guest has
            # it, and a little for its ACK to reach the stack, so that the
            # trace ends the connection
            "for i in $(seq 100); do "
            f"ss -Htn state fin-wait-2 '( dport = :{web} )' | grep -q . || break; sleep 0.1; done",
            "sleep 0.3",
        ]
    )


def read_trace(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_one_session_traced_recorded_and_replayed(tmp_path):
    trace, rec, pcap = tmp_path / "t.jsonl", tmp_path / "s.rec", tmp_path / "s.pcap"
    with (
        web_server() as web,
        harness.DnsServer(silent=True) as dead,
        harness.DnsServer(records={"example.test.": "192.0.2.7"}) as dns,
    ):
        result = subprocess.run(
            [
                *harness.FORWARDER,
                f"--dns-upstream=127.0.0.1:{dead.port}",
                f"--dns-upstream=127.0.0.1:{dns.port}",
                f"--trace={trace}",
                f"--record={rec}",
                f"--pcap={pcap}",
                "--",
                "sh",
                "-c",
                guest_script(web),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=harness.REPO,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["down 200000", "192.0.2.7", "lossy 6000000"]
    lines = read_trace(trace)
    assert all(list(line)[:4] == ["t", "event", "flow", "msg"] for line in lines)

    # The lossy download: its flow's transitions in order, and resends with their cause.
    resent = [line for line in lines if line["event"] == "tcp.retransmit"]
    assert resent, "no retransmission traced under 10% loss toward the guest"
    # "syn": the rule may drop the SYN-ACK itself, which the stack then resends
    causes = {"fast-retransmit", "partial-ack", "rto", "probe", "syn"}
    assert {line["reason"] for line in resent} <= causes
    flow = resent[0]["flow"]
    assert flow.startswith("tcp 10.0.2.100:") and flow.endswith(f">10.0.2.2:{web}")
    states = [
        (line["old"], line["new"])
        for line in lines
        if line["event"] == "tcp.state" and line["flow"] == flow
    ]
    assert states[:3] == [
        ("CLOSED", "LISTEN"),
        ("LISTEN", "SYN-RECEIVED"),
        ("SYN-RECEIVED", "ESTABLISHED"),
    ], states
    assert states[-1][1] in ("TIME-WAIT", "CLOSED"), states
    assert all(a[1] == b[0] for a, b in zip(states, states[1:])), states  # a chain
    connected = [x for x in lines if x["event"] == "tcp.host-connect" and x["flow"] == flow]
    assert connected and connected[0]["result"] == "connected", connected

    # The DNS proxy: the silent upstream, its timeout, the next one's answer.
    dns_events = [
        (x["event"], x.get("upstream")) for x in lines if x["event"].startswith("dns.")
    ]
    first, second = f"127.0.0.1:{dead.port}", f"127.0.0.1:{dns.port}"
    assert dns_events[:4] == [
        ("dns.upstream", first),
        ("dns.failover", first),
        ("dns.upstream", second),
        ("dns.answer", second),
    ], dns_events
    asked = {x["flow"] for x in lines if x["event"].startswith("dns.")}
    assert len(asked) == 1 and asked.pop().endswith(">10.0.2.3:53"), asked

    # The recording replays exactly, and the replayed stack decides as the live one did.
    replayed_trace = tmp_path / "replayed.jsonl"
    played = subprocess.run(
        [*harness.TOOLS, "replay", str(rec), f"--trace={replayed_trace}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=harness.REPO,
    )
    assert played.returncode == 0, played.stdout + played.stderr
    assert played.stdout.endswith("pyslirp replay: no divergence\n")

    def decisions(records):
        return [x for x in records if x["event"] in STACK_EVENTS]

    live, again = decisions(lines), decisions(read_trace(replayed_trace))
    assert len(live) > 10
    assert again == live
    assert os.path.getsize(pcap) > 3_000_000
