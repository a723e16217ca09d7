"""The executor: runs jobs, journals their output, enforces their limits.

Each job runs in its own session and process group, with stdout and stderr
read concurrently so a full pipe never blocks anything. Every chunk read is
appended to the job's journal before it is forwarded to the broker, so what
a slow or absent reader misses is still on disk. Ending a job (cancel,
timeout, shutdown) ends its whole process tree. The executor is its jobs'
child subreaper: what a job left running in a session of its own (a
daemon) becomes its child once its parents exit, and is ended once the job
has ended.

On an executor node (role = executor) the broker is another host's: output
is sent with backpressure rather than dropped, since the head writes its
own copy of the journal from it (and asks again, RESEND, for any chunk a
broken connection lost); the node's journal goes once the head has the
job's end; a node cut off from the head for longer than the head waits
ends its jobs, as the head has recorded them lost.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import shutil
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import psutil
import zmq
import zmq.asyncio

from ccexec import bus, claude, config, leftovers, logs, policy, protocol, remote, stall
from ccexec.journal import CLAUDE, READ_BLOCK, JournalWriter, byte_counts, claude_record, job_dir, read_range
from ccexec.liveness import WatchdogPulse
from ccexec.protocol import STREAMS

log = logging.getLogger("ccexec.executor")

READ_SIZE = 256 << 10  # what one read of a pipe transport yields at most (asyncio max_size)
PIPE_SIZE = 1 << 20  # the default pipe-max-size: any user may ask for it
GATHER_DELAY = 0.001  # seconds a fast writer's small writes gather between two reads
EXIT_DRAIN = 1.0  # seconds to wait for pipes after the job's leader exited
INTERNAL_ENV_PREFIXES = ("CCEXEC_", "CIRCUS")
CLAUDE_OFFLOAD_BYTES = 1 << 20  # a stdout line this long is parsed off the event loop
HEAD_TIMEOUT = bus.HEARTBEAT_INTERVAL * bus.HEARTBEAT_LIVENESS  # as long as the head waits for us


@dataclass
class RunningJob:
    job_id: str
    spec: dict
    proc: asyncio.subprocess.Process | None = None
    pid: int | None = None
    started_at: float = field(default_factory=time.time)
    boot_started: float = 0.0  # the boot clock just before its leader was started
    ended_by: str | None = None  # reason, when ccexec ended the job itself
    ended_error: str | None = None
    journal_failed: bool = False  # a write to its journal failed: what it writes after is dropped
    paused: bool = False
    output_bytes: int = 0  # read from its pipes so far
    claude_reader: claude.ClaudeReader | None = None  # a Claude job's stdout events
    quiet_until: float = 0.0  # loop time before which silence is no stall (a CLI retry wait)
    journal: JournalWriter | None = None

    def journaled(self) -> dict[str, int]:
        """How far each of its journal files goes."""
        return dict(self.journal.sizes) if self.journal is not None else {}

    def describe(self) -> dict:
        """As a (re-)registering executor tells a broker of it, with how far
        its journal goes: what it wrote while no broker heard is read from there."""
        return {"job_id": self.job_id, "pid": self.pid, "pgid": self.pid, "started_at": self.started_at,
                "spec": self.spec, "output": self.journaled()}


def daemon_environment() -> dict[str, str]:
    """The daemon's environment without its internal variables: what jobs start from."""
    return {k: v for k, v in os.environ.items() if not k.startswith(INTERNAL_ENV_PREFIXES)}


def job_environment(settings: config.Settings, daemon_env: dict[str, str], requested: dict[str, str]) -> dict[str, str]:
    """daemon_env after the environment policy: env_pass, env_set, the
    request's env as far as env_client_allow lets it, and env_remove last
    (policy.job_environment)."""
    return policy.job_environment(daemon_env, env_pass=settings.env_pass, env_set=settings.env_set,
                                  requested=requested, client_allow=settings.env_client_allow,
                                  remove=settings.env_remove)


def signal_tree(job_id: str, pgid: int, sig: int) -> None:
    """Signal a job's process group and every process of the job that left
    it: descendants, and processes carrying its id (a double fork leaves no
    descendant). Blocking: run it in a worker thread."""
    try:
        tree = {p.pid: p for p in psutil.Process(pgid).children(recursive=True)}
    except psutil.Error:
        tree = {}
    tree.update((p.pid, p) for p in leftovers.job_processes({job_id}))
    escaped = [p for pid, p in tree.items() if _pgid(pid) != pgid]
    kill_group(pgid, sig)
    for proc in escaped:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def output_pipe() -> tuple[int, int]:
    """(read end, write end) of a pipe with PIPE_SIZE of buffer (Linux gives
    64 KiB): a fast writer then fills one read with up to READ_SIZE, and
    every hop after it (journal, broker, handler) handles fewer, larger
    messages. A refusal (past /proc/sys/fs/pipe-max-size) keeps the default."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
    return read_end, write_end


def pipe_writers(inodes: set[int]) -> list[int]:
    """Blocking (/proc walk): every process holding the write end of one of these pipes."""
    links = {f"pipe:[{inode}]" for inode in inodes}
    holders = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:  # gone, or not ours to look at
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in links and _opened_for_writing(f"/proc/{entry}/fdinfo/{fd}"):
                    holders.append(int(entry))
                    break
            except OSError:
                continue
    return holders


def _opened_for_writing(fdinfo: str) -> bool:
    with open(fdinfo) as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8) & os.O_ACCMODE == os.O_WRONLY
    return False


def kill_pipe_holders(inodes: set[int]) -> int:
    """Blocking: SIGKILL whoever can still write to a job's output pipes; how many were found."""
    holders = pipe_writers(inodes)
    for pid in holders:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(holders)


class PipeReader:
    """The read end of a job's output pipe, read straight into the bytes each
    read returns: asyncio's StreamReader copies every read into its buffer and
    out again, two copies of each byte in the executor's hottest loop."""

    def __init__(self, read_end: int):
        os.set_blocking(read_end, False)
        self.fd = read_end

    async def read(self, size: int) -> bytes:
        """Up to size bytes; b"" at the end (every write end closed)."""
        while True:
            try:
                return os.read(self.fd, size)
            except BlockingIOError:
                await self.readable()

    async def readable(self) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        # A readiness callback already queued may still run after a cancel.
        loop.add_reader(self.fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_reader(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def journal_closed(job_id: str, closing: Future) -> None:
    """In the worker thread that closed a job's journal: a failure (a network
    filesystem can report a lost write only here) is told, not swallowed."""
    if closing.exception() is not None:
        logs.event(log, "job.journal_close_failed", logging.ERROR, job_id=job_id, error=closing.exception())


@dataclass(frozen=True)
class JobPriority:
    """The CPU priority jobs get right after they start, `job_nice` below
    the executor's own. Two values are set: the nice of every thread in the
    job's process group (the leader's, inherited by what it starts later,
    and that of any thread or child started in the moment before) and, where
    the kernel schedules each session as a group (autogroup; each job is a
    session of its own), the nice of the job's group, which is what counts
    between groups. Raising either needs no privilege."""

    nice: int
    group_nice: int | None  # None: the kernel has no autogroups

    @classmethod
    def below_own(cls, increment: int) -> "JobPriority":
        return cls(_lower(os.getpriority(os.PRIO_PROCESS, 0), increment),
                   None if (own := _own_group_nice()) is None else _lower(own, increment))

    def apply(self, pid: int) -> None:
        """Cheap calls into /proc and the scheduler, made on the loop, before
        the job is fed its stdin. A job that already ended is let be."""
        try:
            os.setpriority(os.PRIO_PGRP, pid, self.nice)  # the leader is its group's id
            if self.group_nice is not None:
                with open(f"/proc/{pid}/autogroup", "w") as f:
                    f.write(str(self.group_nice))
        except OSError:
            pass


def _lower(nice: int, increment: int) -> int:
    return min(19, nice + increment)


def _own_group_nice() -> int | None:
    try:
        with open("/proc/self/autogroup") as f:  # "/autogroup-123 nice 0"
            return int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


class Executor:
    def __init__(self, settings: config.Settings, subreaper: bool = False):
        self.settings = settings
        # Orphans of its jobs' processes become this process's children
        # (main): it then ends those of ended jobs, and reaps them.
        self.subreaper = subreaper
        self.accepted = 0  # jobs accepted so far
        self.children_clean = False  # a sweep found no child, and no job was accepted since
        self.capacity = settings.slots_per_executor
        self.ctx = zmq.asyncio.Context()
        if settings.remote:
            self.sock = remote.connect_to_head(self.ctx, settings, bus.peer_identity("executor", settings.node_name))
        else:
            self.sock = bus.dealer(self.ctx, "executor", bus.backend_endpoint(settings.run_dir),
                                   send_hwm=bus.DATA_HIGH_WATER_MARK)
        self.jobs: dict[str, RunningJob] = {}
        self.tasks: set[asyncio.Task] = set()
        self.unacked: dict[str, dict] = {}  # COMPLETED headers the broker has not acknowledged
        self.dropped: set[str] = set()  # jobs whose output had a send dropped: told with the next heartbeat
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="journal")
        self.broker_seen = time.monotonic()
        self.stopping = asyncio.Event()
        self.stop_heard = asyncio.Event()  # the broker knows we stop: it dispatches no more
        self.daemon_env = daemon_environment()  # read once: the process's environment does not change
        self.plain_env = job_environment(settings, self.daemon_env, {})  # a job's that sets no env of its own
        self.job_priority = JobPriority.below_own(settings.job_nice) if settings.job_nice else None
        # Held from a job's spawn until its pid is known, and by a sweep
        # while it judges and ends children: one no job names as its leader
        # is then surely a leftover.
        self.spawn_lock = asyncio.Lock()

    # ------------------------------------------------------------ broker link

    async def send(self, kind: bytes, header: dict, *payload: bytes) -> None:
        await self.sock.send_multipart(bus.pack(kind, header, *payload))

    async def send_output(self, header: dict, data: bytes) -> None:
        """Locally: only if the broker link has room (the journal has it anyway).
        On a node: with backpressure, as the head's journal is written from it."""
        if self.settings.remote:
            await self.send(bus.OUTPUT, header, data)
            return
        self.sock.send_multipart(bus.pack(bus.OUTPUT, header, data), zmq.NOBLOCK).add_done_callback(
            functools.partial(self.output_sent, header["job_id"]))

    def output_sent(self, job_id: str, sent: asyncio.Future) -> None:
        """zmq.asyncio reports a full queue on the send's future, not by raising:
        that chunk is dropped, as meant (the journal has it), and the next
        heartbeat says how far the job's journal goes. Anything else is told."""
        error = None if sent.cancelled() else sent.exception()
        if isinstance(error, zmq.Again):
            self.dropped.add(job_id)
        elif error is not None:
            logs.event(log, "executor.output_send_failed", logging.WARNING, error=error)

    async def register(self) -> None:
        await self.send(bus.READY, {
            "role": "executor", "pid": os.getpid(), "capacity": self.capacity,
            "jobs": [j.describe() for j in self.jobs.values() if j.pid is not None],
            "completed": list(self.unacked.values()), "labels": self.settings.labels,
            "node": self.settings.node_name})

    async def receive_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            self.broker_seen = time.monotonic()
            try:
                kind, header, _ = bus.unpack(frames)
            except ValueError as exc:
                logs.event(log, "executor.bad_message", logging.WARNING, error=exc)
                continue
            if kind == bus.DISPATCH and self.stopping.is_set():
                await self.send(bus.DECLINED, {"job_id": header["job_id"]})  # sent before the broker heard
            elif kind == bus.DISPATCH:
                # Known at once: a CONTROL right behind the DISPATCH finds it.
                self.spawn_task(self.run_job(self.accept(header["job_id"], header["spec"])))
            elif kind == bus.STOPPING:
                self.stop_heard.set()
            elif kind == bus.CONTROL:
                await self.control(header)
            elif kind == bus.COMPLETED_ACK:
                if self.unacked.pop(header.get("job_id"), None) is not None and self.settings.remote:
                    self.spawn_task(self.in_thread(self.forget_journal, header["job_id"]))
            elif kind == bus.RESEND:
                self.spawn_task(self.resend(header))
            elif kind == bus.REREGISTER:
                await self.register()

    async def heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(bus.HEARTBEAT_INTERVAL)
            header = {"running": len(self.jobs)}
            if self.dropped:  # a job that ended since tells its sizes in its COMPLETED
                header["dropped"] = {j: self.jobs[j].journaled() for j in self.dropped if j in self.jobs}
                self.dropped = set()
            await self.send(bus.HEARTBEAT, header)

    async def watch_head(self) -> None:
        """On a node: jobs the head has stopped hearing about are ended (it records them lost)."""
        reported = False
        while True:
            await asyncio.sleep(bus.HEARTBEAT_INTERVAL)
            silent = time.monotonic() - self.broker_seen
            if silent <= HEAD_TIMEOUT:
                reported = False
                continue
            if not reported:  # once per outage: unreachable, or refused our key
                reported = True
                logs.event(log, "executor.head_unreachable", logging.WARNING, broker=self.settings.broker,
                           silent=round(silent, 1))
            for job in self.jobs.values():
                if job.pid is not None and job.ended_by is None:
                    logs.event(log, "executor.head_lost", logging.WARNING, job_id=job.job_id, silent=round(silent, 1))
                    self.spawn_task(self.end_job(job, "lost", f"lost contact with the head node for {silent:.0f} s"))

    async def resend(self, header: dict) -> None:
        """Send output the head's journal lacks again, from ours; then the
        job's end, if it is over, which the head holds back until then."""
        job_id, stream, offset = header["job_id"], header["stream"], int(header["offset"])
        try:
            while data := await self.in_thread(read_range, self.settings.jobs_dir, job_id, stream,
                                               offset, offset + READ_BLOCK):
                kind = bus.CLAUDE_EVENT if stream == CLAUDE else bus.OUTPUT
                await self.send(kind, {"job_id": job_id, "stream": stream, "offset": offset}, data)
                offset += len(data)
        except (OSError, ValueError) as exc:
            logs.event(log, "executor.resend_failed", logging.WARNING, job_id=job_id, error=exc)
        if job_id in self.unacked:
            await self.send(bus.COMPLETED, self.unacked[job_id])

    def forget_journal(self, job_id: str) -> None:
        """In a worker thread: the head holds this job's journal now."""
        shutil.rmtree(job_dir(self.settings.jobs_dir, job_id), ignore_errors=True)

    def spawn_task(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ------------------------------------------------------------ jobs

    def resolve_cwd(self, spec: dict) -> str:
        cwd = spec.get("cwd") or self.settings.workdir
        return os.path.normpath(os.path.join(self.settings.workdir, os.path.expanduser(cwd)))

    def argv(self, spec: dict) -> list[str]:
        return list(spec["argv"]) if spec.get("argv") else [self.settings.shell, "-c", spec["command"]]

    async def in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    def accept(self, job_id: str, spec: dict) -> RunningJob:
        job = RunningJob(job_id, spec, claude_reader=claude.ClaudeReader() if claude.is_claude_job(spec) else None)
        self.jobs[job_id] = job
        self.accepted += 1
        self.children_clean = False
        return job

    async def run_job(self, job: RunningJob) -> None:
        job_id = job.job_id
        journal = job.journal = JournalWriter(self.settings.jobs_dir, job_id)
        exit_code, reason, error = await self.execute(job, journal, self.resolve_cwd(job.spec))
        # Every byte is written: the job's end need not wait for its files to
        # close (a worker-thread round trip is ~0.1 ms of a short job's CPU).
        self.io.submit(journal.close).add_done_callback(functools.partial(journal_closed, job_id))
        self.jobs.pop(job_id, None)
        completed = {
            "job_id": job_id, "pid": job.pid, "pgid": job.pid, "exit_code": exit_code,
            "reason": reason, "error": error, "execution_time": time.time() - job.started_at,
            **byte_counts(journal.sizes),
        }
        if job.claude_reader is not None:
            completed["claude"] = job.claude_reader.summary()
            completed["error"] = error or job.claude_reader.error()
        self.unacked[job_id] = completed
        await self.send(bus.COMPLETED, completed)

    def environment(self, job_id: str, requested: dict[str, str] | None) -> dict[str, str]:
        env = job_environment(self.settings, self.daemon_env, requested) if requested else self.plain_env
        return {**env, leftovers.JOB_ENV: job_id}

    async def execute(self, job: RunningJob, journal: JournalWriter, cwd: str) -> tuple[int, str, str | None]:
        """Run the job to its end: (exit_code, reason, error)."""
        argv = self.argv(job.spec)
        stall_timeout = job.spec.get("stall_timeout")
        stall_timeout = self.settings.stall_timeout if stall_timeout is None else stall_timeout
        stdin_text = job.spec.get("stdin")
        if job.ended_by is not None:  # canceled before it was started
            return -signal.SIGTERM, job.ended_by, job.ended_error
        pipes = {stream: output_pipe() for stream in STREAMS}
        # stdin is a pipe of our own, like stdout and stderr: one asyncio made
        # would hold proc.wait() until it closes, i.e. past the leader's exit
        # for as long as a process the job left holds it and reads nothing.
        stdin_pipe = os.pipe2(os.O_CLOEXEC) if stdin_text is not None else None
        async with self.spawn_lock:
            job.boot_started = time.clock_gettime(time.CLOCK_BOOTTIME)
            try:
                job.proc = await asyncio.create_subprocess_exec(
                    *argv, cwd=cwd, env=self.environment(job.job_id, job.spec.get("env")),
                    stdin=stdin_pipe[0] if stdin_pipe is not None else asyncio.subprocess.DEVNULL,
                    stdout=pipes["stdout"][1], stderr=pipes["stderr"][1], start_new_session=True)
            except OSError as exc:
                for read_end, _ in pipes.values():
                    os.close(read_end)
                if stdin_pipe is not None:
                    os.close(stdin_pipe[1])
                return self.spawn_failure(exc, argv[0], cwd)
            finally:
                for _, write_end in pipes.values():  # the job holds them now
                    os.close(write_end)
                if stdin_pipe is not None:
                    os.close(stdin_pipe[0])
            job.pid, job.started_at = job.proc.pid, time.time()
        if job.ended_by is not None:  # canceled while it was being started
            self.spawn_task(self.end_job(job, job.ended_by, job.ended_error))
        if self.job_priority is not None:
            self.job_priority.apply(job.pid)
        pipe_inodes = {os.fstat(read_end).st_ino for read_end, _ in pipes.values()}
        readers = {stream: PipeReader(read_end) for stream, (read_end, _) in pipes.items()}
        if self.settings.remote:
            try:
                await self.in_thread(leftovers.record_owner, self.settings.jobs_dir, job.job_id, job.pid)
            except OSError as exc:  # the journal's directory: its output could not be kept either
                self.journal_failed(job, exc, file=leftovers.OWNER_FILE)
        await self.send(bus.STARTED, {"job_id": job.job_id, "pid": job.pid, "pgid": job.pid,
                                      "started_at": job.started_at})
        pumps = [asyncio.ensure_future(self.pump(job, journal, stream, reader)) for stream, reader in readers.items()]
        feeder = asyncio.ensure_future(self.feed_stdin(stdin_pipe[1], stdin_text)) if stdin_pipe is not None else None
        monitor = asyncio.ensure_future(self.watch_stall(job, stall_timeout)) if stall_timeout else None
        await self.wait_leader(job)
        if monitor is not None:
            monitor.cancel()
        await self.drain(job, pumps, pipe_inodes)
        if feeder is not None:
            feeder.cancel()
        return self.outcome(job)

    @staticmethod
    def spawn_failure(exc: OSError, program: str, cwd: str) -> tuple[int, str, str]:
        # subprocess names the working directory when the child's chdir
        # failed, the program when its exec did (a program that is the
        # working directory itself can only have failed to exec).
        if exc.filename == cwd and program != cwd:
            if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
                return 126, "rejected", f"working directory does not exist: {cwd}"
            return 126, "rejected", f"working directory cannot be entered: {cwd} ({exc.strerror})"
        if isinstance(exc, FileNotFoundError):
            return 127, "exit", f"command not found: {program}"
        if isinstance(exc, PermissionError):
            return 126, "exit", f"permission denied: {program}"
        return 126, "rejected", f"could not start: {exc}"

    async def wait_leader(self, job: RunningJob) -> None:
        timeout, capped = policy.job_timeout(job.spec.get("timeout"), self.settings.max_job_seconds)
        try:
            await asyncio.wait_for(asyncio.shield(job.proc.wait()), timeout)
        except asyncio.TimeoutError:
            await self.end_job(job, "timeout", f"timed out after {timeout:g} s"
                               + (" (the daemon's max_job_seconds)" if capped else ""))
            await job.proc.wait()

    async def watch_stall(self, job: RunningJob, stall_timeout: float) -> None:
        """End the job as stalled once its tree shows no progress for stall_timeout s."""
        loop = asyncio.get_running_loop()
        watch = stall.ProgressWatch(stall_timeout, loop.time())
        interval = stall.sample_interval(stall_timeout)
        try:
            while job.ended_by is None:
                sample = await self.in_thread(stall.sample_tree, job.pid)
                if job.paused or sample is None or loop.time() < job.quiet_until:
                    # paused on request, already exiting, or a Claude CLI waiting to retry the API
                    watch.restart(loop.time())
                elif watch.observe(sample, job.output_bytes, loop.time()) and job.ended_by is None:
                    await self.end_job(job, "stalled", f"no output, CPU or I/O for {stall_timeout:g} s")
                    return
                await asyncio.sleep(interval)
        except Exception as exc:  # a broken monitor must not take the job down
            logs.event(log, "executor.stall_watch_failed", logging.WARNING, job_id=job.job_id, error=exc)

    async def drain(self, job: RunningJob, pumps: list[asyncio.Future], pipe_inodes: set[int]) -> None:
        """Read the pipes to their end; what the leader left running is ended."""
        _, pending = await asyncio.wait(pumps, timeout=EXIT_DRAIN)
        # The leader is gone (and reaped), so its group is all that is left to
        # end: a background process may still run in it, holding the pipes.
        kill_group(job.pid, signal.SIGKILL)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=EXIT_DRAIN)
        # A process that left the group (setsid, a double fork: no longer
        # the leader's descendant either) and still holds the job's output
        # is the job's too: it would hold the job open, past any timeout.
        while pending:
            if killed := await self.in_thread(kill_pipe_holders, pipe_inodes):
                logs.event(log, "job.pipe_holders_killed", logging.WARNING, job_id=job.job_id, processes=killed)
            _, pending = await asyncio.wait(pending, timeout=EXIT_DRAIN)

    def outcome(self, job: RunningJob) -> tuple[int, str, str | None]:
        code = job.proc.returncode
        if job.ended_by is not None:
            return code, job.ended_by, job.ended_error
        if code < 0:
            return code, "signal", f"killed by signal {signal.Signals(-code).name}"
        return code, "exit", None

    async def pump(self, job: RunningJob, journal: JournalWriter, stream: str,
                   reader: PipeReader) -> None:
        """Copy one pipe to the journal, then to the broker; close it at its end."""
        try:
            await self.copy_output(job, journal, stream, reader)
        finally:
            reader.close()

    async def copy_output(self, job: RunningJob, journal: JournalWriter, stream: str,
                          reader: PipeReader) -> None:
        loop = asyncio.get_running_loop()
        quick_reads = 0
        while True:
            asked = loop.time()
            data = await reader.read(READ_SIZE)
            # A job that keeps its pipe busy with small writes (base64 writes
            # 4 KiB at a time) would cost a journal append and a message down
            # the line per write: after two short reads that did not wait,
            # its output gathers for a moment before the next one.
            quick = len(data) < READ_SIZE and loop.time() - asked < GATHER_DELAY
            quick_reads = quick_reads + 1 if quick else 0
            if not data:
                if stream == "stdout" and job.claude_reader is not None:
                    await self.claude_events(job, journal, None)
                return
            if job.journal_failed:
                continue  # read and dropped: a byte after a lost one would sit at the wrong offset
            limit = self.settings.max_output_bytes
            if limit and job.output_bytes + len(data) > limit:
                data = data[:max(0, limit - job.output_bytes)]  # the rest is read and dropped
                self.end_soon(job, "output_limit", f"output limit reached: the job wrote more than {limit} "
                              "bytes (max_output_bytes); it was ended and its output kept up to the limit")
                if not data:
                    continue
            job.output_bytes += len(data)
            try:
                offset = await self.in_thread(journal.append, stream, data)
            except OSError as exc:
                self.journal_failed(job, exc, stream=stream)
                continue
            await self.send_output({"job_id": job.job_id, "stream": stream, "offset": offset}, data)
            if stream == "stdout" and job.claude_reader is not None:
                await self.claude_events(job, journal, data)
            if quick_reads >= 2:
                await asyncio.sleep(GATHER_DELAY)

    def journal_failed(self, job: RunningJob, exc: OSError, **where: str) -> None:
        """A full or failing disk: end the job rather than lose output unsaid;
        what it writes from now on is read and dropped."""
        job.journal_failed = True
        logs.event(log, "job.journal_failed", logging.ERROR, job_id=job.job_id, **where, error=exc)
        self.end_soon(job, "journal_failed", f"its output could not be written to the journal ({exc}); "
                      "it was ended and its output kept up to that point")

    async def claude_events(self, job: RunningJob, journal: JournalWriter, data: bytes | None) -> None:
        """Read a Claude job's stdout (None: its end); what it tells is
        journaled, then sent, as output is."""
        reader = job.claude_reader
        try:
            if data is None:  # the last line may be as long as any other (up to 16 MiB)
                notices = await self.in_thread(reader.finish) if reader.buffered >= CLAUDE_OFFLOAD_BYTES \
                    else reader.finish()
            elif reader.buffered + len(data) >= CLAUDE_OFFLOAD_BYTES:  # a long line: parse it in a thread
                notices = await self.in_thread(reader.feed, data)
            else:
                notices = reader.feed(data)
        except Exception as exc:  # a reader bug must not take the job down
            logs.event(log, "executor.claude_reader_failed", logging.WARNING, job_id=job.job_id, error=exc)
            job.claude_reader = None
            return
        for notice in notices:
            if notice.quiet_for is not None:
                job.quiet_until = max(job.quiet_until, asyncio.get_running_loop().time() + notice.quiet_for)
        if not notices or job.journal_failed:
            return
        records = b"".join(claude_record(notice.stdout_end, protocol.claude_notification(
            notice.method, job.job_id, notice.params).encode()) for notice in notices)
        try:
            offset = await self.in_thread(journal.append, CLAUDE, records)
        except OSError as exc:
            self.journal_failed(job, exc, stream=CLAUDE)
            return
        await self.send(bus.CLAUDE_EVENT, {"job_id": job.job_id, "stream": CLAUDE, "offset": offset}, records)

    @staticmethod
    async def feed_stdin(write_end: int, text: str) -> None:
        """Write text to the job's stdin and close it; canceled (the job is
        over), what was not written is dropped and the pipe closed."""
        loop = asyncio.get_running_loop()
        transport, flow = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                        os.fdopen(write_end, "wb", buffering=0))
        writer = asyncio.StreamWriter(transport, flow, None, loop)
        try:
            writer.write(text.encode())
            await writer.drain()
            writer.close()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            if not transport.is_closing():
                transport.abort()

    def end_soon(self, job: RunningJob, reason: str, error: str) -> None:
        """End the job for `reason` unless something already ends it; the
        reason holds at once, for the reads still to come."""
        if job.ended_by is None:
            job.ended_by, job.ended_error = reason, error
            self.spawn_task(self.end_job(job, reason, error))

    async def end_job(self, job: RunningJob, reason: str, error: str) -> None:
        """Terminate the job's tree: SIGTERM, then SIGKILL after the grace."""
        if job.ended_by is None:
            job.ended_by, job.ended_error = reason, error
        await self.in_thread(signal_tree, job.job_id, job.pid, signal.SIGTERM)
        if job.paused:  # a stopped process sees SIGTERM only once continued
            await self.in_thread(signal_tree, job.job_id, job.pid, signal.SIGCONT)
        try:
            await asyncio.wait_for(asyncio.shield(job.proc.wait()), self.settings.kill_grace)
        except asyncio.TimeoutError:
            await self.in_thread(signal_tree, job.job_id, job.pid, signal.SIGKILL)

    async def control(self, header: dict) -> None:
        job = self.jobs.get(header.get("job_id"))
        action = header.get("action")
        reply = {"job_id": header.get("job_id"), "action": action, "ref": header.get("ref", "")}
        why = str(header.get("why") or "canceled on request")  # the broker's when it cancels by itself
        if job is not None and job.pid is None and action == "CANCEL" and job.ended_by is None:
            # Dispatched, not started yet: it never starts, or is ended as soon as it has.
            job.ended_by, job.ended_error = "canceled", why
            await self.send(bus.CONTROL_RESULT, {**reply, "ok": True, "status": "canceled", "pid": None, "pgid": None})
            return
        if job is None or job.pid is None or job.proc.returncode is not None:
            await self.send(bus.CONTROL_RESULT, {**reply, "ok": False, "code": -32002,
                                                 "error": f"job {reply['job_id']} is not running"})
            return
        status = {"PAUSE": "paused", "RESUME": "resumed", "CANCEL": "canceled"}[action]
        await self.send(bus.CONTROL_RESULT, {**reply, "ok": True, "status": status,
                                             "pid": job.pid, "pgid": job.pid})
        if action == "CANCEL":
            self.spawn_task(self.end_job(job, "canceled", why))
        else:
            job.paused = action == "PAUSE"
            await self.in_thread(signal_tree, job.job_id, job.pid, signal.SIGSTOP if job.paused else signal.SIGCONT)

    # ------------------------------------------------------------ leftovers

    async def sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(leftovers.SWEEP_INTERVAL)
            try:
                await self.sweep_leftovers()
            except Exception as exc:  # a broken sweep must not take the executor down
                logs.event(log, "executor.sweep_failed", logging.WARNING, error=exc)

    async def sweep_leftovers(self) -> None:
        """End what jobs that have ended left running, and reap what exited:
        a process whose parents are gone (a daemon a job started, say) is
        the subreaper's child."""
        if not self.subreaper or self.children_clean:
            return
        accepted = self.accepted
        found = await self.in_thread(leftovers.children, os.getpid())
        async with self.spawn_lock:
            started = [job for job in self.jobs.values() if job.pid is not None]
            zombies, ended = leftovers.leftovers_of_ended_jobs(
                found, {job.pid for job in started}, {job.job_id: job.boot_started for job in started})
            # None is a job's leader, which asyncio waits for: only a sweep
            # waits for other children.
            for pid in zombies:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            killed = sum(leftovers.kill_child(pid, os.getpid()) for pid in ended)
        if killed:
            logs.event(log, "job.leftovers_killed", logging.WARNING, processes=killed)
        # Only a job makes children: an idle executor reads the process table no more.
        self.children_clean = not found and not self.jobs and self.accepted == accepted

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.keep_running)
        pulse = WatchdogPulse(self.settings.watchdog_port) if self.settings.watchdog_port else None
        if self.settings.remote:  # a killed executor's jobs: nobody else on this host would end them
            await self.in_thread(leftovers.reap_node_orphans, self.settings.jobs_dir)
        # Not awaited here: on a node whose key the head refuses, READY can wait
        # for a link forever, and the executor must still watch the head and stop.
        background = [loop.create_task(self.register()), loop.create_task(self.receive_loop()),
                      loop.create_task(self.heartbeat_loop()), loop.create_task(self.sweep_loop())]
        logs.event(log, "executor.started", pid=os.getpid(), capacity=self.capacity)
        if self.settings.remote:
            background.append(loop.create_task(self.watch_head()))
        if pulse:
            background.append(loop.create_task(pulse.run()))
        await self.stopping.wait()
        await self.shutdown()
        for task in background:
            task.cancel()

    def keep_running(self) -> None:
        """SIGHUP, Circus's reload (`systemctl reload`): the jobs run on; new
        [ccexec] settings reach the executor when it restarts."""
        logs.event(log, "executor.reload_skipped", pid=os.getpid(), jobs=len(self.jobs))

    async def shutdown(self) -> None:
        """Stop: end every running job's tree and report it."""
        logs.event(log, "executor.stopping", pid=os.getpid(), jobs=len(self.jobs))
        # Queued ahead of the completions of the jobs ended below, so that the
        # slots they free take no new jobs; not awaited, as a broker out of
        # reach (the head of a node that lost it) hears nothing.
        told = self.sock.send_multipart(bus.pack(bus.STOPPING, {}))
        for job in list(self.jobs.values()):
            if job.pid is None and job.ended_by is None:  # being started: ended once it is
                job.ended_by, job.ended_error = "canceled", "the daemon is stopping"
            elif job.pid is not None and job.proc.returncode is None:
                self.spawn_task(self.end_job(job, "canceled", "the daemon is stopping"))
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=self.settings.kill_grace + EXIT_DRAIN + 2)
        await self.sweep_leftovers()  # the jobs ended above leave nothing behind either
        # A DISPATCH already on its way when the broker heard is declined
        # (by the receive loop, still running) only if it arrives before the socket closes.
        try:
            async with asyncio.timeout(bus.HEARTBEAT_INTERVAL):
                await told
                await self.stop_heard.wait()
        except TimeoutError:
            pass
        self.sock.close(linger=500)
        logs.event(log, "executor.stopped", pid=os.getpid())


def main(argv: list[str]) -> None:
    settings = config.load_effective()
    logs.setup("executor", settings.log_level)
    if sys.version_info < (3, 12) and hasattr(os, "pidfd_open"):
        # Python 3.11 waits for each child in a thread of its own; a pidfd on
        # the event loop does it without (3.12 does this by default).
        asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
    try:
        leftovers.become_subreaper()
        subreaper = True
    except OSError as exc:  # what jobs leave running outlives them, as before Linux 3.4
        logs.event(log, "executor.no_subreaper", logging.WARNING, error=exc)
        subreaper = False
    asyncio.run(Executor(settings, subreaper).run())
