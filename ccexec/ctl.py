"""`ccexecctl`: drive a running ccexecd through its Circus control endpoint."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

import click
import psutil

from ccexec import config

# Exit codes: 0 ok, 1 daemon unhealthy or a command failed, 3 daemon not running.
EXIT_FAILED, EXIT_DOWN = 1, 3


class Daemon:
    """What ccexecctl needs to reach one daemon, found from its config."""

    def __init__(self, config_file: str | None, state_dir: str | None):
        ini = config.read_ini(config_file)
        config.apply_overrides(ini, state_dir=state_dir)
        base = config.settings_from_ini(ini)
        effective = f"{base.run_dir}/ccexec.ini"
        try:
            self.settings = config.settings_from_ini(config.read_ini(effective))
        except config.ConfigError:
            self.settings = base  # never started: fall back to the source config
        self.endpoint = self.settings.circus_endpoint

    def call(self, command: str, **props) -> dict:
        from circus.client import CircusClient
        from circus.exc import CallError

        client = CircusClient(endpoint=self.endpoint, timeout=5)
        try:
            return client.call({"command": command, "properties": props})
        except CallError as exc:
            raise click.ClickException(f"daemon not reachable at {self.endpoint}: {exc}") from None
        finally:
            client.stop()

    def http(self, path: str) -> tuple[int, dict]:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::") else self.settings.host
        url = f"http://{host}:{self.settings.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")


def _watchers(daemon: Daemon) -> list[dict]:
    rows = []
    names = daemon.call("list").get("watchers", [])
    for name in sorted(names):
        info = daemon.call("stats", name=name).get("info", {})
        status = daemon.call("status", name=name).get("status")
        processes = {pid: proc for pid, proc in info.items() if isinstance(proc, dict)}
        for pid, proc in sorted(processes.items()):
            rows.append({"watcher": name, "status": status, "pid": int(pid), "rss_mib": None,
                         "uptime": round(proc.get("age", 0), 1), "cmdline": proc.get("cmdline")})
        if not processes:
            rows.append({"watcher": name, "status": status, "pid": None, "rss_mib": None,
                         "uptime": None, "cmdline": None})
    return rows


def _running(pid: int) -> bool:
    """Alive and not a zombie (a daemon that exited counts as stopped before it is reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _rss_mib(pid: int | None) -> float | None:
    try:
        return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    except (psutil.Error, TypeError, ValueError):
        return None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="The daemon's config file.")
@click.option("--state-dir", type=click.Path(file_okay=False), help="The daemon's state directory.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def main(ctx: click.Context, config_file, state_dir, as_json) -> None:
    """Control a running ccexec daemon."""
    try:
        ctx.obj = {"daemon": Daemon(config_file, state_dir), "json": as_json}
    except config.ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Watchers, their processes, and the daemon's health."""
    daemon: Daemon = ctx.obj["daemon"]
    try:
        rows = _watchers(daemon)
    except click.ClickException as exc:
        click.echo(f"ccexecd is not running ({exc.message})", err=True)
        sys.exit(EXIT_DOWN)
    for row in rows:
        row["rss_mib"] = _rss_mib(row["pid"])
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
        click.echo(f"{'WATCHER':<18} {'STATUS':<8} {'PID':>7} {'RSS MiB':>8} {'UPTIME s':>9}")
        for r in rows:
            click.echo(f"{r['watcher']:<18} {r['status'] or '-':<8} {r['pid'] or '-':>7} "
                       f"{r['rss_mib'] if r['rss_mib'] is not None else '-':>8} "
                       f"{r['uptime'] if r['uptime'] is not None else '-':>9}")
        readiness = "ready" if ready_code == 200 else f"not ready ({ready.get('reason')})"
        click.echo(f"health: {health.get('status')}, {readiness}  sessions: {health.get('active_sessions', '-')}"
                   f"  running: {health.get('running_jobs', '-')}  queued: {health.get('queued_jobs', '-')}")
    sys.exit(0 if healthy else EXIT_FAILED)


@main.command()
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the daemon to exit.")
@click.pass_context
def stop(ctx: click.Context, timeout: float) -> None:
    """Stop the daemon and every job it runs."""
    daemon: Daemon = ctx.obj["daemon"]
    try:
        pid = daemon.call("dstats").get("info", {}).get("pid")
        daemon.call("quit", waiting=False)
    except click.ClickException as exc:
        click.echo(f"ccexecd is not running ({exc.message})", err=True)
        sys.exit(EXIT_DOWN)
    deadline = time.monotonic() + timeout
    while pid and _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid and _running(pid):
        click.echo(f"ccexecd (PID {pid}) did not exit within {timeout:g} s", err=True)
        sys.exit(EXIT_FAILED)
    click.echo("stopped")
