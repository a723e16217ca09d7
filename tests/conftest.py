"""Fixtures that start real ccexec daemons and clean up after them."""

from __future__ import annotations

import pytest

from support import Daemon, finish


def _daemon(tmp_path_factory, name: str, **kwargs) -> Daemon:
    return Daemon(tmp_path_factory.mktemp(name), **kwargs)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One daemon shared by a module's tests (never restarted between them)."""
    d = _daemon(tmp_path_factory, "ccexecd").start()
    yield d
    finish(d)


@pytest.fixture
def make_daemon(tmp_path_factory):
    """A factory for daemons with their own settings, stopped after the test."""
    started: list[Daemon] = []

    def make(start: bool = True, **kwargs) -> Daemon:
        d = _daemon(tmp_path_factory, "ccexecd", **kwargs)
        started.append(d)
        return d.start() if start else d

    yield make
    finish(*started)
