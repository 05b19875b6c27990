"""The in-process example of docs/design.md runs as written: a bare Stack
answers a UDP datagram and a whole TCP exchange (SYN, the connect-requested
event, accept, SYN-ACK, data both ways), and every ``print(...)  # expected``
line prints what its comment says, so the document cannot rot."""

import contextlib
import io
import re

from tests import harness

DESIGN = harness.REPO / "docs" / "design.md"


def example() -> str:
    text = DESIGN.read_text()
    start = text.index("Driving the stack in-process")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_the_in_process_example_speaks_udp_and_tcp_as_its_comments_say():
    code = example()
    assert "stack.tcp.accept(" in code and "TCP(" in code
    expected = [
        line.split("  # ", 1)[1]
        for line in code.splitlines()
        if line.startswith("print(") and "  # " in line
    ]
    assert len(expected) >= 8
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DESIGN), "exec"), {"__name__": "design_example"})
    assert out.getvalue().splitlines() == expected
