"""What an executor finds among its children once it is its jobs' subreaper."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from ccexec.leftovers import CLOCK_TICK, JOB_ENV, Child, children, kill_child, leftovers_of_ended_jobs
from support import wait_for

RUNNING, ENDED = "a" * 32, "b" * 32


def _child(pid: int, job_id: str | None = None, started: float = 100.0, zombie: bool = False) -> Child:
    return Child(pid, zombie, started, job_id)


@pytest.mark.parametrize("child, verdict", [
    (_child(10, RUNNING), "kept"),  # a running job's leader
    (_child(11, RUNNING), "kept"),  # a running job's daemon
    (_child(12, ENDED), "ended"),
    (_child(13, None, started=99.0), "ended"),  # cleared its environment before the running job started
    (_child(14, None, started=100.0 - CLOCK_TICK), "kept"),  # within a tick of its start: maybe its
    (_child(15, None, started=120.0), "kept"),
    (_child(16, ENDED, zombie=True), "reaped"),
    (_child(10, RUNNING, zombie=True), "kept"),  # a leader's exit is asyncio's to wait for
], ids=["leader", "running-job", "ended-job", "unmarked-older", "unmarked-same-tick", "unmarked-newer",
        "zombie", "zombie-leader"])
def test_an_executor_child_is_kept_reaped_or_ended_by_its_job(child, verdict):
    zombies, ended = leftovers_of_ended_jobs([child], leaders={10}, running={RUNNING: 100.0})
    assert {"kept": ([], []), "reaped": ([child.pid], []), "ended": ([], [child.pid])}[verdict] == (zombies, ended)


def test_with_no_job_running_every_child_is_a_leftover():
    found = [_child(20, ENDED), _child(21, None), _child(22, None, zombie=True)]
    assert leftovers_of_ended_jobs(found, leaders=set(), running={}) == ([22], [20, 21])


def test_children_reads_job_id_start_and_exit_of_a_process_s_children():
    # Their parent is a process of their own that never reaps them (a sleep
    # the shell became), not the test's: a pytest worker may reap a child
    # whose PID an old subprocess object of another test names.
    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    parent = subprocess.Popen(["sh", "-c", f"{JOB_ENV}={RUNNING} sleep 30 & sleep 30 & exec sleep 31"],
                              env={k: v for k, v in os.environ.items() if k != JOB_ENV}, start_new_session=True)
    try:
        def both_sleeping():
            found = {c.job_id: c for c in children(parent.pid)}
            named = [psutil.Process(c.pid).name() for c in found.values()]
            return found if set(found) == {RUNNING, None} and named == ["sleep", "sleep"] else None
        found = wait_for(both_sleeping, 10, what="the two sleeps started")
        marked = found[RUNNING]
        assert not marked.zombie and not found[None].zombie
        assert before - CLOCK_TICK <= marked.started <= time.clock_gettime(time.CLOCK_BOOTTIME)
        os.kill(marked.pid, signal.SIGKILL)
        wait_for(lambda: {c.pid: c for c in children(parent.pid)}[marked.pid].zombie, 10,
                 what="the killed child to show as exited")
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(10)


def test_kill_child_ends_only_a_child_of_the_parent_with_the_group_it_leads():
    """A PID found earlier may name another process by the time it is killed."""
    ours = subprocess.Popen(["sh", "-c", "sleep 30 & wait"], start_new_session=True)
    try:
        wait_for(lambda: psutil.Process(ours.pid).children(), 10, what="the sleep started")
        [grandchild] = psutil.Process(ours.pid).children()
        assert not kill_child(grandchild.pid, parent=os.getpid())  # not our child
        assert grandchild.is_running()
        assert kill_child(ours.pid, parent=os.getpid())
        assert ours.wait(10) == -9
        wait_for(lambda: not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE, 10,
                 what="the grandchild, in its group, killed")
    finally:
        ours.kill()
        ours.wait(10)
