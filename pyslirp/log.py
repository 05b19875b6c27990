"""Loggers that import the standard ``logging`` only when a record is due.

``import logging`` costs the forwarder's start about 9 ms (it brings
traceback, re, string, threading and more), and in the plain mode at the
default --log-level=warning most runs never log a line. So every module of
pyslirp and the forwarder takes its logger from here:

    log = get_logger("pyslirp.dhcp")
    log.warning("DHCP pool exhausted: no offer for %s", mac)

A ``Logger`` has the methods of ``logging.Logger`` that we call (debug,
info, warning, error, exception, log, isEnabledFor) and hands each record
to the ``logging.Logger`` of the same name, made on first use.

Used as a library (tests, an embedding program), nothing is configured
here and every call goes to ``logging`` as it is set up there. The console
script calls ``configure(level, setup)``: records below ``level`` are
dropped here without importing anything, and the first record at ``level``
or above runs ``setup`` (the handler, its format and its rate limit, see
forwarder.ratelimit) before it is handed on. Nothing changes a logger's
level after that, so the threshold here and the one in ``logging`` agree.
"""

from __future__ import annotations

DEBUG = 10
INFO = 20
WARNING = 30
ERROR = 40
LEVELS = {"DEBUG": DEBUG, "INFO": INFO, "WARNING": WARNING, "ERROR": ERROR}

# Records below this level are dropped without asking ``logging``; 0 until
# configure() (as a library: ``logging`` decides everything).
_threshold = 0
# Run once, before the first record that passes the threshold.
_setup = None


def configure(level: str | int, setup=None) -> None:
    """Drop records below ``level`` (a name of LEVELS or a number) here;
    call ``setup()`` before the first one at or above it."""
    global _threshold, _setup
    _threshold = LEVELS[level.upper()] if isinstance(level, str) else level
    _setup = setup


def load() -> bool:
    """Import ``logging`` and run the pending setup now, not at the first
    record: before a sandbox puts the Python library out of reach. True
    if ``logging`` is ready."""
    return _standard("pyslirp") is not None


def _standard(name: str):
    """The ``logging.Logger`` called ``name``, after the pending setup; None
    if ``logging`` cannot be imported now (no descriptor left to read its
    files: the record is dropped, the next one tries again)."""
    global _setup
    try:
        if _setup is not None:
            _setup()
            _setup = None
        import logging
    except (ImportError, OSError):
        return None
    return logging.getLogger(name)


class Logger:
    """A ``logging.Logger`` made when the first record passes the threshold."""

    __slots__ = ("name", "_standard")

    def __init__(self, name: str) -> None:
        self.name = name
        self._standard = None

    def standard(self):
        """The ``logging.Logger`` behind this one (imports ``logging``), or
        None while it cannot be imported."""
        if self._standard is None:
            self._standard = _standard(self.name)
        return self._standard

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 (logging's name)
        if level < _threshold:
            return False
        standard = self.standard()
        return standard is not None and standard.isEnabledFor(level)

    def log(self, level: int, msg, *args, **kw) -> None:
        if level >= _threshold:
            self._emit(level, msg, args, kw)

    def debug(self, msg, *args, **kw) -> None:
        if _threshold <= DEBUG:
            self._emit(DEBUG, msg, args, kw)

    def info(self, msg, *args, **kw) -> None:
        if _threshold <= INFO:
            self._emit(INFO, msg, args, kw)

    def warning(self, msg, *args, **kw) -> None:
        if _threshold <= WARNING:
            self._emit(WARNING, msg, args, kw)

    def error(self, msg, *args, **kw) -> None:
        if _threshold <= ERROR:
            self._emit(ERROR, msg, args, kw)

    def exception(self, msg, *args, exc_info=True, **kw) -> None:
        """An error with the exception being handled (its traceback)."""
        if _threshold <= ERROR:
            kw["exc_info"] = exc_info
            self._emit(ERROR, msg, args, kw)

    def _emit(self, level: int, msg, args: tuple, kw: dict) -> None:
        standard = self.standard()
        if standard is not None:
            # stacklevel: the record names our caller, two frames up.
            kw["stacklevel"] = kw.get("stacklevel", 1) + 2
            standard.log(level, msg, *args, **kw)


def get_logger(name: str) -> Logger:
    """The logger for ``name`` (one per name, like ``logging.getLogger``)."""
    logger = _loggers.get(name)
    if logger is None:
        logger = _loggers[name] = Logger(name)
    return logger


_loggers: dict[str, Logger] = {}
