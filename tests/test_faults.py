"""Fault injection against the real daemon: kill -9 and SIGSTOP of each
process kind, and a client that stops reading while its job writes 1 GiB.

(kill -9 of a handler during a streaming job is in test_resume.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import websockets

from ccexec import broker, ctl
from ccexec.client import Client, RPCError
from support import (Daemon, async_test, detached_sleep, http_get, marked_processes, marked_running, pid_running,
                     serves, ticker, wait_for)
from wire import Wire

TICKER, TICKER_OUTPUT = ticker(150, 0.02)
LONG_TICKER, _ = ticker(1000, 0.02)


def _sleeps(d: Daemon, seconds: str, count: int) -> list[int] | None:
    """The PIDs of `count` `sleep <seconds>` processes of d's jobs, once there are as many."""
    found = marked_running(d.mark, "sleep", seconds)
    return found if len(found) == count else None


def _descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _idle(pid: int, quiet: float = 0.2) -> bool:
    """The process used no CPU for `quiet` seconds: it has nothing left to do."""
    process = psutil.Process(pid)
    before = sum(process.cpu_times()[:2])
    time.sleep(quiet)
    return sum(process.cpu_times()[:2]) == before


@contextlib.contextmanager
def _struck(pid: int, sig: int):
    """Send sig to pid; a process frozen by it and still there at the end is let go."""
    os.kill(pid, sig)
    try:
        yield time.monotonic()
    finally:
        if sig == signal.SIGSTOP and pid_running(pid):
            os.kill(pid, signal.SIGCONT)


STRIKES = pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill-9", "frozen"])


@STRIKES
@async_test(90)
async def test_dead_or_frozen_broker_jobs_finish_and_clients_get_everything(make_daemon, sig):
    """A frozen broker is killed by the watchdog; either way the next one
    takes the running jobs over."""
    d = make_daemon()
    [broker] = d.role_pids("broker")
    async with Client(d.url) as a, Client(d.url) as b, Client(d.url) as c:
        jobs = [await client.execute(TICKER) for client in (a, b, c)]
        await asyncio.gather(*(_first_output(job) for job in jobs))
        with _struck(broker, sig) as struck_at:
            results = await asyncio.gather(*(job.wait(60) for job in jobs))
            new_broker = wait_for(lambda: [pid for pid in d.role_pids("broker") if pid != broker], 15,
                                  what="a new broker")
            recovery = time.monotonic() - struck_at
            assert not pid_running(broker)
    assert new_broker != [broker]
    for result in results:
        assert result.reason == "exit" and result.exit_code == 0
        assert result.stdout == TICKER_OUTPUT
    print(f"broker {sig.name}: all three jobs completed {recovery:.2f} s after it")
    assert d.health()["status"] == "healthy"


@async_test(60)
async def test_request_that_reaches_a_new_broker_before_its_handler_registers_is_answered(make_daemon):
    d = make_daemon()
    [broker] = d.role_pids("broker")
    async with Client(d.url) as client:
        job = await client.execute("echo before")
        await job.wait(20)
        os.kill(broker, signal.SIGKILL)
        wait_for(lambda: d.role_pids("broker") not in ([], [broker]), 10, what="a respawned broker")
        record = await client.job_status(job.job_id)  # handlers register at their next heartbeat
    assert (record["state"], record["reason"]) == ("finished", "exit"), record


@async_test(90)
async def test_new_broker_dispatches_once_every_job_it_found_running_is_claimed(make_daemon):
    """A restarted broker holds new jobs back until the jobs its predecessor
    left are accounted for, lest it lose one still running; once they are
    all claimed there is nothing left to wait for."""
    d = make_daemon()
    [old_broker] = d.role_pids("broker")
    async with Client(d.url) as client:
        running = await client.execute(LONG_TICKER)
        await _first_output(running)
        os.kill(old_broker, signal.SIGKILL)
        [new_broker] = wait_for(lambda: [pid for pid in d.role_pids("broker") if pid != old_broker], 10,
                                what="a respawned broker")
        async with Client(d.url) as other:  # a connection's own jobs run one after another
            after = await other.execute("echo after")
            assert (await after.wait(20)).stdout == "after\n"
        record = await client.job_status(after.job_id)
        still_running = (await client.job_status(running.job_id))["state"]
        await running.control("CANCEL")
        await running.wait(20)
    assert still_running == "running"
    # Without the claims, the broker would settle SETTLE_TIME after it started.
    since_broker_start = record["started_at"] - psutil.Process(new_broker).create_time()
    assert since_broker_start < broker.SETTLE_TIME, f"the new job started {since_broker_start:.2f} s after the broker"


@async_test(60)
async def test_execute_whose_handler_dies_before_the_answer_is_sent_again_and_runs_once(make_daemon):
    """kill -9 of the handler after it passed an execute on and before it
    answered: the client cannot know whether the job was made. It sends the
    execute again, with the job_id it chose, and gets that job: none runs
    twice, none runs unknown to it."""
    d = make_daemon()
    [broker] = d.role_pids("broker")
    command = "echo once"
    async with Client(d.url) as client:
        [handler] = [pid for pid in d.role_pids("handler") if serves(pid, client)]
        with _struck(broker, signal.SIGSTOP):  # the answer waits for the broker
            executing = asyncio.ensure_future(client.execute(command))
            await client.ping()  # answered after the handler passed the execute on
            os.kill(handler, signal.SIGKILL)
            await asyncio.to_thread(wait_for, lambda: not pid_running(handler), 10, 0.05, "the handler's end")
        job = await executing
        result = await job.wait(20)
        records = [r for r in await client.jobs() if r["command"] == command]
    assert result.stdout == "once\n" and client.reconnects == 1
    assert [r["job_id"] for r in records] == [job.job_id]


@async_test(60)
async def test_job_that_starts_while_the_broker_restarts_is_recorded_and_told_as_started(make_daemon, tmp_path):
    """A job dispatched by a broker that dies before its STARTED: the next
    broker hears of the job only from its executor's READY. It records the
    start, and the client is told, as it would have been."""
    d = make_daemon(sections={"plugin:supervision": {"watchers_regex": "^(broker|handler)$"}})  # executors frozen at will
    executors, [broker] = d.role_pids("executor"), d.role_pids("broker")
    go = tmp_path / "go"
    async with Client(d.url) as client, Client(d.url) as observer:
        for pid in executors:
            os.kill(pid, signal.SIGSTOP)
        try:
            executing = asyncio.ensure_future(client.execute(f"echo begun; while [ ! -e {go} ]; do sleep 0.02; done"))
            # Dispatched, not recorded as started: the broker's heartbeat (each second) counts it running.
            await asyncio.to_thread(wait_for, lambda: d.health()["running_jobs"] == 1, 10, 0.05, "the dispatch")
            os.kill(broker, signal.SIGKILL)
            await asyncio.to_thread(wait_for, lambda: [p for p in d.role_pids("broker") if p != broker], 10, 0.05,
                                    "a new broker")
        finally:
            for pid in executors:
                os.kill(pid, signal.SIGCONT)
        job = await asyncio.wait_for(executing, 20)  # answered while the job runs, not once it ended
        deadline = time.monotonic() + 10
        while (record := await observer.job_status(job.job_id))["state"] != "running" or record["pid"] is None:
            assert time.monotonic() < deadline, f"never recorded as started: {record}"
            await asyncio.sleep(0.05)
        go.touch()
        told = [event["method"] async for event in job.events(timeout=20)]
        result = await job.wait()
    assert told.count("process.started") == 1 and told[-1] == "process.completed", told
    assert result.stdout == "begun\n" and result.exit_code == 0
    assert record["pid"] == result.completed["pid"]


@async_test(60)
async def test_request_the_broker_had_not_answered_when_it_hung_is_answered_by_the_next(make_daemon):
    """job.status and control wait for the broker's answer. A broker that
    hangs is killed by the watchdog and replaced; the handlers ask again."""
    d = make_daemon()
    [broker] = d.role_pids("broker")
    async with Client(d.url) as client:
        job = await client.execute("echo done")
        await job.wait(20)
        with _struck(broker, signal.SIGSTOP):
            record = await client.job_status(job.job_id)  # asked the hung broker; answered by the next
            assert not pid_running(broker)
    assert (record["state"], record["reason"]) == ("finished", "exit")


@async_test(60)
async def test_cancel_of_a_job_whose_executor_has_not_re_registered_waits_for_it(make_daemon):
    """Right after a broker restart a running job is known only from the
    job table until its executor re-registers: a CANCEL meanwhile is carried
    out once it has, not refused while the job runs on."""
    d = make_daemon(sections={"plugin:supervision": {"watchers_regex": "^(broker|handler)$"}})  # executors frozen at will
    executors, [old_broker] = d.role_pids("executor"), d.role_pids("broker")
    async with Client(d.url) as client:
        job = await client.execute("echo begun; sleep 30")
        await _first_output(job)
        for pid in executors:
            os.kill(pid, signal.SIGSTOP)
        try:
            os.kill(old_broker, signal.SIGKILL)
            await asyncio.to_thread(wait_for, lambda: [p for p in d.role_pids("broker") if p != old_broker], 10,
                                    0.05, "a new broker")
            canceling = asyncio.ensure_future(job.control("CANCEL"))
            await client.job_status(job.job_id)  # answered after the broker read the CANCEL, sent first
        finally:
            for pid in executors:
                os.kill(pid, signal.SIGCONT)
        answer = await canceling
        result = await job.wait(20)
    assert answer["status"] == "canceled"
    assert result.reason == "canceled" and result.stdout == "begun\n"


@async_test(60)
async def test_job_whose_client_left_while_the_broker_was_down_is_canceled_after_detach_grace(make_daemon):
    """The client's DETACH went to a broker that was gone: the next one
    learns who follows which job as handlers re-register, and counts down
    for the jobs nobody follows, as §6 says."""
    d = make_daemon(settings={"detach_grace": 1})
    [broker] = d.role_pids("broker")
    leaving = Client(d.url, resume=False)
    await leaving.connect()
    job = await leaving.execute("echo begun; sleep 30")
    await _first_output(job)
    os.kill(broker, signal.SIGKILL)
    await leaving.close()
    async with Client(d.url) as observer:
        record = await _finished_record(observer, job.job_id, 20)
    assert (record["reason"], record["error"]) == ("canceled", "canceled: its client went away")


@async_test(90)
async def test_completion_the_broker_cannot_record_is_recorded_by_the_next_broker(make_daemon, tmp_path):
    """A broker whose job table cannot be written (a full or failing disk,
    here a file size limit of one byte) exits, and the executor tells the
    next broker of the completion it was never acknowledged for."""
    d = make_daemon()
    [broker] = d.role_pids("broker")
    go = tmp_path / "go"
    os.mkfifo(go)
    async with Client(d.url) as client:
        job = await client.execute(f"read word < {go}; echo $word")
        limits = psutil.Process(broker)
        limits.rlimit(psutil.RLIMIT_FSIZE, (1, limits.rlimit(psutil.RLIMIT_FSIZE)[1]))
        with open(go, "w") as fifo:
            fifo.write("done\n")
        result = await job.wait(60)
        wait_for(lambda: d.role_pids("broker") not in ([], [broker]), 10, what="a respawned broker")
        record = await _finished_record(client, job.job_id)
    assert (result.reason, result.stdout) == ("exit", "done\n"), result.completed
    assert (record["state"], record["reason"], record["exit_code"]) == ("finished", "exit", 0), record


async def _finished_record(client: Client, job_id: str, timeout: float = 20) -> dict:
    """job.status once the job is recorded finished (a new broker learns it
    when the job's executor registers with it)."""
    deadline = time.monotonic() + timeout
    while (record := await client.job_status(job_id))["state"] != "finished":
        assert time.monotonic() < deadline, f"still {record['state']} after {timeout} s"
        await asyncio.sleep(0.05)
    return record


async def _first_output(job) -> None:
    async for event in job.events(timeout=20):
        if event["method"] == "process.output":
            return


@async_test(60)
async def test_job_whose_output_cannot_be_journaled_is_ended_and_says_so(make_daemon):
    d = make_daemon()
    jobs, moved = d.state_dir / "jobs", d.state_dir / "jobs.moved"
    async with Client(d.url) as client:
        before = await (await client.execute("echo before")).wait(20)
        jobs.rename(moved)
        jobs.write_text("")  # not a directory: no journal can be made, as on a full disk
        try:
            result = await (await client.execute("echo lost; sleep 30")).wait(20)
            with pytest.raises(RPCError) as unreadable:  # nor read
                await client.attach(before.job_id)
        finally:
            jobs.unlink()
            moved.rename(jobs)
        assert result.reason == "journal_failed" and result.status == "failed"
        assert result.exit_code in (-15, -9) and "journal" in result.completed["error"]
        assert result.stdout == "" and result.completed["stdout_bytes"] == 0
        assert unreadable.value.code == -32006 and unreadable.value.data == {"job_id": before.job_id}
        again = await client.execute("echo kept")
        assert (await again.wait(20)).stdout == "kept\n"
    assert "job.journal_failed" in d.log_path.read_text()


@STRIKES
@async_test(90)
async def test_dead_or_frozen_executor_jobs_end_lost_and_leave_no_orphans(make_daemon, sig):
    d = make_daemon()
    async with Client(d.url) as client:
        # Two sleeps in the job's group, one that left it with no pipe of the
        # job's (a daemon: neither the group nor the pipes lead to it), and
        # one that also cleared its environment (nor does the job's id).
        job = await client.execute(f"echo started; ({detached_sleep('100')}); ({detached_sleep('101', True)}); "
                                   "sleep 100 & sleep 100 & wait")
        await _first_output(job)  # journaled by now
        tree = [job.pid, *wait_for(lambda: _sleeps(d, "100", 3), 10, what="the job's three sleeps")]
        cleared = wait_for(lambda: marked_running(d.mark, "sleep", "101"), 10, what="the job's cleared daemon")
        executor = psutil.Process(job.pid).ppid()
        assert executor in d.role_pids("executor")
        with _struck(executor, sig) as struck_at:
            result = await job.wait(30)
            ended_after = time.monotonic() - struck_at
            assert result.reason == "lost" and result.status == "failed"
            assert result.stdout == "started\n"
            assert (await client.job_status(job.job_id))["stdout_bytes"] == len("started\n")  # as the journal has it
            # Circus tells the broker of a death. A frozen executor falls
            # silent, and the watchdog kills it after about as long as the
            # broker's heartbeat timeout: either may be heard first.
            causes = {"exit code -9"} if sig == signal.SIGKILL else {"heartbeat timeout", "exit code -9"}
            assert result.completed["error"] in {f"the executor running this job died ({cause})" for cause in causes}
            wait_for(lambda: not any(pid_running(p) for p in tree), 5, what="the job's tree to be gone")
            wait_for(lambda: executor not in d.role_pids("executor") and len(d.role_pids("executor")) == 2, 15,
                     what="a new executor in its place")
            # The arbiter adopts what the dead executor had adopted, and ends it.
            wait_for(lambda: not any(pid_running(p) for p in cleared), 10, what="the cleared daemon to be gone")
        again = await client.execute("echo still serving")
        assert (await again.wait(20)).stdout == "still serving\n"
    print(f"executor {sig.name}: job ended lost {ended_after:.2f} s after it")


@async_test(60)
async def test_an_executor_dead_before_circus_reaps_it_is_told_by_its_exit_code(make_daemon):
    """An arbiter starved of CPU (here stopped) reaps late, after the
    heartbeat timeout. An executor that fell silent because
    it died is waited for (bounded), so its jobs end saying how it died."""
    d = make_daemon()
    async with Client(d.url) as client:
        job = await client.execute("echo started; sleep 100")
        await _first_output(job)
        executor = psutil.Process(job.pid).ppid()
        with _struck(d.proc.pid, signal.SIGSTOP):  # the arbiter: it reaps nothing meanwhile
            os.kill(executor, signal.SIGKILL)
            await asyncio.to_thread(wait_for, lambda: "executor.awaiting_reap" in d.log_path.read_text(), 15, 0.05,
                                    "the broker waiting for the executor's reap")
        result = await job.wait(30)
    assert result.reason == "lost"
    assert result.completed["error"] == "the executor running this job died (exit code -9)"


@async_test(60)
async def test_a_dead_executor_is_reaped_and_replaced_when_it_dies_not_at_circus_next_check(make_daemon):
    """The arbiter looks at its watchers on SIGCHLD, not only once per
    check_delay (here far longer than any wait below): the broker hears the
    exit code, and a new executor starts, at once."""
    d = make_daemon(sections={"circus": {"check_delay": "300"}})
    async with Client(d.url) as client:
        job = await client.execute("echo started; sleep 100")
        await _first_output(job)
        executor = psutil.Process(job.pid).ppid()
        os.kill(executor, signal.SIGKILL)
        result = await job.wait(30)
        # Without the reap, the broker gives up the silent executor after its
        # heartbeat timeout and the reap wait, and cannot say how it died.
        assert result.completed["error"] == "the executor running this job died (exit code -9)"
        wait_for(lambda: executor not in d.role_pids("executor") and len(d.role_pids("executor")) == 2, 15,
                 what="a new executor in its place")
        again = await client.execute("echo still serving")
        assert (await again.wait(20)).stdout == "still serving\n"


async def _until_last_line(job, line: str, timeout: float) -> None:
    """Until the job's output ends with `line`. The job sleeps on after it,
    so no later output or end of the job can be what brings it."""
    try:
        async for _ in job.events(timeout=timeout):
            if job.stdout and job.stdout[-1] == line:
                return
    except TimeoutError:
        pytest.fail(f"{line!r} did not come: {sum(map(len, job.stdout))} characters did, then none for {timeout} s")


@pytest.mark.parametrize("behind", ["handler", "broker"])
@async_test(60)
async def test_output_a_process_fell_behind_on_reaches_its_client_while_the_job_is_silent(make_daemon, behind):
    """Live copies of output the next process cannot take in time are dropped
    (the journal has them). The last of them, before a long silence, still
    reaches the client within seconds, not only when the job ends."""
    d = make_daemon(handlers=1)
    [frozen] = d.role_pids(behind)
    go = d.workdir / "go"
    width, lines = 60_000, 500  # 30 MB: far past what the queues between the processes hold
    expected = "begun\n" + ("x" * width + "\n") * lines + "TAIL\n"
    command = (f"echo begun; while [ ! -e {go} ]; do sleep 0.05; done; "
               f"head -c {width * lines} /dev/zero | tr '\\0' x | fold -w {width}; echo; echo TAIL; sleep 60")
    async with Client(d.url) as client:
        job = await client.execute(command)  # lines mode: no partial line is held, to be flushed after a pause
        await _first_output(job)
        # What sends to the frozen process: the broker to a handler, an executor to the broker.
        [sender] = d.role_pids("broker") if behind == "handler" else [psutil.Process(job.pid).ppid()]
        journal = d.state_dir / "jobs" / job.job_id / "stdout"
        with _struck(frozen, signal.SIGSTOP):  # it takes nothing while the burst is written
            go.touch()
            wait_for(lambda: journal.stat().st_size == len(expected), 10, what="the burst journaled")
            wait_for(lambda: _idle(sender), 10, what="the burst sent (or dropped) on the way")
        await _until_last_line(job, "TAIL\n", 10)
        assert "".join(job.stdout) == expected
        await job.control("cancel")


@async_test(60)
async def test_output_written_while_the_broker_was_down_reaches_its_client_while_the_job_is_silent(make_daemon):
    """A line the job writes while no broker hears it (frozen, then killed:
    what was queued for it dies with it) is in the journal; once the broker
    is back, the client gets it within seconds, not when the job next writes."""
    d = make_daemon()
    go = d.workdir / "go"
    command = f"echo begun; while [ ! -e {go} ]; do sleep 0.05; done; echo meanwhile; sleep 60"
    async with Client(d.url) as client:
        job = await client.execute(command)
        await _first_output(job)
        journal = d.state_dir / "jobs" / job.job_id / "stdout"
        [broker] = d.role_pids("broker")
        os.kill(broker, signal.SIGSTOP)
        go.touch()
        wait_for(lambda: journal.read_text() == "begun\nmeanwhile\n", 10, what="the line journaled")
        os.kill(broker, signal.SIGKILL)
        await _until_last_line(job, "meanwhile\n", 15)
        assert "".join(job.stdout) == "begun\nmeanwhile\n"
        await job.control("cancel")


@async_test(60)
async def test_an_executor_the_watchdog_killed_is_not_waited_for(make_daemon):
    """Circus reaps a process its watchdog kills without a word (its kill
    polls the process), so no exit code will come: the broker, frozen until
    then, gives the executor up at once instead of waiting for one."""
    d = make_daemon(sections={"plugin:supervision": {"watchers_regex": "^executor$"}})  # the broker is not killed
    [broker_pid] = d.role_pids("broker")
    async with Client(d.url) as client:
        job = await client.execute("echo started; sleep 100")
        await _first_output(job)
        executor = psutil.Process(job.pid).ppid()
        with _struck(broker_pid, signal.SIGSTOP), _struck(executor, signal.SIGSTOP):
            await asyncio.to_thread(wait_for, lambda: not psutil.pid_exists(executor), 15, 0.05,
                                    "the watchdog's kill of the frozen executor")
        result = await job.wait(30)
    assert result.reason == "lost"
    assert result.completed["error"] in {f"the executor running this job died ({cause})"
                                         for cause in ("heartbeat timeout", "exit code -9")}
    assert "executor.awaiting_reap" not in d.log_path.read_text()


@STRIKES
@async_test(90)
async def test_control_of_a_job_whose_executor_died_or_froze_is_answered_with_why(make_daemon, sig):
    """The CANCEL goes to an executor that will never answer it: the client
    hears why once the executor is known to be gone, not a timeout."""
    d = make_daemon()
    async with Client(d.url) as client:
        job = await client.execute("echo started; sleep 100")
        await _first_output(job)
        executor = psutil.Process(job.pid).ppid()
        with _struck(executor, sig):
            with pytest.raises(RPCError) as refused:
                await job.control("CANCEL")
            assert refused.value.code == -32002, refused.value
            assert "not running" in refused.value.message
            assert (await job.wait(30)).reason == "lost"


@async_test(90)
async def test_stopping_executor_takes_no_new_job_and_the_queue_waits_for_the_next(make_daemon):
    """SIGTERM to an executor (`restart --watcher executor`): its running job
    ends canceled; a job queued behind it is not handed to the stopping
    executor, but runs on the one started in its place."""
    d = make_daemon(executors=1, settings={"slots_per_executor": 1})
    async with Client(d.url) as client:
        running = await client.execute("sleep 30", parallel=True)
        queued = await client.execute("echo next", parallel=True)
        assert running.pid is not None and queued.pid is None
        [executor] = d.role_pids("executor")
        os.kill(executor, signal.SIGTERM)
        first, second = await running.wait(30), await queued.wait(30)
    assert first.reason == "canceled"
    assert (second.reason, second.stdout) == ("exit", "next\n"), second.completed


@async_test(60)
async def test_cancel_that_reaches_the_executor_with_the_dispatch_still_cancels(make_daemon):
    """A queued job canceled just as a slot frees for it: the broker passes
    the CANCEL on right behind the DISPATCH, and the job still ends canceled
    (frozen broker: both wait in its queue, then go out back to back)."""
    d = make_daemon(executors=1, settings={"slots_per_executor": 1})
    [broker], [executor] = d.role_pids("broker"), d.role_pids("executor")
    wire = await Wire.open(d.url)
    first = await wire.execute(command="echo started; exec sleep 30", parallel=True)
    second = await wire.execute(command="exec sleep 30", parallel=True)
    assert second["status"] == "queued"
    journal = str(d.state_dir / "jobs" / first["job_id"] / "stdout")
    await asyncio.to_thread(wait_for, lambda: journal in [f.path for f in psutil.Process(executor).open_files()],
                            5, 0.01, "the first job's journal")
    os.kill(broker, signal.SIGSTOP)
    try:
        os.kill(first["pid"], signal.SIGTERM)  # its end is told to the frozen broker: a slot frees there
        await asyncio.to_thread(wait_for, lambda: journal not in [f.path for f in psutil.Process(executor).open_files()],
                                5, 0.01, "the executor to be done with the first job")
        cancel = await wire.request("control", {"type": "CANCEL", "job_id": second["job_id"]})
        await wire.answer(await wire.request("ping"))  # the handler has passed the CANCEL on
    finally:
        os.kill(broker, signal.SIGCONT)
    answer = await wire.answer(cancel)
    assert answer.get("result", {}).get("status") == "canceled", answer
    assert (await wire.completed(second["job_id"], 20))["reason"] == "canceled"
    await wire.close()


def test_killed_arbiter_new_daemon_takes_over_port_and_orphans(tmp_path):
    """kill -9 of ccexecd itself: a new ccexecd on the same port and state
    directory starts by itself, ending the old processes and their jobs."""
    old = Daemon(tmp_path)
    new = None
    try:
        old.start()
        job = asyncio.run(_start_detached(old.url, f"echo started; ({detached_sleep('300')}); sleep 300 & sleep 300 & wait"))
        tree = [job["pid"], *wait_for(lambda: _sleeps(old, "300", 3), 10, what="the job's three sleeps")]
        orphans = old.processes()
        old.proc.send_signal(signal.SIGKILL)
        old.proc.wait(10)
        assert all(pid_running(p.pid) for p in orphans if p.pid not in tree)  # handlers still hold the port
        new = Daemon(tmp_path)
        new.port = old.port
        started = time.monotonic()
        new.start(timeout=20)
        takeover = time.monotonic() - started
        assert not [p.pid for p in orphans if pid_running(p.pid)], "old processes survived the takeover"
        assert not [p.pid for p in tree if pid_running(p)]
        assert not marked_processes(old.mark)
        record = asyncio.run(_job_status(new.url, job["job_id"]))
        assert record["state"] == "finished" and record["reason"] in ("canceled", "lost")
        assert record["stdout_bytes"] == len("started\n")
        print(f"arbiter kill -9: new ccexecd ready {takeover:.2f} s after it was started")
    finally:
        for daemon in (new, old):
            if daemon is not None:
                daemon.stop()
                daemon.cleanup()


async def _start_detached(url: str, command: str) -> dict:
    async with Client(url) as client:
        job = await client.execute(command, detach=True)
        return {"job_id": job.job_id, "pid": job.pid}


async def _job_status(url: str, job_id: str) -> dict:
    async with Client(url) as client:
        return await client.job_status(job_id)


@async_test(60)
async def test_stopped_handler_is_killed_and_respawned_while_service_answers(make_daemon):
    d = make_daemon()
    victim = d.role_pids("handler")[0]
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        async with Client(d.url) as client:  # the other handler takes new connections
            result = await (await client.execute("echo served")).wait(20)
        assert result.stdout == "served\n"
        await asyncio.to_thread(wait_for, lambda: not pid_running(victim), 15, 0.1, "the watchdog's kill")
        killed_after = time.monotonic() - stopped_at
        await asyncio.to_thread(wait_for, lambda: len(d.role_pids("handler")) == 2, 10, 0.1, "a new handler")
    finally:
        if pid_running(victim):
            os.kill(victim, signal.SIGCONT)
    assert killed_after < 8, f"frozen handler killed only after {killed_after:.1f} s"
    print(f"SIGSTOP of a handler: killed by the watchdog after {killed_after:.2f} s")


@async_test(90)
async def test_handler_started_while_the_broker_is_down_still_serves_and_says_why(make_daemon):
    """A handler takes connections once the broker has answered it, but with
    the broker down it does not wait for ever: /ready then says why."""
    d = make_daemon(handlers=1)
    circus = ctl.Daemon(None, str(d.state_dir))
    await asyncio.to_thread(circus.call, "stop", name="broker", waiting=True)
    [handler] = d.role_pids("handler")
    os.kill(handler, signal.SIGKILL)
    [respawned] = await asyncio.to_thread(
        wait_for, lambda: [p for p in d.role_pids("handler") if p != handler], 10, 0.05, "a respawned handler")
    status, body = await asyncio.to_thread(d.get, "/ready", 15)  # held in the backlog until it serves
    assert status == 503 and json.loads(body)["reason"] == "broker unreachable"
    assert d.health()["handler_pid"] == respawned
    await asyncio.to_thread(circus.call, "start", name="broker", waiting=True)
    await asyncio.to_thread(d.wait_ready, 20)
    async with Client(d.url) as client:
        result = await (await client.execute("echo back")).wait(20)
    assert result.stdout == "back\n"


@async_test(60)
async def test_stopping_handler_completes_a_handshake_whose_request_comes_late(make_daemon):
    """A handler told to stop accepts no more connections but lets the
    handshakes it accepted finish, even one whose request comes late, then
    moves that client on with 1012 like every other."""
    d = make_daemon(handlers=1)
    [handler] = d.role_pids("handler")
    reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
    client_port = writer.get_extra_info("sockname")[1]
    await asyncio.to_thread(wait_for, lambda: _holds_connection_from(handler, client_port), 10, 0.05,
                            "the handler's accept")
    os.kill(handler, signal.SIGTERM)
    await asyncio.to_thread(wait_for, lambda: "handler.stopping" in d.log_path.read_text(errors="replace"),
                            10, 0.05, "the handler stopping")
    await asyncio.sleep(0.6)  # a slow client: its request comes well after the stop began
    writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    close_frame = b"\x88\x11\x03\xf4service restart"  # 1012, "service restart"
    answer = b""
    async with asyncio.timeout(15):
        while close_frame not in answer and (chunk := await reader.read(65536)):
            answer += chunk
    writer.close()
    assert answer.startswith(b"HTTP/1.1 101 "), answer[:200]
    assert b'"method":"connected"' in answer.replace(b" ", b"")
    assert close_frame in answer


def _holds_connection_from(pid: int, port: int) -> bool:
    return any(c.raddr and c.raddr.port == port for c in psutil.Process(pid).net_connections(kind="tcp"))


@async_test(240)
async def test_client_that_stops_reading_costs_no_memory_and_loses_nothing(make_daemon):
    """1 GiB of output to a client that does not read: it waits in the journal."""
    d = make_daemon()
    line = "0" * 999 + "\n"
    size = 1 << 30
    command = f"yes {'0' * 999} | head -c {size}"
    watched = {f"{role} {pid}": psutil.Process(pid) for role in ("handler", "broker", "executor")
               for pid in d.role_pids(role)}
    baseline = {name: p.memory_info().rss for name, p in watched.items()}
    async with websockets.connect(d.url, max_size=None, max_queue=4) as slow:
        await slow.send(json.dumps({"jsonrpc": "2.0", "method": "execute", "id": 1,
                                    "params": {"command": command, "stream_mode": "chunks"}}))
        # Not reading now. Watch memory until the job has written everything.
        peak, peaks = sum(baseline.values()), dict(baseline)
        job_done = False
        deadline = time.monotonic() + 180
        async with Client(d.url) as other:
            while not job_done and time.monotonic() < deadline:
                now = {name: p.memory_info().rss for name, p in watched.items()}
                peak = max(peak, sum(now.values()))
                peaks = {name: max(peaks[name], rss) for name, rss in now.items()}
                records = await other.jobs(state="finished", limit=5)
                job_done = any(r["command"] == command for r in records)
                await asyncio.sleep(0.2)
            # Another client is served meanwhile.
            assert (await (await other.execute("echo unaffected")).wait(20)).stdout == "unaffected\n"
        assert job_done, "the job did not finish writing within 180 s"
        growth = (peak - sum(baseline.values())) / 2**20
        each = ", ".join(f"{name} +{(peaks[name] - baseline[name]) / 2**20:.0f}" for name in watched)
        print(f"slow client, 1 GiB: handler+broker+executor RSS {sum(baseline.values()) / 2**20:.0f} MiB -> peak "
              f"{peak / 2**20:.0f} MiB (+{growth:.0f} MiB; each's own peak, MiB: {each})")
        assert growth < 100, f"+{growth:.0f} MiB at the peak; each's own peak, MiB: {each}"
        # Now read: every byte arrives, in order.
        digest, received = hashlib.sha256(), 0
        while True:
            message = json.loads(await asyncio.wait_for(slow.recv(), 30))
            if message.get("method") == "process.output":
                assert message["params"]["offset"] == received
                data = message["params"]["data"].encode()
                digest.update(data)
                received += len(data)
            elif message.get("method") == "process.completed":
                assert message["params"]["stdout_bytes"] == size
                break
    expected = hashlib.sha256()
    block = (line * 1024).encode()
    for _ in range(size // len(block)):
        expected.update(block)
    expected.update((line * 1024).encode()[: size % len(block)])
    assert received == size and digest.hexdigest() == expected.hexdigest()


def test_crash_loop_is_stopped_and_shows_in_status(make_daemon):
    """Circus's flapping protection: an executor that dies at once, again and
    again, is stopped, and `ccexecctl status` says so; the service says why."""
    d = make_daemon(start=False, sections={"watcher:executor": {"cmd": "/bin/false"}})
    d.log = open(d.log_path, "ab")
    d.proc = subprocess.Popen(d.command(), env=d.env, cwd=d.tmp, stdout=d.log, stderr=subprocess.STDOUT)
    ctl = [str(Path(sys.executable).parent / "ccexecctl"), "--state-dir", str(d.state_dir), "--json", "status"]

    def executor_stopped() -> bool:
        status = subprocess.run(ctl, capture_output=True, text=True, timeout=30)
        try:
            rows = json.loads(status.stdout)["processes"]
        except (ValueError, KeyError):
            return False
        return {r["status"] for r in rows if r["watcher"] == "executor"} == {"stopped"} and status.returncode == 1

    wait_for(executor_stopped, 30, 0.2, "the flapping executor watcher to be stopped")
    status, body, _ = http_get(d.port, "/ready")
    assert status == 503 and json.loads(body)["reason"] == "no executor ready"


# What init (or systemd) does for orphans, which the PID 1 of a container may not:
# reap them. ccexecd runs as its child; whatever is orphaned below it is reaped here.
REAPER = """
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
child = os.fork()
if child == 0:
    os.execv(sys.argv[1], sys.argv[1:])
exited = None
def on_term(sig, frame):
    if exited is None:
        os.kill(child, sig)
    else:
        os._exit(0)
signal.signal(signal.SIGTERM, on_term)
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        signal.pause()
        continue
    if pid == child:
        exited = os.waitstatus_to_exitcode(status)
        if exited >= 0:
            os._exit(exited)
"""


def test_group_of_a_job_whose_leader_exited_meanwhile_is_ended_by_the_next_daemon(tmp_path):
    """Every ccexec process killed with SIGKILL (e.g. `kill -9 -- -PGID`); the
    job's leader exits before the next start, its background child runs on."""
    old = Daemon(tmp_path)
    old.command = lambda: [sys.executable, "-c", REAPER, *Daemon.command(old)]

    def ready() -> bool:  # ccexecd is not old.proc itself here
        if old.proc.poll() is not None:
            raise RuntimeError(f"ccexecd exited with {old.proc.returncode}:\n{old.log_tail()}")
        try:
            return http_get(old.port, "/ready", timeout=2)[0] == 200
        except OSError:
            return False
    old.ready = ready
    new = child = None
    try:
        old.start()
        job = asyncio.run(_start_detached(old.url, "sleep 300 & exec sleep 300"))
        child = wait_for(lambda: _descendants(job["pid"]) or None, 10, what="the job's child")[0]
        arbiter = psutil.Process(old.proc.pid).children()[0]
        ours = [arbiter, *(p for p in arbiter.children() if p.pid != job["pid"])]
        for proc in ours:
            proc.kill()
        wait_for(lambda: not any(pid_running(p.pid) for p in ours), 10, what="every ccexec process gone")
        os.kill(job["pid"], signal.SIGTERM)  # the leader ends; its child is left in the group
        wait_for(lambda: not psutil.pid_exists(job["pid"]), 10, what="the leader exited and reaped")
        assert pid_running(child)
        new = Daemon(tmp_path)
        new.port = old.port
        new.start(timeout=20)
        wait_for(lambda: not pid_running(child), 10, what="the job's child to be ended")
        record = asyncio.run(_job_status(new.url, job["job_id"]))
        assert record["state"] == "finished" and record["reason"] == "lost"
    finally:
        for daemon in (new, old):
            if daemon is not None:
                daemon.stop()
                daemon.cleanup()
        if child is not None and pid_running(child):  # jobs do not inherit the daemon's mark
            os.kill(child, signal.SIGKILL)


@async_test(60)
async def test_cancel_whose_answer_and_job_end_reach_the_handler_together_keeps_their_order(make_daemon):
    """CANCEL of a running job whose end reaches the handler right behind the
    control's answer (frozen handler: both wait in its queue, then come in
    back to back): result, process.canceled, process.completed, in that order."""
    d = make_daemon(handlers=1, executors=1)
    [handler], [executor] = d.role_pids("handler"), d.role_pids("executor")
    wire = await Wire.open(d.url)
    job_id = (await wire.execute(command="exec sleep 30"))["job_id"]
    await wire.until(lambda m: m.get("method") == "process.started", 10)
    os.kill(executor, signal.SIGSTOP)  # the CANCEL waits there until the handler is frozen
    try:
        cancel = await wire.request("control", {"type": "CANCEL", "job_id": job_id})
        for _ in range(2):  # the second one waited for its frame: the handler has passed the CANCEL on
            await wire.answer(await wire.request("ping"))
        os.kill(handler, signal.SIGSTOP)
    finally:
        os.kill(executor, signal.SIGCONT)
    try:
        await asyncio.to_thread(wait_for, lambda: f"job.finished job_id={job_id}" in d.log_path.read_text(),
                                2, 0.01, "the job's end")
    finally:
        os.kill(handler, signal.SIGCONT)
    await wire.answer(cancel)
    await wire.completed(job_id, 20)
    await wire.answer(await wire.request("ping"))
    told = [m.get("method") or ("result" if m.get("id") == cancel else None) for m in wire.messages
            if m.get("id") == cancel or m.get("method") in ("process.canceled", "process.completed")]
    assert told == ["result", "process.canceled", "process.completed"], told
    await wire.close()
