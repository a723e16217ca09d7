"""ccexecctl, driven as a subprocess against real daemons."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import site
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import websockets

from ccexec.client import Client
from ccexec.store import JobStore
from support import CCEXECD, ROOT, Daemon, async_test, finish, marked_processes, ticker, wait_for

CTL = str(Path(sys.executable).parent / "ccexecctl")
TICKER, TICKER_OUTPUT = ticker(120, 0.05)


def ctl(daemon: Daemon, *args: str, timeout: float = 90, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([CTL, "--state-dir", str(daemon.state_dir), *args], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A daemon that also keeps log files."""
    tmp = tmp_path_factory.mktemp("logged")
    d = Daemon(tmp, settings={"log_dir": str(tmp / "logs")}).start()
    yield d
    finish(d)


def test_health_and_status_in_both_formats(logged):
    health = ctl(logged, "health")
    assert health.returncode == 0 and health.stdout.startswith("healthy, ready")
    status = json.loads(ctl(logged, "--json", "status").stdout)
    assert {r["watcher"] for r in status["processes"]} >= {"broker", "executor", "handler"}
    assert all(r["pid"] and r["rss_mib"] > 0 for r in status["processes"])
    assert status["health"]["service"] == "ccexec" and status["ready"]["status"] == "ready"


def test_run_streams_output_and_exits_with_the_jobs_status(logged):
    done = ctl(logged, "run", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (done.returncode, done.stdout, done.stderr) == (7, "out\n", "err\n")
    killed = ctl(logged, "run", "--", "sh", "-c", "kill -TERM $$")
    assert killed.returncode == 128 + signal.SIGTERM


def test_run_ctrl_c_cancels_the_job(logged, tmp_path):
    marker = tmp_path / "started"
    proc = subprocess.Popen([CTL, "--state-dir", str(logged.state_dir), "run", "--", "sh", "-c",
                             f"touch {marker}; sleep 60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(marker.exists, 20, what="the job to start")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()


def test_detached_run_then_jobs_job_logs_and_cancel(logged):
    job_id = ctl(logged, "run", "--detach", "--", "sh", "-c", "echo begun; sleep 60").stdout.strip()
    assert len(job_id) == 32
    wait_for(lambda: ctl(logged, "logs", "--job", job_id).stdout == "begun\n", 20, 0.2, "the job's output")
    running = json.loads(ctl(logged, "--json", "jobs", "--state", "running").stdout)
    assert [r["job_id"] for r in running] == [job_id]
    table = ctl(logged, "jobs", "--since", "5m").stdout
    assert table.splitlines()[0].split()[:3] == ["JOB", "ID", "STATE"] and job_id in table
    assert json.loads(ctl(logged, "--json", "job", job_id).stdout)["state"] == "running"
    canceled = ctl(logged, "cancel", job_id)
    assert canceled.returncode == 0 and canceled.stdout.startswith("canceled")
    record = json.loads(ctl(logged, "--json", "job", job_id).stdout)
    assert (record["state"], record["reason"]) == ("finished", "canceled")
    assert ctl(logged, "cancel", job_id).returncode == 1  # already finished
    assert ctl(logged, "job", "0" * 32).returncode == 1


def test_logs_follow_shows_new_events_of_one_watcher(logged):
    # -n 1000: lines written before it opened the file are shown too, so there is no race.
    follower = subprocess.Popen([CTL, "--state-dir", str(logged.state_dir), "logs", "-f", "--watcher", "broker",
                                 "-n", "1000"], stdout=subprocess.PIPE, text=True)
    try:
        job_id = ctl(logged, "run", "--detach", "--", "true").stdout.strip()
        lines: list[str] = []
        reader = threading.Thread(target=lambda: [lines.append(l) for l in follower.stdout], daemon=True)
        reader.start()
        wait_for(lambda: any(f"job.finished job_id={job_id}" in l for l in lines), 20, 0.1, "the followed line")
        assert all("ccexec.broker[" in l for l in lines)
    finally:
        follower.terminate()
        follower.wait(10)


def test_logs_without_log_files_says_where_they_are(daemon):
    missing = ctl(daemon, "logs")
    assert missing.returncode == 1 and "journalctl" in missing.stderr


def test_commands_say_when_no_daemon_runs(tmp_path):
    for args in (["status"], ["stop"], ["health"]):
        result = subprocess.run([CTL, "--state-dir", str(tmp_path / "none"), *args], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 3, (args, result.stderr)


def test_start_daemonizes_and_stop_stops(tmp_path):
    d = Daemon(tmp_path)  # only for its paths, port and marker; ccexecctl starts it
    try:
        started = subprocess.run([CTL, "--config", str(d.config), "--state-dir", str(d.state_dir), "--json",
                                  "start", "--", "--port", str(d.port)], capture_output=True, text=True,
                                 timeout=60, env=d.env)
        assert started.returncode == 0, started.stderr
        pid = json.loads(started.stdout)["pid"]
        assert d.health()["status"] == "healthy"
        assert "already running" in ctl(d, "start").stdout
        assert ctl(d, "stop").returncode == 0
        wait_for(lambda: not marked_processes(d.mark), 20, 0.2, "everything to exit")
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    finally:
        for proc in marked_processes(d.mark):
            proc.kill()


def test_reload_changes_pool_sizes_live(make_daemon):
    d = make_daemon(handlers=2)
    d.config.write_text(d.config.read_text().replace("numprocesses = 2\npriority = 10",
                                                     "numprocesses = 3\npriority = 10"))
    # ccexecd was started with --handlers 2, which wins over the file: start from the file alone.
    launch = json.loads((d.state_dir / "run" / "launch.json").read_text())
    launch["overrides"].pop("handlers")
    (d.state_dir / "run" / "launch.json").write_text(json.dumps(launch))
    reloaded = ctl(d, "reload")
    assert reloaded.returncode == 0, reloaded.stderr
    wait_for(lambda: len(d.role_pids("handler")) == 3, 20, 0.2, "a third handler")
    assert d.ready()


def test_status_shows_a_frozen_process_as_frozen(make_daemon):
    """A process stopped by SIGSTOP (or a debugger) is alive to Circus,
    and serves nobody: status says which."""
    d = make_daemon(sections={"plugin:supervision": {"watchers_regex": "^(broker|handler)$"}})  # not killed meanwhile
    frozen, running = d.role_pids("executor")
    os.kill(frozen, signal.SIGSTOP)
    try:
        shown = json.loads(ctl(d, "--json", "status").stdout)["processes"]
    finally:
        os.kill(frozen, signal.SIGCONT)
    status = {row["pid"]: row["status"] for row in shown}
    assert (status[frozen], status[running]) == ("frozen", "active")


@async_test(120)
async def test_status_and_restart_see_every_process_while_jobs_come_and_go(make_daemon):
    d = make_daemon()
    stop = asyncio.Event()

    async def churn() -> None:
        async with Client(d.url) as client:
            while not stop.is_set():
                await (await client.execute("true", parallel=True)).wait(20)
    executors, [broker] = sorted(d.role_pids("executor")), d.role_pids("broker")
    churning = [asyncio.ensure_future(churn()) for _ in range(4)]
    try:
        for _ in range(20):
            status = await asyncio.to_thread(ctl, d, "--json", "status")
            rows = json.loads(status.stdout)["processes"]
            assert sorted(r["pid"] for r in rows if r["watcher"] == "executor") == executors
        restart = await asyncio.to_thread(ctl, d, "--json", "restart", "--watcher", "broker")
    finally:
        stop.set()
        await asyncio.gather(*churning)
    assert json.loads(restart.stdout)["replaced"] == [broker], restart.stdout


def test_plain_restart_replaces_every_process_and_cancels_running_jobs(make_daemon):
    d = make_daemon()
    before = set(d.role_pids("handler") + d.role_pids("broker") + d.role_pids("executor"))
    job_id = ctl(d, "run", "--detach", "--", "sleep", "60").stdout.strip()
    restarted = ctl(d, "restart")
    assert restarted.returncode == 0, restarted.stderr
    after = set(d.role_pids("handler") + d.role_pids("broker") + d.role_pids("executor"))
    assert not before & after
    record = wait_for(lambda: (lambda r: r if r["state"] == "finished" else None)(
        json.loads(ctl(d, "--json", "job", job_id).stdout)), 30, 0.3, "the job's record")
    assert record["reason"] in ("canceled", "lost")


@pytest.mark.parametrize("watcher", ["executor", "handler"])
def test_processes_restarted_on_purpose_are_not_logged_as_lost(make_daemon, watcher):
    """Operators tail the log for warnings: a restart is not one."""
    d = make_daemon()
    old = d.role_pids(watcher)
    restarted = ctl(d, "restart", "--watcher", watcher)
    assert restarted.returncode == 0, restarted.stderr
    for pid in old:
        wait_for(lambda: f"{watcher}.exited {watcher}={watcher}-{pid}" in d.log_tail(200), 10, 0.1,
                 f"the broker to see {watcher} {pid} go")
    assert " WARNING " not in d.log_tail(200)


def test_restart_of_a_hung_broker_waits_for_it_and_says_so(make_daemon):
    """What an operator does about a broker that does not answer: restart
    it. Circus gives it graceful_timeout (here 6 s) before SIGKILL, longer
    than a Circus command was waited for."""
    d = make_daemon(sections={"watcher:broker": {"graceful_timeout": "6"},
                              "plugin:supervision": {"watchers_regex": "^(handler|executor)$"}})
    [broker] = d.role_pids("broker")
    os.kill(broker, signal.SIGSTOP)  # hung: it handles no signal but SIGKILL
    try:
        restarted = ctl(d, "--json", "restart", "--watcher", "broker")
    finally:
        if psutil.pid_exists(broker):
            os.kill(broker, signal.SIGCONT)
    assert restarted.returncode == 0, restarted.stderr
    assert json.loads(restarted.stdout)["replaced"] == [broker]


@pytest.mark.parametrize("restart", [("--graceful",), ("--watcher", "broker")])
@async_test(120)
async def test_restart_of_the_broker_keeps_the_queue_in_its_order(make_daemon, tmp_path, restart):
    d = make_daemon(executors=1, settings={"slots_per_executor": 1})
    go = tmp_path / "go"
    os.mkfifo(go)
    async with Client(d.url) as client:
        running = await client.execute(f"read word < {go}; echo $word", parallel=True)
        queued = [await client.execute(f"echo {word}", parallel=True) for word in ("second", "third")]
        assert running.pid is not None and [job.pid for job in queued] == [None, None]
        restarted = await asyncio.to_thread(ctl, d, "restart", *restart)
        with open(go, "w") as fifo:  # the running job ends only now
            fifo.write("first\n")
        results = [await job.wait(60) for job in (running, *queued)]
        records = [await client.job_status(job.job_id) for job in queued]
    assert restarted.returncode == 0, restarted.stderr
    assert [(r.reason, r.stdout) for r in results] == [("exit", "first\n"), ("exit", "second\n"),
                                                       ("exit", "third\n")]
    assert records[0]["started_at"] < records[1]["started_at"]


@async_test(120)
async def test_restart_of_the_broker_keeps_a_sequenced_job_behind_its_predecessor(make_daemon, tmp_path):
    """Jobs of one connection run one after another (no `parallel`): across
    the restart, the second still waits for the first."""
    d = make_daemon()
    go = tmp_path / "go"
    os.mkfifo(go)
    async with Client(d.url) as client:
        first = await client.execute(f"read word < {go}; echo $word")
        second = await client.execute("echo second")
        assert first.pid is not None and second.pid is None
        restarted = await asyncio.to_thread(ctl, d, "restart", "--watcher", "broker")
        await asyncio.to_thread(wait_for, lambda: "broker.settled" in d.log_tail(), 20, 0.1,
                                "the new broker to take up the jobs")
        with open(go, "w") as fifo:
            fifo.write("first\n")
        results = [await job.wait(60) for job in (first, second)]
        records = [await client.job_status(job.job_id) for job in (first, second)]
    assert restarted.returncode == 0, restarted.stderr
    assert [(r.reason, r.stdout) for r in results] == [("exit", "first\n"), ("exit", "second\n")]
    assert records[1]["started_at"] >= records[0]["finished_at"]


def test_run_that_the_daemon_stops_under_says_so_and_exits_as_canceled(make_daemon):
    d = make_daemon()
    run = subprocess.Popen([CTL, "--state-dir", str(d.state_dir), "run", "--", "sh", "-c", "echo started; sleep 100"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert run.stdout.readline() == "started\n"
        assert d.stop() == 0
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 128 + signal.SIGTERM and err == "ccexecctl: the daemon is stopping\n", (out, err)


@async_test(120)
async def test_sighup_reloads_handlers_and_broker_and_leaves_running_jobs_alone(make_daemon, tmp_path):
    """`systemctl reload` (ExecReload sends ccexecd SIGHUP)."""
    d = make_daemon()
    go = tmp_path / "go"
    os.mkfifo(go)
    async with Client(d.url) as client:
        job = await client.execute(f"read word < {go}; echo $word")
        handlers, brokers, executors = (set(d.role_pids(role)) for role in ("handler", "broker", "executor"))
        d.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(wait_for, lambda: not (set(d.role_pids("handler")) & handlers) and not (
            set(d.role_pids("broker")) & brokers) and "executor.reload_skipped" in d.log_tail(), 30, 0.1,
                                "new handlers and broker")
        with open(go, "w") as fifo:
            fifo.write("kept\n")
        result = await job.wait(60)
    assert (result.reason, result.stdout) == ("exit", "kept\n"), result.completed
    assert set(d.role_pids("executor")) == executors


def test_stop_that_comes_during_a_reload_is_carried_out_after_it(make_daemon):
    """`systemctl reload` then `systemctl stop`: Circus refuses a stop while
    it reloads; the daemon must stop all the same, not run on."""
    d = make_daemon()
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "Got signal SIG_HUP" in d.log_tail(), 10, what="the reload to begin")
    assert d.stop() == 0


def test_stop_cancels_the_queued_jobs_and_records_it(make_daemon):
    d = make_daemon(executors=1, settings={"slots_per_executor": 1})
    running = ctl(d, "run", "--detach", "--", "sleep", "60").stdout.strip()
    queued = ctl(d, "run", "--detach", "--", "echo", "never").stdout.strip()
    assert json.loads(ctl(d, "--json", "job", queued).stdout)["state"] == "queued"
    assert d.stop() == 0
    records = {job_id: JobStore(str(d.state_dir)).get(job_id) for job_id in (running, queued)}
    assert (records[running]["state"], records[running]["reason"]) == ("finished", "canceled")
    assert (records[queued]["state"], records[queued]["reason"], records[queued]["error"]) == (
        "finished", "canceled", "the daemon is stopping")


def test_stop_with_a_kill_grace_past_the_shipped_graceful_timeout_still_ends_jobs_as_canceled(make_daemon):
    """kill_grace 11 s, a job that ignores SIGTERM: its executor waits the
    11 s before SIGKILL, and Circus (10 s for an executor as shipped) must
    not kill the executor first, leaving the record to say lost."""
    d = make_daemon(settings={"kill_grace": 11})
    job_id = ctl(d, "run", "--detach", "--", "sh", "-c", "trap '' TERM; echo up; sleep 60").stdout.strip()
    wait_for(lambda: json.loads(ctl(d, "--json", "job", job_id).stdout)["state"] == "running", 10, 0.1, "the start")
    assert d.stop() == 0
    record = JobStore(str(d.state_dir)).get(job_id)
    assert (record["state"], record["reason"], record["error"]) == ("finished", "canceled", "the daemon is stopping")


@async_test(120)
async def test_graceful_restart_during_streaming_jobs_refuses_nobody_loses_nothing(make_daemon):
    d = make_daemon()
    old_handlers = d.role_pids("handler")
    [old_broker] = d.role_pids("broker")
    failures, probes = [], []
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            try:
                async with websockets.connect(d.url, open_timeout=5) as ws:
                    assert json.loads(await asyncio.wait_for(ws.recv(), 5))["method"] == "connected"
                probes.append(time.monotonic())
            except Exception as exc:  # any failed handshake counts
                failures.append(repr(exc))
            await asyncio.sleep(0.05)

    async with Client(d.url) as a, Client(d.url) as b, Client(d.url) as c:
        jobs = [await client.execute(TICKER) for client in (a, b, c)]
        prober = asyncio.ensure_future(probe())
        started = time.monotonic()
        restart = await asyncio.to_thread(ctl, d, "restart", "--graceful")
        took = time.monotonic() - started
        results = await asyncio.gather(*(job.wait(60) for job in jobs))
        stop.set()
        await prober
    assert restart.returncode == 0, restart.stderr
    assert not failures, failures
    assert len(probes) > 10
    for result in results:
        assert (result.reason, result.stdout) == ("exit", TICKER_OUTPUT)
    assert not set(d.role_pids("handler")) & set(old_handlers) and d.role_pids("broker") != [old_broker]
    print(f"graceful restart: {took:.2f} s, {len(probes)} handshakes during it, 0 failed, "
          f"{sum(c.reconnects for c in (a, b, c))} client resumes")


@async_test(120)
async def test_graceful_restart_under_a_stream_of_executes_answers_each_and_runs_each_once(make_daemon):
    """A request in flight when a handler closes its connection is either
    answered before the close or not carried out and sent again: no client
    sees an error, and no job runs that its client does not know of."""
    d = make_daemon()
    known, failures = [], []
    stop = asyncio.Event()

    async def client_loop(n: int) -> None:
        async with Client(d.url) as client:
            for i in range(400):
                if stop.is_set():
                    return
                try:
                    job = await client.execute(f"echo {n}-{i}")
                    known.append(job.job_id)
                    assert (await job.wait(30)).stdout == f"{n}-{i}\n"
                except Exception as exc:
                    failures.append(repr(exc))
    clients = [asyncio.ensure_future(client_loop(n)) for n in range(8)]
    try:
        await asyncio.to_thread(wait_for, lambda: len(known) > 50, 30, 0.05, "jobs before the restart")
        restart = await asyncio.to_thread(ctl, d, "restart", "--graceful")
        count = len(known)
        await asyncio.to_thread(wait_for, lambda: len(known) > count + 50, 30, 0.05, "jobs after it")
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert restart.returncode == 0, restart.stderr
    assert not failures, failures[:5]
    recorded = {row["job_id"] for row in JobStore(str(d.state_dir)).db.execute("SELECT job_id FROM jobs")}
    assert recorded == set(known)


def test_reload_of_a_daemon_whose_state_dir_came_from_systemd(make_daemon, tmp_path):
    """Under systemd the state directory comes from $STATE_DIRECTORY, which
    ccexecctl, run from a shell, does not have."""
    d = make_daemon(start=False)
    d.env["STATE_DIRECTORY"] = str(d.state_dir)
    d.command = lambda: [*CCEXECD, "--config", str(d.config), "--port", str(d.port)]  # no --state-dir
    d.start()
    d.config.write_text(d.config.read_text().replace("numprocesses = 2\npriority = 10",
                                                     "numprocesses = 3\npriority = 10"))
    shell_env = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
    shell_env["XDG_STATE_HOME"] = str(tmp_path / "xdg")
    reloaded = ctl(d, "reload", env=shell_env)
    assert reloaded.returncode == 0, reloaded.stderr
    wait_for(lambda: len(d.role_pids("handler")) == 3, 20, 0.2, "a third handler")
    assert d.ready()


def test_reload_keeps_the_open_file_limit_ccexecd_runs_with(make_daemon):
    """rlimit_nofile is capped at ccexecd's own hard limit, not at that of
    the shell ccexecctl reload happens to run in."""
    ours = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    theirs = 2048
    if ours != resource.RLIM_INFINITY and ours <= theirs:
        pytest.skip(f"this process's hard open-file limit ({ours}) is not above {theirs}")
    d = make_daemon(start=False)
    limited = [sys.executable, "-c", "import os, resource, sys; "
               f"resource.setrlimit(resource.RLIMIT_NOFILE, ({theirs}, {theirs})); "
               "os.execv(sys.argv[1], sys.argv[1:])"]
    d.command = lambda: [*limited, *Daemon.command(d)]
    d.start()
    handlers = d.role_pids("handler")
    reloaded = ctl(d, "reload")
    assert reloaded.returncode == 0, reloaded.stderr
    wait_for(d.ready, 20, 0.2, "the daemon ready after the reload")
    assert d.role_pids("handler") == handlers  # nothing changed: nothing restarted
    for pid in d.role_pids("handler"):
        assert psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)[1] <= theirs


def test_daemon_on_ipv6_loopback_serves_and_ccexecctl_reaches_it(make_daemon):
    """host = ::1, the loopback address the docs offer besides 127.0.0.1."""
    d = make_daemon(start=False, sections={"socket:ccexec": {"host": "::1"}})

    def get(path: str, timeout: float = 5) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://[::1]:{d.port}{path}", timeout=timeout) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
    d.get = get
    d.start()
    health = ctl(d, "health")
    assert health.returncode == 0, health.stderr
    ran = ctl(d, "run", "--", "echo", "over ipv6")
    assert ran.returncode == 0 and ran.stdout == "over ipv6\n", ran.stderr


def test_start_finds_ccexecd_installed_beside_ccexecctl_not_beside_python(tmp_path):
    """pip outside a virtualenv puts the scripts in /usr/local/bin or
    ~/.local/bin while Python is /usr/bin/python3."""
    python_dir, scripts = tmp_path / "usr-bin", tmp_path / "local-bin"
    python_dir.mkdir()
    scripts.mkdir()
    (python_dir / "python3").symlink_to(os.path.realpath(sys.executable))
    for name in ("ccexecctl", "ccexecd"):
        shutil.copy2(Path(sys.executable).parent / name, scripts / name)
    d = Daemon(tmp_path / "daemon")
    env = {**d.env, "PYTHONPATH": os.pathsep.join([*site.getsitepackages(), str(ROOT)])}
    try:
        started = subprocess.run([str(python_dir / "python3"), str(scripts / "ccexecctl"), "--config", str(d.config),
                                  "--state-dir", str(d.state_dir), "start", "--", "--port", str(d.port)],
                                 capture_output=True, text=True, timeout=60, env=env)
        assert started.returncode == 0, started.stderr
        assert d.health()["status"] == "healthy"
        assert ctl(d, "stop").returncode == 0
        wait_for(lambda: not marked_processes(d.mark), 20, 0.2, "everything to exit")
    finally:
        for proc in marked_processes(d.mark):
            proc.kill()


@async_test()
async def test_a_refused_connection_is_reported_with_its_http_status(make_daemon):
    d = make_daemon(handlers=1, settings={"max_sessions_per_address": 1})
    async with websockets.connect(d.url, open_timeout=10):  # this address's one session
        refused = await asyncio.to_thread(ctl, d, "jobs")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "refused the connection: HTTP 503" in refused.stderr
    assert "too many connections from this address" in refused.stderr


def test_run_into_a_closed_pipe_cancels_the_job_and_exits_as_sigpipe(make_daemon):
    """`ccexecctl run -- CMD | head`: once head is gone the job is canceled
    at once (not left writing its journal until detach_grace), and ccexecctl
    exits like a program killed by SIGPIPE, without blaming the daemon."""
    d = make_daemon(settings={"detach_grace": 120})
    proc = subprocess.Popen([CTL, "--state-dir", str(d.state_dir), "run", "--", "yes"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdout.read(10)
        proc.stdout.close()
        assert proc.wait(30) == 128 + signal.SIGPIPE
        assert b"not reachable" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    [record] = json.loads(ctl(d, "--json", "jobs").stdout)
    record = wait_for(lambda: (lambda r: r if r["state"] == "finished" else None)(
        json.loads(ctl(d, "--json", "job", record["job_id"]).stdout)), 30, 0.3, "the job's end")
    assert record["reason"] == "canceled"


# Runs argv, reads its stdout to the end; prints its exit code, the bytes read
# and its peak resident memory in KiB.
PEAK_OF_READ_COMMAND = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
counted = 0
while chunk := proc.stdout.read(1 << 20):
    counted += len(chunk)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), counted, usage.ru_maxrss)
"""


def test_logs_of_a_job_streams_a_large_journal_without_holding_it(logged):
    size = 192 << 20
    job_id = ctl(logged, "run", "--detach", "--", "head", "-c", str(size), "/dev/zero").stdout.strip()
    wait_for(lambda: json.loads(ctl(logged, "--json", "job", job_id).stdout)["state"] == "finished",
             60, 0.3, "the job's end")
    # Started from a small Python of its own: a process's peak memory counts
    # the address space it was spawned from, here a test worker's hundreds of MiB.
    measured = subprocess.run([sys.executable, "-c", PEAK_OF_READ_COMMAND, CTL, "--state-dir",
                               str(logged.state_dir), "logs", "--job", job_id],
                              capture_output=True, text=True, timeout=120)
    exit_code, counted, peak_kib = map(int, measured.stdout.split())
    assert exit_code == 0 and counted == size
    assert peak_kib < 128 * 1024, f"{peak_kib} KiB"
    print(f"ccexecctl logs of {size >> 20} MiB: peak {peak_kib >> 10} MiB")


def test_logs_of_a_job_whose_journal_is_gone_says_so(logged):
    job_id = ctl(logged, "run", "--detach", "--", "echo", "kept").stdout.strip()
    wait_for(lambda: ctl(logged, "logs", "--job", job_id).stdout == "kept\n", 20, 0.2, "the job's output")
    shutil.rmtree(logged.state_dir / "jobs" / job_id)
    gone = ctl(logged, "logs", "--job", job_id)
    assert gone.returncode == 1 and "no longer available" in gone.stderr, (gone.returncode, gone.stderr)


def test_run_says_why_a_job_failed_when_the_job_itself_could_not(logged, tmp_path):
    """A job that never ran (a missing program or cwd) or that ccexec ended
    has only the daemon's `error` to explain its exit status."""
    missing = ctl(logged, "run", "--", "no-such-program-here")
    assert missing.returncode == 127 and "command not found: no-such-program-here" in missing.stderr
    rejected = ctl(logged, "run", "--cwd", str(tmp_path / "nowhere"), "--", "true")
    assert rejected.returncode == 126 and "working directory does not exist" in rejected.stderr
    timed_out = ctl(logged, "run", "--timeout", "0.3", "--", "sleep", "30")
    assert timed_out.returncode == 128 + signal.SIGTERM and "timed out" in timed_out.stderr


def test_run_ctrl_c_while_the_daemon_is_unreachable_stops_waiting(tmp_path):
    """Ctrl-C of `ccexecctl run` whose daemon is gone (the client is trying to
    resume) cannot reach anyone to cancel the job, but must not be ignored."""
    d = Daemon(tmp_path)
    try:
        d.start()
        marker = tmp_path / "started"
        proc = subprocess.Popen([CTL, "--state-dir", str(d.state_dir), "run", "--", "sh", "-c",
                                 f"touch {marker}; sleep 60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        wait_for(marker.exists, 20, what="the job to start")
        for p in [psutil.Process(d.proc.pid), *d.processes()]:
            p.kill()  # only this test's daemon and its job
        d.proc.wait(10)  # by its Popen: reaped elsewhere, its PID could name a later child to it
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        # Not exit 3 once the whole retry policy ran out: the interruption is heard.
        assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, (proc.returncode, err)
        assert "interrupted" in err, err
    finally:
        if "proc" in locals() and proc.poll() is None:
            proc.kill()
        d.cleanup()


@async_test(60)
async def test_run_ctrl_c_before_the_job_is_known_still_cancels_it(tmp_path):
    """Ctrl-C while the execute answer is on its way (the job may already
    run): ccexecctl must cancel the job, not abort and leave it running."""
    got: dict[str, asyncio.Future] = {}
    loop = asyncio.get_running_loop()
    for name in ("execute", "control"):
        got[name] = loop.create_future()
    answer_execute = asyncio.Event()
    job_id = "d" * 32

    async def daemon(ws):  # plays the daemon's side of `ccexecctl run`
        await ws.send(json.dumps({"jsonrpc": "2.0", "method": "connected", "params": {"session_id": "s"}}))
        execute = json.loads(await ws.recv())
        got["execute"].set_result(execute)
        await answer_execute.wait()
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": execute["id"], "result": {
            "status": "started", "pid": 1, "pgid": 1, "job_id": job_id}}))
        control = json.loads(await ws.recv())
        got["control"].set_result(control)
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": control["id"],
                                  "result": {"status": "canceled", "job_id": job_id}}))
        await ws.send(json.dumps({"jsonrpc": "2.0", "method": "process.completed", "params": {
            "status": "failed", "pid": 1, "pgid": 1, "exit_code": -15, "error": "canceled on request",
            "job_id": job_id, "reason": "canceled", "execution_time": 0.1, "stdout_bytes": 0, "stderr_bytes": 0}}))
        await ws.wait_closed()

    async with websockets.serve(daemon, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        d = Daemon(tmp_path, sections={"socket:ccexec": {"port": port}})  # only its config file
        proc = await asyncio.create_subprocess_exec(CTL, "--config", str(d.config), "--state-dir", str(d.state_dir),
                                                    "run", "--", "sleep", "60", stderr=subprocess.PIPE)
        try:
            await asyncio.wait_for(got["execute"], 20)
            proc.send_signal(signal.SIGINT)  # delivered at once; the answer only leaves after it
            answer_execute.set()
            control = await asyncio.wait_for(got["control"], 10)
            assert control["params"] == {"type": "CANCEL", "job_id": job_id}
            assert await asyncio.wait_for(proc.wait(), 20) == 128 + signal.SIGTERM
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
