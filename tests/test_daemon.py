"""ccexecd as a whole: signals, the process tree, the port, the CLI and ccexecctl.

Every daemon here is real. Tests only signal PIDs they started themselves or
that belong to the daemon they started, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from ccexec import policy
from ccexec.client import Client
from support import CCEXECD, MARK, async_test, detached_sleep, http_get, marked_processes, run, wait_for

CCEXECCTL = str(Path(sys.executable).parent / "ccexecctl")
# Two sleeps in the job's group, and a daemon that left it with its
# environment cleared (only the tests' mark kept): a stop ends them all.
JOB = f"({detached_sleep('1001', cleared_env=True)}); sleep 1000 & sleep 1000; wait"


# ------------------------------------------------------------------ helpers


def alive(proc: psutil.Process) -> bool:
    """The very process recorded (not a reused PID) still exists and is not a zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def can_bind(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a new server could listen on host:port now (SO_REUSEADDR, as servers bind)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen()
        except OSError:
            return False
    return True


async def start_job_tree(client: Client) -> list[psutil.Process]:
    """Start JOB and return its shell and both sleeps, once all three exist."""
    job = await client.execute(JOB)
    if job.pid is None:  # queued: the pid comes with process.started
        async for event in job.events(timeout=20):
            if event["method"] == "process.started":
                job.pid = event["params"]["pid"]
                break
    assert job.pid, "the job never reported a pid"
    shell = psutil.Process(job.pid)
    await asyncio.to_thread(wait_for, lambda: len(shell.children(recursive=True)) >= 2, 10,
                            0.05, "both sleeps of the job started")
    return [shell, *shell.children(recursive=True)]


def stop_with_signal_while_job_runs(daemon, sig: signal.Signals) -> None:
    async def scenario() -> list[psutil.Process]:
        async with Client(daemon.url) as client:
            job_tree = await start_job_tree(client)
            assert all(alive(p) for p in job_tree)
            daemon.proc.send_signal(sig)  # the arbiter this test started
            await asyncio.to_thread(wait_for, lambda: daemon.proc.poll() is not None, 40, 0.1,
                                    f"ccexecd exiting after {sig.name}")
        return job_tree

    job_tree = run(scenario(), timeout=90)
    status = daemon.proc.returncode
    assert status == 0, f"ccexecd exited with {status} after {sig.name}:\n{daemon.log_tail()}"
    leftovers = daemon.leftovers()
    assert not leftovers, f"left behind: {[(p.pid, p.name()) for p in leftovers]}"
    assert not [p.pid for p in job_tree if alive(p)], "job processes survived the daemon"
    assert can_bind(daemon.port), f"port {daemon.port} still held after ccexecd exited"


def wait_role_pids(daemon, role: str, count: int, timeout: float) -> list[int]:
    """The daemon's pids of role, once there are exactly count of them."""
    def found():
        pids = daemon.role_pids(role)
        return pids if len(pids) == count else None
    return wait_for(found, timeout, 0.1, f"{count} {role} processes")


def ctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([CCEXECCTL, *args], capture_output=True, text=True, timeout=timeout)


def ps_args(pid: int) -> str:
    return subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True,
                          text=True, timeout=10).stdout.strip()


# ------------------------------------------------------------------ signals


def test_sigterm_stops_daemon_and_running_jobs_and_frees_the_port(make_daemon):
    stop_with_signal_while_job_runs(make_daemon(), signal.SIGTERM)


def test_sigint_stops_daemon_and_running_jobs_and_frees_the_port(make_daemon):
    stop_with_signal_while_job_runs(make_daemon(), signal.SIGINT)


# ------------------------------------------------------------------ process tree


def test_process_tree_has_one_broker_and_the_configured_executors_and_handlers(make_daemon):
    daemon = make_daemon(handlers=3, executors=2)
    counts = {"broker": 1, "executor": 2, "handler": 3}
    pids = {role: wait_role_pids(daemon, role, n, 10) for role, n in counts.items()}
    assert {role: len(p) for role, p in pids.items()} == counts
    for role, role_pids in pids.items():
        for pid in role_pids:
            shown = ps_args(pid)
            assert "ccexec" in shown and role in shown.split(), f"ps shows {shown!r} for a {role}"


def test_every_socket_of_the_daemon_is_on_loopback(make_daemon):
    """Servers bind loopback only: no process of the tree listens, or can be
    sent datagrams, on another address (TCP or UDP; the watchdog's beats too)."""
    daemon = make_daemon()
    tree = [psutil.Process(daemon.proc.pid), *daemon.processes()]
    bound = {(p.pid, c.type.name, c.laddr.ip, c.laddr.port) for p in tree for c in p.net_connections("inet")
             if c.laddr and (c.type == socket.SOCK_DGRAM or c.status == psutil.CONN_LISTEN)}
    assert any(kind == "SOCK_DGRAM" for _, kind, _, _ in bound) and any(port == daemon.port for *_, port in bound)
    assert sorted(b for b in bound if not policy.is_loopback(b[2])) == []


# ------------------------------------------------------------------ the port


@async_test(timeout=90)
async def test_port_stays_open_while_every_handler_is_killed(make_daemon):
    daemon = make_daemon()
    old = daemon.role_pids("handler")
    assert len(old) == daemon.handlers
    for pid in old:  # handlers of the daemon this test started
        os.kill(pid, signal.SIGKILL)
    async with Client(daemon.url, open_timeout=30) as client:
        job = await client.execute("echo ok")
        result = await job.wait(30)
    assert result.exit_code == 0 and result.stdout == "ok\n"
    new = await asyncio.to_thread(wait_role_pids, daemon, "handler", daemon.handlers, 20)
    assert not set(new) & set(old), f"old handlers {old}, new {new}"


def test_port_held_by_another_program_is_reported_with_its_pid_and_name(make_daemon):
    daemon = make_daemon(start=False)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", daemon.port))
        holder.listen()
        done = daemon.run_to_exit()
    assert done.returncode != 0
    assert f"PID {os.getpid()}" in done.stderr, done.stderr
    assert "python" in done.stderr.lower(), done.stderr
    assert str(daemon.port) in done.stderr, done.stderr


def test_starts_beside_other_programs_whose_command_line_looks_like_a_plugin(make_daemon):
    # `python -c <script>` is how Circus runs its plugins; `wc -c` (as in
    # `… | wc -c`) has the "-c" and nothing after it.
    with subprocess.Popen(["wc", "-c"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL) as counter:
        try:
            daemon = make_daemon()
            assert http_get(daemon.port, "/ready")[0] == 200
        finally:
            counter.stdin.close()
    assert counter.returncode == 0


@pytest.mark.parametrize("key", ["state_dir", "log_dir"])
def test_directory_that_cannot_be_made_is_a_clear_config_error(make_daemon, key):
    daemon = make_daemon(start=False)
    blocker = daemon.tmp / "a-file"
    blocker.write_text("")
    daemon._write_config({key: str(blocker / "ccexec")}, {})
    command = daemon.command()
    if key == "state_dir":  # from the file, not the command line
        at = command.index("--state-dir")
        del command[at:at + 2]
    done = daemon.run_to_exit(command=command)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("ccexecd: "), done.stderr
    assert str(blocker) in done.stderr, done.stderr


def test_a_state_dir_too_long_for_its_unix_sockets_is_a_clear_config_error(make_daemon):
    daemon = make_daemon(start=False)
    command = daemon.command()
    at = command.index("--state-dir")
    command[at + 1] = str(daemon.tmp / ("s" * 100))
    done = daemon.run_to_exit(command=command)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "state_dir" in done.stderr and "too long" in done.stderr, done.stderr


def test_config_file_with_only_the_ccexec_section_is_a_clear_config_error(tmp_path):
    partial = tmp_path / "partial.ini"
    partial.write_text(f"[ccexec]\nworkdir = {tmp_path}\n")
    done = subprocess.run([*CCEXECD, "--config", str(partial), "--state-dir", str(tmp_path / "state")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "[circus]" in done.stderr, done.stderr


# ------------------------------------------------------------------ command line


def test_help_lists_every_option():
    done = subprocess.run([*CCEXECD, "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    for option in ("--config", "--host", "--port", "--handlers", "--executors", "--state-dir",
                   "--log-level"):
        assert option in done.stdout, option


def test_no_arguments_serves_on_the_builtin_default_port(tmp_path):
    if not can_bind(8004):
        pytest.skip("127.0.0.1:8004 is in use, cannot test the built-in default port")
    mark = uuid.uuid4().hex
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg"), MARK: mark}
    env.pop("STATE_DIRECTORY", None)
    log_path = tmp_path / "ccexecd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(CCEXECD, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"ccexecd exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                return http_get(8004, "/ready", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(ready, 20, 0.1, "ccexecd ready on 127.0.0.1:8004")
        status, body, _ = http_get(8004, "/health")
        assert status == 200 and json.loads(body)["service"] == "ccexec"
        assert (tmp_path / "xdg" / "ccexec" / "run" / "ccexec.ini").is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 0, log_path.read_text()
        try:
            wait_for(lambda: not marked_processes(mark), 5, 0.1)
        except TimeoutError:
            pass
        left = marked_processes(mark)
        assert not left, f"left behind: {[(p.pid, p.name()) for p in left]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for p in marked_processes(mark):
            try:
                p.kill()
            except psutil.Error:
                pass


# ------------------------------------------------------------------ ccexecctl


def test_ctl_status_lists_the_three_watchers_with_pids(daemon):
    done = ctl("--state-dir", str(daemon.state_dir), "status")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:] if line.split()}
    for role in ("broker", "executor", "handler"):
        assert role in rows, done.stdout
        assert rows[role][2].isdigit(), f"no pid for {role}: {done.stdout}"
    broker_pid = daemon.role_pids("broker")[0]
    assert str(broker_pid) in done.stdout.split()


def test_ctl_status_json_includes_the_broker_pid(daemon):
    done = ctl("--state-dir", str(daemon.state_dir), "--json", "status")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    broker_pids = [p["pid"] for p in report["processes"] if p["watcher"] == "broker"]
    assert broker_pids == daemon.role_pids("broker")
    assert {p["watcher"] for p in report["processes"]} >= {"broker", "executor", "handler"}
    assert report["health"]["service"] == "ccexec"


def test_ctl_stop_stops_the_daemon(make_daemon):
    daemon = make_daemon()
    # ccexecctl waits until the daemon's PID is gone, so this test (its parent)
    # must reap it meanwhile, as a shell or systemd would: poll() does.
    stopper = subprocess.Popen([CCEXECCTL, "--state-dir", str(daemon.state_dir), "stop"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: daemon.proc.poll() is not None, 30, 0.1, "ccexecd exiting after ccexecctl stop")
        out, err = stopper.communicate(timeout=30)
    finally:
        if stopper.poll() is None:
            stopper.kill()
            stopper.wait(5)
    assert stopper.returncode == 0, out + err
    assert "stopped" in out
    assert daemon.proc.returncode == 0, daemon.log_tail()
    assert not daemon.leftovers()


def test_ctl_status_without_a_daemon_exits_3(tmp_path):
    done = ctl("--state-dir", str(tmp_path / "no-daemon"), "status")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "not running" in done.stderr
