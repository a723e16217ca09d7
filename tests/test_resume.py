"""Journals, records and resume: attach, jobs, job.status, automatic reconnect."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import signal
import socket
import sys
import time
import urllib.parse
import uuid
import weakref

import psutil
import pytest
import websockets

from ccexec.client import Client, ConnectionLost, Job, RetryPolicy, RPCError
from support import Daemon, async_test, serves, ticker
from wire import Wire

# 200 numbered lines, one every 20 ms: long enough to interrupt, exact to compare.
TICKER, TICKER_OUTPUT = ticker(200, 0.02, "line")


@async_test()
async def test_attach_replays_a_finished_job_from_any_offset(daemon):
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(command="printf 'one\\ntwo\\n'; printf 'err\\n' >&2")
    job_id = completed["job_id"]
    other = await Wire.open(daemon.url)
    answer = await other.answer(await other.request("attach", {"job_id": job_id, "stdout_offset": 4}))
    assert answer["result"] == {"job_id": job_id, "state": "finished", "stdout_offset": 4, "stderr_offset": 0}
    again = await other.completed(job_id)
    assert other.text(job_id) == "two\n" and other.text(job_id, "stderr") == "err\n"
    assert other.outputs(job_id)[0]["offset"] == 4
    assert {k: again[k] for k in ("exit_code", "reason", "stdout_bytes")} == \
        {k: completed[k] for k in ("exit_code", "reason", "stdout_bytes")}
    await wire.close()
    await other.close()


@async_test()
async def test_attach_to_a_running_job_replays_then_streams_live(daemon):
    wire = await Wire.open(daemon.url)
    result = await wire.execute(command=TICKER)
    await wire.until(lambda m: m.get("method") == "process.output" and m["params"]["data"] == "line 0050\n", 20)
    watcher = await Wire.open(daemon.url)
    answer = await watcher.answer(await watcher.request("attach", {"job_id": result["job_id"]}))
    assert answer["result"]["state"] == "running"
    await watcher.completed(result["job_id"], 30)
    assert watcher.text(result["job_id"]) == TICKER_OUTPUT
    await wire.completed(result["job_id"], 30)
    assert wire.text(result["job_id"]) == TICKER_OUTPUT
    await wire.close()
    await watcher.close()


@async_test()
async def test_attach_errors(daemon):
    wire = await Wire.open(daemon.url)
    unknown = await wire.answer(await wire.request("attach", {"job_id": "0" * 32}))
    assert unknown["error"]["code"] == -32002
    malformed = await wire.answer(await wire.request("attach", {"job_id": "../../etc"}))
    assert malformed["error"]["code"] == -32002
    _, completed = await wire.run(command="echo gone")
    past = await wire.answer(await wire.request("attach", {"job_id": completed["job_id"], "stdout_offset": 99}))
    assert past["error"]["code"] == -32602 and "stdout_offset" in past["error"]["message"]
    shutil.rmtree(daemon.state_dir / "jobs" / completed["job_id"])
    pruned = await wire.answer(await wire.request("attach", {"job_id": completed["job_id"]}))
    assert pruned["error"]["code"] == -32006
    await wire.close()


@async_test(60)
async def test_output_whose_journal_goes_while_it_is_sent_ends_with_output_gone(daemon):
    size = 16 << 20
    async with Client(daemon.url) as client:
        done = await (await client.execute(f"head -c {size} /dev/zero | tr '\\0' x", stream_mode="chunks")).wait(30)
    assert done.completed["stdout_bytes"] == size
    # A reader with a small receive buffer that stops reading: the handler waits mid-replay.
    host, port = urllib.parse.urlsplit(daemon.url).hostname, urllib.parse.urlsplit(daemon.url).port
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    sock.connect((host, port))
    reader = await Wire.open(daemon.url, sock=sock, max_queue=1)
    await reader.answer(await reader.request("attach", {"job_id": done.job_id, "stream_mode": "chunks"}))
    await reader.until(lambda m: m.get("method") == "process.output", 10)
    shutil.rmtree(daemon.state_dir / "jobs" / done.job_id)
    gone = await reader.until(lambda m: "error" in m, 30)
    assert gone["id"] is None and gone["error"]["code"] == -32006 and gone["error"]["data"] == {"job_id": done.job_id}
    assert 0 < sum(p["size"] for p in reader.outputs(done.job_id)) < size
    assert not [m for m in reader.of_job(done.job_id) if m.get("method") == "process.completed"]
    _, after = await reader.run(command="echo after")  # the connection goes on
    assert reader.text(after["job_id"]) == "after\n"
    await reader.close()


@async_test()
async def test_client_raises_output_gone_from_the_job_it_is_about():
    client = Client("ws://127.0.0.1:9")  # never connected: only its reading of messages is used
    job = Job(client, "a" * 32, "started", 1)
    client._jobs[job.job_id] = job
    client._dispatch({"jsonrpc": "2.0", "id": None, "error": {
        "code": -32006, "message": "Output no longer available", "data": {"job_id": job.job_id}}})
    with pytest.raises(RPCError) as caught:
        await job.wait(5)
    assert caught.value.code == -32006 and client.notifications.empty()


@async_test()
async def test_jobs_and_job_status_describe_records(daemon):
    async with Client(daemon.url) as client:
        job = await client.execute("echo recorded; exit 3", name="my-label")
        await job.wait(20)
        record = await client.job_status(job.job_id)
        assert {k: record[k] for k in ("job_id", "name", "command", "state", "exit_code", "reason",
                                       "stdout_bytes", "stderr_bytes")} == {
            "job_id": job.job_id, "name": "my-label", "command": "echo recorded; exit 3", "state": "finished",
            "exit_code": 3, "reason": "exit", "stdout_bytes": 9, "stderr_bytes": 0}
        assert record["created_at"] <= record["started_at"] <= record["finished_at"]
        running = await client.execute("sleep 30", parallel=True)
        assert [r["job_id"] for r in await client.jobs(state="running")] == [running.job_id]
        assert job.job_id in [r["job_id"] for r in await client.jobs(state="finished", limit=1000)]
        await running.control("CANCEL")
        await running.wait(20)
        with pytest.raises(RPCError) as missing:
            await client.job_status("f" * 32)
        assert missing.value.code == -32002


@async_test(60)
async def test_detached_job_can_be_attached_after_its_client_left(daemon):
    async with Client(daemon.url) as client:
        job = await client.execute("sleep 5; echo later", detach=True)
    async with Client(daemon.url) as client:
        attached = await client.attach(job.job_id)
        result = await attached.wait(30)
    assert result.stdout == "later\n" and result.reason == "exit"


@async_test(90)
async def test_killed_handler_client_resumes_with_every_byte_once(make_daemon):
    """kill -9 of the handler serving a streaming job: the client reconnects and attaches."""
    d = make_daemon()
    handlers = d.role_pids("handler")
    async with Client(d.url) as client:
        job = await client.execute(TICKER)
        events = job.events(timeout=20)
        while (await events.__anext__())["method"] != "process.output":
            pass
        served_by = [pid for pid in handlers if serves(pid, client)]
        assert len(served_by) == 1
        os.kill(served_by[0], signal.SIGKILL)
        result = await job.wait(60)
    assert client.reconnects == 1
    assert result.stdout == TICKER_OUTPUT and result.reason == "exit"
    offsets = [o["offset"] for o in result.outputs]
    assert offsets == sorted(set(offsets))  # no byte twice


@pytest.mark.parametrize("drop", ["kill -9", "1012"])
@async_test(90)
async def test_client_with_no_job_running_keeps_working_when_its_handler_goes(make_daemon, drop):
    """An orchestrator's next task must not fail because the handler its
    idle connection was on was killed or restarted (close code 1012)."""
    d = make_daemon()
    async with Client(d.url) as client:
        assert (await (await client.execute("echo one")).wait(20)).stdout == "one\n"
        [served_by] = [pid for pid in d.role_pids("handler") if serves(pid, client)]
        os.kill(served_by, signal.SIGKILL if drop == "kill -9" else signal.SIGTERM)
        await asyncio.wait_for(client.ws.wait_closed(), 20)
        assert (await (await client.execute("echo two")).wait(20)).stdout == "two\n"
    assert client.reconnects == 1


@async_test(90)
async def test_client_keeps_its_jobs_in_order_across_a_reconnect(make_daemon, tmp_path):
    """A job the client starts after it reconnected still waits for the one
    it started before, though the new connection has no previous job."""
    d = make_daemon()
    go = tmp_path / "go"
    os.mkfifo(go)
    async with Client(d.url) as client:
        first = await client.execute(f"read word < {go}; echo $word")
        [served_by] = [pid for pid in d.role_pids("handler") if serves(pid, client)]
        os.kill(served_by, signal.SIGKILL)
        await asyncio.wait_for(client.ws.wait_closed(), 20)
        second = await client.execute("echo second")
        assert second.pid is None  # held behind the first
        await asyncio.to_thread(go.write_text, "first\n")
        results = [await job.wait(60) for job in (first, second)]
        records = [await client.job_status(job.job_id) for job in (first, second)]
    assert client.reconnects == 1
    assert [(r.reason, r.stdout) for r in results] == [("exit", "first\n"), ("exit", "second\n")]
    assert records[1]["started_at"] >= records[0]["finished_at"]


@async_test(60)
async def test_client_gives_up_after_its_retry_policy(tmp_path):
    """With the whole daemon gone (kill -9 of every process), resuming fails
    within the retry policy and the job's waiter is told, not left hanging."""
    d = Daemon(tmp_path)
    try:
        await asyncio.to_thread(d.start)
        client = Client(d.url, retry=RetryPolicy(attempts=3, first_delay=0.05, max_delay=0.1))
        await client.connect()
        job = await client.execute("sleep 30")
        for proc in [psutil.Process(d.proc.pid), *d.processes()]:
            proc.kill()  # only this test's daemon and its job
        started = time.monotonic()
        with pytest.raises(ConnectionLost):
            await job.wait(30)
        assert time.monotonic() - started < 10
        await client.close()
    finally:
        d.cleanup()


@async_test(60)
async def test_control_without_job_id_acts_on_a_job_this_connection_submitted_not_one_it_attached(daemon):
    owner, other = await Wire.open(daemon.url), await Wire.open(daemon.url)
    theirs = await owner.execute(command="sleep 30", detach=True)
    mine = await other.execute(command="sleep 30")
    await other.until(lambda m: m.get("method") == "process.started", 10)
    attached = await other.answer(await other.request("attach", {"job_id": theirs["job_id"]}))
    assert attached["result"]["state"] == "running"
    empty = await other.answer(await other.request("control", {"type": "CANCEL", "job_id": ""}))
    assert empty["error"]["code"] == -32002  # a job_id names a job, even an empty one
    answer = await other.answer(await other.request("control", {"type": "CANCEL"}))
    assert answer["result"] == {"status": "canceled", "job_id": mine["job_id"]}
    assert (await other.completed(mine["job_id"]))["reason"] == "canceled"
    status = await owner.answer(await owner.request("job.status", {"job_id": theirs["job_id"]}))
    assert status["result"]["state"] == "running"
    await owner.answer(await owner.request("control", {"type": "CANCEL", "job_id": theirs["job_id"]}))
    assert (await owner.completed(theirs["job_id"]))["reason"] == "canceled"
    await owner.close()
    await other.close()


@async_test()
async def test_a_failed_attach_can_be_retried_at_once(daemon):
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(command="echo once")
    job_id = completed["job_id"]
    too_far = {"job_id": job_id, "stdout_offset": 99}
    # Pipelined: the retry is read as soon as the first attach is answered.
    await wire.send_raw(json.dumps({"jsonrpc": "2.0", "method": "attach", "params": too_far, "id": "a"}))
    await wire.send_raw(json.dumps({"jsonrpc": "2.0", "method": "attach", "params": {"job_id": job_id}, "id": "b"}))
    first, retry = await wire.answer("a"), await wire.answer("b")
    assert first["error"]["code"] == -32602
    assert retry["result"]["state"] == "finished", retry
    assert len([m for m in wire.messages if m.get("method") == "process.completed"]) == 1
    again = await wire.until(lambda m: m.get("method") == "process.completed", 10)
    assert again["params"]["job_id"] == job_id and wire.text(job_id) == "once\nonce\n"
    await wire.close()


@async_test()
async def test_attach_to_a_running_job_from_past_its_output_is_refused(daemon, tmp_path):
    """No client can hold an offset past what a job has written so far: a
    running job answers it like a finished one, instead of streaming from a
    place that is not there yet and reporting that place as the end."""
    go = tmp_path / "go"
    wire = await Wire.open(daemon.url)
    result = await wire.execute(command=f"echo one; for i in $(seq 400); do [ -e {go} ] && break; sleep 0.05; done; "
                                        "echo two")
    await wire.until(lambda m: m.get("method") == "process.output", 10)
    watcher = await Wire.open(daemon.url)
    past = await watcher.answer(await watcher.request("attach", {"job_id": result["job_id"], "stdout_offset": 100}))
    go.touch()
    completed = await wire.completed(result["job_id"], 30)
    assert completed["stdout_bytes"] == 8 and wire.text(result["job_id"]) == "one\ntwo\n"
    if "result" in past:
        told = await watcher.completed(result["job_id"], 30)
        pytest.fail(f"attach past the end accepted: {past['result']}, then {told}")
    assert past["error"]["code"] == -32602 and "stdout_offset" in past["error"]["message"]
    at_end = await watcher.answer(await watcher.request("attach", {"job_id": result["job_id"], "stdout_offset": 8}))
    assert at_end["result"]["stdout_offset"] == 8
    assert (await watcher.completed(result["job_id"]))["stdout_bytes"] == 8 and watcher.text(result["job_id"]) == ""
    await wire.close()
    await watcher.close()


JOB_ID = "c" * 32


async def _serve(handler) -> tuple[object, str]:
    """A tiny real WebSocket server running `handler`, and its URL."""
    server = await websockets.serve(handler, "127.0.0.1", 0)
    return server, f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws"


def _note(method: str, **params) -> str:
    return json.dumps({"jsonrpc": "2.0", "method": method, "params": {**params, "job_id": JOB_ID}})


async def _connected_and_started(ws) -> None:
    """Play a daemon that accepts one execute and starts the job."""
    await ws.send(json.dumps({"jsonrpc": "2.0", "method": "connected", "params": {"session_id": "s"}}))
    request = json.loads(await ws.recv())
    await ws.send(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": {
        "status": "started", "pid": 1, "pgid": 1, "job_id": JOB_ID}}))
    await ws.send(_note("process.started", status="started", pid=1, pgid=1, exit_code=None, error=None))


@async_test(30)
async def test_a_malformed_server_message_is_skipped_not_the_end_of_the_client():
    """A frame that is not JSON, not an object, or a job message without a
    method must not end the client's reading: calls and jobs would hang."""
    async def handler(ws):
        await _connected_and_started(ws)
        for frame in ("not json", "[1, 2]", "null", json.dumps({"jsonrpc": "2.0", "params": {"job_id": JOB_ID}}),
                      json.dumps({"jsonrpc": "2.0", "method": "process.output", "params": "x"})):
            await ws.send(frame)
        await ws.send(_note("process.output", type="stdout", data="hi\n", truncated=False, chunk_index=None,
                            total_chunks=None, offset=0, size=3))
        await ws.send(_note("process.completed", status="completed", pid=1, pgid=1, exit_code=0, error=None,
                            reason="exit", execution_time=0.1, stdout_bytes=3, stderr_bytes=0))
        ping = json.loads(await ws.recv())
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": ping["id"], "result": {"pong": True}}))
        await ws.wait_closed()
    server, url = await _serve(handler)
    async with server, Client(url, resume=False) as client:
        job = await client.execute("echo hi")
        result = await job.wait(10)
        assert (result.stdout, result.exit_code) == ("hi\n", 0)
        assert (await client.ping())["pong"] is True


@async_test(30)
async def test_resume_gives_up_when_every_resumed_connection_drops_before_attaching():
    """A server that drops each new connection before answering attach (a
    handler crashing on it, a pool that keeps restarting): the retry policy
    bounds the whole resume, not each connection that merely opened."""
    connections = []

    async def handler(ws):
        connections.append(ws)
        if len(connections) == 1:
            await _connected_and_started(ws)
        else:
            await ws.send(json.dumps({"jsonrpc": "2.0", "method": "connected", "params": {"session_id": "s"}}))
            await ws.recv()  # the attach: never answered
        ws.transport.abort()
    server, url = await _serve(handler)
    async with server:
        client = Client(url, retry=RetryPolicy(attempts=3, first_delay=0.01, max_delay=0.02))
        await client.connect()
        try:
            job = await client.execute("sleep 30")
            with pytest.raises(ConnectionLost):
                await job.wait(10)
            assert len(connections) <= 1 + 3
        finally:
            await client.close()


@async_test(30)
async def test_a_timed_out_call_leaves_nothing_behind_and_its_late_answer_is_no_job_error(daemon):
    async with Client(daemon.url) as client:
        running = await client.execute("sleep 30")
        held = await client.execute("sleep 30")  # held behind `running`: not started, PAUSE fails
        with pytest.raises(asyncio.TimeoutError):
            await client.call("control", {"type": "PAUSE", "job_id": held.job_id}, timeout=0)
        assert not client._pending
        assert (await client.ping())["pong"] is True  # the late -32002 answer has come by now
        await held.control("CANCEL")
        assert (await held.wait(20)).reason == "canceled"
        await running.control("CANCEL")
        assert (await running.wait(20)).reason == "canceled"


@async_test(60)
async def test_a_job_whose_execute_answer_comes_after_its_caller_gave_up_is_canceled(make_daemon):
    """The caller of a timed-out execute believes no job started: should
    one have, it is canceled, and its output is not kept by the client."""
    d = make_daemon()
    [broker] = d.role_pids("broker")
    command = "timeout 30 sh -c 'while :; do echo unwanted; sleep 0.01; done'"
    async with Client(d.url) as client:
        os.kill(broker, signal.SIGSTOP)  # the execute waits for the broker
        try:
            with pytest.raises(asyncio.TimeoutError):
                await client.execute(command, answer_timeout=0.5)
        finally:
            os.kill(broker, signal.SIGCONT)
        deadline = time.monotonic() + 20
        while not (records := [r for r in await client.jobs() if r["command"] == command and r["reason"]]):
            assert time.monotonic() < deadline, "the job of the timed-out execute did not end"
            await asyncio.sleep(0.1)
        assert records[0]["reason"] == "canceled"
        assert (await client.ping())["pong"] is True  # whatever the job sent came before this answer
        assert not client._early and not client._jobs


@async_test(60)
async def test_execute_naming_a_job_already_made_follows_it_and_nothing_runs_twice(daemon, tmp_path):
    """What a client whose connection dropped before an execute's answer does:
    it sends the execute again with the same job_id, and gets the job the
    first one made, whole, whatever else the second one says."""
    job_id, runs, go = uuid.uuid4().hex, tmp_path / "runs", tmp_path / "go"
    command = f"echo ran >> {runs}; echo first; while [ ! -e {go} ]; do sleep 0.02; done; echo second"
    first = await Wire.open(daemon.url)
    assert (await first.execute(command=command, job_id=job_id, timeout=30))["job_id"] == job_id
    await first.until(lambda m: m.get("method") == "process.output", 10)
    again = await Wire.open(daemon.url)
    answer = await again.execute(command="echo something else", job_id=job_id)
    [started] = [m["params"] for m in first.of_job(job_id) if m["method"] == "process.started"]
    assert (answer["job_id"], answer["status"], answer["pid"]) == (job_id, "started", started["pid"])
    twice_here = await again.answer(await again.request("execute", {"command": "true", "job_id": job_id}))
    assert twice_here["error"]["code"] == -32602 and "already followed here" in twice_here["error"]["message"]
    go.touch()
    for wire in (first, again):
        assert (await wire.completed(job_id))["exit_code"] == 0
        assert wire.text(job_id) == "first\nsecond\n"
        assert [m["method"] for m in wire.of_job(job_id)].count("process.started") == 1
    late = await Wire.open(daemon.url)  # after the end: its record and its output, from the journal
    assert (await late.execute(command=command, job_id=job_id))["job_id"] == job_id
    assert (await late.completed(job_id))["exit_code"] == 0 and late.text(job_id) == "first\nsecond\n"
    for wire in (first, again, late):
        await wire.close()
    assert runs.read_text() == "ran\n"


@async_test(90)
async def test_resume_keeps_the_jobs_stream_mode(make_daemon, tmp_path):
    """A chunks-mode job resumed after its handler died still comes in chunks
    (lines mode would cut a long line into `truncated` pieces)."""
    d = make_daemon()
    marker = tmp_path / "go"
    script = (f"import os, sys, time\nprint('start', flush=True)\n"
              f"while not os.path.exists({str(marker)!r}): time.sleep(0.02)\n"
              "sys.stdout.write('x' * 100000 + '\\n'); sys.stdout.flush()")
    async with Client(d.url) as client:
        job = await client.execute(argv=[sys.executable, "-c", script], stream_mode="chunks")
        events = job.events(timeout=20)
        while (await events.__anext__())["method"] != "process.output":
            pass
        [served_by] = [pid for pid in d.role_pids("handler") if serves(pid, client)]
        os.kill(served_by, signal.SIGKILL)
        marker.touch()
        result = await job.wait(60)
    assert client.reconnects == 1
    assert result.stdout == "start\n" + "x" * 100000 + "\n"
    assert [o["truncated"] for o in result.outputs] == [False] * len(result.outputs)
    assert [o["chunk_index"] for o in result.outputs] == [None] * len(result.outputs)


@async_test(30)
async def test_a_finished_job_is_not_kept_by_its_client(daemon):
    """A long-lived client must not keep every job's output it ever ran."""
    async with Client(daemon.url) as client:
        job = await client.execute("head -c 100000 /dev/zero | tr '\\0' x")
        result = await job.wait(20)
        assert len(result.stdout) == 100000
        gone = weakref.ref(job)
        del job
        gc.collect()
        assert gone() is None


@async_test(30)
async def test_a_job_whose_connection_is_lost_says_so_to_every_later_wait():
    """events() raised ConnectionLost: a wait() after it must raise it too,
    not wait for an event that was already taken."""
    async def handler(ws):
        await _connected_and_started(ws)
        ws.transport.abort()
    server, url = await _serve(handler)
    async with server, Client(url, resume=False) as client:
        job = await client.execute("sleep 30")
        with pytest.raises(ConnectionLost):
            async for _ in job.events(10):
                pass
        with pytest.raises(ConnectionLost):
            await job.wait(10)


@async_test(90)
async def test_a_resumed_client_gets_each_claude_notification_once(make_daemon, tmp_path):
    """kill -9 of the handler in the middle of a Claude job: the notifications
    of the lines the job writes meanwhile come after the resume, and those
    the client had do not come again."""
    d = make_daemon()
    go = tmp_path / "go"
    init = '{"type":"system","subtype":"init","session_id":"s-1","model":"m","tools":[]}'
    tool_use = '{"type":"assistant","message":{"content":[{"type":"tool_use","id":"toolu_1","name":"Bash"}]}}'
    result = '{"type":"result","subtype":"success","is_error":false,"result":"4","num_turns":2}'
    command = f"echo '{init}'; while [ ! -e {go} ]; do sleep 0.02; done; echo '{tool_use}'; echo '{result}'"
    async with Client(d.url) as client:
        job = await client.execute(command, claude=True)
        first = await asyncio.wait_for(client.notifications.get(), 20)
        while first.get("method") != "claude.event":  # heartbeats may come first
            first = await asyncio.wait_for(client.notifications.get(), 20)
        [served_by] = [pid for pid in d.role_pids("handler") if serves(pid, client)]
        os.kill(served_by, signal.SIGKILL)
        await asyncio.wait_for(client.ws.wait_closed(), 20)
        go.touch()
        done = await job.wait(60)
        rest = [client.notifications.get_nowait() for _ in range(client.notifications.qsize())]
    assert client.reconnects == 1 and done.reason == "exit"
    kinds = [m["params"]["kind"] for m in [first, *rest] if m.get("method") == "claude.event"]
    assert kinds == ["init", "tool_use", "result"] and job.claude_offset == 3
