"""Parity between the python backend and libslirp.

Frame level: the same guest frames go into each backend in-process; the
answers are parsed with scapy and compared field by field. Every difference
must be listed, with its reason, in the table of docs/parity.md, and every row
of that table must still be a difference: an unlisted or stale difference
fails.

The libslirp side asks the first nameserver of /etc/resolv.conf: these tests
run only inside .ci/sandbox, where that is 127.0.0.1, and serve 127.0.0.1:53.
"""

from pathlib import Path

import pytest
from scapy.fields import FlagValue
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import NoPayload

from tests import guest_frames
from tests.test_libslirp import (
    Dns53,
    closed_port,
    dhcp_frame,
    dns_query,
    is_arp_reply,
    is_dhcp,
    is_icmp_type,
    needs_libslirp,
    network,
    receive,
    resolv_conf_is_ours,
    udp_frame,
    udp_from,
)

PARITY_DOC = Path(__file__).resolve().parent.parent / "docs" / "parity.md"
ABSENT = "(absent)"
NO_ANSWER = "(no answer)"
CHECKSUMMED = (IP, ICMP, UDP, TCP)


# -------------------------------------------------------------- scenarios
def scenarios(closed: int) -> list[tuple[str, bytes, object]]:
    """(name, guest frame, predicate for the answer), sent in this order."""
    return [
        # captured from a Linux guest: who-has 10.0.2.2 from 10.0.2.100
        ("arp-gateway", guest_frames.ARP_REQUEST, is_arp_reply),
        ("arp-dns", guest_frames.ARP_REQUEST[:38] + bytes([10, 0, 2, 3]), is_arp_reply),
        ("dhcp-offer", dhcp_frame("discover", xid=0x5A5A5A5A), is_dhcp(2)),
        ("dhcp-ack", dhcp_frame("request", xid=0x5A5A5A5A, requested="10.0.2.15"), is_dhcp(5)),
        # captured: ping -p 0123456789abcdef 10.0.2.2
        ("icmp-echo-gateway", guest_frames.ECHO_TO_GATEWAY, is_icmp_type(0)),
        # captured: ping -R 10.0.2.3 (a record-route option in the IP header)
        ("icmp-echo-dns-options", guest_frames.ECHO_WITH_OPTIONS, is_icmp_type(0)),
        (
            "dns-query",
            udp_frame("10.0.2.3", 53, dns_query("parity.test."), sport=45000),
            udp_from(53),
        ),
    ]


SCENARIO_NAMES = [name for name, _, _ in scenarios(1)]


# ---------------------------------------------------------------- fields
def checksum_ok(frame: bytes, layer_type) -> bool:
    pkt = Ether(frame)
    original = pkt[layer_type].chksum
    pkt[layer_type].chksum = None
    return Ether(bytes(pkt))[layer_type].chksum == original


def _plain(value):
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, FlagValue):
        return str(value)
    if isinstance(value, int | str | float | type(None)):
        return value
    return repr(value)


def flatten(frame: bytes) -> dict[str, object]:
    """Every field of every layer as ``Layer.field``: value. Checksums become
    "valid"/"invalid", DHCP and TCP options one field each (plus their order)."""
    out: dict[str, object] = {}
    layer = Ether(frame)
    while not isinstance(layer, NoPayload):
        name = type(layer).__name__
        for field in layer.fields_desc:
            value = layer.getfieldval(field.name)
            if name == "DHCP" and field.name == "options":
                order = []
                for option in value:
                    if option == "pad":
                        continue
                    if isinstance(option, tuple):
                        rest = option[1] if len(option) == 2 else option[1:]
                        out[f"DHCP.option.{option[0]}"] = _plain(rest)
                        order.append(option[0])
                    else:
                        order.append(option)
                out["DHCP.option-order"] = " ".join(order)
            elif name == "TCP" and field.name == "options":
                for option_name, option_value in value:
                    out[f"TCP.option.{option_name}"] = _plain(option_value)
            elif field.name == "chksum" and type(layer) in CHECKSUMMED:
                out[f"{name}.chksum"] = "valid" if checksum_ok(frame, type(layer)) else "invalid"
            else:
                out[f"{name}.{field.name}"] = _plain(value)
        layer = layer.payload
    return out


def differences(python: dict | None, libslirp: dict | None) -> dict[str, tuple]:
    if python is None or libslirp is None:
        if python is None and libslirp is None:
            return {}
        return {
            "(answer)": (
                NO_ANSWER if python is None else "frame",
                NO_ANSWER if libslirp is None else "frame",
            )
        }
    diff = {}
    for key in sorted(set(python) | set(libslirp)):
        a, b = python.get(key, ABSENT), libslirp.get(key, ABSENT)
        if a != b:
            diff[key] = (a, b)
    return diff


def documented() -> dict[str, dict[str, tuple[str, str]]]:
    """Scenario -> field -> (python cell, libslirp cell) from docs/parity.md.

    A cell in backticks is a value the test checks; plain text describes a
    value that varies (an IP id, say)."""
    table: dict[str, dict[str, tuple[str, str]]] = {}
    for line in PARITY_DOC.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        scenario, field = cells[0].strip("`"), cells[1].strip("`")
        table.setdefault(scenario, {})[field] = (cells[2], cells[3])
    return table


def value_matches(cell: str, value) -> bool:
    if cell.startswith("`") and cell.endswith("`"):
        return cell.strip("`") == str(value)
    return True


# ------------------------------------------------------------ the runs
def run_backend(backend: str, closed: int) -> dict[str, dict | None]:
    config = {"dns_upstreams": [("127.0.0.1", 53)]} if backend == "python" else {}
    answers: dict[str, dict | None] = {}
    with network(backend, **config) as net:
        for name, frame, predicate in scenarios(closed):
            net.send(frame)
            answer = receive(net, predicate, timeout=2.0)
            answers[name] = None if answer is None else flatten(answer)
    return answers


@pytest.fixture(scope="module")
def answers():
    if not resolv_conf_is_ours():
        pytest.fail(
            "parity tests must run inside .ci/sandbox (/etc/resolv.conf names a "
            "resolver that is not ours)"
        )
    closed = closed_port()
    with Dns53(address="192.0.2.77") as dns:
        result = {backend: run_backend(backend, closed) for backend in ("python", "libslirp")}
    assert dns.queries == ["parity.test.", "parity.test."]
    return result


def test_parity_table_names_known_scenarios_and_gives_reasons():
    table = documented()
    assert set(table) <= set(SCENARIO_NAMES), set(table) - set(SCENARIO_NAMES)
    for line in PARITY_DOC.read_text().splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert len(cells) == 5 and len(cells[4]) > 10, f"row needs values and a reason: {line}"


@needs_libslirp
@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_frame_parity(answers, scenario):
    python, libslirp = answers["python"][scenario], answers["libslirp"][scenario]
    assert libslirp is not None, f"libslirp did not answer {scenario}"
    diff = differences(python, libslirp)
    listed = documented().get(scenario, {})
    unlisted = {k: v for k, v in diff.items() if k not in listed}
    stale = set(listed) - set(diff)
    assert not unlisted, (
        f"{scenario}: differences not in docs/parity.md (field: (python, libslirp)): {unlisted}"
    )
    assert not stale, f"{scenario}: docs/parity.md lists fields that no longer differ: {stale}"
    for field, (python_cell, libslirp_cell) in listed.items():
        python_value, libslirp_value = diff[field]
        assert value_matches(python_cell, python_value), (scenario, field, python_value)
        assert value_matches(libslirp_cell, libslirp_value), (scenario, field, libslirp_value)
