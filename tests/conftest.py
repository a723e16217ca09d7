"""Fixtures that start real ccexec daemons and clean up after them."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from support import Daemon, finish

_OWN_BASETEMP = pytest.StashKey[str]()


def _is_controller(config) -> bool:
    return not hasattr(config, "workerinput")  # xdist workers have it


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """A short base temp directory: a daemon's Unix sockets live under its
    temp directory, their paths hold at most 107 bytes, and xdist adds a
    worker directory to every path under the default base."""
    if config.option.basetemp is None and _is_controller(config):
        config.option.basetemp = tempfile.mkdtemp(prefix="ccx-")
        config.stash[_OWN_BASETEMP] = config.option.basetemp


def pytest_sessionfinish(session, exitstatus):
    """Remove the base temp directory made above once everything passed;
    keep it, with every daemon's logs, when something failed."""
    own = session.config.stash.get(_OWN_BASETEMP, None)
    if own is not None and exitstatus == 0:
        shutil.rmtree(own, ignore_errors=True)
    elif own is not None:
        print(f"\ntest daemons' files kept in {own}")


def pytest_xdist_auto_num_workers(config):
    """Tests mostly wait on daemons and jobs rather than compute: two per core."""
    return min(2 * len(os.sched_getaffinity(0)), 8)


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
