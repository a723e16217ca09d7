"""Executor nodes on other hosts: a real head (remote_listen + CURVE) and
real `ccexecd --role executor` nodes connected to it over TCP, on loopback.
The network-namespace test of the link itself is in test_netns.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import zmq

from ccexec import bus, remote
from ccexec.client import Client
from ccexec.config import Settings
from ccexec.executor import Executor
from support import (Daemon, ExecutorNode, async_test, cluster_keys, finish, free_port, line_printer, node_executors,
                     pid_running, remote_head_settings, wait_for)
from wire import Wire

PRINT_LINES, EXPECTED = line_printer(60_000)  # 2.2 MB of output: many network chunks


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head with one local executor and a node (label site=far, 2 slots)."""
    tmp = tmp_path_factory.mktemp("cluster")
    keys, clients = cluster_keys(tmp)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    head = Daemon(tmp / "head", remote_head_settings(endpoint, keys["head"], clients), executors=1)
    node = ExecutorNode(tmp / "node", endpoint, keys["far"], keys["head"][0], "far-node", labels="site=far",
                        settings={"slots_per_executor": 2})
    try:
        head.start()
        node.start()
        wait_for(lambda: node_executors(head, "far-node"), 20, what="the node registered")
        yield head, node, keys, endpoint
    finally:
        finish(node, head)


@async_test(90)
async def test_a_labelled_job_runs_on_the_node_with_exact_output_in_both_modes(cluster):
    head, node, _, _ = cluster
    async with Client(head.url) as client:
        for mode in ("lines", "chunks"):
            job = await client.execute(argv=PRINT_LINES, labels={"site": "far"}, stream_mode=mode)
            result = await job.wait(60)
            assert result.exit_code == 0 and result.reason == "exit"
            assert result.stdout == EXPECTED, f"{mode}: output differs"
            record = await client.job_status(job.job_id)
            assert record["node"] == "far-node" and record["stdout_bytes"] == len(EXPECTED)
            # The head holds the journal: a replay from byte 0 is exact too.
            replay = await (await client.attach(job.job_id)).wait(30)
            assert replay.stdout == EXPECTED
            # ... and the node dropped its copy once the head had it all.
            wait_for(lambda: not (node.state_dir / "jobs" / job.job_id).exists(), 10,
                     what="the node's journal removed")


@async_test(60)
async def test_jobs_without_labels_stay_here_and_unmatched_labels_wait(cluster):
    head, node, _, _ = cluster
    parent = "echo $PPID"  # the executor that runs the job's shell
    async with Client(head.url) as client:
        local = await (await client.execute(parent, labels={})).wait(30)
        far = await (await client.execute(parent, labels={"site": "far"})).wait(30)
        node_executor_pids = set(node.role_pids("executor"))
        assert int(far.stdout) in node_executor_pids
        assert int(local.stdout) in head.role_pids("executor")
        # No executor carries gpu=yes: the job waits, and does not hold up the jobs behind it.
        waiting = await client.execute("echo never", labels={"gpu": "yes"}, parallel=True)
        behind = await (await client.execute("echo behind", labels={"site": "far"}, parallel=True)).wait(30)
        assert behind.stdout == "behind\n"
        assert (await client.job_status(waiting.job_id))["state"] == "queued"
        await waiting.control("CANCEL")
        result = await waiting.wait(10)
        assert result.reason == "canceled" and result.stdout == ""


def test_a_node_with_an_unknown_key_is_refused(cluster, tmp_path):
    head, _, keys, endpoint = cluster
    rogue = ExecutorNode(tmp_path / "rogue", endpoint, keys["rogue"], keys["head"][0], "rogue-node")
    try:
        rogue.start()
        wait_for(lambda: "remote.refused" in head.log_path.read_text(errors="replace"), 20,
                 what="the head logs the refused key")
        wait_for(lambda: "executor.head_unreachable" in rogue.log_path.read_text(errors="replace"), 20,
                 what="the rogue node logs that it gets no answer")
        assert node_executors(head, "rogue-node") == []
        public = keys["rogue"][0].read_text()
        assert any(line.strip().startswith("public-key") and line.split('"')[1] in head.log_path.read_text()
                   for line in public.splitlines())
        assert rogue.stop() == 0
        # It stopped by itself, not killed by Circus after graceful_timeout
        # for still waiting to tell a head that never answers.
        assert "executor.stopped" in rogue.log_path.read_text(errors="replace")
    finally:
        finish(rogue)


async def _until(condition, timeout: float) -> None:
    """Poll an async condition until it holds; TimeoutError after timeout."""
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.1)


@async_test(60)
async def test_a_refused_node_executor_that_starts_late_still_watches_the_head_and_stops(cluster, tmp_path, caplog):
    """Once the head denies a node's CURVE handshake, the node's link has no
    pipe left and a send waits for ever. An executor whose READY comes only
    after that (one slow to start) still warns that the head does not
    answer, and stops when told to."""
    head, _, keys, endpoint = cluster
    settings = Settings(curve_secret_key=str(keys["rogue"][1]), curve_server_key=str(keys["head"][0]),
                        broker=endpoint, role="executor", state_dir=str(tmp_path / "state"), node_name="late-rogue")
    os.makedirs(settings.jobs_dir)
    executor = Executor(settings)  # connects: the head denies the handshake
    probe = bus.pack(bus.HEARTBEAT, {"running": 0})

    async def link_gone() -> bool:
        try:
            await executor.sock.send_multipart(probe, zmq.NOBLOCK)
            return False
        except zmq.Again:
            return True

    async def warned() -> bool:
        return any("executor.head_unreachable" in r.getMessage() for r in caplog.records)

    await _until(link_gone, 20)
    caplog.set_level("WARNING", logger="ccexec.executor")
    running = asyncio.ensure_future(executor.run())
    try:
        await _until(warned, 20)
        executor.stopping.set()
        await asyncio.wait_for(asyncio.shield(running), 20)
    finally:
        running.cancel()
        executor.ctx.destroy(linger=0)


@async_test(90)
async def test_kill_9_of_a_node_executor_ends_its_job_lost_and_its_tree(cluster):
    head, node, _, _ = cluster
    async with Client(head.url) as client:
        job = await client.execute("echo started; sleep 300", labels={"site": "far"})
        async for event in job.events(30):
            if event["method"] == "process.output":
                break
        (executor_pid,) = [p for p in node.role_pids("executor") if job.pid in
                           [c.pid for c in psutil.Process(p).children(recursive=True)]]
        os.kill(executor_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        result = await job.wait(30)
        lost_after = time.monotonic() - killed_at
        assert result.reason == "lost" and "far-node" in result.completed["error"]
        # The respawned executor ends the orphaned `sleep` (the head cannot: another host's pid).
        wait_for(lambda: not pid_running(job.pid), 20, what="the orphaned job's process ended on the node")
        reaped_after = time.monotonic() - killed_at
        wait_for(lambda: "job.orphan_reaped" in node.log_path.read_text(errors="replace"), 10,
                 what="the reaping logged (after the kill)")
        wait_for(lambda: len(node_executors(head, "far-node")) == 1, 20, what="the new executor registered")
        again = await (await client.execute("echo back", labels={"site": "far"})).wait(30)
        assert again.stdout == "back\n"
    print(f"\nnode executor kill -9: job lost after {lost_after:.1f} s, its process ended after {reaped_after:.1f} s")


@async_test(60)
async def test_ccexecctl_status_lists_the_node(cluster):
    head, node, _, _ = cluster
    async with Client(head.url) as client:  # its own: another worker may run this module's other tests
        await (await client.execute("true", labels={"site": "far"})).wait(30)
    ctl = str(Path(sys.executable).parent / "ccexecctl")
    shown = subprocess.run([ctl, "--config", str(head.config), "--state-dir", str(head.state_dir), "status"],
                           capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    rows = [line.split() for line in shown.stdout.splitlines() if "far-node" in line]
    assert rows and all(r[2] == "2" and r[-1] == "site=far" for r in rows), shown.stdout
    listed = subprocess.run([ctl, "--config", str(head.config), "--state-dir", str(head.state_dir), "jobs"],
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0 and " far-node " in listed.stdout, listed.stdout
    on_node = subprocess.run([ctl, "--config", str(node.config), "--state-dir", str(node.state_dir), "status"],
                             capture_output=True, text=True, timeout=30)
    assert on_node.returncode == 0 and "executor node far-node of tcp://" in on_node.stdout, on_node.stdout
    refused = subprocess.run([ctl, "--state-dir", str(node.state_dir), "restart", "--watcher", "handler"],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and "this daemon runs no handler" in refused.stderr


def test_restarting_a_node_brings_its_executors_back_to_the_head(cluster):
    head, node, _, _ = cluster
    ctl = str(Path(sys.executable).parent / "ccexecctl")
    before = {e["pid"] for e in node_executors(head, "far-node")}
    done = subprocess.run([ctl, "--state-dir", str(node.state_dir), "restart"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: (lambda now: now and not now & before)({e["pid"] for e in node_executors(head, "far-node")}),
             20, what="the node's new executors registered, the old ones gone")
    reloaded = subprocess.run([ctl, "--state-dir", str(node.state_dir), "reload"], capture_output=True, text=True,
                              timeout=60)
    assert reloaded.returncode == 0 and reloaded.stdout.strip() == "reloaded: executors=1", reloaded.stdout


@pytest.mark.parametrize("settings, args, message", [
    ({"remote_listen": "tcp://127.0.0.1:1"}, [], "remote_listen needs curve_secret_key"),
    ({}, ["--role", "executor"], "an executor node needs [ccexec] broker"),
    ({}, ["--role", "executor", "--broker", "tcp://127.0.0.1:1"], "needs [ccexec] curve_secret_key"),
])
def test_remote_settings_without_their_keys_refuse_to_start(tmp_path, settings, args, message):
    daemon = Daemon(tmp_path, settings)
    done = daemon.run_to_exit(*args)
    assert done.returncode == 2 and message in done.stderr, done.stderr


@async_test(120)
async def test_kill_9_of_the_head_broker_loses_no_output_of_a_node_job(cluster):
    """Chunks in flight to the killed broker are lost on the wire; the new
    broker finds the gap in its copy of the journal and asks the node again."""
    head, _, _, _ = cluster
    lines = 150
    code = f"import time\nfor i in range({lines}):\n    print(f'{{i:05d}}' + 'y' * 8000, flush=True); time.sleep(0.02)"
    expected = "".join(f"{i:05d}" + "y" * 8000 + "\n" for i in range(lines))
    async with Client(head.url) as client:
        job = await client.execute(argv=[sys.executable, "-c", code], labels={"site": "far"}, stream_mode="chunks")
        assert await anext(_outputs(job))
        (broker,) = head.role_pids("broker")
        os.kill(broker, signal.SIGKILL)
        result = await job.wait(60)
        assert result.exit_code == 0 and result.stdout == expected
        assert (await (await client.attach(job.job_id)).wait(30)).stdout == expected
    _recovered(head, broker)


def _recovered(head: Daemon, broker: int) -> None:
    """After a kill -9 of the head's broker: a new one that has settled and
    has the node back, as the module's other tests expect to find it."""
    wait_for(lambda: head.role_pids("broker") not in ([], [broker]) and head.ready()
             and node_executors(head, "far-node"), 20, what="the head back with a new broker and the node")


@async_test(90)
async def test_a_node_job_that_ends_while_the_head_broker_is_down_is_recorded_and_told(cluster, tmp_path):
    """The node tells the new broker of the job's end when it registers; the
    broker knows the job only from its record, which names the node."""
    head, _, _, _ = cluster
    go = tmp_path / "go"
    async with Client(head.url) as client:
        job = await client.execute(f"echo waiting; while [ ! -e {go} ]; do sleep 0.02; done; echo done",
                                   labels={"site": "far"})
        assert await anext(_outputs(job)) == "waiting\n"
        (broker,) = head.role_pids("broker")
        os.kill(broker, signal.SIGKILL)
        go.touch()
        result = await job.wait(60)
        assert (result.exit_code, result.reason, result.stdout) == (0, "exit", "waiting\ndone\n")
        assert (await client.job_status(job.job_id))["state"] == "finished"
    _recovered(head, broker)


async def _outputs(job):
    async for event in job.events(30):
        if event["method"] == "process.output":
            yield event["params"]["data"]


@async_test(60)
async def test_a_node_cannot_speak_for_jobs_it_was_not_given(cluster):
    """A node's key admits it to the pool, not to other executors' jobs: a
    node (here a raw ZeroMQ peer with an allowed key) claiming a running job
    is told to cancel its copy, and its output and end for it are ignored."""
    head, _, keys, endpoint = cluster
    go = head.workdir / f"go-{uuid.uuid4().hex}"
    with _raw_node(keys, endpoint, b"executor-intruder-1") as intruder:
        async with Client(head.url) as client:
            # On the head's own executor, running until the forgeries are in.
            job = await client.execute(f"echo first; while [ ! -e {go} ]; do sleep 0.05; done; echo second")
            assert await anext(_outputs(job)) == "first\n"
            claim = {"job_id": job.job_id, "pid": 1, "pgid": 1, "started_at": time.time(), "spec": {}}
            intruder.send_multipart(bus.pack(bus.READY, {"role": "executor", "pid": 1, "capacity": 0,
                                                         "jobs": [claim], "completed": [], "node": "intruder"}))
            told = await asyncio.to_thread(_receive_kind, intruder, bus.CONTROL, 10)
            assert told == {"job_id": job.job_id, "action": "CANCEL", "ref": ""}
            intruder.send_multipart(bus.pack(bus.OUTPUT, {"job_id": job.job_id, "stream": "stdout", "offset": 6},
                                             b"forged\n"))
            intruder.send_multipart(bus.pack(bus.COMPLETED, {"job_id": job.job_id, "exit_code": 0, "reason": "exit",
                                                             "stdout_bytes": 13, "stderr_bytes": 0}))
            foreign = f"executor.foreign_job executor=executor-intruder-1 job_id={job.job_id}"
            wait_for(lambda: head.log_path.read_text(errors="replace").count(foreign) == 2, 10,
                     what="the head passing over the forged output and end")
            go.touch()
            result = await job.wait(30)
            assert result.stdout == "first\nsecond\n" and result.exit_code == 0


@async_test(60)
async def test_a_malformed_end_from_a_node_ends_the_job_lost_and_says_why(cluster):
    """A node (here a raw ZeroMQ peer with an allowed key, as a node of
    another version might be) that reports a job's end with an exit_code
    that is no number: the job ends `lost`, and its client is told why."""
    head, _, keys, endpoint = cluster
    with _raw_node(keys, endpoint, b"executor-odd-1") as odd:
        odd.send_multipart(bus.pack(bus.READY, {"role": "executor", "pid": 1, "capacity": 1, "jobs": [],
                                                "completed": [], "node": "odd", "labels": {"site": "odd"}}))

        def run_the_job_oddly() -> tuple[dict | None, dict | None]:
            """As a node: take the job, start it, end it; within the broker's heartbeat liveness (3 s)."""
            dispatched = _receive_kind(odd, bus.DISPATCH, 10)
            job_id = dispatched["job_id"] if dispatched else ""
            odd.send_multipart(bus.pack(bus.STARTED, {"job_id": job_id, "pid": 7, "pgid": 7,
                                                      "started_at": time.time()}))
            odd.send_multipart(bus.pack(bus.COMPLETED, {"job_id": job_id, "pid": 7, "pgid": 7,
                                                        "exit_code": "zero", "reason": "exit", "error": None,
                                                        "execution_time": 0.1, "stdout_bytes": 0}))
            return dispatched, _receive_kind(odd, bus.COMPLETED_ACK, 10)

        async with Client(head.url) as client:
            # The execute is answered once the job has started: the node must be at work meanwhile.
            node_at_work = asyncio.ensure_future(asyncio.to_thread(run_the_job_oddly))
            job = await client.execute("echo hi", labels={"site": "odd"})
            dispatched, acked = await node_at_work
            assert dispatched["job_id"] == job.job_id and acked == {"job_id": job.job_id}
            result = await job.wait(30)
            assert (result.reason, result.exit_code) == ("lost", -9)
            assert result.completed["error"] == ("its node's report of its end was malformed: "
                                                 "'exit_code' is not an integer")
            assert (await client.job_status(job.job_id))["state"] == "finished"


def test_a_report_of_a_jobs_end_is_checked_field_by_field():
    good = {"job_id": "f" * 32, "pid": 7, "pgid": 7, "exit_code": 0, "reason": "exit", "error": None,
            "execution_time": 1, "stdout_bytes": 3, "stderr_bytes": 0, "claude_bytes": 0}
    assert bus.completed_flaw(good) is None and bus.completed_flaw({**good, "claude": {"is_error": False}}) is None
    assert bus.completed_flaw({**good, "exit_code": True}) == "'exit_code' is not an integer"
    assert bus.completed_flaw({**good, "stdout_bytes": "3"}) == "'stdout_bytes' is not an integer or null"
    assert bus.completed_flaw({k: v for k, v in good.items() if k != "reason"}) == "'reason' is not a string"


def test_how_far_a_jobs_output_goes_keeps_only_its_output_streams_and_integer_ends():
    assert bus.output_ends({"stdout": 10, "stderr": 0}) == {"stdout": 10, "stderr": 0}
    assert bus.output_ends({"stdout": "10", "claude": 5, "stderr": 3}) == {"stderr": 3}
    assert bus.output_ends(["stdout", 10]) == {} and bus.output_ends(None) == {}


@contextlib.contextmanager
def _raw_node(keys: dict, endpoint: str, identity: bytes):
    """A raw ZeroMQ peer on the head's remote face, with the node's key: it
    sends no heartbeats, so the broker gives it up 3 s after its last word."""
    ctx = zmq.Context()
    sock = remote.connect_to_head(ctx, Settings(curve_secret_key=str(keys["far"][1]),
                                                curve_server_key=str(keys["head"][0]), broker=endpoint), identity)
    try:
        yield sock
    finally:
        sock.close(linger=0)
        ctx.term()


def _receive_kind(sock: zmq.Socket, kind: bytes, timeout: float) -> dict | None:
    """The header of the first message of this kind within timeout (others skipped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(left * 1000):
            got, header, _ = bus.unpack(sock.recv_multipart())
            if got == kind:
                return header
    return None


def test_a_remote_listen_port_in_use_is_a_clear_error_at_start(tmp_path):
    keys, clients = cluster_keys(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        daemon = Daemon(tmp_path / "head", remote_head_settings(f"tcp://127.0.0.1:{port}", keys["head"], clients))
        done = daemon.run_to_exit()
    assert done.returncode == 1, done.stderr
    assert f"127.0.0.1:{port} is already in use by PID {os.getpid()}" in done.stderr


@pytest.mark.parametrize("host", ["head", "node"])
@async_test(120)
async def test_a_node_job_whose_output_cannot_be_journaled_is_ended_and_says_so(tmp_path, host):
    """The head's copy of the journal, or the node's own (where the job's
    owner is recorded too), on a full or broken disk."""
    keys, clients = cluster_keys(tmp_path)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    head = Daemon(tmp_path / "head", remote_head_settings(endpoint, keys["head"], clients), executors=1)
    node = ExecutorNode(tmp_path / "node", endpoint, keys["far"], keys["head"][0], "far-node", labels="site=far")
    broken = head if host == "head" else node
    jobs, moved = broken.state_dir / "jobs", broken.state_dir / "jobs.moved"
    try:
        head.start()
        node.start()
        wait_for(lambda: node_executors(head, "far-node"), 20, what="the node registered")
        [broker] = head.role_pids("broker")
        async with Client(head.url) as client:
            before = await (await client.execute("echo before", labels={"site": "far"})).wait(30)
            assert before.stdout == "before\n"
            jobs.rename(moved)
            jobs.write_text("")  # not a directory: no journal can be made, as on a full disk
            try:
                result = await (await client.execute("echo lost; sleep 30", labels={"site": "far"})).wait(30)
            finally:
                jobs.unlink()
                moved.rename(jobs)
            assert result.reason == "journal_failed" and result.status == "failed", result.completed
            assert result.stdout == "" and "journal" in result.completed["error"]
            assert head.role_pids("broker") == [broker]  # the head's broker was not taken down by it
            again = await client.execute("echo kept", labels={"site": "far"})
            assert (await again.wait(30)).stdout == "kept\n"
    finally:
        finish(node, head)


@async_test(90)
async def test_a_claude_job_on_the_node_loses_no_notification_to_a_head_broker_kill(cluster, tmp_path):
    """What the node sends while the head's broker is down is lost on the
    wire: the new broker finds the gap in its copy of the job's `claude`
    journal, as in its output, and asks the node again."""
    head, node, _, _ = cluster
    go = tmp_path / "go"
    lines = ['{"type":"system","subtype":"init","session_id":"s-1","model":"m","tools":["Bash"]}',
             '{"type":"assistant","message":{"content":[{"type":"tool_use","id":"toolu_1","name":"Bash"}]}}',
             '{"type":"result","subtype":"success","is_error":false,"result":"4","num_turns":1}']
    command = f"echo '{lines[0]}'; while [ ! -e {go} ]; do sleep 0.02; done; echo '{lines[1]}'; echo '{lines[2]}'"
    wire = await Wire.open(head.url)
    job_id = (await wire.execute(command=command, claude=True, labels={"site": "far"}))["job_id"]
    await wire.until(lambda m: m.get("method") == "claude.event", 20)
    (broker,) = head.role_pids("broker")
    os.kill(broker, signal.SIGKILL)
    go.touch()
    completed = await wire.completed(job_id, 60)
    assert completed["reason"] == "exit" and wire.text(job_id) == "".join(line + "\n" for line in lines)
    events = [m["params"] for m in wire.of_job(job_id) if m.get("method") == "claude.event"]
    starts = [0, len(lines[0]) + 1, len(lines[0]) + len(lines[1]) + 2]
    assert [(e["kind"], e["offset"]) for e in events] == list(zip(["init", "tool_use", "result"], starts))
    # The node's journal is gone once the head has the job's end: the replay is the head's copy.
    wait_for(lambda: not (node.state_dir / "jobs" / job_id).exists(), 10, what="the node's journal removed")
    again = await Wire.open(head.url)
    await again.answer(await again.request("attach", {"job_id": job_id}))
    await again.completed(job_id)
    assert [m["params"] for m in again.of_job(job_id) if m.get("method") == "claude.event"] == events
    _recovered(head, broker)
    await wire.close()
    await again.close()
