"""Test support: a real ccexecd in a temp dir, and bounded waits.

Every daemon a test starts carries a unique mark in its environment, which
its jobs inherit; after the daemon stops, no process with that mark may be
left alive. Only PIDs these helpers started are ever signalled.
"""

from __future__ import annotations

import asyncio
import configparser
import ctypes
import functools
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import trustme

from ccexec.client import Client

ROOT = Path(__file__).resolve().parent.parent
FAKE_CLAUDE_DIR = ROOT / "tests" / "fake_claude"
CCEXECD = [str(Path(sys.executable).parent / "ccexecd")]  # the installed console script
# Not CCEXEC_*: the executor keeps its own variables from jobs, and a test's
# daemon's jobs must carry the mark too, to be found if left behind.
MARK = "TEST_CCEXEC_DAEMON_MARK"


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll predicate until it returns a truthy value; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met within {timeout} s")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 5) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
            return reply.status, reply.read(), dict(reply.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def pid_running(pid: int) -> bool:
    """A process of that PID exists and is not a zombie (one that ends while
    being looked at counts as ended)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def marked_processes(mark: str) -> list[psutil.Process]:
    found = []
    for pid in psutil.pids():  # not process_iter: its cache can hold an earlier process of a PID
        try:
            proc = psutil.Process(pid)
            if proc.environ().get(MARK) == mark and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def detached_sleep(seconds: str, cleared_env: bool = False) -> str:
    """A shell command starting a daemon, as a job may: `sleep seconds` in a
    session of its own, holding none of the job's pipes, in the background.
    cleared_env: its environment holds only the tests' mark (no CCEXEC_JOB_ID)."""
    env = f'env -i {MARK}="${MARK}" ' if cleared_env else ""
    return f"{env}setsid sleep {seconds} >/dev/null 2>&1 &"


def marked_running(mark: str, *argv: str) -> list[int]:
    """The PIDs of the processes carrying `mark` that run exactly argv."""
    found = []
    for proc in marked_processes(mark):
        try:
            if proc.cmdline() == list(argv):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


class Daemon:
    """A real ccexecd on a free loopback port, in its own temp directory."""

    def __init__(self, tmp: Path, settings: dict | None = None, env: dict | None = None,
                 handlers: int = 2, executors: int = 2, sections: dict[str, dict] | None = None,
                 netns: str | None = None):
        self.tmp = tmp
        self.netns = netns  # run inside this network namespace (its loopback is not ours)
        self.port = free_port()
        self.state_dir = tmp / "state"
        self.workdir = tmp / "work"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = tmp / "ccexec.ini"
        self.log_path = tmp / "ccexecd.log"
        self.mark = uuid.uuid4().hex
        self.handlers, self.executors = handlers, executors
        self._write_config(settings or {}, sections or {})
        self.env = {**os.environ, MARK: self.mark,
                    "PATH": os.pathsep.join([str(FAKE_CLAUDE_DIR), str(Path(sys.executable).parent),
                                             os.environ.get("PATH", "")]),
                    **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def _write_config(self, settings: dict, sections: dict[str, dict]) -> None:
        ini = configparser.ConfigParser(interpolation=None)
        ini.read(ROOT / "etc" / "ccexec.ini")
        base = {"workdir": str(self.workdir), "heartbeat_interval": "6", "detach_grace": "3",
                "kill_grace": "1"}
        for key, value in {**base, **settings}.items():
            ini.set("ccexec", key, str(value))
        for section, values in sections.items():
            for key, value in values.items():
                ini.set(section, key, str(value))
        with open(self.config, "w") as f:
            ini.write(f)

    def command(self) -> list[str]:
        return self.in_netns([*CCEXECD, "--config", str(self.config), "--port", str(self.port),
                              "--state-dir", str(self.state_dir), "--handlers", str(self.handlers),
                              "--executors", str(self.executors)])

    def in_netns(self, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *command] if self.netns else command

    def start(self, timeout: float = 20) -> "Daemon":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), env=self.env, cwd=self.tmp,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_ready(timeout)
        return self

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"ccexecd exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            if self.get("/ready", timeout=2)[0] != 200:
                return False
            # Answered by one of this daemon's own handlers, not a stale one.
            return psutil.Process(self.health()["handler_pid"]).ppid() == self.proc.pid
        except (OSError, psutil.Error):
            return False

    def wait_ready(self, timeout: float = 20) -> None:
        wait_for(self.ready, timeout, 0.05, "daemon ready")

    def health(self) -> dict:
        return json.loads(self.get("/health")[1])

    def get(self, path: str, timeout: float = 5) -> tuple[int, bytes]:
        """An HTTP GET of the daemon's port, from its network namespace."""
        if self.netns is None:
            return http_get(self.port, path, timeout)[:2]
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        connection.sock = connect_in_netns(self.netns, self.port, timeout)
        try:
            connection.request("GET", path)
            reply = connection.getresponse()
            return reply.status, reply.read()
        finally:
            connection.close()

    def client(self, **kwargs) -> Client:
        """A ccexec client of this daemon (one connection, made in its namespace)."""
        if self.netns is not None:
            kwargs.update(resume=False, sock=connect_in_netns(self.netns, self.port))
        return Client(self.url, **kwargs)

    def processes(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def role_pids(self, role: str) -> list[int]:
        pids = []
        for proc in self.processes():
            try:
                cmdline = proc.cmdline()
            except psutil.Error:
                continue
            if cmdline[1:4] == ["-m", "ccexec", role]:
                pids.append(proc.pid)
        return sorted(pids)

    def log_tail(self, lines: int = 60) -> str:
        """The log's last whole lines: a reader may see a line that straddles
        a page of the file only in part while it is being written."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text[:text.rfind("\n") + 1].splitlines()[-lines:])

    def run_to_exit(self, *extra: str, command: list[str] | None = None) -> subprocess.CompletedProcess:
        """Run ccexecd in the foreground until it exits, its output captured:
        a start it must refuse."""
        return subprocess.run([*(command or self.command()), *extra], env=self.env, cwd=self.tmp,
                              capture_output=True, text=True, timeout=60)

    def stop(self, timeout: float = 40) -> int:
        """SIGTERM the arbiter; returns its exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise

    def leftovers(self, timeout: float = 5) -> list[psutil.Process]:
        """Processes of this daemon (and its jobs) still alive after it stopped."""
        try:
            wait_for(lambda: not marked_processes(self.mark), timeout, 0.1)
        except TimeoutError:
            pass
        return marked_processes(self.mark)

    def cleanup(self) -> None:
        """Last resort: kill what this daemon left (only its own marked PIDs)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for proc in marked_processes(self.mark):
            try:
                proc.kill()
            except psutil.Error:
                pass
        if getattr(self, "log", None):
            self.log.close()


def self_signed_cert(directory: Path) -> tuple[trustme.CA, Path, Path]:
    """A CA and the certificate and key (mode 600) it issued for loopback."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_path))
    os.chmod(key_path, 0o600)
    return ca, cert_path, key_path


def finish(*daemons: Daemon) -> None:
    """Stop each daemon, then check that it exited 0, left nothing running
    and let no exception escape into its log; every one is stopped and
    cleaned up whatever the others did."""
    problems = []
    for daemon in daemons:
        try:
            status = daemon.stop()
            left = daemon.leftovers()
            if status != 0:
                problems.append(f"{daemon.tmp.name}: ccexecd exited with {status}:\n{daemon.log_tail()}")
            if left:
                problems.append(f"{daemon.tmp.name}: processes left behind: {[(p.pid, p.name()) for p in left]}")
            log = daemon.log_path.read_text(errors="replace") if daemon.log_path.exists() else ""
            if "Traceback (most recent call last)" in log:
                problems.append(f"{daemon.tmp.name}: an exception escaped in the daemon:\n{log[-5000:]}")
        finally:
            daemon.cleanup()
    assert not problems, "\n".join(problems)


def run(coro, timeout: float = 120):
    """Run a coroutine with a hard bound, from a sync test."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def async_test(timeout: float = 60):
    """Run an async test function on a fresh loop, bounded by timeout."""
    def wrap(fn):
        @functools.wraps(fn)
        def test(*args, **kwargs):
            return run(fn(*args, **kwargs), timeout)
        return test
    return wrap


def serves(pid: int, client) -> bool:
    """Whether handler `pid` holds the server end of a Client's connection."""
    local = client.ws.local_address[:2]
    return any(c.raddr and (c.raddr.ip, c.raddr.port) == tuple(local)
               for c in psutil.Process(pid).net_connections(kind="tcp"))


def ticker(lines: int, interval: float, word: str = "tick") -> tuple[str, str]:
    """A command printing `lines` numbered lines, one every `interval` s, and its exact output."""
    command = (f"{sys.executable} -c \"import time\nfor i in range({lines}):\n"
               f"    print(f'{word} {{i:04d}}', flush=True); time.sleep({interval})\"")
    return command, "".join(f"{word} {i:04d}\n" for i in range(lines))


CLONE_NEWNET = 0x40000000
LIBC = ctypes.CDLL(None, use_errno=True)


def connect_in_netns(netns: str, port: int, timeout: float = 5) -> socket.socket:
    """A TCP connection to 127.0.0.1:port of network namespace netns. Only a
    short-lived thread enters the namespace (on Linux a thread's namespace
    is its own); the socket stays in it for whoever uses it after."""
    outcome: dict = {}

    def enter_and_connect() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if LIBC.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns} failed")
            finally:
                os.close(fd)
            outcome["sock"] = socket.create_connection(("127.0.0.1", port), timeout)
        except OSError as exc:
            outcome["error"] = exc
    thread = threading.Thread(target=enter_and_connect)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    outcome["sock"].settimeout(None)
    return outcome["sock"]


def line_printer(lines: int) -> tuple[list[str], str]:
    """argv of a job printing `lines` numbered lines as fast as it can, and its exact output."""
    code = f"for i in range({lines}): print(f'line {{i:06d}} {{\"x\" * 24}}')"
    return [sys.executable, "-c", code], "".join(f"line {i:06d} {'x' * 24}\n" for i in range(lines))


def make_keys(directory: Path, *names: str) -> dict[str, tuple[Path, Path]]:
    """Key pairs made by `ccexecctl keys generate`: name -> (public, secret)."""
    ctl = str(Path(sys.executable).parent / "ccexecctl")
    for name in names:
        subprocess.run([ctl, "keys", "generate", name, "--dir", str(directory)], check=True,
                       capture_output=True, timeout=30)
    return {n: (directory / f"{n}.key", directory / f"{n}.key_secret") for n in names}


def cluster_keys(directory: Path) -> tuple[dict[str, tuple[Path, Path]], Path]:
    """Key pairs of a head, a node "far" and a "rogue" one, and the head's
    curve_clients directory, which lists far only."""
    keys = make_keys(directory / "keys", "head", "far", "rogue")
    clients = directory / "clients"
    clients.mkdir()
    (clients / "far.key").write_bytes(keys["far"][0].read_bytes())
    return keys, clients


def remote_head_settings(endpoint: str, server: tuple[Path, Path], clients: Path) -> dict:
    """[ccexec] settings of a head accepting executor nodes on endpoint."""
    return {"remote_listen": endpoint, "curve_secret_key": str(server[1]), "curve_clients": str(clients)}


class ExecutorNode(Daemon):
    """A real executor-only ccexecd (role = executor) for a head's remote
    face, optionally inside a network namespace (run with `ip netns exec`)."""

    def __init__(self, tmp: Path, broker: str, keys: tuple[Path, Path], server_public: Path,
                 node_name: str, labels: str = "", netns: str | None = None, executors: int = 1,
                 settings: dict | None = None):
        super().__init__(tmp, {"curve_secret_key": str(keys[1]), "curve_server_key": str(server_public),
                               "labels": labels, "node_name": node_name, **(settings or {})},
                         executors=executors, netns=netns)
        self.broker, self.node_name = broker, node_name

    def command(self) -> list[str]:
        return self.in_netns([*CCEXECD, "--config", str(self.config), "--role", "executor",
                              "--broker", self.broker, "--state-dir", str(self.state_dir),
                              "--executors", str(self.executors)])

    def ready(self) -> bool:
        """Its executors run (the head's health tells whether they registered)."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"ccexecd --role executor exited with {self.proc.returncode}:\n{self.log_tail()}")
        return len(self.role_pids("executor")) == self.executors


def node_executors(head: Daemon, node_name: str) -> list[dict]:
    """The executors of node_name the head's broker has registered now."""
    return [e for e in head.health().get("executors", []) if e.get("remote") and e.get("node") == node_name]
