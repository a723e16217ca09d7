"""`ccexecd`: the embedded Circus arbiter that owns the port and every process.

Steps, in order: read the config and apply the command line; end what a
crashed instance left (stale ccexec processes, orphan job groups); make sure
the port is free (or say exactly who holds it); hand the effective config to
Circus, which binds the socket, starts broker, executors, handlers and the
watchdog plugin, and runs until SIGTERM/SIGINT stops them all. It is the
subreaper of everything it starts: what a dead executor left running comes
back to it, and is killed.
"""

from __future__ import annotations

import configparser
import functools
import json
import logging
import os
import resource
import signal
import socket
import ssl
import sys

import click
import psutil
import zmq

from ccexec import __version__, bus, config, leftovers, logs, policy, remote
from ccexec.systemd import SystemdNotify

log = logging.getLogger("ccexec.arbiter")
STOP_RETRY_DELAY = 0.1  # seconds between tries of a stop Circus is too busy to take


class PortHeld(Exception):
    pass


def port_holder(host: str, port: int) -> psutil.Process | None:
    """The process listening on host:port, if this user may see it."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            if conn.laddr.ip in (host, "0.0.0.0", "::") or host in ("0.0.0.0", "::"):
                try:
                    return psutil.Process(conn.pid)
                except psutil.Error:
                    return None
    return None


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
    except OSError as exc:
        holder = port_holder(host, port)
        who = (f"PID {holder.pid} ({' '.join(holder.cmdline()) or holder.name()})"
               if holder else "a process this user cannot see")
        raise PortHeld(f"{host}:{port} is already in use by {who}: {exc.strerror}") from None
    finally:
        probe.close()


def recover(settings: config.Settings, effective_config: str) -> None:
    """Take over from a crashed instance, then check the port is ours to bind."""
    leftovers.reap_orphan_jobs(settings, leftovers.stale_processes(settings, effective_config))
    if not settings.remote:
        check_port_free(settings.host, settings.port)
    if settings.remote_listen:  # the broker binds it; a clash would only show as a broker that keeps dying
        check_port_free(*config.remote_listen_address(settings.remote_listen))


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_graceful_timeouts(ini: configparser.ConfigParser, settings: config.Settings) -> None:
    """A watcher's graceful_timeout is set for the default kill_grace; a
    longer kill_grace adds what it exceeds that by. Else Circus would SIGKILL
    an executor still waiting for its jobs to end, and their records would
    say lost."""
    excess = settings.kill_grace - config.Settings.kill_grace
    if excess <= 0:
        return
    for section in ("watcher:broker", "watcher:executor", "watcher:handler"):
        if ini.has_section(section):
            configured = ini.getfloat(section, "graceful_timeout", fallback=30.0)  # Circus's default
            ini.set(section, "graceful_timeout", f"{configured + excess:g}")


def resolve(config_file: str | None, *, nofile: int | None = None,
            **overrides) -> tuple[config.Settings, configparser.ConfigParser]:
    """The configuration, with every value this run will use filled in
    (`nofile`: the hard open-file limit of the arbiter, when not this process)."""
    ini = config.read_ini(config_file)
    config.apply_overrides(ini, **overrides)
    settings = config.settings_from_ini(ini)
    check_circus_sections(ini, settings, config_file)
    if settings.remote:  # an executor node: executors only, no port, no broker of its own
        for section in (config.SOCKET_SECTION, "watcher:broker", "watcher:handler"):
            ini.remove_section(section)
    elif ":" in settings.host and not ini.has_option(config.SOCKET_SECTION, "family"):
        # Circus makes an AF_INET socket unless told: one on an IPv6 address
        # (::1, ::) would fail, leaving the daemon without its port.
        ini.set(config.SOCKET_SECTION, "family", "AF_INET6")
    if settings.watchdog_port == 0:
        ini.set("ccexec", "watchdog_port", str(free_udp_port()))
    ini.set("ccexec", "state_dir", settings.state_dir)
    ini.set("ccexec", "workdir", settings.workdir)
    ini.set("circus", "loglevel", settings.log_level)
    for key in ("token_file", "tls_cert", "tls_key", "curve_secret_key", "curve_server_key", "curve_clients"):
        # absolute, whatever the children's cwd
        ini.set("ccexec", key, getattr(settings, key))
    cap_rlimits(ini, nofile_ceiling() if nofile is None else nofile)
    fit_graceful_timeouts(ini, settings)
    if settings.log_dir:
        log_to_files(ini, settings)
    return config.settings_from_ini(ini), ini


def check_circus_sections(ini: configparser.ConfigParser, settings: config.Settings, config_file: str | None) -> None:
    """A config file is a whole Circus configuration (a copy of etc/ccexec.ini), not [ccexec] alone."""
    missing = [] if ini.has_section("circus") else ["[circus]"]
    for watcher in ("executor",) if settings.remote else config.WATCHERS:
        if not ini.get(f"watcher:{watcher}", "cmd", fallback="").strip():
            missing.append(f"[watcher:{watcher}] cmd")
    if missing:
        raise config.ConfigError(f"config {config_file} has no {', '.join(missing)}: make it from a copy of "
                                 "the complete default, etc/ccexec.ini")


def nofile_ceiling() -> int:
    """The most open files a watcher may be given: ccexecd's own hard limit
    (raising it needs a privilege even root may lack in a container; under
    systemd, LimitNOFILE= sets it)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def cap_rlimits(ini: configparser.ConfigParser, ceiling: int) -> None:
    """Circus sets a watcher's rlimit_nofile as soft and hard limit; past what
    the system allows its processes would fail to start, so cap it."""
    for section in ini.sections():
        raw = ini.get(section, "rlimit_nofile", fallback="").strip() if section.startswith("watcher:") else ""
        if not raw:
            continue
        try:
            wanted = int(raw)
        except ValueError:
            raise config.ConfigError(f"[{section}] rlimit_nofile must be a number, got {raw!r}") from None
        if ceiling != resource.RLIM_INFINITY and (wanted < 0 or wanted > ceiling):
            ini.set(section, "rlimit_nofile", str(ceiling))


def check_socket_paths(settings: config.Settings) -> None:
    """A Unix socket's path has room for 107 bytes: under a longer state_dir
    the broker and Circus could not bind theirs, and would fail in a loop."""
    run_dir = settings.run_dir
    paths = [endpoint.removeprefix("ipc://") for endpoint in (
        settings.circus_endpoint, settings.circus_events_endpoint, bus.frontend_endpoint(run_dir),
        bus.handler_data_endpoint(run_dir), bus.backend_endpoint(run_dir))]
    longest = max(paths, key=lambda path: len(os.fsencode(path)))
    if len(os.fsencode(longest)) > zmq.IPC_PATH_MAX_LEN:
        raise config.ConfigError(f"state_dir {settings.state_dir} is too long: the path of its socket {longest} "
                                 f"would be {len(os.fsencode(longest))} bytes, and a Unix socket's path holds "
                                 f"{zmq.IPC_PATH_MAX_LEN}; choose a shorter state_dir")


def check_security(settings: config.Settings) -> None:
    """Refuse a configuration that would expose the daemon: no tokens beyond
    loopback, an unusable token file, or TLS that cannot load."""
    if settings.token_file:
        try:
            tokens = policy.read_token_file(settings.token_file)
        except policy.PolicyError as exc:
            raise config.ConfigError(str(exc)) from None
        logs.event(log, "auth.tokens_loaded", tokens=len(tokens), names=",".join(tokens.by_name))
    elif not policy.is_loopback(settings.host):
        raise config.ConfigError(
            f"refusing to listen on {settings.host or 'every address'} without authentication: "
            "set [ccexec] token_file (bearer tokens), or bind to loopback (127.0.0.1, ::1, localhost)")
    remote.check_keys(settings)
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise config.ConfigError("[ccexec] tls_cert and tls_key go together: set both or neither")
    if settings.tls_cert:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(settings.tls_cert, settings.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise config.ConfigError(f"cannot load tls_cert/tls_key: {exc}") from None


def log_to_files(ini: configparser.ConfigParser, settings: config.Settings) -> None:
    """Each watcher's stderr into a size-rotated file (a Circus stream)."""
    for watcher in config.WATCHERS:
        section = f"watcher:{watcher}"
        if not ini.has_section(section):  # an executor node runs executors only
            continue
        ini.set(section, "stderr_stream.class", "FileStream")
        ini.set(section, "stderr_stream.filename", os.path.join(settings.log_dir, f"{watcher}.log"))
        ini.set(section, "stderr_stream.max_bytes", str(settings.log_max_bytes))
        ini.set(section, "stderr_stream.backup_count", str(settings.log_backups))


def effective_path(settings: config.Settings) -> str:
    return os.path.join(settings.run_dir, "ccexec.ini")


def publish(settings: config.Settings, ini: configparser.ConfigParser) -> str:
    """Write the effective config Circus loads and every process reads."""
    path = effective_path(settings)
    config.write_effective(ini, path)
    os.environ.update({
        "CCEXEC_PYTHON": sys.executable, "CCEXEC_RUN_DIR": settings.run_dir,
        "CCEXEC_CONFIG": path, "CCEXEC_WATCHDOG_PORT": str(settings.watchdog_port),
    })
    return path


def record_launch(settings: config.Settings, config_file: str | None, overrides: dict) -> None:
    with open(settings.launch_record, "w") as f:
        json.dump({"config_file": os.path.abspath(config_file) if config_file else None,
                   "overrides": overrides, "cwd": os.getcwd(), "pid": os.getpid()}, f)


def reload_config(settings: config.Settings) -> config.Settings:
    """Re-read the config ccexecd was started with into a new effective file
    (keeping the live watchdog port); Circus applies it with `reloadconfig`."""
    with open(settings.launch_record) as f:
        launch = json.load(f)
    os.chdir(launch["cwd"])
    try:  # the limit the arbiter's children inherit, not this process's
        nofile = psutil.Process(launch["pid"]).rlimit(psutil.RLIMIT_NOFILE)[1]
    except psutil.Error as exc:
        raise config.ConfigError(f"cannot read the open-file limit of ccexecd (PID {launch['pid']}): {exc}") from None
    # The running daemon's state directory, whatever this process's
    # $STATE_DIRECTORY or $XDG_STATE_HOME would make of an empty state_dir.
    overrides = {**launch["overrides"], "state_dir": settings.state_dir}
    fresh, ini = resolve(launch["config_file"], nofile=nofile, **overrides)
    check_security(fresh)  # a reload must not open what a start would refuse
    ini.set("ccexec", "watchdog_port", str(settings.watchdog_port))
    config.write_effective(ini, effective_path(fresh))
    return config.settings_from_ini(ini)


class _ShutdownRaceFilter(logging.Filter):
    """Drop Circus's ConflictError tracebacks from a periodic watcher check
    that fires while the arbiter is stopping: harmless, but it reads like a
    failure in the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        from circus.exc import ConflictError

        return not (record.exc_info and isinstance(record.exc_info[1], ConflictError))


def stop_once_free(arbiter) -> None:
    """SIGTERM or SIGINT. Circus drops a stop that comes while it carries out
    another command (a reload: `systemctl reload` then `stop`) with a
    ConflictError, and the daemon would run on; it is tried until taken."""
    from circus.exc import ConflictError

    try:
        arbiter.stop()
    except ConflictError:
        arbiter.loop.call_later(STOP_RETRY_DELAY, stop_once_free, arbiter)


def check_watchers_now(arbiter) -> None:
    """SIGCHLD: a child of the arbiter died. Circus looks at its watchers
    once per check_delay; a death is the reason to look at once, so the
    broker hears a dead executor's or handler's exit code (and ends its
    jobs) within milliseconds, and Circus starts its replacement as soon."""
    from circus.exc import ConflictError
    from circus.util import check_future_exception_and_log

    try:
        checked = arbiter.manage_watchers()
    except ConflictError:  # a command (stop, restart, reload) is under way; the next periodic check reaps
        return
    checked.add_done_callback(check_future_exception_and_log)


class OrphanSweep:
    """What an executor that died (kill -9, the watchdog) left running, its
    jobs and what they started, becomes the arbiter's child: the arbiter is
    their subreaper. A sweep kills every child no watcher started, with its
    process group; its own children come back the same way, and Circus's
    waitpid(-1), on this loop, reaps them all. Only a death adopts
    anything, so the process table is read only after one, until a sweep
    finds nothing."""

    def __init__(self, arbiter):
        self.arbiter = arbiter
        self.watched: set[int] = set()  # the watchers' processes at the last sweep
        # Read the process table at the next sweep even if no death is seen: at
        # the first (a death before it has no last sweep to be seen against),
        # and after one that killed some (their children come next).
        self.look = True

    def started(self) -> set[int]:
        return {pid for watcher in self.arbiter.watchers for pid in watcher.processes}

    async def sweep(self) -> None:
        started = self.started()
        died, self.watched = self.watched - started, started
        if not died and not self.look:
            return
        found = await self.arbiter.loop.run_in_executor(None, leftovers.children, os.getpid())
        started = self.started()
        killed = sum(leftovers.kill_child(child.pid, os.getpid()) for child in found
                     if child.pid not in started and not child.zombie)
        self.look = killed > 0
        if killed:
            logs.event(log, "daemon.orphans_killed", logging.WARNING, processes=killed)


def run_circus(path: str, settings: config.Settings) -> int:
    from circus.arbiter import Arbiter
    from circus.util import check_future_exception_and_log
    from tornado.ioloop import PeriodicCallback

    for handler in logging.getLogger().handlers:
        handler.addFilter(_ShutdownRaceFilter())
    notify = SystemdNotify(settings)
    notify.start()
    arbiter = Arbiter.load_from_config(path)
    arbiter.ctrl.sys_hdl.quit = functools.partial(arbiter.loop.add_callback_from_signal, stop_once_free, arbiter)
    arbiter.loop.asyncio_loop.add_signal_handler(signal.SIGCHLD, check_watchers_now, arbiter)
    try:
        leftovers.become_subreaper()
        PeriodicCallback(OrphanSweep(arbiter).sweep, leftovers.SWEEP_INTERVAL * 1000).start()
    except OSError as exc:  # a dead executor's jobs are still ended by the broker
        logs.event(log, "daemon.no_subreaper", logging.WARNING, error=exc)
    future = arbiter.start()
    notify.stopping()
    return 1 if check_future_exception_and_log(future) is not None else 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="Config file (Circus ini + [ccexec]); default: the built-in etc/ccexec.ini.")
@click.option("--host", help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port to listen on (default 8004).")
@click.option("--handlers", type=click.IntRange(1, 64), help="WebSocket handler processes.")
@click.option("--executors", type=click.IntRange(1, 256), help="Executor processes.")
@click.option("--state-dir", type=click.Path(file_okay=False), help="Journals, run directory, records.")
@click.option("--log-level", type=click.Choice(config.LOG_LEVELS, case_sensitive=False))
@click.option("--role", type=click.Choice(config.ROLES),
              help="head (default): the whole daemon; executor: an executor-only node of the head at --broker.")
@click.option("--broker", metavar="tcp://HOST:PORT", help="The head's remote_listen endpoint (executor nodes).")
@click.version_option(__version__, prog_name="ccexecd")
def main(config_file, host, port, handlers, executors, state_dir, log_level, role, broker) -> None:
    """Run the ccexec daemon in the foreground."""
    overrides = {k: v for k, v in dict(host=host, port=port, handlers=handlers, executors=executors,
                                       state_dir=state_dir, log_level=log_level and log_level.lower(),
                                       role=role, broker=broker).items()
                 if v is not None}
    try:
        settings, ini = resolve(config_file, **overrides)
        check_socket_paths(settings)
        config.ensure_dirs(settings)
        logs.setup("arbiter", settings.log_level,
                   os.path.join(settings.log_dir, "arbiter.log") if settings.log_dir else None,
                   settings.log_max_bytes, settings.log_backups)
        check_security(settings)
        recover(settings, effective_path(settings))
        path = publish(settings, ini)
        record_launch(settings, config_file, overrides)
    except (config.ConfigError, PortHeld, leftovers.DaemonRunning) as exc:
        click.echo(f"ccexecd: {exc}", err=True)
        sys.exit(2 if isinstance(exc, config.ConfigError) else 1)
    logs.event(log, "daemon.starting", version=__version__, pid=os.getpid(), role=settings.role,
               **({"broker": settings.broker} if settings.remote else
                  {"listen": f"{settings.host}:{settings.port}", "handlers": settings.handlers,
                   "remote_listen": settings.remote_listen or None}),
               executors=settings.executors, state_dir=settings.state_dir)
    status = run_circus(path, settings)
    logs.event(log, "daemon.stopped", pid=os.getpid(), status=status)
    sys.exit(status)
