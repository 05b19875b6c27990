"""The command line's own parser (forwarder.options, which no longer
imports argparse): each form of option that argparse took still means the
same, and each mistake still gets argparse's words."""

from __future__ import annotations

import os

import pytest

from forwarder.errors import UsageError
from forwarder.options import parse


@pytest.fixture
def fd():
    """A descriptor that exists, for -r and -e."""
    r, w = os.pipe()
    try:
        yield w
    finally:
        os.close(r)
        os.close(w)


def options(*argv: str):
    text, parsed = parse(list(argv))
    assert text is None
    return parsed


def test_short_flags_combine_and_short_values_attach(fd):
    o = options("-c6", "-r", str(fd), "1", "tap0")
    assert (o.configure, o.enable_ipv6, o.ready_fd) == (True, True, fd)
    o = options(f"-cr{fd}", "1", "tap0")
    assert (o.configure, o.enable_ipv6, o.ready_fd) == (True, False, fd)
    assert options(f"-r={fd}", "1", "tap0").ready_fd == fd
    assert options(f"--ready-fd={fd}", "1", "tap0").ready_fd == fd
    assert options("--ready-fd", str(fd), "1", "tap0").ready_fd == fd


def test_positionals_mix_with_options_and_the_last_value_wins():
    o = options("1", "--mtu=9000", "tap1", "-m", "1400", "--configure")
    assert (o.config.mtu, o.tap, o.configure) == (1400, "tap1", True)


def test_repeatable_options_collect_and_start_empty_each_time():
    o = options("-p", "8080:80", "--publish=127.0.0.1:2222:22/tcp", "1", "tap0")
    wanted = [("0.0.0.0", 8080, 80), ("127.0.0.1", 2222, 22)]
    assert [(p[1], p[2], p[4]) for p in o.publish] == wanted
    assert options("1", "tap0").publish == []


def test_a_lone_dash_is_a_value():
    assert options("--trace", "-", "1", "tap0").config.trace_path == "-"


def test_help_and_version_are_text():
    assert parse(["--help"])[0].startswith("Usage: ")
    assert parse(["-h"])[0] == parse(["--help"])[0]
    assert "version" in parse(["-v"])[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mtu"], "argument -m/--mtu: expected one argument (see --help)"),
        (["-r"], "argument -r/--ready-fd: expected one argument (see --help)"),
        (["--mtu", "-5", "1", "tap0"], "argument -m/--mtu: expected one argument (see --help)"),
        (["--mtu", "--configure", "1"], "argument -m/--mtu: expected one argument (see --help)"),
        (
            ["--configure=yes", "1", "tap0"],
            "argument -c/--configure: ignored explicit argument 'yes' (see --help)",
        ),
        (["-x", "--other=1", "1", "tap0"], "unrecognized arguments: -x --other=1 (see --help)"),
        # no abbreviations, as with allow_abbrev=False
        (["--conf", "1", "tap0"], "unrecognized arguments: --conf (see --help)"),
    ],
)
def test_mistakes_get_argparse_words(argv, message):
    with pytest.raises(UsageError) as caught:
        parse(argv)
    assert str(caught.value) == message
