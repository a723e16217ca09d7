"""`ccexecctl`: operate a ccexec daemon.

Process-level commands (status, start, stop, restart, reload) talk to the
Circus control endpoint in the daemon's run directory; job-level commands
(jobs, job, cancel, run, logs --job) speak the daemon's own WebSocket
protocol through ccexec.client. Human-readable output by default, --json
for scripts. Exit codes: 0 ok, 1 failed or unhealthy, 3 daemon not running;
`run` exits with its job's exit status (128+N for signal N).

Shell completion (bash): eval "$(_CCEXECCTL_COMPLETE=bash_source ccexecctl)"
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import click
import psutil
from websockets.exceptions import ConnectionClosed, InvalidStatus

from ccexec import config, policy
from ccexec.client import Client, RPCError

EXIT_FAILED, EXIT_DOWN = 1, 3
# Seconds a Circus command that stops processes may take: it waits for each
# to exit, up to its watcher's graceful_timeout (10-15 s in etc/ccexec.ini).
STOPPING_COMMAND_TIMEOUT = 60.0


class Daemon:
    """What ccexecctl needs to reach one daemon, found from its config."""

    def __init__(self, config_file: str | None, state_dir: str | None):
        ini = config.read_ini(config_file)
        config.apply_overrides(ini, state_dir=state_dir)
        self.base = config.settings_from_ini(ini)
        self.load()

    def load(self) -> None:
        """Read the running daemon's effective config (the source one if it never ran)."""
        try:
            self.settings = config.settings_from_ini(config.read_ini(f"{self.base.run_dir}/ccexec.ini"))
        except config.ConfigError:
            self.settings = self.base
        self.endpoint = self.settings.circus_endpoint

    def call(self, command: str, answer_within: float = 5, **props) -> dict:
        """A Circus command; answer_within: seconds it may take (a restart
        waits for the processes it stops, a hung one for its graceful_timeout)."""
        from circus.client import CircusClient
        from circus.exc import CallError

        path = self.endpoint.removeprefix("ipc://")
        if path != self.endpoint and not os.path.exists(path):  # no daemon: no need to wait for an answer
            raise click.ClickException(f"daemon not reachable at {self.endpoint}: the socket does not exist")
        client = CircusClient(endpoint=self.endpoint, timeout=answer_within)
        try:
            return client.call({"command": command, "properties": props})
        except CallError as exc:
            raise click.ClickException(f"no answer from the daemon at {self.endpoint} "
                                       f"within {answer_within:g} s: {exc}") from None
        finally:
            client.stop()

    @property
    def address(self) -> str:
        return config.local_address(self.settings.host, self.settings.port)

    @property
    def url(self) -> str:
        return f"{'wss' if self.settings.tls_cert else 'ws'}://{self.address}/ws"

    def tls_context(self) -> ssl.SSLContext | None:
        """Trust the daemon's own certificate (the address is loopback, so no name check)."""
        return config.local_tls_context(self.settings.tls_cert) if self.settings.tls_cert else None

    def connect_kwargs(self) -> dict:
        """TLS and the first bearer token of the daemon's token_file, when it has them."""
        kwargs: dict = {}
        if self.settings.token_file:
            try:
                tokens = policy.read_token_file(self.settings.token_file)
            except policy.PolicyError as exc:
                raise click.ClickException(str(exc)) from None
            if not tokens.by_name:
                raise click.ClickException(f"token_file {self.settings.token_file} holds no token to present")
            kwargs["additional_headers"] = {"Authorization": f"Bearer {next(iter(tokens.by_name.values()))}"}
        if self.settings.tls_cert:
            kwargs["ssl"] = self.tls_context()
        return kwargs

    def running(self) -> bool:
        try:
            self.call("dstats")
            return True
        except click.ClickException:
            return False

    def is_ready(self) -> bool:
        if self.settings.remote:  # an executor node has no port: running is ready
            return self.running()
        try:
            return self.http("/ready")[0] == 200
        except OSError:
            return False

    def http(self, path: str) -> tuple[int, dict]:
        url = f"{'https' if self.settings.tls_cert else 'http'}://{self.address}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5, context=self.tls_context()) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")


NO_PROCESS = {"rss_mib": None, "uptime": None, "cmdline": None}


def _watchers(daemon: Daemon) -> list[dict]:
    """Each watcher's processes. Their pids come from Circus's `list`: its
    `stats` also walks their children (the executors' jobs) and fails when
    one of them ends meanwhile, about one call in seven under load."""
    rows = []
    for name in sorted(daemon.call("list").get("watchers", [])):
        status = daemon.call("status", name=name).get("status")
        pids = sorted(daemon.call("list", name=name).get("pids", []))
        for pid in pids:
            described = _describe(pid)
            # Stopped by SIGSTOP or a debugger, it serves nobody until continued.
            rows.append({"watcher": name, "status": "frozen" if described.pop("stopped", False) else status,
                         "pid": pid, **described})
        if not pids:
            rows.append({"watcher": name, "status": status, "pid": None, **NO_PROCESS})
    return rows


def _describe(pid: int) -> dict:
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            return {"rss_mib": round(process.memory_info().rss / 2**20, 1),
                    "uptime": round(time.time() - process.create_time(), 1), "cmdline": process.name(),
                    "stopped": process.status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)}
    except psutil.Error:  # it ended meanwhile
        return NO_PROCESS


def _running(pid: int) -> bool:
    """Alive and not a zombie (a daemon that exited counts as stopped before it is reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="The daemon's config file.")
@click.option("--state-dir", type=click.Path(file_okay=False), help="The daemon's state directory.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def main(ctx: click.Context, config_file, state_dir, as_json) -> None:
    """Operate a ccexec daemon."""
    daemon_args = [*(["--config", config_file] if config_file else []),
                   *(["--state-dir", state_dir] if state_dir else [])]
    try:
        ctx.obj = {"daemon": Daemon(config_file, state_dir), "json": as_json, "daemon_args": daemon_args}
    except config.ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Watchers, their processes, and the daemon's health."""
    daemon: Daemon = ctx.obj["daemon"]
    require_running(daemon)
    rows = _watchers(daemon)
    if daemon.settings.remote:
        _node_status(ctx, daemon, rows)
        return
    try:
        code, health = daemon.http("/health")
        ready_code, ready = daemon.http("/ready")
    except OSError as exc:
        code, health = 0, {"status": "unreachable", "error": str(exc)}
        ready_code, ready = 0, {"status": "not_ready", "reason": "unreachable"}
    healthy = code == 200 and health.get("status") == "healthy" and ready_code == 200
    if ctx.obj["json"]:
        click.echo(json.dumps({"processes": rows, "health": health, "ready": ready}, indent=2))
    else:
        _print_rows(rows)
        readiness = "ready" if ready_code == 200 else f"not ready ({ready.get('reason')})"
        click.echo(f"health: {health.get('status')}, {readiness}  sessions: {health.get('active_sessions', '-')}"
                   f"  running: {health.get('running_jobs', '-')}  queued: {health.get('queued_jobs', '-')}")
        _print_executors(health.get("executors") or [])
    sys.exit(0 if healthy else EXIT_FAILED)


def _print_rows(rows: list[dict]) -> None:
    click.echo(f"{'WATCHER':<18} {'STATUS':<8} {'PID':>7} {'RSS MiB':>8} {'UPTIME s':>9}")
    for r in rows:
        click.echo(f"{r['watcher']:<18} {r['status'] or '-':<8} {r['pid'] or '-':>7} "
                   f"{r['rss_mib'] if r['rss_mib'] is not None else '-':>8} "
                   f"{r['uptime'] if r['uptime'] is not None else '-':>9}")


def _print_executors(executors: list[dict]) -> None:
    """Every executor the broker has registered, on this host or on nodes."""
    click.echo(f"\n{'EXECUTOR':<28} {'NODE':<16} {'SLOTS':>5} {'RUNNING':>7} {'HEARTBEAT':>9}  LABELS")
    for e in sorted(executors, key=lambda e: (e.get("remote", False), e.get("id", ""))):
        labels = " ".join(f"{k}={v}" for k, v in (e.get("labels") or {}).items()) or "-"
        click.echo(f"{e.get('id', '-'):<28} {(e.get('node') if e.get('remote') else 'local') or '-':<16} "
                   f"{e.get('capacity', '-'):>5} {e.get('running', '-'):>7} {str(e.get('last_heartbeat')) + ' s':>9}"
                   f"  {labels}")


def _node_status(ctx: click.Context, daemon: Daemon, rows: list[dict]) -> None:
    """An executor node: its processes, and whose node it is."""
    healthy = bool(rows) and all(r["status"] == "active" for r in rows)
    if ctx.obj["json"]:
        click.echo(json.dumps({"processes": rows, "role": "executor", "broker": daemon.settings.broker,
                               "node": daemon.settings.node_name, "labels": daemon.settings.labels}, indent=2))
    else:
        _print_rows(rows)
        click.echo(f"executor node {daemon.settings.node_name} of {daemon.settings.broker}")
    sys.exit(0 if healthy else EXIT_FAILED)



class Spinner:
    """A progress spinner on stderr, only when stdout is a terminal."""

    def __init__(self, what: str):
        self.what = what
        self.active = sys.stdout.isatty()
        self.frames = itertools.cycle("|/-\\")

    def tick(self) -> None:
        if self.active:
            click.echo(f"\r{next(self.frames)} {self.what}", nl=False, err=True)

    def done(self) -> None:
        if self.active:
            click.echo("\r" + " " * (len(self.what) + 2) + "\r", nl=False, err=True)


def wait_until(predicate, timeout: float, what: str) -> bool:
    spinner = Spinner(what)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if predicate():
                return True
            spinner.tick()
            time.sleep(0.1)
        return predicate()
    finally:
        spinner.done()


def emit(ctx: click.Context, data, human) -> None:
    """Print data as JSON with --json, else through human(data)."""
    if ctx.obj["json"]:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        human(data)


def require_running(daemon: Daemon) -> None:
    if not daemon.running():
        click.echo(f"ccexecd is not running (no answer at {daemon.endpoint})", err=True)
        sys.exit(EXIT_DOWN)


def with_client(daemon: Daemon, work):
    """Run `work(client)` against the daemon over its WebSocket."""
    async def session():
        async with Client(daemon.url, open_timeout=5, **daemon.connect_kwargs()) as client:
            return await work(client)
    try:
        return asyncio.run(session())
    except OSError as exc:
        click.echo(f"ccexecd is not reachable at {daemon.url}: {exc}", err=True)
        sys.exit(EXIT_DOWN)
    except InvalidStatus as exc:  # 401, 403, or 503 (a per-address limit, a stopping handler)
        reply = exc.response
        click.echo(f"ccexecd at {daemon.url} refused the connection: HTTP {reply.status_code} "
                   f"{reply.body.decode(errors='replace').strip() or reply.reason_phrase}", err=True)
        sys.exit(EXIT_FAILED)
    except RPCError as exc:
        click.echo(f"error {exc.code}: {exc.message}", err=True)
        sys.exit(EXIT_FAILED)


@main.command()
@click.pass_context
def health(ctx: click.Context) -> None:
    """Liveness and readiness (exit 0 healthy and ready, 1 not, 3 down)."""
    daemon: Daemon = ctx.obj["daemon"]
    try:
        code, body = daemon.http("/health")
        ready_code, ready = daemon.http("/ready")
    except OSError as exc:
        click.echo(f"ccexecd is not reachable at {daemon.address}: {exc}", err=True)
        sys.exit(EXIT_DOWN)
    ok = code == 200 and ready_code == 200

    def human(data):
        h = data["health"]
        click.echo(f"{h.get('status')}, {'ready' if ok else 'not ready: ' + str(data['ready'].get('reason'))}"
                   f" (version {h.get('version')}, up {h.get('uptime_seconds')} s,"
                   f" {h.get('active_sessions')} sessions, {h.get('running_jobs')} running,"
                   f" {h.get('queued_jobs')} queued)")
    emit(ctx, {"health": body, "ready": ready}, human)
    sys.exit(0 if ok else EXIT_FAILED)


def ccexecd_program() -> str:
    """ccexecd: installed beside this ccexecctl (pip puts both console
    scripts in one directory, which is not Python's own outside a
    virtualenv: /usr/local/bin, ~/.local/bin), else beside Python, else on PATH."""
    for directory in (Path(sys.argv[0]).parent, Path(sys.executable).parent):
        program = directory / "ccexecd"
        if program.is_file() and os.access(program, os.X_OK):
            return str(program)
    found = shutil.which("ccexecd")
    if found is None:
        raise click.ClickException("cannot find the ccexecd program: not beside ccexecctl, nor on PATH")
    return found


@main.command()
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait until it is ready.")
@click.argument("ccexecd_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def start(ctx: click.Context, timeout: float, ccexecd_args: tuple[str, ...]) -> None:
    """Start ccexecd in the background and wait until it is ready.

    Extra arguments after `--` go to ccexecd. Its output goes to
    <state_dir>/ccexecd.out.
    """
    daemon: Daemon = ctx.obj["daemon"]
    if daemon.running():
        click.echo("ccexecd is already running")
        return
    command = [ccexecd_program(), *ctx.obj["daemon_args"], *ccexecd_args]
    os.makedirs(daemon.settings.state_dir, exist_ok=True)
    with open(os.path.join(daemon.settings.state_dir, "ccexecd.out"), "ab") as out:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def ready() -> bool:
        daemon.load()  # the effective config it wrote: its real port
        return daemon.running() and daemon.is_ready()
    wait_until(lambda: proc.poll() is not None or ready(), timeout, "starting ccexecd")
    if proc.poll() is not None:
        click.echo(f"ccexecd exited with status {proc.returncode}; see {out.name}", err=True)
        sys.exit(EXIT_FAILED)
    if not ready():
        click.echo(f"ccexecd (PID {proc.pid}) is not ready after {timeout:g} s", err=True)
        sys.exit(EXIT_FAILED)
    emit(ctx, {"pid": proc.pid, "listen": daemon.address}, lambda d: click.echo(f"started (PID {d['pid']})"))


@main.command()
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the daemon to exit.")
@click.pass_context
def stop(ctx: click.Context, timeout: float) -> None:
    """Stop the daemon and every job it runs."""
    daemon: Daemon = ctx.obj["daemon"]
    require_running(daemon)
    pid = daemon.call("dstats").get("info", {}).get("pid")
    daemon.call("quit", waiting=False)
    if not wait_until(lambda: not (pid and _running(pid)), timeout, "stopping ccexecd"):
        click.echo(f"ccexecd (PID {pid}) did not exit within {timeout:g} s", err=True)
        sys.exit(EXIT_FAILED)
    emit(ctx, {"stopped": pid}, lambda d: click.echo("stopped"))


@main.command()
@click.option("--graceful", is_flag=True,
              help="Roll: new handlers first, then the old ones; restart the broker; executors "
                   "and their running jobs are left alone.")
@click.option("--watcher", type=click.Choice(config.WATCHERS), help="Restart only this watcher.")
@click.option("--timeout", default=STOPPING_COMMAND_TIMEOUT, show_default=True,
              help="Seconds each watcher's restart may take, and then the wait until ready.")
@click.pass_context
def restart(ctx: click.Context, graceful: bool, watcher: str | None, timeout: float) -> None:
    """Restart the daemon's processes.

    Plain: every watcher is stopped and started again; executors end their
    running jobs on the way (reason "canceled"). --graceful never refuses a
    connection and never touches a running or queued job: clients of the old
    handlers are closed with 1012 and reconnect (the Python client resumes by
    itself).
    """
    daemon: Daemon = ctx.obj["daemon"]
    require_running(daemon)
    before = {row["pid"] for row in _watchers(daemon) if row["pid"]}
    present = set(daemon.call("list").get("watchers", []))  # an executor node has executors only
    if watcher and watcher not in present:
        raise click.ClickException(f"this daemon runs no {watcher} (watchers: {', '.join(sorted(present))})")
    if graceful:
        for name in [watcher] if watcher else [w for w in ("handler", "broker") if w in present]:
            if name == "handler":
                daemon.call("reload", answer_within=timeout, name=name, graceful=True, sequential=True,
                            waiting=True)
            else:
                daemon.call("restart", answer_within=timeout, name=name, waiting=True)
    else:
        for name in [watcher] if watcher else [w for w in config.WATCHERS if w in present]:
            daemon.call("restart", answer_within=timeout, name=name, waiting=True)
    ok = wait_until(daemon.is_ready, timeout, "waiting for ready")
    after = {row["pid"] for row in _watchers(daemon) if row["pid"]}
    emit(ctx, {"replaced": sorted(before - after), "started": sorted(after - before), "ready": ok},
         lambda d: click.echo(f"restarted: {len(d['replaced'])} processes replaced"
                              f"{'' if d['ready'] else ', but the daemon is not ready'}"))
    sys.exit(0 if ok else EXIT_FAILED)


@main.command()
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Re-read the config ccexecd was started with; pool sizes change live.

    Circus sections (watchers' numprocesses, plugins) apply at once; [ccexec]
    settings reach each process when it next starts (restart --graceful).
    """
    from ccexec.arbiter import reload_config

    daemon: Daemon = ctx.obj["daemon"]
    require_running(daemon)
    try:
        fresh = reload_config(daemon.settings)
    except (OSError, config.ConfigError) as exc:
        click.echo(f"cannot reload: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    answer = daemon.call("reloadconfig", answer_within=STOPPING_COMMAND_TIMEOUT, waiting=True)
    if answer.get("status") != "ok":
        click.echo(f"Circus refused the new config: {answer.get('reason')}", err=True)
        sys.exit(EXIT_FAILED)
    pool = {"executors": fresh.executors} if fresh.remote else {"handlers": fresh.handlers, "executors": fresh.executors}
    emit(ctx, pool, lambda d: click.echo("reloaded: " + " ".join(f"{k}={n}" for k, n in d.items())))


def _age(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    seconds = max(0, time.time() - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _duration(text: str) -> float:
    """'90', '90s', '15m', '2h', '1d' in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise click.BadParameter(f"not a duration: {text!r} (e.g. 90s, 15m, 2h, 1d)") from None


@main.command()
@click.option("--state", type=click.Choice(["running", "queued", "finished"]))
@click.option("--since", help="Only jobs created within this long (90s, 15m, 2h, 1d).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.pass_context
def jobs(ctx: click.Context, state: str | None, since: str | None, limit: int) -> None:
    """List jobs, newest first."""
    daemon: Daemon = ctx.obj["daemon"]
    records = with_client(daemon, lambda client: client.jobs(state=state, limit=limit))
    if since:
        oldest = time.time() - _duration(since)
        records = [r for r in records if (r["created_at"] or 0) >= oldest]

    def human(rows):
        click.echo(f"{'JOB ID':<32}  {'STATE':<8} {'EXIT':>5} {'REASON':<9} {'AGE':>5}  {'NODE':<12} COMMAND")
        for r in rows:
            exit_code = "-" if r["exit_code"] is None else r["exit_code"]
            click.echo(f"{r['job_id']:<32}  {r['state']:<8} {exit_code:>5} {r['reason'] or '-':<9} "
                       f"{_age(r['created_at']):>5}  {r.get('node') or '-':<12} "
                       f"{(r['name'] + ': ') if r.get('name') else ''}{(r['command'] or '')[:60]}")
    emit(ctx, records, human)


@main.command()
@click.argument("job_id")
@click.pass_context
def job(ctx: click.Context, job_id: str) -> None:
    """Describe one job."""
    record = with_client(ctx.obj["daemon"], lambda client: client.job_status(job_id))
    emit(ctx, record, lambda r: [click.echo(f"{k:>13}: {v}") for k, v in r.items()])


@main.command()
@click.argument("job_id")
@click.pass_context
def cancel(ctx: click.Context, job_id: str) -> None:
    """Cancel a job (SIGTERM to its process group, SIGKILL after the grace)."""
    async def work(client: Client):
        job = await client.attach(job_id, *await _ends(client, job_id))
        if job.status == "finished":
            return {"job_id": job_id, "canceled": False, "state": "finished"}
        await job.control("CANCEL")
        result = await job.wait(60)
        return {"job_id": job_id, "canceled": True, "reason": result.reason, "exit_code": result.exit_code}
    outcome = with_client(ctx.obj["daemon"], work)
    emit(ctx, outcome, lambda o: click.echo(
        f"canceled (exit {o['exit_code']})" if o["canceled"] else "already finished"))
    sys.exit(0 if outcome["canceled"] else EXIT_FAILED)


async def _ends(client: Client, job_id: str) -> tuple[int, int]:
    """Offsets at the current end of a job's output: attach without replay."""
    record = await client.job_status(job_id)
    return record["stdout_bytes"] or 0, record["stderr_bytes"] or 0


def _exit_status(exit_code: int) -> int:
    return exit_code if exit_code >= 0 else 128 - exit_code


class Interrupted(Exception):
    """Ctrl-C, with no daemon to pass the cancel on to."""


class OutputClosed(Exception):
    """Our stdout or stderr is a pipe whose reader is gone (`ccexecctl … | head`)."""


def _exit_output_closed() -> None:
    """Exit as a program killed by SIGPIPE, with nothing more to say (nobody reads)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # what is still buffered cannot fail at exit
    os.dup2(devnull, sys.stderr.fileno())
    sys.exit(128 + signal.SIGPIPE)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--detach", is_flag=True, help="Start the job, print its id and return; it outlives this command.")
@click.option("--cwd", help="Working directory of the job.")
@click.option("--timeout", type=float, help="Wall-clock limit of the job, seconds.")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def run(ctx: click.Context, detach: bool, cwd: str | None, timeout: float | None, argv: tuple[str, ...]) -> None:
    """Run `-- CMD ARGS...` as a job, stream its output, exit with its status.

    Ctrl-C cancels the job.
    """
    params = {k: v for k, v in {"cwd": cwd, "timeout": timeout}.items() if v is not None}

    async def work(client: Client):
        loop, waiting = asyncio.get_running_loop(), asyncio.current_task()
        job, asked, interrupted = None, False, False

        async def cancel() -> None:
            nonlocal interrupted
            try:
                await job.control("CANCEL")  # its process.completed ends the wait
            except RPCError:
                pass  # it ended meanwhile
            except (OSError, ConnectionClosed):  # the connection is down (being resumed): stop waiting
                interrupted = True
                waiting.cancel()

        def on_sigint() -> None:
            nonlocal asked, interrupted
            if job is not None:
                loop.create_task(cancel())
            elif asked:  # a second Ctrl-C while the daemon has not answered: give up waiting
                interrupted = True
                waiting.cancel()
            asked = True
        if not detach:  # from before the job exists: it may run before its execute answer is read
            loop.add_signal_handler(signal.SIGINT, on_sigint)
        try:
            job = await client.execute(argv=list(argv), detach=detach, **params)
            if detach:
                return {"job_id": job.job_id, "pid": job.pid}
            if asked:
                loop.create_task(cancel())
            return await _print_events(job)
        except asyncio.CancelledError:
            if interrupted:
                raise Interrupted from None
            raise
        except OutputClosed:
            try:
                await job.control("CANCEL")  # its output has nowhere to go
            except (RPCError, OSError, ConnectionClosed):
                pass  # it ended meanwhile, or the daemon cancels it after detach_grace
            raise

    try:
        outcome = with_client(ctx.obj["daemon"], work)
    except OutputClosed:
        _exit_output_closed()
    except Interrupted:
        click.echo("ccexecctl: interrupted; the daemon could not be told to cancel the job "
                   "(it is canceled once detach_grace passes with no client)", err=True)
        sys.exit(128 + signal.SIGINT)
    if detach:
        emit(ctx, outcome, lambda o: click.echo(o["job_id"]))
        return
    if ctx.obj["json"]:
        click.echo(json.dumps(outcome), err=True)
    elif outcome.get("error"):  # the daemon's word on why (a missing program or cwd, a timeout, …)
        click.echo(f"ccexecctl: {outcome['error']}", err=True)
    sys.exit(_exit_status(outcome["exit_code"]))


@main.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines as they come.")
@click.option("--watcher", type=click.Choice([*config.WATCHERS, "arbiter"]), help="Only this process kind's log.")
@click.option("--job", "job_id", help="A job's output (from its journal) instead of the daemon's log.")
@click.option("-n", "--lines", default=50, show_default=True, help="Lines of each log to show first.")
@click.pass_context
def logs(ctx: click.Context, follow: bool, watcher: str | None, job_id: str | None, lines: int) -> None:
    """Show (and follow) the daemon's logs, or a job's output."""
    daemon: Daemon = ctx.obj["daemon"]
    if job_id:
        _job_output(daemon, job_id, follow)
        return
    if not daemon.settings.log_dir:
        click.echo("this daemon logs to stderr only (journald under systemd: journalctl -u ccexec -f);"
                   " set [ccexec] log_dir to keep log files", err=True)
        sys.exit(EXIT_FAILED)
    names = [watcher] if watcher else ["arbiter", *config.WATCHERS]
    _follow_files([os.path.join(daemon.settings.log_dir, f"{n}.log") for n in names], lines, follow)


def _job_output(daemon: Daemon, job_id: str, follow: bool) -> None:
    record = with_client(daemon, lambda client: client.job_status(job_id))  # exit 1 if there is no such job
    try:
        if not follow:
            _print_journal(daemon, record)
            return

        async def work(client: Client):
            await _print_events(await client.attach(job_id))
        with_client(daemon, work)
    except OutputClosed:
        _exit_output_closed()


async def _print_events(job) -> dict:
    """Write a job's output to stdout/stderr as it comes; its completed params."""
    async for event in job.events():
        if event["method"] == "process.output":
            stream = sys.stdout if event["params"]["type"] == "stdout" else sys.stderr
            try:
                stream.write(event["params"]["data"])
                stream.flush()
            except BrokenPipeError:
                raise OutputClosed from None
    return job.completed


def _print_journal(daemon: Daemon, record: dict) -> None:
    """A job's journals as they are on disk, stdout then stderr, a piece at a time."""
    from ccexec.journal import job_dir

    for stream, out in (("stdout", sys.stdout.buffer), ("stderr", sys.stderr.buffer)):
        path = os.path.join(job_dir(daemon.settings.jobs_dir, record["job_id"]), stream)
        try:
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
            out.flush()
        except FileNotFoundError:
            if record.get(f"{stream}_bytes"):
                raise click.ClickException(f"the job's {stream} is no longer available: {path} is gone") from None
            # else the job never wrote to this stream
        except BrokenPipeError:
            raise OutputClosed from None
        except OSError as exc:
            raise click.ClickException(f"cannot copy the job's {stream}: {exc}") from None


def _follow_files(paths: list[str], lines: int, follow: bool) -> None:
    """tail -n, then (with follow) tail -F over several files, rotation included."""
    positions: dict[str, tuple[int, int]] = {}  # path -> (inode, offset)
    for path in paths:
        try:
            with open(path, "rb") as f:
                tail = f.read().splitlines(keepends=True)[-lines:] if lines else []
                sys.stdout.write(b"".join(tail).decode(errors="replace"))
                positions[path] = (os.fstat(f.fileno()).st_ino, f.tell())
        except FileNotFoundError:
            positions[path] = (0, 0)
    sys.stdout.flush()
    while follow:
        for path in paths:
            inode, offset = positions[path]
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            if stat.st_ino != inode or stat.st_size < offset:  # rotated or truncated
                inode, offset = stat.st_ino, 0
            if stat.st_size > offset:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
                sys.stdout.write(data.decode(errors="replace"))
                sys.stdout.flush()
                offset += len(data)
            positions[path] = (inode, offset)
        time.sleep(0.2)


@main.group()
def keys() -> None:
    """CURVE key pairs for the head's remote_listen and its executor nodes."""


@keys.command("generate")
@click.argument("name")
@click.option("--dir", "directory", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where to write NAME.key and NAME.key_secret.")
@click.pass_context
def keys_generate(ctx: click.Context, name: str, directory: str) -> None:
    """Make a key pair: NAME.key (public: copy it to the other side) and
    NAME.key_secret (mode 600: it stays on this host).

    \b
    Head:  curve_secret_key = head.key_secret; each node's NODE.key goes into
           the curve_clients directory.
    Node:  curve_secret_key = NODE.key_secret; curve_server_key = head.key.
    """
    from ccexec import remote

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise click.BadParameter("letters, digits, '_', '.', '-' only", param_hint="NAME")
    for suffix in (".key", ".key_secret"):
        if os.path.exists(os.path.join(directory, name + suffix)):
            raise click.ClickException(f"{os.path.join(directory, name + suffix)} exists; not overwriting a key")
    public, secret = remote.generate_keys(directory, name)
    emit(ctx, {"public": os.path.abspath(public), "secret": os.path.abspath(secret)},
         lambda d: click.echo(f"public key: {d['public']}\nsecret key: {d['secret']}"))
