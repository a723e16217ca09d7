"""Fixtures that start real ccexec daemons and clean up after them."""

from __future__ import annotations

import pytest

from support import Daemon


def _daemon(tmp_path_factory, name: str, **kwargs) -> Daemon:
    return Daemon(tmp_path_factory.mktemp(name), **kwargs)


def _finish(daemon: Daemon) -> None:
    try:
        status = daemon.stop()
        leftovers = daemon.leftovers()
        assert status == 0, f"ccexecd exited with {status}:\n{daemon.log_tail()}"
        assert not leftovers, f"processes left behind: {[(p.pid, p.name()) for p in leftovers]}"
        log = daemon.log_path.read_text(errors="replace") if daemon.log_path.exists() else ""
        assert "Traceback (most recent call last)" not in log, f"an exception escaped in the daemon:\n{log[-5000:]}"
    finally:
        daemon.cleanup()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One daemon shared by a module's tests (never restarted between them)."""
    d = _daemon(tmp_path_factory, "ccexecd").start()
    yield d
    _finish(d)


@pytest.fixture
def make_daemon(tmp_path_factory):
    """A factory for daemons with their own settings, stopped after the test."""
    started: list[Daemon] = []

    def make(start: bool = True, **kwargs) -> Daemon:
        d = _daemon(tmp_path_factory, "ccexecd", **kwargs)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        _finish(d)
