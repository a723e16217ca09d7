"""Jobs end to end: output exactness, execution semantics, sequencing, queueing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import signal
import sys
import time
import uuid

import psutil
import pytest

from ccexec.client import Client, RPCError, run as run_sync
from ccexec.executor import Executor, PipeReader
from ccexec.protocol import MAX_ARG_BYTES
from support import async_test, detached_sleep, marked_running, pid_running, wait_for
from wire import Wire

PY = sys.executable

# ------------------------------------------------------------------ output


def _assert_contiguous(outputs: list[dict]) -> None:
    offset = 0
    for piece in outputs:
        assert piece["offset"] == offset
        offset += piece["size"]


@async_test(120)
async def test_eight_mib_line_arrives_byte_exact_in_64k_chunks(daemon):
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(120, command=f"{PY} -c \"import sys; sys.stdout.write('x' * (8 << 20) + chr(10))\"")
    outputs = wire.outputs(completed["job_id"])
    assert wire.text(completed["job_id"]) == "x" * (8 << 20) + "\n"
    assert [p["chunk_index"] for p in outputs] == list(range(129))
    assert all(len(p["data"]) <= 65536 for p in outputs)
    assert all(p["truncated"] for p in outputs[:-1]) and not outputs[-1]["truncated"]
    _assert_contiguous(outputs)
    assert completed["stdout_bytes"] == (8 << 20) + 1
    await wire.close()


def _random_base64_lines(seed: int, raw_bytes: int, width: int) -> str:
    text = base64.b64encode(random.Random(seed).randbytes(raw_bytes)).decode()
    return "".join(text[i:i + width] + "\n" for i in range(0, len(text), width))


GENERATOR = (f"{PY} -c \"import base64, random, sys; "
             "text = base64.b64encode(random.Random({seed}).randbytes({raw})).decode(); "
             "[sys.stdout.write(text[i:i + {width}] + chr(10)) for i in range(0, len(text), {width})]\"")


@pytest.mark.parametrize("mode, width", [("lines", 4096), ("chunks", 76)])
@async_test(240)
async def test_64_mib_of_output_arrives_byte_exact(daemon, mode, width):
    raw = 48 << 20  # base64 makes 64 MiB of it
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(240, command=GENERATOR.format(seed=7, raw=raw, width=width), stream_mode=mode)
    outputs = wire.outputs(completed["job_id"])
    expected = _random_base64_lines(7, raw, width)
    received = "".join(p["data"] for p in outputs)
    assert len(received) == len(expected) and hashlib.sha256(received.encode()).digest() == \
        hashlib.sha256(expected.encode()).digest()
    _assert_contiguous(outputs)
    if mode == "chunks":
        assert max(p["size"] for p in outputs) <= 65536 and all(p["data"].endswith("\n") for p in outputs)
    else:
        assert all(p["data"].endswith("\n") and len(p["data"]) == width + 1 for p in outputs[:-1])
    await wire.close()


@async_test()
async def test_multibyte_characters_are_never_split(daemon):
    wire = await Wire.open(daemon.url)
    line = "é€😀" * 30000
    _, completed = await wire.run(command=f"{PY} -c \"print('é€😀' * 30000)\"")
    outputs = wire.outputs(completed["job_id"])
    assert wire.text(completed["job_id"]) == line + "\n"
    assert sum(p["size"] for p in outputs) == len((line + "\n").encode())
    _assert_contiguous(outputs)
    assert len(outputs) > 1 and all(len(p["data"]) <= 65536 for p in outputs)
    await wire.close()


@async_test()
async def test_last_line_without_newline_is_delivered(daemon):
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(command="printf 'a\\nb'")
    assert [p["data"] for p in wire.outputs(completed["job_id"])] == ["a\n", "b"]
    await wire.close()


@async_test()
async def test_chunks_mode_sends_a_partial_line_when_the_job_pauses(daemon):
    """A job that stops mid-line for a second: what it wrote goes out then,
    not held until the line ends."""
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(command="printf partial; sleep 1; printf ' rest\\n'", stream_mode="chunks")
    assert [p["data"] for p in wire.outputs(completed["job_id"])] == ["partial", " rest\n"]
    await wire.close()


@async_test(60)
async def test_full_pipes_on_both_streams_never_deadlock(daemon):
    script = ("import sys\nfor i in range(64):\n    sys.stderr.write('e' * 65536)\n    sys.stdout.write('o' * 65536)\n"
              "    sys.stderr.flush(); sys.stdout.flush()")
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(60, argv=[PY, "-c", script], stream_mode="chunks")
    assert (completed["stdout_bytes"], completed["stderr_bytes"]) == (4 << 20, 4 << 20)
    assert wire.text(completed["job_id"]) == "o" * (4 << 20)
    assert wire.text(completed["job_id"], "stderr") == "e" * (4 << 20)
    await wire.close()


# ------------------------------------------------------------------ semantics


@async_test()
async def test_unknown_command_exits_127_not_an_error(daemon):
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(command="no_such_command_anywhere")
    assert (completed["exit_code"], completed["reason"], completed["status"]) == (127, "exit", "failed")
    await wire.close()


@async_test()
async def test_death_by_signal_is_minus_n_with_reason_signal(daemon):
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(command="kill -USR1 $$")
    assert (completed["exit_code"], completed["reason"]) == (-signal.SIGUSR1, "signal")
    await wire.close()


@async_test()
async def test_stdin_is_dev_null_by_default_and_a_string_when_given(daemon):
    wire = await Wire.open(daemon.url)
    _, empty = await wire.run(command="cat; echo end")
    assert wire.text(empty["job_id"]) == "end\n"
    _, fed = await wire.run(command="cat", stdin="line one\nline two\n")
    assert wire.text(fed["job_id"]) == "line one\nline two\n"
    await wire.close()


@async_test()
async def test_environment_policy(make_daemon):
    d = make_daemon(env={"ANTHROPIC_API_KEY": "secret", "DAEMON_VAR": "kept"})
    wire = await Wire.open(d.url)
    show = f"{PY} -c \"import os; print([os.environ.get(k) for k in ('ANTHROPIC_API_KEY', 'DAEMON_VAR', 'PYTHONUNBUFFERED', 'MINE')])\""
    _, completed = await wire.run(command=show, env={"MINE": "yes", "ANTHROPIC_API_KEY": "from-client"})
    assert wire.text(completed["job_id"]) == "[None, 'kept', '1', 'yes']\n"
    await wire.close()


# The job's nice and its executor's (field 19 of stat; $PPID is the
# executor), then the nice of each one's autogroup, where the kernel has them.
# Started before it reads its stdin, which the executor feeds only once the
# priority is set: the child may have been forked before that or after.
SHOW_PRIORITY = ('sleep 30 >/dev/null 2>&1 & read go;'
                 ' echo $(cut -d" " -f19 /proc/$PPID/stat /proc/$$/stat /proc/$!/stat);'
                 ' echo $(cut -s -d" " -f3 /proc/$PPID/autogroup /proc/$$/autogroup 2>/dev/null); kill $!')


@async_test()
async def test_job_nice_lowers_the_priority_of_the_job_and_its_session(make_daemon):
    d = make_daemon(settings={"job_nice": 5})
    wire = await Wire.open(d.url)
    _, completed = await wire.run(command=SHOW_PRIORITY, stdin="go\n")
    nices, groups = (list(map(int, line.split())) for line in wire.text(completed["job_id"]).split("\n")[:2])
    executor, *job = nices
    assert job == [min(19, executor + 5)] * 2  # the shell and the child it started at once
    if groups:
        executor_group, job_group = groups
        assert job_group == min(19, executor_group + 5)
    await wire.close()


@async_test()
async def test_working_directory_default_and_cwd_param(daemon, tmp_path):
    wire = await Wire.open(daemon.url)
    _, default = await wire.run(command="pwd")
    assert wire.text(default["job_id"]) == f"{daemon.workdir}\n"
    _, chosen = await wire.run(command="pwd", cwd=str(tmp_path))
    assert wire.text(chosen["job_id"]) == f"{tmp_path}\n"
    await wire.close()


@async_test()
async def test_missing_cwd_is_rejected_with_a_completed_message(daemon, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    wire = await Wire.open(daemon.url)
    result, completed = await wire.run(command="pwd", cwd="/does/not/exist")
    assert result["status"] == "rejected" and result["pid"] is None
    assert (completed["reason"], completed["status"]) == ("rejected", "failed")
    assert "/does/not/exist" in completed["error"]
    _, not_a_dir = await wire.run(command="pwd", cwd=str(a_file))
    assert not_a_dir["reason"] == "rejected" and str(a_file) in not_a_dir["error"]
    await wire.close()


@pytest.mark.parametrize("error, program, outcome", [
    (PermissionError(13, "Permission denied", "/srv/w"), "/bin/sh",
     (126, "rejected", "working directory cannot be entered: /srv/w (Permission denied)")),
    (FileNotFoundError(2, "No such file or directory", "/srv/w"), "/bin/sh",
     (126, "rejected", "working directory does not exist: /srv/w")),
    (FileNotFoundError(2, "No such file or directory", "nosuch"), "nosuch", (127, "exit", "command not found: nosuch")),
    (PermissionError(13, "Permission denied", "/srv/w"), "/srv/w", (126, "exit", "permission denied: /srv/w")),
])
def test_a_failed_spawn_blames_the_working_directory_or_the_program(error, program, outcome):
    """subprocess names the directory when the child's chdir failed, the program when its exec did."""
    assert Executor.spawn_failure(error, program, "/srv/w") == outcome


@async_test()
async def test_argv_runs_without_a_shell(daemon):
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(argv=["printf", "%s|%s", "$HOME", "a b"])
    assert wire.text(completed["job_id"]) == "$HOME|a b"
    _, missing = await wire.run(argv=["no_such_program_anywhere"])
    assert (missing["exit_code"], missing["reason"]) == (127, "exit")
    await wire.close()


@async_test(90)
async def test_a_string_longer_than_one_exec_argument_is_invalid_params_and_disturbs_no_job(daemon):
    wire = await Wire.open(daemon.url)
    others = [await wire.execute(command="sleep 4; echo done", parallel=True) for _ in range(4)]
    limit = MAX_ARG_BYTES
    _, longest = await wire.run(command="true #" + "a" * (limit - 6), parallel=True)
    assert (longest["exit_code"], longest["reason"]) == (0, "exit")
    too_long = "true #" + "\u00e9" * ((limit - 6) // 2 + 1)  # UTF-8 bytes count, not characters
    huge = "true " + "a " * (4_500_000)  # 9 MB: within max_frame_bytes
    for params, param in (({"command": too_long}, "command"), ({"command": huge}, "command"),
                          ({"argv": ["echo", "a" * (limit + 1)]}, "argv")):
        answer = await wire.answer(await wire.request("execute", {**params, "parallel": True}), 30)
        assert answer["error"]["code"] == -32602 and answer["error"]["data"] == {"param": param}
    for result in others:  # their executors were never held up
        completed = await wire.completed(result["job_id"], 30)
        assert (completed["reason"], wire.text(result["job_id"])) == ("exit", "done\n"), completed
    await wire.close()


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if pid_running(pid)]


def _gone(pids: list[int]) -> None:
    """Wait until none of pids runs. A killed process has closed its pipes
    (so its job could end) a moment before it is seen exited."""
    wait_for(lambda: not _alive(pids), 5, what="the job's processes to end")


def _tree(pid: int, count: int) -> list[int]:
    """The pids of a job's process tree, once it has `count` descendants."""
    def found():
        try:
            kids = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        return [pid] + [k.pid for k in kids] if len(kids) >= count else None
    return wait_for(found, 10, what="job tree")


@async_test()
async def test_timeout_kills_the_whole_tree_with_reason_timeout(daemon):
    wire = await Wire.open(daemon.url)
    result = await wire.execute(command="sleep 60 & sleep 60 & wait", timeout=1)
    pids = _tree(result["pid"], 2)
    completed = await wire.completed(result["job_id"], 15)
    assert (completed["reason"], completed["status"]) == ("timeout", "failed")
    assert 1 <= completed["execution_time"] < 10
    _gone(pids)
    await wire.close()


@async_test()
async def test_cancel_kills_the_whole_process_group_and_what_left_it(daemon):
    """A canceled job's processes all end: its group, and one that left the
    group and session and holds none of its pipes (a daemon)."""
    wire = await Wire.open(daemon.url)
    result = await wire.execute(command="(setsid sleep 61 >/dev/null 2>&1 &); sleep 60 & sleep 60 & wait")
    pids = _tree(result["pid"], 2) + wait_for(lambda: marked_running(daemon.mark, "sleep", "61"), 10,
                                              what="the process that left the job")
    answer = await wire.answer(await wire.request("control", {"type": "CANCEL"}))
    assert answer["result"]["status"] == "canceled"
    await wire.until(lambda m: m.get("method") == "process.canceled", 10)
    completed = await wire.completed(result["job_id"], 15)
    assert completed["reason"] == "canceled" and completed["exit_code"] < 0
    _gone(pids)
    await wire.close()


@async_test()
async def test_pause_and_resume_stop_and_continue_the_group(daemon):
    wire = await Wire.open(daemon.url)
    result = await wire.execute(command="sleep 30 & wait")
    pids = _tree(result["pid"], 1)
    paused = await wire.answer(await wire.request("control", {"type": "pause", "job_id": result["job_id"]}))
    assert paused["result"]["status"] == "paused"
    notice = await wire.until(lambda m: m.get("method") == "process.paused", 10)
    assert notice["params"]["job_id"] == result["job_id"] and notice["params"]["pid"] == result["pid"]
    wait_for(lambda: all(psutil.Process(p).status() == psutil.STATUS_STOPPED for p in pids), 5)
    resumed = await wire.answer(await wire.request("control", {"type": "RESUME"}))
    assert resumed["result"]["status"] == "resumed"
    wait_for(lambda: all(psutil.Process(p).status() != psutil.STATUS_STOPPED for p in pids), 5)
    await wire.answer(await wire.request("control", {"type": "CANCEL"}))
    assert (await wire.completed(result["job_id"]))["reason"] == "canceled"
    await wire.close()


@async_test()
async def test_cancel_of_a_paused_job_still_ends_it(daemon):
    wire = await Wire.open(daemon.url)
    result = await wire.execute(command="sleep 30")
    await wire.answer(await wire.request("control", {"type": "PAUSE"}))
    await wire.answer(await wire.request("control", {"type": "CANCEL"}))
    completed = await wire.completed(result["job_id"], 15)
    assert completed["reason"] == "canceled"
    _gone([result["pid"]])
    await wire.close()


@async_test(60)
async def test_a_process_that_left_the_session_cannot_hold_the_job_open(daemon):
    """A job's own double-forked, setsid'd process keeps the job's stdout open
    after the leader exited: it is part of the job and ends with it."""
    wire = await Wire.open(daemon.url)
    result = await wire.execute(command="(setsid sleep 60 &); echo started", timeout=2)
    completed = await wire.completed(result["job_id"], 20)
    assert completed["reason"] in ("exit", "timeout")
    assert wire.text(result["job_id"]) == "started\n"
    assert not marked_running(daemon.mark, "sleep", "60")
    await wire.close()


@async_test(60)
async def test_what_a_job_left_running_runs_as_long_as_the_job_and_ends_after_it(daemon):
    """Daemons a job started (their own session, none of its pipes), one of
    them with its environment cleared: they run while the job runs, past the
    executor's reaping of another of the job's orphans, and end once the job
    has ended by itself."""
    wire = await Wire.open(daemon.url)
    script = f"""
        d=$(mktemp -d); cd "$d"
        ({detached_sleep("71")} echo $! >marked)
        ({detached_sleep("72", cleared_env=True)} echo $! >unmarked)
        (setsid sh -c 'echo $$ >exited' >/dev/null 2>&1 &)
        # Its exit reaped, so the executor has looked at its orphans since the sleeps became some.
        until [ -s exited ] && ! kill -0 "$(cat exited)" 2>/dev/null; do sleep 0.05; done
        kill -0 "$(cat marked)" && kill -0 "$(cat unmarked)" && echo both running
        cd /; rm -rf "$d"
    """
    _, completed = await wire.run(30, command=script, timeout=20)
    assert completed["reason"] == "exit" and completed["exit_code"] == 0
    assert wire.text(completed["job_id"]) == "both running\n"
    wait_for(lambda: not marked_running(daemon.mark, "sleep", "71") and not marked_running(daemon.mark, "sleep", "72"),
             15, what="the job's daemons to end")
    await wire.close()


@async_test(60)
async def test_job_ends_with_its_leader_while_a_child_holds_its_unread_stdin(daemon):
    """The leader's exit ends the job (its group is killed) even when stdin
    is not all written yet because a child holds the pipe and reads nothing."""
    wire = await Wire.open(daemon.url)
    code = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\nprint('leader done')"
    result = await wire.execute(argv=[PY, "-c", code], stdin="x" * (4 << 20))
    completed = await wire.completed(result["job_id"], 20)
    assert (completed["reason"], completed["exit_code"]) == ("exit", 0)
    assert completed["execution_time"] < 10 and wire.text(result["job_id"]) == "leader done\n"
    await wire.close()


@async_test(60)
async def test_silent_job_runs_on_and_heartbeats_report_its_silence(daemon):
    """No timeout: a long silence is neither killed nor reported finished."""
    wire = await Wire.open(daemon.url)
    started = time.monotonic()
    result = await wire.execute(command="sleep 13; echo awake")
    completed = await wire.completed(result["job_id"], 40)
    assert time.monotonic() - started >= 13
    assert completed["reason"] == "exit" and wire.text(result["job_id"]) == "awake\n"
    beats = [m["params"] for m in wire.messages if m.get("method") == "heartbeat"]
    assert len(beats) >= 2  # every 6 s in the test config
    silences = [b["jobs"][0]["silent_for"] for b in beats if b["jobs"]]
    assert silences == sorted(silences) and silences[-1] >= 10
    await wire.close()


# ------------------------------------------------------------------ sequencing


@async_test(60)
async def test_a_sequenced_job_is_told_started_only_after_its_predecessor_completed(daemon):
    """The first job's last 8 MiB of output are still on their way to the
    client when the second job starts: everything of the first comes first."""
    wire = await Wire.open(daemon.url)
    first = await wire.execute(command=f"{PY} -c \"import sys; sys.stdout.write(('y' * 127 + chr(10)) * 65536)\"")
    second = await wire.execute(command="echo second")
    await wire.completed(second["job_id"], 40)
    await wire.completed(first["job_id"], 40)
    told = [(m["params"]["job_id"], m["method"]) for m in wire.messages
            if m.get("method", "").startswith("process.") and m["params"].get("job_id") in (first["job_id"], second["job_id"])]
    last_of_first = max(i for i, (job, _) in enumerate(told) if job == first["job_id"])
    assert told[last_of_first] == (first["job_id"], "process.completed")
    assert told.index((second["job_id"], "process.started")) > last_of_first
    await wire.close()


@async_test()
async def test_second_execute_on_a_busy_connection_is_queued_behind_the_first(daemon):
    wire = await Wire.open(daemon.url)
    first = await wire.execute(command="sleep 1; echo first")
    second = await wire.execute(command="echo second")
    assert first["status"] == "started" and second["status"] == "queued" and second["pid"] is None
    await wire.completed(second["job_id"])
    order = [m["params"]["job_id"] for m in wire.messages if m.get("method") in ("process.completed", "process.started")]
    assert order == [first["job_id"], first["job_id"], second["job_id"], second["job_id"]]
    await wire.close()


@async_test()
async def test_parallel_jobs_on_one_connection_run_together(daemon):
    wire = await Wire.open(daemon.url)
    first = await wire.execute(command="sleep 2", parallel=True)
    second = await wire.execute(command="echo now", parallel=True)
    assert second["status"] == "started"
    await wire.completed(second["job_id"])
    assert not [m for m in wire.of_job(first["job_id"]) if m.get("method") == "process.completed"]
    await wire.completed(first["job_id"])
    await wire.close()


@async_test(60)
async def test_global_fifo_queue_positions_and_busy_error(make_daemon, tmp_path):
    d = make_daemon(executors=1, settings={"slots_per_executor": 1, "max_queue": 2})
    wire = await Wire.open(d.url)
    running = await wire.execute(command="sleep 30", parallel=True)
    # The first waiting job holds its slot until the test lets it go: positions
    # are told once per broker turn, and two instant jobs could both leave the
    # queue within one turn, so that "position 1" is never told.
    go = tmp_path / "go"
    waiting = [await wire.execute(command=f"while [ ! -e {go} ]; do sleep 0.02; done; echo 1", parallel=True),
               await wire.execute(command="echo 2", parallel=True)]
    assert [w["status"] for w in waiting] == ["queued", "queued"]
    told = [await wire.first(lambda m: m.get("method") == "process.queued" and m["params"]["job_id"] == w["job_id"], 10)
            for w in waiting]
    assert [m["params"]["position"] for m in told] == [1, 2]
    refused = await wire.answer(await wire.request("execute", {"command": "echo 3", "parallel": True}))
    assert refused["error"]["code"] == -32005 and refused["error"]["data"]["retry_after"] >= 1
    await wire.answer(await wire.request("control", {"type": "CANCEL", "job_id": running["job_id"]}))
    # FIFO: the first waiting job starts, and the second moves up to position 1
    # (told before or after the CANCEL's answer: they are of different jobs).
    await wire.first(lambda m: m.get("method") == "process.queued" and m["params"]["job_id"] == waiting[1]["job_id"]
                     and m["params"]["position"] == 1, 10)
    go.touch()
    for w in waiting:
        await wire.completed(w["job_id"])
    moved = [m["params"]["position"] for m in wire.messages
             if m.get("method") == "process.queued" and m["params"]["job_id"] == waiting[1]["job_id"]]
    assert moved == [2, 1]
    # Each job's messages keep their order, but parallel jobs' messages may
    # interleave on the connection: the records tell the order they ran in.
    records = [(await wire.answer(await wire.request("job.status", {"job_id": job["job_id"]})))["result"]
               for job in (running, *waiting)]
    assert records[0]["finished_at"] <= records[1]["started_at"]
    assert records[1]["finished_at"] <= records[2]["started_at"]
    await wire.close()


@async_test(120)
async def test_a_queued_job_is_told_started_before_its_output(make_daemon):
    """Jobs that wait in the queue start one by one. Their output reaches a
    handler on the data plane, their start on the control plane: whichever
    comes first, the client gets process.started first (it used to get
    the output first about once in a thousand jobs)."""
    d = make_daemon(executors=1, settings={"slots_per_executor": 1})

    async def jobs_in_a_row(count: int) -> list[list[str]]:
        wire, orders = await Wire.open(d.url), []
        for _ in range(count):
            result = await wire.execute(command="echo x")
            await wire.completed(result["job_id"])
            orders.append([m["method"] for m in wire.of_job(result["job_id"]) if m.get("method")])
        await wire.close()
        return orders
    orders = [order for orders in await asyncio.gather(*(jobs_in_a_row(250) for _ in range(8))) for order in orders]
    told_late = [order for order in orders if order.index("process.started") > order.index("process.output")]
    assert not told_late, f"{len(told_late)} of {len(orders)}: {told_late[0]}"


@async_test()
async def test_canceling_a_queued_job_completes_it_without_running(make_daemon):
    d = make_daemon(executors=1, settings={"slots_per_executor": 1})
    wire = await Wire.open(d.url)
    running = await wire.execute(command="sleep 30", parallel=True)
    queued = await wire.execute(command="echo never", parallel=True)
    await wire.answer(await wire.request("control", {"type": "CANCEL", "job_id": queued["job_id"]}))
    completed = await wire.completed(queued["job_id"])
    assert completed["reason"] == "canceled" and completed["pid"] is None and wire.text(queued["job_id"]) == ""
    await wire.answer(await wire.request("control", {"type": "CANCEL", "job_id": running["job_id"]}))
    await wire.completed(running["job_id"])
    await wire.close()


async def _fill_then_free_the_queue(d, refuse):
    """With the queue full of another connection's job, refuse() gets -32005;
    then that job is canceled, and there is room again."""
    other = await Wire.open(d.url)
    filler = await other.execute(command="echo filler", parallel=True)
    assert filler["status"] == "queued"
    await refuse()
    await other.answer(await other.request("control", {"type": "CANCEL", "job_id": filler["job_id"]}))
    await other.completed(filler["job_id"])
    await other.close()


@async_test(60)
async def test_a_refused_execute_leaves_the_connection_waiting_for_the_job_before_it(make_daemon):
    """Retrying after -32005 (as its `retry_after` invites) keeps the order:
    the refused request made no job, so the next waits for the one before."""
    d = make_daemon(executors=1, settings={"slots_per_executor": 1, "max_queue": 1})
    wire = await Wire.open(d.url)
    first = await wire.execute(command="sleep 30")

    async def refuse():
        refused = await wire.answer(await wire.request("execute", {"command": "echo refused"}))
        assert refused["error"]["code"] == -32005
    await _fill_then_free_the_queue(d, refuse)
    retried = await wire.execute(command="echo retried")
    assert retried["status"] == "queued"
    queued = await wire.until(lambda m: m.get("method") == "process.queued"
                              and m["params"]["job_id"] == retried["job_id"], 10)
    assert queued["params"] == {"job_id": retried["job_id"], "position": None, "after": first["job_id"]}
    await wire.answer(await wire.request("control", {"type": "CANCEL", "job_id": first["job_id"]}))
    assert (await wire.completed(retried["job_id"]))["reason"] == "exit"
    await wire.close()


@async_test(60)
async def test_a_refused_client_execute_leaves_the_client_waiting_for_the_job_before_it(make_daemon):
    d = make_daemon(executors=1, settings={"slots_per_executor": 1, "max_queue": 1})
    async with Client(d.url) as client:
        first = await client.execute("sleep 30")

        async def refuse():
            with pytest.raises(RPCError) as refused:
                await client.execute("echo refused")
            assert refused.value.code == -32005
        await _fill_then_free_the_queue(d, refuse)
        retried = await client.execute("echo retried")
        queued = await anext(retried.events(timeout=10))
        assert queued == {"method": "process.queued",
                          "params": {"job_id": retried.job_id, "position": None, "after": first.job_id}}
        await first.control("CANCEL")
        assert (await retried.wait(20)).stdout == "retried\n"


@async_test()
async def test_after_holds_a_job_behind_a_job_of_another_connection(daemon, tmp_path):
    go = tmp_path / "go"
    os.mkfifo(go)
    first_wire, second_wire = await Wire.open(daemon.url), await Wire.open(daemon.url)
    first = await first_wire.execute(command=f"read word < {go}; echo $word")
    second = await second_wire.execute(command="echo second", after=first["job_id"])
    assert second["status"] == "queued" and second["pid"] is None
    queued = await second_wire.until(lambda m: m.get("method") == "process.queued", 10)
    assert queued["params"] == {"job_id": second["job_id"], "position": None, "after": first["job_id"]}
    unknown = await second_wire.execute(command="echo at once", after=uuid.uuid4().hex)
    assert unknown["status"] == "started"  # a job the daemon does not have holds nothing up
    await asyncio.to_thread(go.write_text, "first\n")
    await first_wire.completed(first["job_id"])
    assert (await second_wire.completed(second["job_id"]))["reason"] == "exit"
    assert second_wire.text(second["job_id"]) == "second\n"
    records = [(await second_wire.answer(await second_wire.request("job.status", {"job_id": job["job_id"]})))["result"]
               for job in (first, second)]
    assert records[1]["started_at"] >= records[0]["finished_at"]
    await first_wire.close()
    await second_wire.close()


# ------------------------------------------------------------------ disconnects


@async_test(60)
async def test_disconnect_cancels_the_job_after_detach_grace(daemon):
    wire = await Wire.open(daemon.url)
    result = await wire.execute(command="sleep 60")
    await wire.close()
    closed_at = time.monotonic()
    wait_for(lambda: not _alive([result["pid"]]), 20, 0.1, "abandoned job to end")
    assert time.monotonic() - closed_at >= 2.5  # detach_grace is 3 s in the test config
    asking = await Wire.open(daemon.url)
    while (record := (await asking.answer(await asking.request("job.status", {"job_id": result["job_id"]})))[
            "result"])["state"] != "finished":
        await asyncio.sleep(0.05)
    await asking.close()
    assert (record["reason"], record["error"]) == ("canceled", "canceled: its client went away")


@async_test(60)
async def test_detached_job_outlives_its_client(daemon):
    wire = await Wire.open(daemon.url)
    result = await wire.execute(command="sleep 6; echo done", detach=True)
    await wire.close()
    closed_at = time.monotonic()
    wait_for(lambda: time.monotonic() - closed_at > 4.5, 10)  # past detach_grace + kill_grace
    assert _alive([result["pid"]])
    finished = f"job.finished job_id={result['job_id']}"
    line = wait_for(lambda: next((l for l in daemon.log_tail(300).splitlines() if finished in l), None), 20, 0.2)
    assert "reason=exit" in line and "exit=0" in line


# ------------------------------------------------------------------ client library


@async_test()
async def test_async_client_streams_events_and_controls(daemon):
    async with Client(daemon.url) as client:
        job = await client.execute("echo a; sleep 30")
        events = job.events(timeout=10)
        assert (await events.__anext__())["method"] == "process.started"
        output = await events.__anext__()
        assert output["params"]["data"] == "a\n"
        assert (await job.control("CANCEL"))["status"] == "canceled"
        result = await job.wait(15)
        assert result.reason == "canceled" and result.stdout == "a\n"


def test_sync_client_runs_a_command(daemon):
    result = run_sync("echo sync; exit 4", url=daemon.url, wait_timeout=20)
    assert (result.stdout, result.exit_code, result.status) == ("sync\n", 4, "failed")


# ------------------------------------------------------------------ a job's output pipe, read


@async_test(timeout=10)
async def test_a_pipe_reader_waits_for_output_returns_it_and_then_the_end():
    read_end, write_end = os.pipe()
    reader = PipeReader(read_end)
    try:
        waiting = asyncio.ensure_future(reader.read(1024))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # nothing written yet
        os.write(write_end, b"first\n")
        assert await waiting == b"first\n"
        os.write(write_end, b"second\n")
        os.close(write_end)
        assert await reader.read(1024) == b"second\n"
        assert await reader.read(1024) == b""
    finally:
        reader.close()


@async_test(timeout=10)
async def test_a_cancelled_pipe_read_leaves_the_pipe_unwatched_and_its_output_unread():
    loop = asyncio.get_running_loop()
    errors = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    read_end, write_end = os.pipe()
    reader = PipeReader(read_end)
    try:
        waiting = asyncio.ensure_future(reader.read(1024))
        await asyncio.sleep(0.05)
        os.write(write_end, b"late\n")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.sleep(0.05)  # loop turns with the pipe readable
        assert not loop.remove_reader(read_end)  # nothing watches it any more
        assert await reader.read(1024) == b"late\n"
        assert errors == []
    finally:
        os.close(write_end)
        reader.close()
