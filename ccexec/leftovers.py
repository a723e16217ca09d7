"""What crashed instances and ended jobs leave behind, found and ended.

A `kill -9` of the arbiter orphans its children: handlers still hold the
port, executors still run jobs. A new `ccexecd` ends them itself (they are
ccexec processes of this user, identified by their command line and the
config they run with), then kills the process groups of jobs whose records
say they were running, and marks those jobs lost: no manual cleanup.

Every job carries its id in its environment (JOB_ENV): how its processes
are found once they left its group, or its executor died. An executor is
its jobs' subreaper, and ends what its ended jobs left among its children.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import psutil

from ccexec import config, journal, logs
from ccexec.journal import job_dir
from ccexec.store import JobStore

log = logging.getLogger("ccexec.arbiter")

STALE_GRACE = 10.0  # seconds stale executors get to end their jobs' trees on SIGTERM
OWNER_FILE = "owner"  # on an executor node, in a job's journal directory: who runs its group
# In every job's environment: its id. How a job's processes are found once its
# executor is gone, in the job's group or not, reported to the broker or not.
JOB_ENV = "CCEXEC_JOB_ID"
KILL_PASSES = 5  # a process can fork while a pass reads past its child's PID
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
SWEEP_INTERVAL = 1.0  # seconds between two looks of a subreaper at its children
CLOCK_TICK = 1 / os.sysconf("SC_CLK_TCK")  # seconds: the grain of a process's start time in /proc


class DaemonRunning(Exception):
    """Another live ccexecd already serves this state directory or port."""


def _ccexec_role(proc: psutil.Process) -> str | None:
    cmdline = proc.info["cmdline"] or []
    if cmdline[1:3] == ["-m", "ccexec"] and len(cmdline) > 3:
        return cmdline[3]
    if cmdline[1:2] == ["-c"] and len(cmdline) > 2 and "circus" in cmdline[2] and "plugins" in cmdline[2]:
        return "plugin"
    return None


def _is_arbiter(proc: psutil.Process | None) -> bool:
    try:
        return proc is not None and any(part.endswith("ccexecd") for part in proc.cmdline()[:2])
    except psutil.Error:
        return False


def _instance_of(proc: psutil.Process) -> str | None:
    """The effective config a ccexec process runs with: its instance."""
    try:
        if _ccexec_role(proc) == "plugin":
            cmdline = " ".join(proc.info["cmdline"])
            return cmdline.split("--endpoint ipc://", 1)[1].split("/circus.ipc", 1)[0] + "/ccexec.ini" \
                if "--endpoint ipc://" in cmdline else None
        return proc.environ().get("CCEXEC_CONFIG")
    except (psutil.Error, IndexError):
        return None


def listeners(port: int) -> set[int]:
    return {c.pid for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}


def stale_processes(settings: config.Settings, effective_config: str) -> list[psutil.Process]:
    """ccexec processes of this user whose arbiter is gone, of this instance
    or of any instance holding our port. Raises DaemonRunning for live ones."""
    holders = set() if settings.remote else listeners(settings.port)  # an executor node has no port
    uid = os.getuid()
    candidates = []
    for proc in psutil.process_iter(["pid", "ppid", "uids", "cmdline"]):
        if proc.info["uids"] and proc.info["uids"].real == uid and _ccexec_role(proc):
            candidates.append(proc)
    instances = {effective_config}
    instances |= {_instance_of(p) for p in candidates if p.pid in holders}
    stale = [p for p in candidates if _instance_of(p) in instances]
    for proc in stale:
        try:
            parent = proc.parent()
        except psutil.Error:
            parent = None
        if _is_arbiter(parent):
            raise DaemonRunning(f"ccexecd is already running as PID {parent.pid} "
                                f"(its {_ccexec_role(proc)} PID {proc.pid} serves this instance)")
    return stale


def end_stale_processes(stale: list[psutil.Process]) -> None:
    logs.event(log, "daemon.stale_processes", logging.WARNING,
               pids=",".join(f"{p.pid}:{_ccexec_role(p)}" for p in stale))
    for proc in stale:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(stale, timeout=STALE_GRACE)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def _group_leader_matches(pgid: int, started_at: float | None) -> bool:
    """The group is still the job we recorded: its leader is, or it has none
    left. A job's leader may exit before the rest of its group (`cmd &`);
    the kernel gives no new process that PID while the group lives on, so a
    group without a leader can only be the job's."""
    try:
        leader = psutil.Process(pgid)
        return started_at is None or abs(leader.create_time() - started_at) < 5.0
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def kill_job_processes(job_ids: set[str]) -> None:
    """SIGKILL every process of this user whose environment names one of
    job_ids (JOB_ENV): what is left of jobs whose executor died, including
    processes that left the job's group (setsid, a double fork) and jobs
    whose executor died before it could report their group. Blocking: it
    reads every process's environment; run it in a worker thread."""
    killed: set[int] = set()
    for _ in range(KILL_PASSES):
        found = set()
        for proc in job_processes(job_ids):
            try:
                proc.kill()
                found.add(proc.pid)
            except psutil.Error:
                continue
        if found <= killed:
            break
        killed |= found
    if killed:
        logs.event(log, "job.processes_killed", logging.WARNING, jobs=",".join(sorted(job_ids)),
                   processes=len(killed))


def job_processes(job_ids: set[str]) -> Iterator[psutil.Process]:
    """The processes of this user whose environment names one of job_ids
    (JOB_ENV). Blocking: it reads every process's environment."""
    uid = os.getuid()
    for pid in psutil.pids():
        try:
            # A new Process each time: process_iter's cache can hold one of an
            # earlier process with this PID, and refuses to signal that.
            proc = psutil.Process(pid)
            if proc.uids().real == uid and _job_of(pid) in job_ids:
                yield proc
        except (psutil.Error, OSError):
            continue


def reap_orphan_jobs(settings: config.Settings, stale: list[psutil.Process]) -> int:
    """End what a crashed instance left: its processes (stale), then the
    groups of the jobs it was running and every process carrying one of
    their ids; mark those jobs lost."""
    store = JobStore(settings.state_dir)
    try:
        # Read first: the stale executors end their jobs as they go, and
        # processes a job started outside its group outlive that.
        running = {record["job_id"] for record in store.unfinished()}
        if stale:
            end_stale_processes(stale)
        records = store.unfinished()
        for record in records:
            pgid = record["pgid"]
            if pgid and _group_leader_matches(pgid, record["started_at"]):
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except OSError:
                    pass
            store.finished({
                "job_id": record["job_id"], "pid": record["pid"], "pgid": pgid,
                "exit_code": -signal.SIGKILL, "reason": "lost",
                "error": "the daemon stopped unexpectedly while this job was "
                         + ("running" if record["started_at"] else "waiting"),
                "execution_time": time.time() - (record["started_at"] or record["created_at"]),
                **journal.recorded_sizes(settings.jobs_dir, record["job_id"])})
            logs.event(log, "job.finished", logging.WARNING, job_id=record["job_id"], reason="lost",
                       pgid=pgid, error="left by a previous instance")
        kill_job_processes(running | {record["job_id"] for record in records})
        return len(records)
    finally:
        store.close()


def record_owner(jobs_dir: str, job_id: str, pgid: int) -> None:
    """On an executor node: note which executor runs a job's group. The
    head cannot end jobs on another host, so reap_node_orphans does it."""
    path = job_dir(jobs_dir, job_id)
    os.makedirs(path, exist_ok=True)  # the journal makes it only on the job's first output
    with open(os.path.join(path, OWNER_FILE), "w") as f:
        json.dump({"executor": os.getpid(), "pgid": pgid, "started_at": time.time()}, f)


def _executor_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).cmdline()[1:4] == ["-m", "ccexec", "executor"]
    except (psutil.Error, OSError):
        return False


def reap_node_orphans(jobs_dir: str) -> int:
    """On an executor node, as an executor starts: end the groups of jobs
    whose executor died (the head has recorded them lost) and drop their
    journals. Blocking: run in a worker thread."""
    reaped = 0
    for name in os.listdir(jobs_dir):
        try:
            with open(os.path.join(job_dir(jobs_dir, name), OWNER_FILE)) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            continue
        if _executor_alive(owner["executor"]):
            continue
        if _group_leader_matches(owner["pgid"], owner["started_at"]):
            try:
                os.killpg(owner["pgid"], signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(job_dir(jobs_dir, name), ignore_errors=True)
        logs.event(log, "job.orphan_reaped", logging.WARNING, job_id=name, pgid=owner["pgid"])
        reaped += 1
    return reaped


def become_subreaper() -> None:
    """Make orphans among this process's descendants its own children, not
    init's: what a job leaves running once its parents exit stays in reach
    of the executor that ran it, and what a dead executor leaves, of the
    arbiter. Raises OSError."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@dataclass(frozen=True)
class Child:
    pid: int
    zombie: bool
    started: float  # seconds since boot, floored to a CLOCK_TICK
    job_id: str | None  # its JOB_ENV; None if it has none (or has exited)


def children(parent: int) -> list[Child]:
    """parent's children. Blocking: it reads every process's /proc/PID/stat
    (a kernel without CONFIG_PROC_CHILDREN has no shorter way)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = _read_small(f"/proc/{entry}/stat")
            # "pid (comm) state ppid ... starttime": comm may hold spaces and parentheses.
            fields = stat[stat.rindex(b")") + 2:].split()
            if int(fields[1]) != parent:
                continue
            zombie = fields[0] == b"Z"
            found.append(Child(int(entry), zombie, int(fields[19]) * CLOCK_TICK,
                               None if zombie else _job_of(int(entry))))
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
    return found


def _read_small(path: str) -> bytes:
    """A file of at most a page, in one read: a third faster than open()
    for the /proc/PID/stat of every process, once a second."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _job_of(pid: int) -> str | None:
    with open(f"/proc/{pid}/environ", "rb") as f:
        for entry in f.read().split(b"\0"):
            name, _, value = entry.partition(b"=")
            if name == JOB_ENV.encode():
                return value.decode(errors="replace")
    return None


def leftovers_of_ended_jobs(found: list[Child], leaders: set[int], running: Mapping[str, float]
                            ) -> tuple[list[int], list[int]]:
    """Among an executor's children (found), other than its jobs' leaders:
    (zombies to reap, processes to end). running maps the id of each job
    that has a process to the boot-clock time just before it was started.
    A process is a running job's by its JOB_ENV; one without (its
    environment cleared) may be any job's that started before it."""
    zombies, ended = [], []
    for child in found:
        if child.pid in leaders:
            continue
        if child.zombie:
            zombies.append(child.pid)
        elif child.job_id is not None and child.job_id not in running:
            ended.append(child.pid)
        elif child.job_id is None and not any(start <= child.started + CLOCK_TICK for start in running.values()):
            ended.append(child.pid)
    return zombies, ended


def kill_child(pid: int, parent: int) -> bool:
    """SIGKILL pid, and the process group it leads if it leads one, if it
    is still parent's child: parent, a subreaper, takes its children in
    turn. Whether it was killed. For the subreaper, on the thread that
    reaps its children: none can be reaped between the check and the kill,
    and a PID found earlier may since name another process."""
    try:
        if psutil.Process(pid).ppid() != parent:
            return False
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        return True
    except (psutil.Error, OSError):
        return False
