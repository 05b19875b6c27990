"""The in-process example of docs/study.md runs as written and prints
exactly the output shown below it (scapy-built frames in, the stack's
answers decoded by scapy, the trace of its decisions), so the guide cannot
rot; and the guide's links point at files that exist."""

import contextlib
import io
import re

from tests import harness

GUIDE = harness.REPO / "docs" / "study.md"


def example() -> tuple[str, str]:
    text = GUIDE.read_text()
    start = text.index("## 6. The stack in-process")
    blocks = re.search(r"```python\n(.*?)```\s*```text\n(.*?)```", text[start:], re.S)
    return blocks.group(1), blocks.group(2)


def test_the_in_process_example_prints_what_the_guide_shows():
    code, expected = example()
    assert "stack.set_tracer(" in code and "scapy" in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(GUIDE), "exec"), {"__name__": "study_example"})
    assert out.getvalue() == expected
    assert "tcp.state" in expected and "RA" in expected and "ipv4-truncated" in expected


def test_the_guide_links_to_documents_that_exist():
    text = GUIDE.read_text()
    for target in re.findall(r"\]\(([a-z]+\.md)(?:#[a-z0-9-]+)?\)", text):
        assert (GUIDE.parent / target).exists(), target
