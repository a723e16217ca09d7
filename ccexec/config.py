"""Configuration: one ini file that is both Circus's config and ccexec's.

`ccexecd` reads the packaged default (etc/ccexec.ini) or the file given with
--config, applies its command-line overrides, and writes the result as the
effective config into the run directory. Circus loads that file; every
ccexec process finds it through $CCEXEC_CONFIG and reads its settings here.
"""

from __future__ import annotations

import configparser
import math
import os
import shlex
import socket
import ssl
from dataclasses import dataclass, field
from importlib import resources

from ccexec.protocol import LABEL, MAX_LABELS
from pathlib import Path

SOCKET_SECTION = "socket:ccexec"
WATCHERS = ("broker", "executor", "handler")
ROLES = ("head", "executor")  # a whole daemon, or an executor-only node of a remote head
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A configuration that ccexec cannot run with; the message says why."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8004
    handlers: int = 2
    executors: int = 2
    state_dir: str = ""
    log_level: str = "info"
    workdir: str = ""
    shell: str = "/bin/sh"
    slots_per_executor: int = 8
    max_queue: int = 1000
    max_sessions: int = 1000
    max_frame_bytes: int = 10 * 1024 * 1024
    heartbeat_interval: float = 15.0
    detach_grace: float = 30.0
    kill_grace: float = 2.0
    stall_timeout: float = 0.0
    job_nice: int = 0
    env_remove: tuple[str, ...] = ("ANTHROPIC_API_KEY",)
    env_set: dict[str, str] = field(default_factory=lambda: {"PYTHONUNBUFFERED": "1"})
    watchdog_port: int = 0
    retention_days: float = 7.0
    retention_bytes: int = 10 * 2**30
    log_dir: str = ""
    log_max_bytes: int = 10 * 2**20
    log_backups: int = 5
    # security (docs: etc/ccexec.ini, [ccexec] "Security" and "Limits")
    token_file: str = ""
    allowed_origins: tuple[str, ...] = ()
    tls_cert: str = ""
    tls_key: str = ""
    command_allow: tuple[str, ...] = ()
    command_deny: tuple[str, ...] = ()
    allow_shell: bool = True
    env_pass: tuple[str, ...] = ()
    env_client_allow: tuple[str, ...] = ("*",)
    max_sessions_per_address: int = 0
    max_jobs_per_connection: int = 0
    max_stdin_bytes: int = 0
    max_requests_per_second: float = 0.0
    request_burst: int = 0
    max_job_seconds: float = 0.0
    max_output_bytes: int = 0
    # remote executors (docs: etc/ccexec.ini, [ccexec] "Remote executor nodes")
    role: str = "head"
    broker: str = ""
    remote_listen: str = ""
    curve_secret_key: str = ""
    curve_server_key: str = ""
    curve_clients: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    node_name: str = ""

    @property
    def remote(self) -> bool:
        """An executor node: its broker is another host's."""
        return self.role == "executor"

    @property
    def run_dir(self) -> str:
        return os.path.join(self.state_dir, "run")

    @property
    def jobs_dir(self) -> str:
        return os.path.join(self.state_dir, "jobs")

    @property
    def launch_record(self) -> str:
        """How ccexecd was started (config file, options, cwd), for reload and restart."""
        return os.path.join(self.run_dir, "launch.json")

    @property
    def circus_events_endpoint(self) -> str:
        return f"ipc://{os.path.join(self.run_dir, 'circus-events.ipc')}"

    @property
    def circus_endpoint(self) -> str:
        return f"ipc://{os.path.join(self.run_dir, 'circus.ipc')}"


def default_config_text() -> str:
    return resources.files("ccexec").joinpath("ccexec.ini").read_text()


def default_state_dir() -> str:
    if os.environ.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "ccexec")


def local_address(host: str, port: int) -> str:
    """HOST:PORT to reach from this machine a daemon listening on `host`
    (an IPv6 address in brackets, as URLs want it)."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_tls_context(tls_cert: str) -> ssl.SSLContext:
    """What a client on this machine (ccexecctl, the readiness probe) trusts:
    the daemon's own certificate, with no name check (it is reached on a
    local address, not the names the certificate is for)."""
    context = ssl.create_default_context(cafile=tls_cert)
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def read_ini(path: str | None) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    if path is None:
        parser.read_string(default_config_text(), source="<default ccexec.ini>")
        return parser
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except configparser.Error as exc:
        raise ConfigError(f"bad config {path}: {exc}") from None
    return parser


def apply_overrides(ini: configparser.ConfigParser, *, host=None, port=None,
                    handlers=None, executors=None, state_dir=None,
                    log_level=None, role=None, broker=None) -> None:
    """Command-line options win over the file."""
    for section in (SOCKET_SECTION, "ccexec", *(f"watcher:{w}" for w in WATCHERS)):
        if not ini.has_section(section):
            ini.add_section(section)
    pairs = [
        (SOCKET_SECTION, "host", host), (SOCKET_SECTION, "port", port),
        ("watcher:handler", "numprocesses", handlers),
        ("watcher:executor", "numprocesses", executors),
        ("ccexec", "state_dir", state_dir), ("ccexec", "log_level", log_level),
        ("ccexec", "role", role), ("ccexec", "broker", broker),
    ]
    for section, key, value in pairs:
        if value is not None:
            ini.set(section, key, str(value))


def _pairs(text: str, key: str) -> dict[str, str]:
    pairs = {}
    try:
        words = shlex.split(text)
    except ValueError as exc:  # an unbalanced quote
        raise ConfigError(f"[ccexec] {key}: {exc}, in {text!r}") from None
    for word in words:
        name, sep, value = word.partition("=")
        if not sep or not name:
            raise ConfigError(f"[ccexec] {key} entries are NAME=VALUE, got {word!r}")
        pairs[name] = value
    return pairs


def _labels(text: str) -> dict[str, str]:
    labels = _pairs(text, "labels")
    bad = [f"{k}={v}" for k, v in labels.items() if not (LABEL.match(k) and LABEL.match(v))]
    if bad or len(labels) > MAX_LABELS:
        raise ConfigError(f"[ccexec] labels: up to {MAX_LABELS} NAME=VALUE pairs of letters, digits, "
                          f"'_', '.', '-'; got {' '.join(bad) or text!r}")
    return labels


def remote_listen_address(endpoint: str) -> tuple[str, int]:
    """(host, port) of a tcp://ADDRESS:PORT endpoint; `*` is every address."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    if not endpoint.startswith("tcp://") or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"[ccexec] remote_listen must be tcp://ADDRESS:PORT, got {endpoint!r}")
    return ("0.0.0.0" if host == "*" else host.strip("[]")), int(port)


def check_remote(s: Settings) -> None:
    """A remote link runs over TCP with CURVE only, and needs its keys."""
    if s.role not in ROLES:
        raise ConfigError(f"[ccexec] role must be one of {', '.join(ROLES)}, got {s.role!r}")
    if s.role == "executor":
        if not s.broker.startswith("tcp://"):
            raise ConfigError("an executor node needs [ccexec] broker = tcp://HEAD:PORT (or --broker)")
        if not (s.curve_secret_key and s.curve_server_key):
            raise ConfigError("an executor node needs [ccexec] curve_secret_key (its own key pair's "
                              ".key_secret file) and curve_server_key (the head's public .key file)")
    if s.remote_listen:
        remote_listen_address(s.remote_listen)
        if not (s.curve_secret_key and s.curve_clients):
            raise ConfigError("[ccexec] remote_listen needs curve_secret_key (the head's .key_secret file) "
                              "and curve_clients (a directory of the executor nodes' public .key files)")


def _number(ini, section, key, default, kind=int, low=None, high=None):
    raw = ini.get(section, key, fallback="").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"[{section}] {key} must be a number, got {raw!r}") from None
    if not math.isfinite(value):  # nan passes every range check below
        raise ConfigError(f"[{section}] {key} must be a finite number, got {raw!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"[{section}] {key} must be between {low} and {high}, got {raw}")
    return value


def _bool(ini, section, key, default: bool) -> bool:
    raw = ini.get(section, key, fallback="").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"[{section}] {key} must be true or false, got {raw!r}")


def _path(ini, section, key) -> str:
    raw = ini.get(section, key, fallback="").strip()
    return os.path.abspath(os.path.expanduser(raw)) if raw else ""


def settings_from_ini(ini: configparser.ConfigParser) -> Settings:
    d = Settings()
    c = "ccexec"
    get = lambda key, default: ini.get(c, key, fallback="").strip() or default  # noqa: E731
    log_level = get("log_level", d.log_level).lower()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"[ccexec] log_level must be one of {', '.join(LOG_LEVELS)}")
    state_dir = os.path.abspath(os.path.expanduser(get("state_dir", "") or default_state_dir()))
    settings = Settings(
        host=ini.get(SOCKET_SECTION, "host", fallback=d.host).strip(),
        port=_number(ini, SOCKET_SECTION, "port", d.port, int, 1, 65535),
        handlers=_number(ini, "watcher:handler", "numprocesses", d.handlers, int, 1, 64),
        executors=_number(ini, "watcher:executor", "numprocesses", d.executors, int, 1, 256),
        state_dir=state_dir,
        log_level=log_level,
        workdir=os.path.abspath(get("workdir", "") or os.getcwd()),
        shell=get("shell", d.shell),
        slots_per_executor=_number(ini, c, "slots_per_executor", d.slots_per_executor, int, 1, 10000),
        max_queue=_number(ini, c, "max_queue", d.max_queue, int, 0, 10**6),
        max_sessions=_number(ini, c, "max_sessions", d.max_sessions, int, 1, 10**6),
        max_frame_bytes=_number(ini, c, "max_frame_bytes", d.max_frame_bytes, int, 1024, 2**30),
        heartbeat_interval=_number(ini, c, "heartbeat_interval", d.heartbeat_interval, float, 6, 25),
        detach_grace=_number(ini, c, "detach_grace", d.detach_grace, float, 0, 86400),
        kill_grace=_number(ini, c, "kill_grace", d.kill_grace, float, 0, 300),
        stall_timeout=_number(ini, c, "stall_timeout", d.stall_timeout, float, 0, 10**7),
        job_nice=_number(ini, c, "job_nice", d.job_nice, int, 0, 19),
        env_remove=tuple(get("env_remove", " ".join(d.env_remove)).split()),
        env_set=_pairs(get("env_set", "PYTHONUNBUFFERED=1"), "env_set"),
        watchdog_port=_number(ini, c, "watchdog_port", d.watchdog_port, int, 0, 65535),
        retention_days=_number(ini, c, "retention_days", d.retention_days, float, 0, 36500),
        retention_bytes=_number(ini, c, "retention_bytes", d.retention_bytes, int, 0, 2**62),
        log_dir=os.path.abspath(os.path.expanduser(get("log_dir", ""))) if get("log_dir", "") else "",
        log_max_bytes=_number(ini, c, "log_max_bytes", d.log_max_bytes, int, 4096, 2**40),
        log_backups=_number(ini, c, "log_backups", d.log_backups, int, 0, 1000),
        token_file=_path(ini, c, "token_file"),
        allowed_origins=tuple(get("allowed_origins", "").split()),
        tls_cert=_path(ini, c, "tls_cert"),
        tls_key=_path(ini, c, "tls_key"),
        command_allow=tuple(get("command_allow", "").split()),
        command_deny=tuple(get("command_deny", "").split()),
        allow_shell=_bool(ini, c, "allow_shell", d.allow_shell),
        env_pass=tuple(get("env_pass", "").split()),
        env_client_allow=tuple(ini.get(c, "env_client_allow", fallback=" ".join(d.env_client_allow)).split()),
        max_sessions_per_address=_number(ini, c, "max_sessions_per_address", 0, int, 0, 10**6),
        max_jobs_per_connection=_number(ini, c, "max_jobs_per_connection", 0, int, 0, 10**6),
        max_stdin_bytes=_number(ini, c, "max_stdin_bytes", 0, int, 0, 2**40),
        max_requests_per_second=_number(ini, c, "max_requests_per_second", 0.0, float, 0, 10**6),
        request_burst=_number(ini, c, "request_burst", 0, int, 0, 10**6),
        max_job_seconds=_number(ini, c, "max_job_seconds", 0.0, float, 0, 10**8),
        max_output_bytes=_number(ini, c, "max_output_bytes", 0, int, 0, 2**62),
        role=get("role", d.role).lower(),
        broker=get("broker", ""),
        remote_listen=get("remote_listen", ""),
        curve_secret_key=_path(ini, c, "curve_secret_key"),
        curve_server_key=_path(ini, c, "curve_server_key"),
        curve_clients=_path(ini, c, "curve_clients"),
        labels=_labels(get("labels", "")),
        node_name=get("node_name", "") or socket.gethostname(),
    )
    check_remote(settings)
    return settings


def write_effective(ini: configparser.ConfigParser, path: str) -> None:
    """Write the config every process of this daemon reads, atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("# Effective configuration written by ccexecd; edit the source config instead.\n")
        ini.write(f)
    os.replace(tmp, path)


def load_effective() -> Settings:
    """Settings of a running daemon, for its child processes."""
    path = os.environ.get("CCEXEC_CONFIG")
    if not path:
        raise ConfigError("CCEXEC_CONFIG is not set: ccexec roles run under ccexecd")
    return settings_from_ini(read_ini(path))


def ensure_dirs(settings: Settings) -> None:
    for path in (settings.state_dir, settings.run_dir, settings.jobs_dir, settings.log_dir):
        if not path:
            continue
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot make directory {path}: {exc.strerror}") from None
    for private in (settings.run_dir, settings.jobs_dir):  # sockets; jobs' output
        try:
            os.chmod(private, 0o700)
        except OSError as exc:
            raise ConfigError(f"cannot make {private} private: {exc.strerror}") from None
