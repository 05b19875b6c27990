"""What replaced standard modules on the start path: pyslirp.settings
(configs and records without dataclasses), pyslirp.log (loggers that import
logging only for a record that is due) and the option parsers without re."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pyslirp.settings import Record, Settings, factory, fields, is_dataclass, replace

REPO = Path(__file__).resolve().parent.parent


class Limits(Settings):
    # A comment, as config classes have.
    burst: int = 5
    names: list = factory(list)
    interval: float = 10.0


class Checked(Limits):
    def __post_init__(self) -> None:
        if self.burst < 0:
            raise ValueError("burst < 0")


class Point(Record):
    __slots__ = ("x", "y")

    def __init__(self, x: int, y: int) -> None:
        self.x = x
        self.y = y


def test_settings_defaults_keywords_positions_and_fresh_factories():
    a, b = Limits(), Limits(burst=7)
    assert (a.burst, a.names, a.interval) == (5, [], 10.0)
    assert b.burst == 7 and Limits(1, [2]).names == [2]
    a.names.append(1)
    assert Limits().names == []  # each instance its own list
    assert a != Limits() and Limits(burst=7) == b and Limits() != Checked()
    assert repr(b) == "Limits(burst=7, names=[], interval=10.0)"
    assert [f.name for f in fields(Limits)] == ["burst", "names", "interval"]
    assert [f.name for f in fields(b)] == ["burst", "names", "interval"]


def test_settings_refuse_unknown_names_and_run_post_init():
    with pytest.raises(TypeError, match="unexpected argument 'brust'"):
        Limits(brust=3)
    with pytest.raises(TypeError, match="two values"):
        Limits(1, burst=2)
    with pytest.raises(ValueError, match="burst < 0"):
        Checked(burst=-1)
    with pytest.raises(ValueError, match="burst < 0"):
        replace(Checked(), burst=-1)
    changed = replace(Checked(burst=2), interval=1.0)
    assert (type(changed), changed.burst, changed.interval) == (Checked, 2, 1.0)
    with pytest.raises(TypeError):
        hash(Limits())


def test_records_compare_and_show_their_slots():
    assert Point(1, 2) == Point(1, 2) and Point(1, 2) != Point(2, 1)
    assert repr(Point(1, 2)) == "Point(x=1, y=2)"
    assert [f.name for f in fields(Point)] == ["x", "y"]
    assert replace(Point(1, 2), y=5) == Point(1, 5)
    assert is_dataclass(Point) and is_dataclass(Limits()) and not is_dataclass(object())


def run_isolated(code: str) -> str:
    """Run ``code`` in a fresh interpreter (-S: no site imports) from the checkout."""
    result = subprocess.run(
        [sys.executable, "-S", "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_logging_imported_only_for_a_record_at_the_level():
    out = run_isolated(
        """
        import sys
        from pyslirp import log
        calls = []
        log.configure("WARNING", lambda: calls.append("setup"))
        logger = log.get_logger("pyslirp.test")
        logger.info("not shown %d", 1)
        logger.debug("not shown")
        assert not logger.isEnabledFor(log.INFO)
        assert "logging" not in sys.modules and calls == []
        import logging
        logging.basicConfig(format="%(levelname)s %(name)s %(funcName)s: %(message)s")
        logger.warning("shown %d", 2)
        logger.error("shown %d", 3)
        assert calls == ["setup"], calls
        """
    )
    assert out == (
        "WARNING pyslirp.test <module>: shown 2\nERROR pyslirp.test <module>: shown 3\n"
    )


def test_the_forwarder_console_format_and_rate_limit_without_logging_at_start():
    out = run_isolated(
        """
        import sys
        from forwarder.ratelimit import installed, log_to_stderr
        from pyslirp.log import get_logger
        limiter = log_to_stderr("WARNING")
        assert installed() is limiter and "logging" not in sys.modules
        logger = get_logger("pyslirp.dhcp")
        for i in range(8):
            logger.warning("pool exhausted: %d", i)
        assert "logging" in sys.modules and limiter.suppressed_total == 3
        limiter.flush(limiter.clock() + 3600)
        """
    )
    lines = out.splitlines()
    assert len(lines) == 6, out
    assert lines[0].endswith(" WARNING pyslirp.dhcp: pool exhausted: 0")
    assert lines[4].endswith(" WARNING pyslirp.dhcp: pool exhausted: 4")
    assert lines[5].endswith(
        " WARNING pyslirp.dhcp: suppressed 3 similar messages: pool exhausted: %d"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.2.0/24", "10.0.2.0/24"),
        ("192.168.0.0/16", "192.168.0.0/16"),
        ("10.0.2/24", "invalid CIDR: 10.0.2/24"),
        ("10.0.2.0/", "invalid CIDR: 10.0.2.0/"),
        ("10.0.2.0/024", "invalid CIDR: 10.0.2.0/024"),
        ("10.0.2.0 /24", "invalid CIDR: 10.0.2.0 /24"),
        ("1.2.3.4444/24", "invalid CIDR: 1.2.3.4444/24"),
        ("10.0.2.256/24", "invalid network address: 10.0.2.256"),
        ("010.0.2.0/24", "invalid network address: 010.0.2.0"),
        ("10.0.2.64/24", "CIDR needs to be a network address like 10.0.2.0/24, not like "
         "10.0.2.100/24"),
        ("10.0.2.0/26", "prefix length needs to be 1-25"),
    ],
)
def test_cidr_parsed_without_re(text, expected):
    from forwarder.errors import UsageError
    from forwarder.options import parse_cidr

    try:
        assert str(parse_cidr(text)) == expected
    except UsageError as exc:
        assert str(exc) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1M", 1 << 20), (" 2g", 2 << 30), ("4096", 4096), ("K", None), ("1.5M", None),
     ("", None), ("\u0661\u0662", None), ("1" * 16, None)],
)  # fmt: skip
def test_sizes_parsed_without_re(text, expected):
    from forwarder.errors import UsageError
    from forwarder.options import parse_size

    if expected is None:
        with pytest.raises(UsageError, match=f"--x must be a size .*, not {text!r}"):
            parse_size(text, "--x", 0)
    else:
        assert parse_size(text, "--x", 0) == expected


def test_the_first_line_comes_even_with_no_descriptor_left():
    """Importing logging reads files: the console keeps a descriptor for it,
    since a guest's flood may exhaust them before anything was logged."""
    out = run_isolated(
        """
        import os, resource, sys
        from forwarder.ratelimit import log_to_stderr
        from pyslirp.log import get_logger
        log_to_stderr("WARNING")
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        held = []
        try:
            for _ in range(64):  # bounded: the soft limit is 64
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            assert exc.errno == 24, exc  # EMFILE
        assert "logging" not in sys.modules
        get_logger("pyslirp.udp").warning("cannot open a UDP socket: %s", "EMFILE")
        assert "logging" in sys.modules
        """
    )
    assert out.endswith(" WARNING pyslirp.udp: cannot open a UDP socket: EMFILE\n"), out


def test_a_record_that_cannot_reach_logging_is_dropped_not_raised():
    out = run_isolated(
        """
        import sys
        from pyslirp import log
        attempts = []
        def setup():
            attempts.append(1)
            if len(attempts) == 1:
                raise OSError(24, "Too many open files")
            import logging
            logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        log.configure("WARNING", setup)
        logger = log.get_logger("pyslirp.test")
        logger.warning("dropped")
        assert not logger.isEnabledFor(log.WARNING) or len(attempts) == 2
        logger.warning("shown")
        """
    )
    assert out == "WARNING pyslirp.test: shown\n"


def test_load_sets_logging_up_before_a_sandbox_would_hide_it():
    out = run_isolated(
        """
        import sys
        from forwarder.ratelimit import log_to_stderr
        from pyslirp import log
        log_to_stderr("ERROR")
        assert "logging" not in sys.modules
        assert log.load()
        import logging
        assert "logging" in sys.modules and len(logging.getLogger().handlers) == 1
        sys.path.clear()  # as after pivot_root: no file left to import
        sys.path_importer_cache.clear()
        log.get_logger("pyslirp.api").error("still %s", "written")
        """
    )
    assert out.endswith(" ERROR pyslirp.api: still written\n"), out
