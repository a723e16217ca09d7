"""Stall detection: no output, CPU, I/O or ESTABLISHED connection for stall_timeout ends a job."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from ccexec.stall import CPU_PROGRESS, ProgressWatch, TreeSample, sample_interval, sample_tree
from support import async_test
from wire import Wire

CLAUDE = 'claude -p "What is 2+2?" --output-format stream-json --verbose'

# ------------------------------------------------------------------ the rule, without processes

IDLE = TreeSample(cpu=1.0, io=1000, connected=False)


def idle_watch(timeout: float = 5.0) -> ProgressWatch:
    """A watch whose baseline (an idle tree, 10 output bytes) was taken at t=0."""
    watch = ProgressWatch(timeout, now=0.0)
    assert not watch.observe(IDLE, 10, 0.0)
    return watch


def test_no_progress_for_the_whole_timeout_is_a_stall_and_not_a_moment_before():
    watch = idle_watch()
    assert [watch.observe(IDLE, 10, t) for t in (1, 2, 3, 4, 4.99)] == [False] * 5
    assert watch.observe(IDLE, 10, 5.0)
    assert watch.observe(IDLE, 10, 6.0)  # and it stays stalled


def test_the_first_sample_is_a_baseline_not_a_stall():
    watch = ProgressWatch(5, now=0.0)
    assert not watch.observe(IDLE, 0, 4.0)  # the clock restarts at the baseline
    assert not watch.observe(IDLE, 0, 8.9)
    assert watch.observe(IDLE, 0, 9.0)


@pytest.mark.parametrize("name, sample, output", [
    ("output grew", IDLE, 11),
    ("cpu rose", TreeSample(1.0 + CPU_PROGRESS * 2, 1000, False), 10),
    ("io grew", TreeSample(1.0, 1001, False), 10),
    ("io dropped (a process left the tree)", TreeSample(1.0, 400, False), 10),
    ("a connection is established", TreeSample(1.0, 1000, True), 10),
])
def test_each_kind_of_progress_restarts_the_clock(name, sample, output):
    watch = idle_watch()
    assert not watch.observe(IDLE, 10, 4.0)
    assert not watch.observe(sample, output, 4.5), name
    assert not watch.observe(sample, output, 9.0), name
    if not sample.connected:  # the same sample again is no progress
        assert watch.observe(sample, output, 9.5), name


def test_cpu_below_the_rounding_threshold_is_no_progress():
    watch = idle_watch()
    assert not watch.observe(TreeSample(1.0 + CPU_PROGRESS, 1000, False), 10, 3.0)
    assert not watch.observe(TreeSample(1.0 + CPU_PROGRESS / 2, 1000, False), 10, 4.0)
    assert watch.observe(TreeSample(1.0 + CPU_PROGRESS, 1000, False), 10, 5.0)


def test_cpu_counts_from_the_last_progress_so_a_slow_trickle_adds_up():
    watch = idle_watch()
    trickle = [watch.observe(TreeSample(1.0 + 0.004 * t, 1000, False), 10, float(t)) for t in range(1, 30)]
    assert not any(trickle)  # 4 ms a second: more than CPU_PROGRESS every third second
    assert watch.last_progress == 27.0


def test_a_working_process_is_never_stalled():
    watch = idle_watch()
    for t in range(1, 60):  # 20 ms of CPU a second
        assert not watch.observe(TreeSample(1.0 + 0.02 * t, 1000, False), 10, float(t))


def test_a_held_connection_is_never_a_stall():
    watch = idle_watch()
    connected = TreeSample(1.0, 1000, True)
    assert not any(watch.observe(connected, 10, float(t)) for t in range(1, 60))
    assert not watch.observe(IDLE, 10, 63.0)  # dropped: the clock runs from the last connected sample
    assert watch.observe(IDLE, 10, 64.0)


def test_output_counts_once_not_by_its_total():
    watch = idle_watch()
    assert not watch.observe(IDLE, 500, 1.0)
    assert not watch.observe(IDLE, 500, 5.9)
    assert watch.observe(IDLE, 500, 6.0)


def test_restart_starts_a_new_baseline_and_clock():
    watch = idle_watch()
    assert not watch.observe(IDLE, 10, 4.0)
    watch.restart(100.0)  # e.g. the job was paused meanwhile
    assert not watch.observe(IDLE, 10, 101.0)  # baseline again
    assert not watch.observe(IDLE, 10, 105.9)
    assert watch.observe(IDLE, 10, 106.0)


def test_watch_needs_a_positive_timeout_and_samples_at_most_once_a_second():
    with pytest.raises(ValueError):
        ProgressWatch(0, now=0.0)
    assert sample_interval(5) == 1.0 and sample_interval(3600) == 1.0
    assert sample_interval(1) == 0.5 and sample_interval(0.01) == 0.1


# ------------------------------------------------------------------ sampling real processes


def test_sample_tree_sums_the_tree_and_sees_established_connections():
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()):
        mine = sample_tree(os.getpid())
        assert mine is not None and mine.connected and mine.cpu > 0 and mine.io > 0
    proc = subprocess.Popen(["sh", "-c", "sleep 60 | cat"], start_new_session=True)
    try:
        first = sample_tree(proc.pid)
        assert first is not None and not first.connected
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test started: sh, sleep and cat
        proc.wait()
    assert sample_tree(proc.pid) is None


# ------------------------------------------------------------------ end to end


@async_test(40)
async def test_sleeping_job_is_killed_as_stalled_after_stall_timeout(daemon):
    wire = await Wire.open(daemon.url)
    started = time.monotonic()
    result = await wire.execute(command="sleep 3600", stall_timeout=5)
    completed = await wire.completed(result["job_id"], 20)
    latency = time.monotonic() - started
    print(f"\nsleep 3600, stall_timeout 5: completed after {latency:.2f} s "
          f"(execution_time {completed['execution_time']:.2f} s)")
    assert (completed["reason"], completed["status"]) == ("stalled", "failed")
    assert completed["error"] == "no output, CPU or I/O for 5 s"
    assert completed["exit_code"] < 0  # SIGTERM'd like a timeout
    assert completed["execution_time"] >= 4.9  # never before the stall_timeout
    assert latency < 12  # generous: the design aims at ~5-7 s
    await wire.close()


@pytest.mark.parametrize("mode", ["socket", "cpu"])
@async_test(60)
async def test_claude_thinking_on_a_connection_or_the_cpu_is_not_stalled(daemon, mode):
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(40, command=f"FAKE_CLAUDE_THINK=12 FAKE_CLAUDE_THINK_MODE={mode} {CLAUDE}",
                                  stall_timeout=5)
    assert (completed["reason"], completed["exit_code"]) == ("exit", 0), completed
    assert completed["execution_time"] >= 12
    assert '"result":"4"' in wire.text(completed["job_id"])
    await wire.close()


@async_test(60)
async def test_job_printing_every_two_seconds_is_not_stalled(daemon):
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(40, command="for i in 1 2 3 4 5 6; do echo tick $i; sleep 2; done",
                                  stall_timeout=5)
    assert (completed["reason"], completed["exit_code"]) == ("exit", 0), completed
    assert completed["execution_time"] >= 12
    assert wire.text(completed["job_id"]) == "".join(f"tick {i}\n" for i in range(1, 7))
    await wire.close()


@async_test(60)
async def test_daemon_default_applies_and_zero_in_the_request_disables_it(make_daemon):
    daemon = make_daemon(settings={"stall_timeout": "4"})
    wire = await Wire.open(daemon.url)
    defaulted = await wire.execute(command="sleep 3600", parallel=True)
    disabled = await wire.execute(command="sleep 7; echo ok", stall_timeout=0, parallel=True)
    stalled = await wire.completed(defaulted["job_id"], 20)
    assert (stalled["reason"], stalled["error"]) == ("stalled", "no output, CPU or I/O for 4 s")
    assert stalled["execution_time"] >= 3.9
    finished = await wire.completed(disabled["job_id"], 20)
    assert (finished["reason"], finished["exit_code"]) == ("exit", 0), finished
    assert wire.text(disabled["job_id"]) == "ok\n"
    await wire.close()


@pytest.mark.parametrize("command", [
    "sleep 3600 | cat",  # cat reads a pipe that sleep never writes
    "mkfifo fifo.$$ && exec 3<>fifo.$$ && rm fifo.$$ && read line <&3",  # a fifo nobody writes
])
@async_test(40)
async def test_read_from_a_pipe_nobody_writes_is_stalled(daemon, command):
    wire = await Wire.open(daemon.url)
    result = await wire.execute(command=command, stall_timeout=3)
    completed = await wire.completed(result["job_id"], 20)
    assert completed["reason"] == "stalled", completed
    assert completed["execution_time"] >= 2.9
    await wire.close()


@async_test(60)
async def test_paused_job_is_not_stalled_and_its_clock_restarts_on_resume(daemon):
    wire = await Wire.open(daemon.url)
    result = await wire.execute(command="sleep 3600", stall_timeout=2, parallel=True)
    await wire.answer(await wire.request("control", {"type": "PAUSE", "job_id": result["job_id"]}))
    # A 5 s job is the clock: the paused job must outlive it.
    _, clock = await wire.run(20, command="sleep 5", parallel=True)
    assert clock["reason"] == "exit"
    assert not [m for m in wire.of_job(result["job_id"]) if m.get("method") == "process.completed"]
    await wire.answer(await wire.request("control", {"type": "RESUME", "job_id": result["job_id"]}))
    resumed = time.monotonic()
    completed = await wire.completed(result["job_id"], 20)
    assert completed["reason"] == "stalled"
    assert time.monotonic() - resumed >= 1.9
    await wire.close()
