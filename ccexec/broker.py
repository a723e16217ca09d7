"""The broker: job table, FIFO queue and routing between handlers and executors.

A ZeroMQ ROUTER broker in the shape of the guide's Paranoid Pirate and
Majordomo patterns: one poll loop, two ROUTER faces (handlers in front,
executors behind), peers tracked by heartbeat and liveness deadlines, every
step a named method. The broker holds nothing that cannot be rebuilt: after
a restart, executors report their running jobs and handlers resubmit what
they still wait for (both on REREGISTER).
"""

from __future__ import annotations

import functools
import heapq
import json
import logging
import os
import signal
import sqlite3
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import psutil
import zmq

from ccexec import bus, config, journal, leftovers, logs, metrics, protocol, remote, store
from ccexec.journal import JournalReplica
from ccexec.liveness import WatchdogPulse

log = logging.getLogger("ccexec.broker")

PEER_TIMEOUT = bus.HEARTBEAT_INTERVAL * bus.HEARTBEAT_LIVENESS
# After a (re)start, time for executors and handlers to re-register before
# jobs are dispatched and records nobody claimed are declared lost.
SETTLE_TIME = PEER_TIMEOUT
PRUNE_INTERVAL = 60.0  # seconds between retention passes
STOP_MARGIN = 3.0  # seconds past kill_grace a stopping broker waits for executors' last reports
REGISTER_ASK_INTERVAL = 1.0  # seconds
EXIT_GRACE = 0.5  # seconds what an executor or handler Circus reaped sent last has to be read in
# Seconds past PEER_TIMEOUT a silent peer whose process is a zombie is waited
# for: ccexecd reaps on SIGCHLD, but an arbiter starved of CPU (or stopped)
# reaps late, and its reap tells the exit code.
REAP_WAIT = 2 * PEER_TIMEOUT
MAX_RESENDS = 5  # times a remote job's missing output is asked for again before its record is closed


@dataclass
class Peer:
    identity: bytes
    last_seen: float
    capacity: int = 0
    jobs: set[str] = field(default_factory=set)
    connections: int = 0
    addresses: dict[str, int] = field(default_factory=dict)  # a handler's connections by client address
    sock: zmq.Socket | None = None  # the face an executor is reached on
    remote: bool = False  # an executor on another host (its pids are not ours to kill)
    node: str = ""
    pid: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    stopping: bool = False  # an executor that takes no more jobs: it ends the ones it runs and exits
    exit_code: int | None = None  # a local executor's or handler's, once Circus has reaped it
    awaiting_reap: bool = False  # silent, and its process is dead: Circus is to tell the exit code
    behind: set[str] = field(default_factory=set)  # a handler's jobs it missed output of: told with a heartbeat

    @property
    def free(self) -> int:
        return self.capacity - len(self.jobs)

    def died_unreaped(self) -> bool:
        """This host's process of the peer is dead and not yet reaped: a
        zombie. (One already gone was reaped: either its event has been read,
        or it was reaped by Circus's kill, the watchdog's, which tells none.)"""
        if self.remote or self.pid is None:
            return False
        try:
            return psutil.Process(self.pid).status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def can_run(self, spec: dict) -> bool:
        """Has a free slot and every label the job asks for."""
        wanted = spec.get("labels") or {}
        return self.free > 0 and all(self.labels.get(k) == v for k, v in wanted.items())

    def describe(self, now: float) -> dict:
        return {"id": self.identity.decode(errors="replace"), "node": self.node, "pid": self.pid,
                "remote": self.remote, "capacity": self.capacity, "running": len(self.jobs),
                "labels": self.labels, "last_heartbeat": round(now - self.last_seen, 1)}


@dataclass
class Job:
    job_id: str
    spec: dict
    client: str | None = None
    after: str | None = None
    state: str = "queued"  # held | queued | dispatched | running | finished
    executor: bytes | None = None
    pid: int | None = None
    pgid: int | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    subscribers: set[bytes] = field(default_factory=set)
    grace_deadline: float | None = None
    position: int | None = None
    remote: bool = False  # runs on an executor node; its output is replicated here
    replica: JournalReplica | None = None
    resend_asked: dict[str, int] = field(default_factory=dict)  # stream -> replica size when asked
    resends: int = 0
    journal_error: str | None = None  # this host could not journal a remote job's output: it was ended
    output_ends: dict[str, int] = field(default_factory=dict)  # how far its journal is known to go, by stream


def extend(ends: dict[str, int], stream: str, end: int) -> None:
    ends[stream] = max(ends.get(stream, 0), end)


class Broker:
    def __init__(self, settings: config.Settings, ctx: zmq.Context):
        self.settings = settings
        self.frontend = self._bind(ctx, bus.frontend_endpoint(settings.run_dir))
        self.data = self._bind(ctx, bus.handler_data_endpoint(settings.run_dir),
                               bus.DATA_HIGH_WATER_MARK, bus.DATA_HIGH_WATER_MARK)
        # Executors send output here: what the broker has not read yet waits
        # in a short queue (their sends then drop it), not in its memory.
        self.backend = self._bind(ctx, bus.backend_endpoint(settings.run_dir), receive_hwm=bus.DATA_HIGH_WATER_MARK)
        self.remote = remote.RemoteFace(ctx, settings) if settings.remote_listen else None
        self.handlers: dict[bytes, Peer] = {}
        self.executors: dict[bytes, Peer] = {}
        self.jobs: dict[str, Job] = {}
        self.store = store.JobStore(settings.state_dir)
        # Records of jobs a previous broker left unfinished, until claimed.
        self.unclaimed: dict[str, dict] = {r["job_id"]: r for r in self.store.unfinished()}
        self.waiting_subscribers: dict[str, set[bytes]] = {}
        self.settle_deadline = time.monotonic() + SETTLE_TIME
        self.settled = not self.unclaimed  # a fresh start has nothing to wait for
        self.next_prune = time.monotonic() + SETTLE_TIME
        self.queue: deque[str] = deque()
        self.restored: list[str] = []  # jobs a previous broker accepted and had not started
        self.held: dict[str, list[str]] = {}  # predecessor -> jobs sequenced after it
        self.pending_controls: dict[str, tuple[bytes, bytes, dict]] = {}  # ref -> (handler, executor, reply)
        self.controls_held: dict[str, list[tuple[bytes, dict]]] = {}  # of unclaimed jobs, until claimed
        self.sends_after_commit: list[Callable[[], object]] = []  # what tells of this turn's records
        self.register_asked: dict[bytes, float] = {}  # unknown peer -> when it was last asked to register
        self.timers: list[tuple[float, str, str]] = []  # (deadline, kind, job_id or a peer's identity)
        if not self.settled:  # by then handlers have re-registered, and said which jobs their clients follow
            self.timers.append((self.settle_deadline, "unfollowed", ""))
        self.metrics = metrics.PoolMetrics()
        self.reaper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reaper")  # kill_job_processes
        # Circus's event stream: every process exit, for the restart counters.
        self.circus_events = ctx.socket(zmq.SUB)
        self.circus_events.setsockopt(zmq.LINGER, 0)
        self.circus_events.setsockopt(zmq.SUBSCRIBE, b"watcher.")
        self.circus_events.connect(settings.circus_events_endpoint)
        self.started_at = time.time()
        self.next_heartbeat = 0.0
        self.positions_dirty = False
        self.running = True
        self.daemon_stopping = False
        self.pulse = WatchdogPulse(settings.watchdog_port) if settings.watchdog_port else None
        self.restore_queue()

    @staticmethod
    def _bind(ctx: zmq.Context, endpoint: str, send_hwm: int = bus.HIGH_WATER_MARK,
              receive_hwm: int = bus.HIGH_WATER_MARK) -> zmq.Socket:
        sock = ctx.socket(zmq.ROUTER)
        bus.tune(sock, send_hwm, receive_hwm)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        path = endpoint[len("ipc://"):]
        if os.path.exists(path):  # left by a killed broker; the arbiter owns the run dir
            os.unlink(path)
        sock.bind(endpoint)
        return sock

    # ------------------------------------------------------------ main loop

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(self.circus_events, zmq.POLLIN)
        if self.remote:
            poller.register(self.remote.sock, zmq.POLLIN)
            on_remote_message = functools.partial(self.on_executor_message, face=self.remote.sock)
        logs.event(log, "broker.started", pid=os.getpid())
        while self.running or not self.drained():
            timeout = max(0.0, min(self.next_heartbeat, self._next_timer()) - time.monotonic())
            events = dict(poller.poll(timeout * 1000))
            if self.backend in events:
                self._drain(self.backend, self.on_executor_message)
            if self.remote and self.remote.sock in events:
                self._drain(self.remote.sock, on_remote_message)
            if self.frontend in events:
                self._drain(self.frontend, self.on_handler_message)
            if self.circus_events in events:
                self.count_process_exits()
            self.run_due_timers()
            self.settle_if_due()
            self.release_held_controls()
            self.prune_if_due()
            self.send_heartbeats_if_due()
            self.publish_positions()
            self.store.commit()
            self.send_recorded()
            if self.pulse:
                self.pulse.beat_if_due()
            if self.remote:
                self.remote.allowed.reload_if_changed()
        self.stop_with_the_pool()  # what was submitted while the daemon stopped
        self.store.commit()
        self.send_recorded()
        if self.remote:
            self.remote.close()
        self.store.close()
        self.reaper.shutdown()
        logs.event(log, "broker.stopped", pid=os.getpid())

    @staticmethod
    def _drain(sock: zmq.Socket, handle, budget: int = 1000) -> None:
        """Handle up to `budget` waiting messages, so neither face starves."""
        for _ in range(budget):
            try:
                # copy=False: output's payload frame is relayed without being copied into Python
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = frames[0].bytes
            try:
                kind, header, _ = bus.unpack([frame.bytes for frame in frames[1:3]])
                handle(identity, kind, header, [frame.buffer for frame in frames[3:]])
            except (ValueError, KeyError, TypeError) as exc:
                logs.event(log, "broker.bad_message", logging.WARNING,
                           peer=identity.decode(errors="replace"), error=exc)

    def count_process_exits(self) -> None:
        """Topics read `watcher.<name>.reap` when Circus reaps a process."""
        while True:
            try:
                frames = self.circus_events.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            parts = frames[0].decode(errors="replace").split(".")
            if len(parts) == 3 and parts[2] == "reap":
                self.metrics.watcher_exited(parts[1])
                if len(frames) > 1:
                    self.process_exited(parts[1], frames[1])

    def process_exited(self, watcher: str, body: bytes) -> None:
        """One of this host's executors or handlers exited (stopped, or died:
        kill -9, the OOM killer, a crash). It is given up once what it sent
        before had time to be read, not a heartbeat timeout later: a dead
        executor's jobs end lost, a handler's clients' jobs count down."""
        try:
            event = json.loads(body)
            pid, exit_code = event["process_pid"], event.get("exit_code")
        except (ValueError, TypeError, KeyError):
            return
        for peer in {"executor": self.executors, "handler": self.handlers}.get(watcher, {}).values():
            if not peer.remote and peer.pid == pid:
                peer.exit_code = exit_code
                heapq.heappush(self.timers, (time.monotonic() + EXIT_GRACE, f"{watcher}_exited", peer.identity.decode()))

    def stop(self, *_: object) -> None:
        """SIGTERM: dispatch nothing more. If the executors stop too (the
        whole daemon stops), wait (bounded) for the reports of the jobs they
        end and cancel the queued ones; if only the broker restarts, running
        jobs run on and queued ones wait for the broker started in its place."""
        if self.running:
            self.running = False
            now = time.monotonic()
            self.stop_deadline = now + self.settings.kill_grace + STOP_MARGIN
            self.stop_noticed_by = now + bus.STOP_NOTICE_TIME
            self.stop_with_the_pool()

    def pool_stops(self) -> bool:
        """This host's executors all stop (nodes on other hosts live on)."""
        local = [p for p in self.executors.values() if not p.remote]
        return not local or all(p.stopping for p in local)

    def stop_with_the_pool(self) -> None:
        """The broker and this host's executors stop: the whole daemon does.
        Its handlers are told (they let their clients see the jobs end before
        they close), and the queued jobs are canceled."""
        if self.running or not self.pool_stops():
            return
        if not self.daemon_stopping:
            self.daemon_stopping = True
            for identity in self.handlers:
                self.to_handler(identity, bus.DAEMON_STOPPING, {})
        for job in [j for j in self.jobs.values() if j.state in ("queued", "held")]:
            self.finish_unstarted(job, "canceled", "the daemon is stopping")

    def drained(self) -> bool:
        """Nothing more to wait for: the executors had time to say whether they
        stop, and the jobs that stopping ones end are reported."""
        now = time.monotonic()
        if now >= self.stop_deadline:
            return True
        if now < self.stop_noticed_by and not self.pool_stops():
            return False
        running = [j for j in self.jobs.values() if j.state in ("running", "dispatched")]
        return not any(j.executor in self.executors and self.executors[j.executor].stopping for j in running)

    # ------------------------------------------------------------ sending

    def _send(self, sock: zmq.Socket, identity: bytes, frames: list[bytes]) -> bool:
        """Send without ever blocking the loop; False if the peer is gone or full."""
        try:
            sock.send_multipart([identity, *frames], zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False
            raise

    def to_handler(self, identity: bytes, kind: bytes, header: dict, *payload: bytes) -> None:
        if not self._send(self.frontend, identity, bus.pack(kind, header, *payload)) \
                and kind not in (bus.HEARTBEAT, bus.DAEMON_STOPPING):  # a stopping handler may be gone already
            # Output is in the journal and is re-read from there; anything
            # else is lost only for a handler that is dead or frozen, whose
            # clients reconnect and attach.
            logs.event(log, "broker.handler_unreachable", logging.WARNING,
                       handler=identity.decode(errors="replace"), message=kind.decode())

    def ask_to_register(self, face: zmq.Socket, identity: bytes) -> None:
        """An unknown peer (this broker restarted, or it was given up for
        lost) sends READY again; asked once a second, however much it sends."""
        now = time.monotonic()
        if now - self.register_asked.get(identity, -REGISTER_ASK_INTERVAL) < REGISTER_ASK_INTERVAL:
            return
        if len(self.register_asked) > 10_000:  # peers that never answered
            self.register_asked.clear()
        self.register_asked[identity] = now
        self._send(face, identity, bus.pack(bus.REREGISTER, {}))

    def to_subscribers(self, job: Job, kind: bytes, header: dict, *payload: bytes) -> None:
        frames = bus.pack(kind, header, *payload)
        sock = self.data if kind == bus.OUTPUT else self.frontend
        if kind == bus.OUTPUT:
            extend(job.output_ends, header["stream"], header["offset"] + len(payload[0]))
        for identity in list(job.subscribers):
            if not self._send(sock, identity, frames) and kind == bus.OUTPUT:
                self.tell_output_ends(job, {identity})

    def to_executor(self, identity: bytes, kind: bytes, header: dict, face: zmq.Socket | None = None) -> bool:
        peer = self.executors.get(identity)
        sock = face or (peer.sock if peer is not None else self.backend)
        return self._send(sock, identity, bus.pack(kind, header))

    # ------------------------------------------------------------ handlers

    def on_handler_message(self, identity: bytes, kind: bytes, header: dict, payload: list[memoryview]) -> None:
        peer = self.handlers.get(identity)
        if kind == bus.READY:
            self.register_handler(identity, header)
            return
        if peer is None:
            # This broker restarted, or gave the handler up for lost. It is
            # asked to register, and its requests are answered all the same:
            # a client waits for each of them.
            self.ask_to_register(self.frontend, identity)
        else:
            peer.last_seen = time.monotonic()
        if kind == bus.HEARTBEAT and peer is not None:
            peer.connections = int(header.get("connections", 0))
            addresses = header.get("addresses")
            peer.addresses = addresses if isinstance(addresses, dict) else {}
        elif kind == bus.SUBMIT:
            self.submit(identity, header)
        elif kind == bus.CONTROL:
            self.control(identity, header)
        elif kind == bus.DETACH:
            for job_id in header.get("job_ids", []):
                self.unsubscribe(identity, job_id)
        elif kind == bus.SUBSCRIBE:
            for job_id in header.get("job_ids", []):
                self.subscribe(identity, job_id)
        elif kind == bus.QUERY:
            self.to_handler(identity, bus.QUERY_RESULT, {"ref": header.get("ref"), **self.query(identity, header)})

    def register_handler(self, identity: bytes, header: dict) -> None:
        self.handlers[identity] = Peer(identity, time.monotonic(), pid=header.get("pid"),
                                       connections=int(header.get("connections", 0)))
        for job_id in header.get("jobs", []):
            self.subscribe(identity, job_id)
        logs.event(log, "handler.registered", handler=identity.decode())
        self.to_handler(identity, bus.HEARTBEAT, self.heartbeat_header())

    def subscribe(self, identity: bytes, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None:
            job.subscribers.add(identity)
            job.grace_deadline = None
            self.tell_output_ends(job, {identity})  # what came before it followed the job
        elif job_id in self.unclaimed:  # its executor has not re-registered yet
            self.waiting_subscribers.setdefault(job_id, set()).add(identity)
        elif (completed := self.store.completed(job_id)) is not None:
            self.to_handler(identity, bus.COMPLETED, completed)  # finished while nobody watched

    def query(self, identity: bytes, header: dict) -> dict:
        """`attach`, `job.status` and `jobs`, answered from the job table and the store."""
        what = header.get("what")
        if what == "jobs":
            limit = max(1, min(int(header.get("limit") or 100), 1000))
            return {"records": self.store.list(header.get("state"), limit)}
        job_id = str(header.get("job_id"))
        record = self.store.get(job_id)
        if record is None:
            return {"error": f"no job {job_id}", "code": protocol.JOB_NOT_FOUND}
        public = store.public(record)
        if what == "attach":
            if record["state"] != "finished":
                self.subscribe(identity, job_id)
            return {"record": public, "completed": self.store.completed(job_id)}
        return {"record": public}

    def unsubscribe(self, identity: bytes, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            return
        job.subscribers.discard(identity)
        self.count_down_if_unfollowed(job)

    def count_down_if_unfollowed(self, job: Job) -> None:
        """A job no client follows is canceled after detach_grace, unless detached."""
        if not job.subscribers and not job.spec.get("detach"):
            job.grace_deadline = time.monotonic() + self.settings.detach_grace
            heapq.heappush(self.timers, (job.grace_deadline, "detach_grace", job.job_id))

    def submit(self, identity: bytes, header: dict) -> None:
        job_id = bus.header_field(header, "job_id", str)
        known = self.store.get(job_id)
        if job_id in self.jobs or (known and known["state"] in ("finished", "running")):
            # Sent again: by a handler, after this broker restarted; or by a
            # client whose connection dropped before the answer. Either
            # follows the job the first one made.
            self.subscribe(identity, job_id)
            self.tell_state(identity, job_id)
            return
        self.unclaimed.pop(job_id, None)
        waiting = sum(1 for j in self.jobs.values() if j.state in ("queued", "held"))
        if waiting >= self.settings.max_queue and not self._free_executor():
            retry_after = 1 + waiting // max(1, self.capacity())
            self.to_handler(identity, bus.REJECTED, {
                "job_id": job_id, "code": protocol.SERVER_BUSY,
                "message": f"Server busy: {waiting} jobs already wait in the queue",
                "data": {"retry_after": retry_after, "queued": waiting}})
            return
        job = Job(job_id, bus.header_field(header, "spec", dict),
                  client=header.get("client"), after=header.get("after"))
        job.subscribers.add(identity)
        self.jobs[job_id] = job
        logs.event(log, "job.accepted", job_id=job_id, client=job.client, token=header.get("token"),
                   name=job.spec.get("name"))
        self.store.accepted(job_id, job.spec, job.client, "held" if self.waits_for_predecessor(job) else "queued",
                            job.after)
        self.queue_or_hold(job)

    def tell_state(self, identity: bytes, job_id: str) -> None:
        """Where a job stands, to a handler that has just begun to follow it.
        One finished was told by subscribe(), one unclaimed is when claimed."""
        job = self.jobs.get(job_id)
        if job is None:
            return
        if job.state in ("queued", "held"):
            self.to_handler(identity, bus.QUEUED, {"job_id": job_id, "position": job.position,
                                                   "after": job.after if job.state == "held" else None})
        elif job.state == "running":
            self.to_handler(identity, bus.STARTED, {"job_id": job_id, "pid": job.pid, "pgid": job.pgid,
                                                    "started_at": job.started_at})

    def waits_for_predecessor(self, job: Job) -> bool:
        """Its `after` job has not ended (it may be one a previous broker left, not claimed yet)."""
        return bool(job.after) and (job.after in self.jobs or job.after in self.unclaimed)

    def queue_or_hold(self, job: Job) -> None:
        if self.waits_for_predecessor(job):
            job.state = "held"
            self.held.setdefault(job.after, []).append(job.job_id)
            self.to_subscribers(job, bus.QUEUED, {"job_id": job.job_id, "position": None, "after": job.after})
        else:
            self.enqueue(job)

    def restore_queue(self) -> None:
        """Jobs a previous broker accepted and had not started: back in the
        queue, in their order (a handler that submits one again finds it)."""
        waiting = [r for r in self.unclaimed.values() if r["state"] in ("queued", "held") and r["spec"]]
        for record in sorted(waiting, key=lambda r: r["created_at"]):
            del self.unclaimed[record["job_id"]]
            job = Job(record["job_id"], json.loads(record["spec"]), client=record["client"],
                      after=record["after"], created_at=record["created_at"])
            self.jobs[job.job_id] = job
            self.restored.append(job.job_id)
            self.queue_or_hold(job)

    def enqueue(self, job: Job) -> None:
        job.state = "queued"
        self.queue.append(job.job_id)
        self.dispatch()
        if job.state == "queued":
            self.positions_dirty = True

    def control(self, identity: bytes, header: dict) -> None:
        job_id, action = bus.header_field(header, "job_id", str), bus.header_field(header, "action", str)
        ref = str(header.get("ref", ""))
        job = self.jobs.get(job_id)
        reply = {"job_id": job_id, "action": action, "ref": ref}
        if job is None and job_id in self.unclaimed:  # its executor has not re-registered yet
            self.controls_held.setdefault(job_id, []).append((identity, header))
        elif job is None:
            self.to_handler(identity, bus.CONTROL_RESULT, {**reply, "ok": False,
                            "code": protocol.JOB_NOT_FOUND, "error": f"job {job_id} is not running"})
        elif job.state in ("running", "dispatched") and job.executor is not None:
            self.pending_controls[ref] = (identity, job.executor, reply)
            if not self.to_executor(job.executor, bus.CONTROL, reply):  # as in dispatch(): it is gone
                self.lose_executor(job.executor, "unreachable")
        elif action == "CANCEL":
            self.to_handler(identity, bus.CONTROL_RESULT, {**reply, "ok": True, "status": "canceled",
                            "pid": None, "pgid": None})
            self.finish_unstarted(job, "canceled", "canceled before it started")
        else:
            self.to_handler(identity, bus.CONTROL_RESULT, {**reply, "ok": False,
                            "code": protocol.JOB_NOT_FOUND, "error": f"job {job_id} has not started yet"})

    # ------------------------------------------------------------ executors

    def on_executor_message(self, identity: bytes, kind: bytes, header: dict, payload: list[memoryview],
                            face: zmq.Socket | None = None) -> None:
        face = face or self.backend
        if kind == bus.READY:
            self.register_executor(identity, header, face)
            return
        peer = self.executors.get(identity)
        if peer is None:
            self.ask_to_register(face, identity)
            return
        peer.last_seen = time.monotonic()
        if kind in (bus.OUTPUT, bus.STARTED, bus.CLAUDE_EVENT):
            job = self.jobs.get(header.get("job_id"))
            if job is None or not self.speaks_for(peer, job):
                return
            if kind == bus.STARTED:
                self.on_started(job, header)
            elif peer.remote:
                self.relay_replicated(peer, job, kind, header, payload[0])
            else:  # a CLAUDE_EVENT goes on the control plane, never dropped for output as OUTPUT may be
                self.to_subscribers(job, kind, header, *payload)
        elif kind == bus.COMPLETED:
            self.on_completed(peer, header)
        elif kind == bus.HEARTBEAT and not peer.remote:  # a node's sends wait instead of dropping
            self.executor_dropped(peer, header.get("dropped"))
        elif kind == bus.STOPPING:
            self.executor_stopping(peer)
        elif kind == bus.DECLINED:
            self.declined(peer, bus.header_field(header, "job_id", str))
        elif kind == bus.CONTROL_RESULT:
            pending = self.pending_controls.pop(str(header.get("ref", "")), None)
            if pending is not None:
                self.to_handler(pending[0], bus.CONTROL_RESULT, header)

    def executor_dropped(self, peer: Peer, dropped: object) -> None:
        """Output an executor could not send."""
        if not isinstance(dropped, dict):
            return
        for job_id, ends in dropped.items():
            job = self.jobs.get(job_id)
            if job is not None and job.executor == peer.identity:
                self.learn_output_ends(job, ends)
                self.tell_output_ends(job, job.subscribers)

    @staticmethod
    def learn_output_ends(job: Job, ends: object) -> None:
        """The job's journal goes this far: its executor says so."""
        for stream, end in bus.output_ends(ends).items():
            extend(job.output_ends, stream, end)

    def tell_output_ends(self, job: Job, handlers: set[bytes]) -> None:
        """Output of the job these handlers may not have had the live copy
        of (dropped on the way, never sent this way, or sent before they
        followed the job): their next heartbeat says how far it goes."""
        for handler in handlers:
            if (peer := self.handlers.get(handler)) is not None:
                peer.behind.add(job.job_id)

    def fail_controls_sent_to(self, executor: bytes, why: str) -> None:
        """Controls an executor will never answer: the handlers hear why now,
        rather than time out."""
        for ref, (handler, sent_to, reply) in list(self.pending_controls.items()):
            if sent_to == executor:
                del self.pending_controls[ref]
                self.to_handler(handler, bus.CONTROL_RESULT, {**reply, "ok": False, "code": protocol.JOB_NOT_FOUND,
                                                              "error": f"job {reply['job_id']} is not running: {why}"})

    def executor_stopping(self, peer: Peer) -> None:
        """An executor that stops takes no more jobs (it ends and reports its
        running ones); told so, it knows no DISPATCH follows."""
        logs.event(log, "executor.stopping", executor=peer.identity.decode(errors="replace"), jobs=len(peer.jobs))
        peer.capacity, peer.stopping = 0, True
        self.to_executor(peer.identity, bus.STOPPING, {})
        self.pool_changed()
        self.stop_with_the_pool()

    def declined(self, peer: Peer, job_id: str) -> None:
        """A job dispatched to an executor that was stopping: first in the queue again."""
        job = self.jobs.get(job_id)
        if job is None or job.state != "dispatched" or job.executor != peer.identity:
            return
        peer.jobs.discard(job_id)
        peer.capacity, peer.stopping = 0, True  # told a broker before this one, it may not have said so to us
        job.state, job.executor, job.remote = "queued", None, False
        self.queue.appendleft(job_id)
        self.positions_dirty = True
        self.dispatch()

    def speaks_for(self, peer: Peer, job: Job) -> bool:
        """An executor node tells only of the jobs it was given: its key
        admits it to the pool, not to other hosts' jobs."""
        if not peer.remote or job.executor == peer.identity:
            return True
        logs.event(log, "executor.foreign_job", logging.WARNING, executor=peer.identity.decode(errors="replace"),
                   job_id=job.job_id)
        return False

    def register_executor(self, identity: bytes, header: dict, face: zmq.Socket) -> None:
        labels = header.get("labels")
        peer = Peer(identity, time.monotonic(), capacity=int(header.get("capacity", 1)), sock=face,
                    remote=face is not self.backend, node=str(header.get("node") or ""),
                    pid=header.get("pid"), labels=labels if isinstance(labels, dict) else {})
        self.executors[identity] = peer
        for running in header.get("jobs", []):
            self.adopt(peer, running)
        for completed in header.get("completed", []):
            self.on_completed(peer, completed)
        logs.event(log, "executor.registered", executor=identity.decode(), node=peer.node or None,
                   capacity=peer.capacity, running=len(peer.jobs),
                   labels=" ".join(f"{k}={v}" for k, v in peer.labels.items()) or None)
        self.pool_changed()
        self.dispatch()

    def adopt(self, peer: Peer, running: dict) -> None:
        """A job an executor runs that this broker (restarted) did not know,
        or that a returning executor node still runs."""
        job_id = running["job_id"]
        if not self.may_adopt(peer, job_id):  # e.g. already ended here as lost: end it there too
            self.to_executor(peer.identity, bus.CONTROL, {"job_id": job_id, "action": "CANCEL", "ref": ""})
            return
        job = self.jobs.get(job_id) or self.claim(job_id)
        if job is None:  # accepted by a broker that died before it recorded the job
            job = Job(job_id, running.get("spec", {}))
            self.jobs[job_id] = job
            self.store.accepted(job_id, job.spec, None, "queued")
        if job_id in self.queue:
            self.queue.remove(job_id)
        job.spec = job.spec or running.get("spec", {})
        job.executor, job.remote = peer.identity, peer.remote
        peer.jobs.add(job_id)
        started = {"job_id": job_id, "pid": running.get("pid"), "pgid": running.get("pgid"),
                   "started_at": running.get("started_at")}
        if started["pid"] is None:  # being started: its STARTED follows
            job.state = "dispatched"
        elif job.state != "running":  # started unbeknown to this broker: recorded, and its followers told
            self.on_started(job, started)
        else:
            job.pid, job.pgid, job.started_at = started["pid"], started["pgid"], started["started_at"]
            self.to_subscribers(job, bus.STARTED, started)  # followers that came while it was unclaimed
        if not peer.remote:  # what it journaled while no broker heard (a node's journal is not this host's)
            self.learn_output_ends(job, running.get("output"))
            self.tell_output_ends(job, job.subscribers)

    def may_adopt(self, peer: Peer, job_id: str) -> bool:
        """A job that is not over; from a node, only one this broker (or the
        one before it) gave that node."""
        current = self.jobs.get(job_id)
        if peer.remote:
            record = self.unclaimed.get(job_id)
            return (current is not None and current.executor == peer.identity) or \
                (record is not None and record["node"] == peer.node)
        known = self.store.get(job_id) if current is None else None
        return known is None or known["state"] != "finished"

    def on_started(self, job: Job, header: dict) -> None:
        job.state, job.pid, job.pgid = "running", header.get("pid"), header.get("pgid")
        job.started_at = header.get("started_at")
        node = self.executors[job.executor].node if job.remote and job.executor in self.executors else None
        self.store.started(job.job_id, job.pid, job.pgid, job.started_at, node)
        self.metrics.job_started((job.started_at or time.time()) - job.created_at)
        logs.event(log, "job.started", job_id=job.job_id, pid=job.pid,
                   queue_wait=round(time.time() - job.created_at, 3))
        self.to_subscribers(job, bus.STARTED, header)

    def on_completed(self, peer: Peer, header: dict) -> None:
        job_id = bus.header_field(header, "job_id", str)
        job = self.jobs.get(job_id) or self.claim(job_id, peer)
        if job is not None and peer.remote and not self.speaks_for(peer, job):
            job = None  # acknowledged, so the node stops telling, and otherwise ignored
        elif job is not None and peer.remote and (flaw := bus.completed_flaw(header)):
            logs.event(log, "executor.bad_report", logging.WARNING, executor=peer.identity.decode(errors="replace"),
                       job_id=job_id, error=flaw)
            header = self.lost_end(job, f"its node's report of its end was malformed: {flaw}")
        elif job is not None and peer.remote and not self.replica_complete(peer, job, header):
            return  # no ack: the node sends COMPLETED again after the missing output
        self.sends_after_commit.append(
            functools.partial(self.to_executor, peer.identity, bus.COMPLETED_ACK, {"job_id": job_id}))
        if job is not None and job.journal_error is not None:
            header = {**header, "reason": "journal_failed", "error": job.journal_error,
                      **journal.byte_counts(job.replica.sizes if job.replica is not None else None)}
        if job is not None:
            self.finish(job, header)

    def send_recorded(self) -> None:
        """A job's end goes to its clients and is acknowledged to its executor
        once the turn's records are committed. A broker that fails to commit
        (a full disk) has told nobody, and the executor tells the broker
        started in its place again."""
        for send in self.sends_after_commit:
            send()
        self.sends_after_commit.clear()

    # ------------------------------------------------------------ remote jobs' journals

    def relay_replicated(self, peer: Peer, job: Job, kind: bytes, header: dict, data: memoryview) -> None:
        """Output or Claude notifications of a job on an executor node: into
        this host's journal first (where handlers read them), then on to the
        subscribers."""
        stream, offset = bus.header_field(header, "stream", str), bus.header_field(header, "offset", int)
        if stream not in (protocol.STREAMS if kind == bus.OUTPUT else (journal.CLAUDE,)):
            raise ValueError(f"unknown stream {stream!r}")
        if job.journal_error is not None:
            return  # dropped: a byte after a lost one would sit at the wrong offset
        try:
            accepted = self.replica_of(job).accept(stream, offset, data)
        except OSError as exc:  # a full or failing disk here: end the job rather than lose output unsaid
            self.replica_failed(peer, job, exc)
            return
        if accepted is None:  # a chunk was lost on the way: ask once per gap
            if job.resend_asked.get(stream) != job.replica.sizes[stream]:
                self.ask_resend(peer, job, stream)
            return
        offset, fresh = accepted
        if fresh:
            self.to_subscribers(job, kind, {**header, "offset": offset}, fresh)

    def replica_of(self, job: Job) -> JournalReplica:
        """This host's copy of a remote job's journal, opened (or reopened,
        after a broker restart) on first use."""
        if job.replica is None:
            job.replica = JournalReplica(self.settings.jobs_dir, job.job_id)
        return job.replica

    def replica_failed(self, peer: Peer, job: Job, exc: OSError) -> None:
        """This host's journal of a remote job cannot be written: the node
        ends the job, whose end is then recorded as `journal_failed`."""
        logs.event(log, "job.journal_failed", logging.ERROR, job_id=job.job_id, node=peer.node, error=exc)
        job.journal_error = (f"its output could not be written to the journal ({exc}); "
                             "it was ended and its output kept up to that point")
        if job.replica is not None:
            job.replica.close()
        self.to_executor(peer.identity, bus.CONTROL, {"job_id": job.job_id, "action": "CANCEL", "ref": ""})

    def ask_resend(self, peer: Peer, job: Job, stream: str) -> None:
        job.resend_asked[stream] = job.replica.sizes[stream]
        job.resends += 1
        logs.event(log, "job.output_resend", logging.WARNING, job_id=job.job_id, stream=stream,
                   offset=job.replica.sizes[stream], node=peer.node)
        self.to_executor(peer.identity, bus.RESEND, {"job_id": job.job_id, "stream": stream,
                                                     "offset": job.replica.sizes[stream]})

    def replica_complete(self, peer: Peer, job: Job, completed: dict) -> bool:
        """Whether this host's journal holds all a remote job wrote; if not, ask for the rest."""
        if job.journal_error is not None:
            return True  # ended for it: what is missing cannot be written here
        try:
            replica = self.replica_of(job)
        except OSError as exc:
            if any(completed.get(f"{s}_bytes") for s in journal.JOURNALS):
                self.replica_failed(peer, job, exc)
            return True
        short = [s for s in journal.JOURNALS if replica.sizes[s] < (completed.get(f"{s}_bytes") or 0)]
        if short and job.resends < MAX_RESENDS:
            for stream in short:
                self.ask_resend(peer, job, stream)
            return False
        if short:
            logs.event(log, "job.output_incomplete", logging.ERROR, job_id=job.job_id, node=peer.node,
                       have=dict(job.replica.sizes))
        job.replica.close()
        return True

    def claim(self, job_id: str, reporter: Peer | None = None) -> Job | None:
        """Turn a record a previous broker left unfinished back into a job;
        one a node ran is that node's executor's, if it is the one telling
        (of the job's end: the job did not outlast the broker's restart)."""
        record = self.unclaimed.pop(job_id, None)
        if record is None:
            return None
        job = Job(job_id, {}, state=record["state"], pid=record["pid"], pgid=record["pgid"],
                  created_at=record["created_at"], started_at=record["started_at"], remote=bool(record["node"]))
        if reporter is not None and reporter.remote and record["node"] == reporter.node:
            job.executor = reporter.identity
        job.subscribers = self.waiting_subscribers.pop(job_id, set())
        self.jobs[job_id] = job
        return job

    def finish(self, job: Job, completed: dict) -> None:
        job.state = "finished"
        self.jobs.pop(job.job_id, None)
        if job.executor in self.executors:
            self.executors[job.executor].jobs.discard(job.job_id)
        self.store.finished(completed)
        self.metrics.job_finished(completed)
        duration = completed.get("execution_time")
        logs.event(log, "job.finished", job_id=job.job_id, client=job.client, exit=completed.get("exit_code"),
                   reason=completed.get("reason"), duration=round(duration, 3) if duration else duration,
                   stdout_bytes=completed.get("stdout_bytes"), stderr_bytes=completed.get("stderr_bytes"),
                   error=completed.get("error"))
        self.sends_after_commit.append(functools.partial(self.to_subscribers, job, bus.COMPLETED, completed))
        for successor in self.held.pop(job.job_id, []):
            if successor in self.jobs:
                self.enqueue(self.jobs[successor])
        self.dispatch()

    def finish_unstarted(self, job: Job, reason: str, error: str) -> None:
        if job.job_id in self.queue:
            self.queue.remove(job.job_id)
            self.positions_dirty = True
        self.finish(job, {
            "job_id": job.job_id, "pid": None, "pgid": None, "exit_code": -signal.SIGTERM,
            "reason": reason, "error": error, "execution_time": 0.0,
            **journal.byte_counts()})

    # ------------------------------------------------------------ scheduling

    def capacity(self) -> int:
        return sum(p.capacity for p in self.executors.values())

    def _free_executor(self, spec: dict | None = None) -> Peer | None:
        """The executor with the most free slots among those that can run spec."""
        fit = [p for p in self.executors.values() if p.can_run(spec or {})]
        return max(fit, key=lambda p: p.free, default=None)

    def dispatch(self) -> None:
        """Start queued jobs, oldest first, on the least loaded executors that
        carry their labels; a job no free executor fits waits without holding
        up the jobs behind it."""
        waiting: list[str] = []
        while self.queue and self.settled and self.running and self._free_executor() is not None:
            job = self.jobs.get(self.queue.popleft())
            if job is None or job.state != "queued":
                continue
            executor = self._free_executor(job.spec)
            if executor is None:
                waiting.append(job.job_id)
                continue
            self.positions_dirty = True
            if not self.to_executor(executor.identity, bus.DISPATCH, {"job_id": job.job_id, "spec": job.spec}):
                self.queue.appendleft(job.job_id)
                self.lose_executor(executor.identity, "unreachable")
                continue
            job.state, job.executor, job.position = "dispatched", executor.identity, None
            job.remote = executor.remote
            executor.jobs.add(job.job_id)
        self.queue.extendleft(reversed(waiting))

    def publish_positions(self) -> None:
        """Tell waiting jobs their new place in the queue, once per loop turn."""
        if not self.positions_dirty:
            return
        self.positions_dirty = False
        for position, job_id in enumerate(self.queue, start=1):
            job = self.jobs.get(job_id)
            if job is not None and job.position != position:
                job.position = position
                self.to_subscribers(job, bus.QUEUED, {"job_id": job_id, "position": position})

    # ------------------------------------------------------------ liveness

    def send_heartbeats_if_due(self) -> None:
        now = time.monotonic()
        if now < self.next_heartbeat:
            return
        self.next_heartbeat = now + bus.HEARTBEAT_INTERVAL
        for identity, peer in list(self.executors.items()):
            if self.silent_too_long(peer, "executor", now):
                self.lose_executor(identity, "heartbeat timeout")
            else:
                self.to_executor(identity, bus.HEARTBEAT, {})
        stats = self.heartbeat_header()
        for identity, peer in list(self.handlers.items()):
            if self.silent_too_long(peer, "handler", now):
                self.lose_handler(identity, "heartbeat timeout")
            else:
                header = self.with_addresses_elsewhere(stats, identity)
                if peer.behind:  # not kept should this send fail: such a handler is dead or frozen
                    ends = {j: self.jobs[j].output_ends for j in peer.behind if j in self.jobs}
                    header, peer.behind = {**header, "dropped": ends}, set()
                self.to_handler(identity, bus.HEARTBEAT, header)

    @staticmethod
    def silent_too_long(peer: Peer, role: str, now: float) -> bool:
        """Silent past PEER_TIMEOUT: frozen, cut off, or dead. A dead process
        of this host is given REAP_WAIT more for Circus to report its exit
        code, so that its jobs end saying how it died."""
        silent = now - peer.last_seen
        if silent <= PEER_TIMEOUT or peer.exit_code is not None:  # alive, or reaped and being given up
            return False
        if silent > PEER_TIMEOUT + REAP_WAIT or not peer.died_unreaped():
            return True
        if not peer.awaiting_reap:
            peer.awaiting_reap = True
            logs.event(log, f"{role}.awaiting_reap", **{role: peer.identity.decode()}, pid=peer.pid)
        return False

    def pool_changed(self) -> None:
        """Executors came or went: every handler hears it on this loop turn,
        so /ready never answers differently from one handler to the next."""
        self.next_heartbeat = 0.0

    def lose_executor(self, identity: bytes, why: str) -> None:
        """An executor exited or its node is cut off: the jobs it had end `lost`."""
        peer = self.executors.pop(identity, None)
        if peer is None:
            return
        if peer.stopping and not peer.jobs:  # it said it would stop, reported its jobs' ends and did
            logs.event(log, "executor.exited", executor=identity.decode(), why=why)
        else:
            logs.event(log, "executor.lost", logging.WARNING, executor=identity.decode(),
                       why=why, jobs=len(peer.jobs))
        self.pool_changed()
        why = f"lost contact with executor node {peer.node} ({why})" if peer.remote \
            else f"the executor running this job died ({why})"
        self.fail_controls_sent_to(identity, why)
        self.lose([self.jobs[job_id] for job_id in peer.jobs if job_id in self.jobs], why)

    def lose(self, jobs: list[Job], why: str) -> None:
        """End jobs whose executor is gone and kill what is left of them:
        their groups at once, then, in a worker thread, every process that
        carries their id (here; an executor node ends its own jobs when it
        loses the head)."""
        local = {job.job_id for job in jobs if not job.remote}
        for job in jobs:
            if job.pgid and job.job_id in local:
                try:
                    os.killpg(job.pgid, signal.SIGKILL)
                except OSError:
                    pass
            self.finish(job, self.lost_end(job, why))
        if local:
            self.reaper.submit(leftovers.kill_job_processes, local)

    def lost_end(self, job: Job, why: str) -> dict:
        """The end of a job its executor cannot tell: what its journal holds."""
        if job.replica is not None:
            job.replica.close()
        return {"job_id": job.job_id, "pid": job.pid, "pgid": job.pgid, "exit_code": -signal.SIGKILL,
                "reason": "lost", "error": why, "execution_time": time.time() - (job.started_at or job.created_at),
                **journal.recorded_sizes(self.settings.jobs_dir, job.job_id)}

    def lose_handler(self, identity: bytes, why: str) -> None:
        peer = self.handlers.pop(identity, None)
        if peer is not None and peer.exit_code == 0:  # a restart, a reload
            logs.event(log, "handler.exited", handler=identity.decode())
        else:
            logs.event(log, "handler.lost", logging.WARNING, handler=identity.decode(), why=why)
        for job in list(self.jobs.values()):
            if identity in job.subscribers:
                self.unsubscribe(identity, job.job_id)

    def settle_if_due(self) -> None:
        """Once peers had time to re-register, or nothing is left to claim:
        what nobody claimed is lost, and jobs are dispatched again."""
        if self.settled or (time.monotonic() < self.settle_deadline and not self.all_claimed()):
            return
        self.settled = True
        self.restored.clear()
        self.pool_changed()
        lost = list(self.unclaimed)
        self.lose([self.claim(job_id) for job_id in lost], "no executor or client claimed it after the broker restarted")
        logs.event(log, "broker.settled", running=sum(1 for j in self.jobs.values() if j.state == "running"),
                   queued=len(self.queue), lost=len(lost))
        self.dispatch()

    def release_held_controls(self) -> None:
        """Controls of jobs a previous broker left, once claimed (or lost)."""
        for job_id in [j for j in self.controls_held if j not in self.unclaimed]:
            for identity, header in self.controls_held.pop(job_id):
                self.control(identity, header)

    def all_claimed(self) -> bool:
        """Every job a previous broker left is accounted for. One restored to
        the queue may be running already, on an executor the previous broker
        dispatched it to that has not re-registered yet: only time tells."""
        return not self.unclaimed and not any(
            job_id in self.jobs and self.jobs[job_id].state in ("queued", "held") for job_id in self.restored)

    def prune_if_due(self) -> None:
        if time.monotonic() < self.next_prune:
            return
        self.next_prune = time.monotonic() + PRUNE_INTERVAL
        removed = self.store.prune(self.settings.retention_days * 86400, self.settings.retention_bytes)
        if removed:
            logs.event(log, "journal.pruned", jobs=removed)

    def _next_timer(self) -> float:
        return self.timers[0][0] if self.timers else float("inf")

    def run_due_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            deadline, kind, key = heapq.heappop(self.timers)
            job = self.jobs.get(key)
            if kind == "detach_grace" and job is not None and job.grace_deadline == deadline:
                logs.event(log, "job.abandoned", job_id=key, grace=self.settings.detach_grace)
                self.cancel_abandoned(job)
            elif kind == "unfollowed":  # jobs whose clients left while no broker ran
                for each in list(self.jobs.values()):
                    self.count_down_if_unfollowed(each)
            elif kind == "executor_exited" and key.encode() in self.executors:
                self.lose_executor(key.encode(), f"exit code {self.executors[key.encode()].exit_code}")
            elif kind == "handler_exited" and key.encode() in self.handlers:
                self.lose_handler(key.encode(), f"exit code {self.handlers[key.encode()].exit_code}")

    def cancel_abandoned(self, job: Job) -> None:
        why = "canceled: its client went away"
        if job.state in ("running", "dispatched") and job.executor is not None:
            self.to_executor(job.executor, bus.CONTROL, {"job_id": job.job_id, "action": "CANCEL", "ref": "", "why": why})
        else:
            self.finish_unstarted(job, "canceled", why)

    def with_addresses_elsewhere(self, stats: dict, identity: bytes) -> dict:
        """For max_sessions_per_address: the other handlers' connections by client address."""
        others = [p.addresses for i, p in self.handlers.items() if i != identity and p.addresses]
        if not others:
            return stats
        elsewhere: dict[str, int] = {}
        for addresses in others:
            for address, count in addresses.items():
                if isinstance(count, int):
                    elsewhere[address] = elsewhere.get(address, 0) + count
        return {**stats, "addresses_elsewhere": elsewhere}

    def heartbeat_header(self) -> dict:
        """What handlers learn with each heartbeat: the pool's state and metrics."""
        stats = self.stats()
        # with its content type: handlers serve it as is, without prometheus_client (1.4 MiB each)
        stats["metrics"], stats["metrics_type"] = self.metrics.render(stats), metrics.CONTENT_TYPE
        return stats

    def stats(self) -> dict:
        states = [j.state for j in self.jobs.values()]
        return {
            "connections": sum(p.connections for p in self.handlers.values()),
            "handlers": len(self.handlers),
            "executors_ready": len(self.executors) if self.settled else 0,
            "capacity": self.capacity(),
            "running": sum(1 for s in states if s in ("running", "dispatched")),
            "queued": sum(1 for s in states if s in ("queued", "held")),
            "uptime": time.time() - self.started_at,
            "executors": [p.describe(time.monotonic()) for p in self.executors.values()],
        }


def main(argv: list[str]) -> None:
    settings = config.load_effective()
    logs.setup("broker", settings.log_level)
    ctx = zmq.Context()
    broker = Broker(settings, ctx)
    signal.signal(signal.SIGTERM, broker.stop)
    signal.signal(signal.SIGINT, broker.stop)
    try:
        broker.run()
    except sqlite3.Error as exc:  # a full or failing disk: Circus starts another broker
        logs.event(log, "broker.store_failed", logging.CRITICAL, error=exc)
        sys.exit(1)
    finally:
        ctx.destroy(linger=0)
