"""The main-job command at the top of README.md works as written (with our
own DNS server as the upstream, since tests never ask the host's resolver)."""

import re
import shlex
import subprocess

import pytest

from tests import harness
from tests.dnsserver import DnsServer

pytestmark = pytest.mark.e2e


def main_job_command() -> list[str]:
    text = (harness.REPO / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S).group(1)
    line = next(x for x in block.splitlines() if x.startswith("sudo sh -c"))
    inner = shlex.split(line)[3]  # sudo sh -c '<inner>'
    assert inner.startswith(".ci/install && ")
    return shlex.split(inner.removeprefix(".ci/install && "))


def test_main_job_gets_a_lease_and_resolves_a_name():
    cmd = main_job_command()
    assert cmd[0] == "pyslirp-forwarder" and "--" in cmd
    with DnsServer(records={"example.org.": "192.0.2.80"}) as dns:
        cmd = [*harness.FORWARDER, "--dns-upstream", f"127.0.0.1:{dns.port}", *cmd[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=harness.REPO)
        assert out.returncode == 0, out.stderr
        assert "lease: 10.0.2.15/24 router 10.0.2.2 dns 10.0.2.3" in out.stdout
        assert re.search(r"^192\.0\.2\.80\s+example\.org$", out.stdout, re.M), out.stdout
        assert ("example.org.", 1) in dns.queries
