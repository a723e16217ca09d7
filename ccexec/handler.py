"""A WebSocket handler process: JSON-RPC over the socket Circus owns.

Glue between `protocol` (pure message logic), the client's WebSocket and
the broker. It serves on a listening socket inherited from the arbiter
(never one it bound), keeps no job state that cannot be rebuilt from the
broker and the journals, and never runs a blocking call on its loop:
journal reads happen in a worker thread.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import http
import json
import logging
import os
import signal
import socket
import ssl
import time
import uuid
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable

import zmq
import zmq.asyncio
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as HttpRequest, Response as HttpResponse

from ccexec import __version__, bus, config, journal, logs, policy, protocol
from ccexec.liveness import WatchdogPulse
from ccexec.protocol import STREAMS, ProtocolError

log = logging.getLogger("ccexec.handler")

WS_PATHS = ("/ws", "/ws/mcp")
INLINE_LIMIT = 4 << 20  # bytes of live output held per stream before the journal takes over
# Seconds at most a stopping handler waits for handshakes it accepted, for
# answers to requests it read, and, if the whole daemon stops, for its
# clients' jobs to end (kill_grace plus a margin); with CLOSE_TIMEOUT, all
# within the handler watcher's graceful_timeout (15 s) at the default kill_grace.
HANDSHAKE_GRACE = 1.5
ANSWER_GRACE = 3.0  # for the answers to requests read before the close began
JOB_END_MARGIN = 3.0
STOP_CHECK = 0.02  # seconds between its checks of either
CLOSE_TIMEOUT = 3.0
CLOSE_SERVICE_RESTART = 1012  # reconnect: the daemon goes on
CLOSE_GOING_AWAY = 1001  # the daemon stops
# A send to a client that keeps up never suspends: after this many messages
# a pump lets handshakes and other connections have the loop.
YIELD_EVERY = 32
BROKER_TIMEOUT = 10.0  # seconds to wait for the broker (and executor) to answer a request
CHUNK_FLUSH_DELAY = 0.05  # seconds of quiet before "chunks" mode sends a partial line
HOOK_STATUS = {"enabled": False, "hooks_configured": []}
TOKEN_CHECK_INTERVAL = 1.0  # seconds between checks of the token file for changes
JOB_LIMIT_RETRY_AFTER = 1  # seconds a client over max_jobs_per_connection is told to wait


def unreadable(exc: OSError) -> str:
    return f"the job's journal could not be read ({exc.strerror or exc})"


class StreamState:
    """Where one journal file of one job (an output stream, or its Claude
    notifications) stands for one connection."""

    def __init__(self, offset: int = 0):
        self.delivered = offset   # bytes read (for output: handed to its splitter)
        self.known = offset       # bytes known to exist in the journal
        self.inline: deque[tuple[int, bytes]] = deque()
        self.inline_bytes = 0

    def learn(self, end: int) -> None:
        """The journal holds this much at least."""
        self.known = max(self.known, end)

    def offer(self, offset: int, data: bytes) -> None:
        """Keep live data if it continues what is held and there is room."""
        self.learn(offset + len(data))
        expected = self.inline[-1][0] + len(self.inline[-1][1]) if self.inline else self.delivered
        if offset == expected and self.inline_bytes + len(data) <= INLINE_LIMIT:
            self.inline.append((offset, data))
            self.inline_bytes += len(data)

    def take_inline(self) -> bytes | None:
        while self.inline:
            offset, data = self.inline.popleft()
            self.inline_bytes -= len(data)
            if offset <= self.delivered < offset + len(data):
                return data[self.delivered - offset:]
        return None


class JobStream:
    """One job as one connection sees it: its messages, in order, once."""

    def __init__(self, session: "Session", job_id: str, mode: str, *, request_id=None,
                 has_id: bool = False, submit: dict | None = None, offsets: tuple[int, int] = (0, 0),
                 claude_offset: int | None = None):
        self.session = session
        self.job_id = job_id
        self.request_id, self.has_id = request_id, has_id
        self.submit = submit  # resent if the broker restarts before the job starts
        self.responded = submit is None  # an attached job had its answer already
        self.started = False
        self.place: tuple | None = None  # (position, after) last told in process.queued
        # The stream on this connection of the job this one waits for: this
        # one's process.started (and all after it) waits until that one has
        # sent its process.completed, as the jobs ran; and it is the
        # connection's last job again if this one is refused.
        self.follows: JobStream | None = None
        self.start_notice: str | None = None
        self.done = asyncio.Event()  # its pump has sent all it will
        self.pid = self.pgid = None
        self.notices: deque[str] = deque()
        self.streams = {s: StreamState(o) for s, o in zip(journal.JOURNALS, (*offsets, 0))}
        self.splitters = {s: protocol.OutputSplitter(mode, o) for s, o in zip(STREAMS, offsets)}
        self.final: dict | None = None
        # Claude notifications, from the start of the job's `claude` journal:
        # those the client has (attach) are skipped, the others held as
        # (stdout_end, message) until stdout is sent that far.
        self.claude_records = journal.ClaudeRecords(after=offsets[0]) if claude_offset is None \
            else journal.ClaudeRecords(skip=claude_offset)
        self.claude: deque[tuple[int, str]] = deque()
        self.finished = False
        # `control` requests of this job awaiting the daemon's answer: its
        # process.completed waits for them, so that it follows their result
        # and process.paused / .resumed / .canceled.
        self.controls = 0
        self.last_output = time.monotonic()
        self.wake = asyncio.Event()
        self.gate = asyncio.Event()  # opened once the request that made this stream is answered
        self.pump_task = asyncio.get_running_loop().create_task(self.pump())

    # -- events from the broker (synchronous: they only queue and wake)

    def respond(self, status: str) -> None:
        if not self.responded:
            self.responded = True
            if self.has_id:
                result = protocol.execute_result(status, self.job_id, self.pid, self.pgid)
                self.notices.append(protocol.response(self.request_id, result))

    # The broker tells a job's state again to a handler that begins to follow
    # it; the connections that followed it already were told.

    def on_queued(self, header: dict) -> None:
        place = (header.get("position"), header.get("after"))
        if self.responded and place == self.place:
            return
        self.place = place
        self.respond("queued")
        self.notices.append(protocol.process_queued(self.job_id, *place))
        self.wake.set()

    def on_started(self, header: dict) -> None:
        if self.started:
            return
        self.started, self.pid, self.pgid = True, header.get("pid"), header.get("pgid")
        self.last_output = time.monotonic()
        self.respond("started")
        self.start_notice = protocol.process_state("started", self.job_id, self.pid, self.pgid)
        self.notices.append(self.start_notice)
        self.wake.set()

    def on_rejected(self, header: dict) -> None:
        if self.session.last_sequenced is self:  # never a job: the next one waits for the one before
            self.session.last_sequenced = self.follows
        self.responded = True
        self.notices.append(protocol.error_response(
            self.request_id, header["code"], header["message"], header.get("data")))
        self.finished = True
        self.wake.set()

    def on_output(self, stream: str, offset: int, data: bytes) -> None:
        self.last_output = time.monotonic()
        self.streams[stream].offer(offset, data)
        self.wake.set()

    def on_output_dropped(self, ends: object) -> None:
        """Live copies of output up to these ends were dropped: read from the journal."""
        for stream, end in bus.output_ends(ends).items():
            self.streams[stream].learn(end)
        self.wake.set()

    def on_control(self, status: str) -> None:
        self.notices.append(protocol.process_state(status, self.job_id, self.pid, self.pgid))
        self.wake.set()

    def on_claude(self, offset: int, records: bytes) -> None:
        self.streams[journal.CLAUDE].offer(offset, records)
        self.wake.set()

    def on_completed(self, header: dict) -> None:
        self.respond("rejected" if header.get("reason") == "rejected" else "started")
        self.final = header
        self.wake.set()

    # -- the pump: the only sender of this job's messages

    async def pump(self) -> None:
        try:
            await self.gate.wait()
            while not self.finished:
                await self.wait_for_events()
                while self.notices:
                    if self.notices[0] is self.start_notice and self.follows is not None:
                        await self.follows.done.wait()
                    await self.session.send(self.notices.popleft())
                if not (self.started or self.final is not None):  # output may overtake the start on the data plane
                    continue
                await self.read_claude()
                for stream in STREAMS:
                    await self.deliver(stream)
                await self.send_claude()
                if self.final is not None and not self.controls:
                    await self.complete()
            while self.notices:  # a rejection's error response
                await self.session.send(self.notices.popleft())
        except ConnectionClosed:
            pass
        except OSError as exc:  # its journal went (retention, an operator) or cannot be read
            await self.output_gone(exc)
        finally:
            self.finished = True
            self.done.set()
            self.follows = None  # a long connection's streams are no chain
            self.session.job_done(self)

    async def output_gone(self, exc: OSError) -> None:
        """Tell the client that this connection can be sent no more of the job."""
        logs.event(log, "job.output_unreadable", logging.WARNING, job_id=self.job_id, error=exc)
        try:
            await self.session.send(protocol.output_gone(self.job_id, unreadable(exc)).to_message())
        except ConnectionClosed:
            pass

    async def wait_for_events(self) -> None:
        """Wait to be woken; a held partial chunk goes out when output pauses."""
        holding = [s for s in STREAMS if self.splitters[s].mode == "chunks" and self.splitters[s].holding]
        try:
            await asyncio.wait_for(self.wake.wait(), CHUNK_FLUSH_DELAY if holding else None)
        except asyncio.TimeoutError:
            for stream in holding:
                state = self.streams[stream]
                # Quiet here is not quiet in the job: live copies of its output
                # are dropped when a queue is full. The journal says which.
                size = await self.session.handler.journal_size(self.job_id, stream)
                if size > state.known:
                    state.known = size  # more to deliver: the line may still end
                else:
                    await self.send_output(stream, self.splitters[stream].flush())
        self.wake.clear()

    async def read_new(self, name: str) -> AsyncIterator[bytes]:
        """What is known of a journal file past what was read: live copies
        while they continue it, else from the journal."""
        state = self.streams[name]
        while True:
            chunk = state.take_inline()
            if chunk is None and state.delivered < state.known:
                chunk = await self.session.handler.read_journal(self.job_id, name, state.delivered, state.known)
            if not chunk:
                return
            state.delivered += len(chunk)
            yield chunk

    async def deliver(self, stream: str) -> None:
        async for chunk in self.read_new(stream):
            # In parts: a 256 KiB read of lines split at once held the loop for ~4 ms.
            for pieces in self.splitters[stream].feed_in_parts(chunk):
                await self.send_output(stream, pieces)

    async def read_claude(self) -> None:
        async for chunk in self.read_new(journal.CLAUDE):
            due = self.claude_records.feed(chunk)
            self.claude.extend(due)
            if due:  # the executor journaled those lines before them
                stdout = self.streams["stdout"]
                stdout.known = max(stdout.known, due[-1][0])

    async def send_output(self, stream: str, pieces: list[protocol.Piece]) -> None:
        """`process.output` messages, YIELD_EVERY to a write, giving the loop up between writes."""
        for start in range(0, len(pieces), YIELD_EVERY):
            await self.session.send_frames(
                protocol.process_output_frames(self.job_id, stream, pieces[start:start + YIELD_EVERY]))
            await asyncio.sleep(0)

    async def complete(self) -> None:
        final = self.final
        for name, state in self.streams.items():
            size = final.get(f"{name}_bytes")
            if size is None:  # recorded by an older version: the journal holds what there is
                size = await self.session.handler.journal_size(self.job_id, name)
            state.known = max(state.known, size)
        await self.read_claude()
        for stream in STREAMS:
            await self.deliver(stream)
            await self.send_output(stream, self.splitters[stream].finish())
        await self.send_claude(everything=True)
        while self.notices:
            await self.session.send(self.notices.popleft())
        await self.session.send(protocol.process_completed(
            self.job_id, final.get("pid"), final.get("pgid"), int(final.get("exit_code", -1)),
            final.get("reason", "exit"), final.get("error"), float(final.get("execution_time") or 0.0),
            self.streams["stdout"].delivered, self.streams["stderr"].delivered, claude=final.get("claude")))
        self.finished = True

    async def send_claude(self, everything: bool = False) -> None:
        """Send the held Claude events whose lines' output went out (all of them at the end)."""
        sent_to = self.splitters["stdout"].offset
        while self.claude and (everything or self.claude[0][0] <= sent_to):
            await self.session.send(self.claude.popleft()[1])

    def silent_for(self) -> float:
        return time.monotonic() - self.last_output


class Session:
    """One WebSocket connection."""

    def __init__(self, handler: "Handler", ws: ServerConnection):
        self.handler = handler
        self.ws = ws
        self.session_id = str(uuid.uuid4())
        self.jobs: dict[str, JobStream] = {}
        self.last_sequenced: JobStream | None = None
        self.last_sent = time.monotonic()
        self.client = "%s:%s" % ws.remote_address[:2] if ws.remote_address else "-"
        self.token_name = handler.admitted.get(ws, (None, None))[1]
        self.handling = False  # a request is being carried out
        rate = handler.settings.max_requests_per_second
        self.bucket = policy.TokenBucket(rate, policy.burst_for(rate, handler.settings.request_burst),
                                         time.monotonic()) if rate > 0 else None

    async def send(self, text: str) -> None:
        self.last_sent = time.monotonic()
        await self.ws.send(text)

    def answering(self) -> bool:
        """A request read before the close began still awaits its answer."""
        return self.handling or any(not j.responded or j.notices or j.controls for j in self.jobs.values())

    async def send_frames(self, messages: list[bytes]) -> None:
        """Text messages (UTF-8 bytes) in one write with one flow-control
        wait, inside websockets' own send_context as its send() does for one:
        in lines mode a chunk of output is many short messages. No extension
        is ever negotiated (compression=None), so frames are plain and built
        here, at a fraction of the library's cost per frame."""
        self.last_sent = time.monotonic()
        async with self.ws.send_context():
            self.ws.transport.write(protocol.websocket_text_frames(messages))

    def job_done(self, job: JobStream) -> None:
        if self.jobs.get(job.job_id) is job:  # not a later attach of the same job
            del self.jobs[job.job_id]
        self.handler.unfollow(job)

    def running_job(self) -> JobStream | None:
        """The most recently submitted running job (an attached one is never chosen by default)."""
        running = [j for j in self.jobs.values() if j.submit is not None and j.started and j.final is None]
        return running[-1] if running else None

    async def heartbeat_loop(self) -> None:
        interval = self.handler.settings.heartbeat_interval
        while True:
            await asyncio.sleep(max(0.2, self.last_sent + interval - time.monotonic()))
            if time.monotonic() - self.last_sent >= interval:
                jobs = [(j.job_id, j.silent_for()) for j in self.jobs.values() if j.started and j.final is None]
                await self.send(protocol.heartbeat(time.time(), jobs))

    # -- requests

    async def handle_frame(self, frame: str | bytes) -> None:
        request = None
        try:
            if self.bucket is not None and (wait := self.bucket.take(time.monotonic())):
                raise self.rate_limited(frame, wait)
            request = protocol.parse_frame(frame)
            await self.dispatch(request)
        except ProtocolError as exc:
            await self.send(exc.to_message())
        except ConnectionClosed:
            raise
        except Exception as exc:  # a bug must cost one request, never the connection
            log.exception("internal error handling a request")
            await self.send(protocol.error_response(
                request.id if request else None, protocol.INTERNAL_ERROR, f"Internal error: {exc}"))

    def rate_limited(self, frame: str | bytes, wait: float) -> ProtocolError:
        """-32005 for a frame past max_requests_per_second (the frame is not carried out)."""
        try:
            request_id = protocol.parse_frame(frame).id
        except ProtocolError as exc:
            request_id = exc.request_id
        rate = self.handler.settings.max_requests_per_second
        return ProtocolError(protocol.SERVER_BUSY,
                             f"Rate limited: more than {rate:g} requests per second on this connection",
                             {"retry_after": wait, "max_requests_per_second": rate}, request_id)

    def check_not_followed(self, request: protocol.Request, job_id: str | None) -> None:
        if job_id in self.jobs:
            raise ProtocolError(protocol.INVALID_PARAMS, f"Invalid params: job {job_id} is already followed here",
                                {"param": "job_id"}, request.id)

    def check_execute(self, request: protocol.Request, spec: protocol.ExecuteSpec) -> None:
        """The daemon's policy and limits for a new job, before it is submitted."""
        self.check_not_followed(request, spec.job_id)
        settings = self.handler.settings
        if settings.max_stdin_bytes and spec.stdin is not None \
                and len(spec.stdin.encode("utf-8", "surrogatepass")) > settings.max_stdin_bytes:
            raise ProtocolError(protocol.INVALID_PARAMS,
                                f"Invalid params: 'stdin' is larger than max_stdin_bytes ({settings.max_stdin_bytes} bytes)",
                                {"param": "stdin", "max_stdin_bytes": settings.max_stdin_bytes}, request.id)
        refusal = (self.handler.command_policy.check(spec.command, spec.argv)
                   or policy.client_env_refusal(spec.env, settings.env_client_allow))
        if refusal is not None:
            logs.event(log, "policy.refused", logging.WARNING, client=self.client, token=self.token_name,
                       **{k: v for k, v in refusal.data.items() if k in ("executable", "reason", "env")})
            raise ProtocolError(protocol.NOT_ALLOWED, refusal.message, refusal.data, request.id)
        limit = settings.max_jobs_per_connection
        if limit:
            unfinished = sum(1 for j in self.jobs.values()
                             if j.submit is not None and not j.finished and j.final is None)
            if unfinished >= limit:
                raise ProtocolError(protocol.SERVER_BUSY,
                                    f"Server busy: this connection has {unfinished} unfinished jobs "
                                    f"(max_jobs_per_connection {limit})",
                                    {"retry_after": JOB_LIMIT_RETRY_AFTER, "unfinished": unfinished,
                                     "max_jobs_per_connection": limit}, request.id)

    async def dispatch(self, request: protocol.Request) -> None:
        method = request.method
        if method == "execute":
            spec = protocol.parse_execute(request)
            self.check_execute(request, spec)
            self.execute(request, spec)
        elif method == "control":
            spec = protocol.parse_control(request)
            asyncio.get_running_loop().create_task(self.control(request, spec))
        elif method == "attach":
            await self.attach(request, protocol.parse_attach(request))
        elif method == "job.status":
            answer = await self.handler.ask_broker({"what": "job", "job_id": protocol.parse_job_status(request)})
            await self.reply(request, broker_answer(request, answer)["record"])
        elif method == "jobs":
            state, limit = protocol.parse_jobs(request)
            answer = await self.handler.ask_broker({"what": "jobs", "state": state, "limit": limit})
            await self.reply(request, {"jobs": broker_answer(request, answer)["records"]})
        elif method == "ping":
            await self.reply(request, {"pong": True, "timestamp": time.time()})
        elif method == "hook_status":
            await self.reply(request, HOOK_STATUS)
        elif method != "pong":
            raise ProtocolError(protocol.METHOD_NOT_FOUND, f"Method not found: {method}",
                                {"method": method}, request.id)

    async def reply(self, request: protocol.Request, result: dict) -> None:
        if request.has_id:
            await self.send(protocol.response(request.id, result))

    def execute(self, request: protocol.Request, spec: protocol.ExecuteSpec) -> None:
        job_id = spec.job_id or uuid.uuid4().hex
        after = spec.after
        if after is None and not spec.parallel:
            previous = self.last_sequenced
            after = previous.job_id if previous is not None and not previous.finished else None
        submit = {"job_id": job_id, "spec": spec.to_dict(), "after": after,
                  "client": self.client, "session": self.session_id}
        if self.token_name is not None:
            submit["token"] = self.token_name
        job = JobStream(self, job_id, spec.stream_mode, request_id=request.id, has_id=request.has_id,
                        submit=submit)
        self.jobs[job_id] = job
        job.follows = self.jobs.get(after) if after is not None else None
        if not spec.parallel:
            self.last_sequenced = job
        self.handler.follow(job)
        job.gate.set()
        self.handler.to_broker(bus.SUBMIT, submit)

    async def attach(self, request: protocol.Request, spec: protocol.AttachSpec) -> None:
        """Follow a job from byte offsets: replay from its journal, then live."""
        self.check_not_followed(request, spec.job_id)
        if not protocol.JOB_ID.match(spec.job_id):
            raise ProtocolError(protocol.JOB_NOT_FOUND, f"Job not found: {spec.job_id}", {"job_id": spec.job_id}, request.id)
        offsets = (spec.stdout_offset, spec.stderr_offset)
        job = JobStream(self, spec.job_id, spec.stream_mode, offsets=offsets, claude_offset=spec.claude_offset)
        self.jobs[job.job_id] = job
        self.handler.follow(job)  # before asking, so no event slips by meanwhile
        try:
            answer = broker_answer(request, await self.handler.ask_broker({"what": "attach", "job_id": job.job_id}))
            record = answer["record"]
            try:
                sizes = [await self.handler.journal_size(job.job_id, s) for s in STREAMS]
            except OSError as exc:
                raise protocol.output_gone(job.job_id, unreadable(exc), request.id) from exc
            self.check_replayable(request, record, offsets, sizes)
        except BaseException:
            job.finished = True
            job.pump_task.cancel()
            self.job_done(job)  # now, not when the pump next runs: the next frame may attach again
            raise
        job.started = record["state"] == "running"
        job.pid = job.pgid = record.get("pid")
        for state, size in zip(job.streams.values(), sizes):
            state.known = max(state.known, size)
        if request.has_id:
            job.notices.appendleft(protocol.response(request.id, {
                "job_id": job.job_id, "state": record["state"],
                "stdout_offset": spec.stdout_offset, "stderr_offset": spec.stderr_offset}))
        if answer.get("completed"):
            job.on_completed(answer["completed"])
        job.gate.set()
        job.wake.set()

    @staticmethod
    def check_replayable(request: protocol.Request, record: dict, offsets: tuple[int, int],
                         sizes: list[int]) -> None:
        recorded = (record.get("stdout_bytes") or 0, record.get("stderr_bytes") or 0)
        if any(size < want for size, want in zip(sizes, recorded)):
            raise protocol.output_gone(record["job_id"], "the job's journal was removed", request.id)
        # Past what the job has written so far, finished or not: no client
        # was sent those bytes, and the stream would resume from a place that
        # is not there yet (its end then reported as the offset asked for).
        for name, offset, size in zip(("stdout_offset", "stderr_offset"), offsets, sizes):
            if offset > size:
                raise ProtocolError(protocol.INVALID_PARAMS, f"Invalid params: '{name}' is past the end ({size} bytes)",
                                    {"param": name}, request.id)

    async def control(self, request: protocol.Request, spec: protocol.ControlSpec) -> None:
        try:
            job = self.jobs.get(spec.job_id) if spec.job_id is not None else self.running_job()
            if job is None or job.finished:
                what = (f"job {spec.job_id} on this connection" if spec.job_id is not None
                        else "running job on this connection")
                raise ProtocolError(protocol.JOB_NOT_FOUND, f"Process not found: no {what}",
                                    {"job_id": spec.job_id}, request.id)
            job.controls += 1  # the job's end, which may come in before this answer, waits for it
            try:
                result = await self.handler.ask_broker({"job_id": job.job_id, "action": spec.action}, bus.CONTROL)
                if not result.get("ok"):
                    raise ProtocolError(result.get("code", protocol.JOB_NOT_FOUND),
                                        result.get("error", "control failed"), {"job_id": job.job_id}, request.id)
                await self.reply(request, {"status": result["status"], "job_id": job.job_id})
                job.on_control(result["status"])
            finally:
                job.controls -= 1
                job.wake.set()
        except ProtocolError as exc:
            try:
                await self.send(exc.to_message())
            except ConnectionClosed:  # the client left meanwhile: nobody to tell
                pass
        except ConnectionClosed:
            pass


class AcceptedConnection(ServerConnection):
    """A connection that tells its handler when it is accepted and when it is
    gone: the handler's one record of connections from accept to close (for
    the handshakes still in flight, which websockets documents no count of,
    and the per-address count)."""

    def __init__(self, handler: "Handler", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.owner = handler  # not `handler`: websockets' own name for the connection handler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.owner.accepted.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.forget(self)
        super().connection_lost(exc)


class Handler:
    def __init__(self, settings: config.Settings):
        self.settings = settings
        self.ctx = zmq.asyncio.Context()
        self.broker = bus.dealer(self.ctx, "handler", bus.frontend_endpoint(settings.run_dir))
        self.data = bus.dealer(self.ctx, "handler", bus.handler_data_endpoint(settings.run_dir),
                               bus.DATA_HIGH_WATER_MARK, bus.DATA_HIGH_WATER_MARK)
        self.sessions: set[Session] = set()
        self.accepted: set[ServerConnection] = set()  # connections from accept to close
        self.followers: dict[str, set[JobStream]] = {}
        # Broker answers awaited, by ref, with what asked for them: sent again
        # to a broker started in place of one that died before it answered.
        self.asked: dict[str, tuple[asyncio.Future, bytes, dict]] = {}
        self.stats: dict = {}
        self.stats_received = asyncio.Event()
        self.broker_seen = 0.0
        self.started = time.time()
        self.io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="journal-read")
        self.stopping = asyncio.Event()
        self.daemon_stopping = asyncio.Event()  # the broker said the whole daemon stops
        # Once set, frames read are not carried out: the close that follows
        # tells each client that a request it has no answer to may be sent again.
        self.closing_sessions = False
        self.command_policy = policy.CommandPolicy(settings.command_allow, settings.command_deny,
                                                   settings.allow_shell)
        self.tokens: policy.Tokens = policy.Tokens()  # loaded in run(); empty refuses everyone
        self.token_key: object = None
        # WebSocket handshakes let through, until their connection closes: (address, token name)
        self.admitted: dict[ServerConnection, tuple[str, str | None]] = {}
        self.per_address: Counter[str] = Counter()

    # -- broker link

    def to_broker(self, kind: bytes, header: dict) -> None:
        try:
            self.broker.send_multipart(bus.pack(kind, header), zmq.NOBLOCK)
        except zmq.Again:
            logs.event(log, "handler.broker_busy", logging.WARNING, message=kind.decode())

    def register(self) -> None:
        self.to_broker(bus.READY, {"role": "handler", "pid": os.getpid(),
                                   "connections": len(self.sessions), "jobs": list(self.followers)})
        for streams in self.followers.values():
            for job in streams:
                if job.submit is not None and not job.started and job.final is None:
                    self.to_broker(bus.SUBMIT, job.submit)
        for _, kind, question in self.asked.values():
            self.to_broker(kind, question)

    def follow(self, job: JobStream) -> None:
        self.followers.setdefault(job.job_id, set()).add(job)

    def unfollow(self, job: JobStream) -> None:
        streams = self.followers.get(job.job_id)
        if streams is None:
            return
        streams.discard(job)
        if not streams:
            del self.followers[job.job_id]
            if job.final is None:
                self.to_broker(bus.DETACH, {"job_ids": [job.job_id]})

    async def ask_broker(self, header: dict, kind: bytes = bus.QUERY) -> dict:
        """Send a CONTROL or QUERY and wait for the answer with the same ref."""
        ref = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        question = {**header, "ref": ref}
        self.asked[ref] = (future, kind, question)
        self.to_broker(kind, question)
        try:
            return await asyncio.wait_for(future, BROKER_TIMEOUT)
        except asyncio.TimeoutError:
            return {"ok": False, "code": protocol.INTERNAL_ERROR, "error": "the daemon did not answer in time"}
        finally:
            self.asked.pop(ref, None)

    async def broker_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            self.broker_seen = time.monotonic()
            try:
                kind, header, payload = bus.unpack(frames)
                self.on_broker_message(kind, header, payload)
            except (ValueError, KeyError, TypeError) as exc:
                logs.event(log, "handler.bad_message", logging.WARNING, error=exc)

    def on_broker_message(self, kind: bytes, header: dict, payload: list[bytes]) -> None:
        if kind == bus.HEARTBEAT:
            dropped = header.pop("dropped", None)
            self.stats = header
            self.stats_received.set()
            if isinstance(dropped, dict):
                for job_id, ends in dropped.items():
                    for job in list(self.followers.get(job_id, ())):
                        job.on_output_dropped(ends)
        elif kind == bus.REREGISTER:
            self.register()
        elif kind == bus.DAEMON_STOPPING:
            self.daemon_stopping.set()
        elif kind in (bus.CONTROL_RESULT, bus.QUERY_RESULT):
            future, _, _ = self.asked.get(header.get("ref"), (None, None, None))
            if future is not None and not future.done():
                future.set_result(header)
        else:
            for job in list(self.followers.get(header.get("job_id"), ())):
                self.deliver_event(job, kind, header, payload)

    @staticmethod
    def deliver_event(job: JobStream, kind: bytes, header: dict, payload: list[bytes]) -> None:
        if kind == bus.OUTPUT:
            job.on_output(header["stream"], int(header["offset"]), payload[0])
        elif kind == bus.STARTED:
            job.on_started(header)
        elif kind == bus.CLAUDE_EVENT:
            job.on_claude(int(header["offset"]), payload[0])
        elif kind == bus.QUEUED:
            job.on_queued(header)
        elif kind == bus.COMPLETED:
            job.on_completed(header)
        elif kind == bus.REJECTED:
            job.on_rejected(header)

    async def heartbeat_loop(self) -> None:
        while True:
            header = {"connections": len(self.sessions)}
            if self.settings.max_sessions_per_address:  # for the pool-wide count per address
                header["addresses"] = dict(self.per_address)
            self.to_broker(bus.HEARTBEAT, header)
            await asyncio.sleep(bus.HEARTBEAT_INTERVAL)

    def broker_alive(self) -> bool:
        return time.monotonic() - self.broker_seen < bus.HEARTBEAT_INTERVAL * bus.HEARTBEAT_LIVENESS

    # -- journals, read off the loop

    async def read_journal(self, job_id: str, stream: str, offset: int, end: int) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(
            self.io, journal.read_range, self.settings.jobs_dir, job_id, stream, offset, end)

    async def journal_size(self, job_id: str, stream: str) -> int:
        return await asyncio.get_running_loop().run_in_executor(
            self.io, journal.stream_size, self.settings.jobs_dir, job_id, stream)

    # -- HTTP side

    def total_sessions(self) -> int:
        """Connections over the whole pool, as of the broker's last count."""
        reported = self.stats.get("connections", 0)
        return max(len(self.sessions), reported)

    def address_sessions(self, address: str) -> int:
        """Connections from one address: this handler's, plus the others' as of the broker's last count."""
        elsewhere = self.stats.get("addresses_elsewhere") or {}
        return self.per_address[address] + int(elsewhere.get(address, 0))

    def admit(self, connection: ServerConnection, request: HttpRequest) -> HttpResponse | None:
        """A WebSocket handshake: origin, token, per-address limit (None: let it through)."""
        peer = connection.remote_address
        address = str(peer[0]) if peer else "-"
        client = "%s:%s" % peer[:2] if peer else "-"
        origins = request.headers.get_all("Origin")
        if len(origins) > 1 or not policy.origin_allowed(origins[0] if origins else None,
                                                         self.settings.allowed_origins):
            logs.event(log, "handshake.refused", logging.WARNING, client=client, status=403,
                       reason="origin not allowed", origin=" ".join(origins)[:200])
            return json_response(http.HTTPStatus.FORBIDDEN, {"error": "origin not allowed"})
        token_name = None
        if self.settings.token_file:
            authorization = request.headers.get_all("Authorization")
            presented = policy.bearer_token(authorization[0]) if len(authorization) == 1 else None
            token_name = self.tokens.match(presented)
            if token_name is None:
                logs.event(log, "auth.refused", logging.WARNING, client=client, status=401,
                           reason="no bearer token" if not authorization else "wrong token")
                response = json_response(http.HTTPStatus.UNAUTHORIZED, {"error": "unauthorized"})
                response.headers["WWW-Authenticate"] = 'Bearer realm="ccexec"'
                return response
            logs.event(log, "auth.accepted", client=client, token=token_name)
        limit = self.settings.max_sessions_per_address
        if limit and self.address_sessions(address) >= limit:
            logs.event(log, "handshake.refused", logging.WARNING, client=client, status=503,
                       reason="max_sessions_per_address", limit=limit)
            response = json_response(http.HTTPStatus.SERVICE_UNAVAILABLE, {
                "error": "too many connections from this address", "max_sessions_per_address": limit})
            response.headers["Retry-After"] = "1"
            return response
        self.admitted[connection] = (address, token_name)
        self.per_address[address] += 1
        return None

    def forget(self, connection: ServerConnection) -> None:
        """A connection is closed (or its handshake failed): it counts no more."""
        self.accepted.discard(connection)
        admitted = self.admitted.pop(connection, None)
        if admitted is not None:
            address = admitted[0]
            self.per_address[address] -= 1
            if self.per_address[address] <= 0:
                del self.per_address[address]

    def process_request(self, connection: ServerConnection, request: HttpRequest) -> HttpResponse | None:
        path = request.path.split("?", 1)[0]
        methods = ("GET",) if path in WS_PATHS else ("GET", "HEAD")
        if request.method not in methods:
            response = json_response(http.HTTPStatus.METHOD_NOT_ALLOWED,
                                     {"error": f"method {request.method} not allowed", "path": path})
            response.headers["Allow"] = ", ".join(methods)
            return response
        response = self.route(connection, request, path)
        if response is not None and request.method == "HEAD":  # what a GET gets, without its body
            response = dataclasses.replace(response, body=b"")
        return response

    def route(self, connection: ServerConnection, request: HttpRequest, path: str) -> HttpResponse | None:
        if path in WS_PATHS and "websocket" not in " ".join(request.headers.get_all("Upgrade")).lower():
            # A browser or curl: told in JSON, like every other refusal, before any token is checked.
            response = json_response(http.HTTPStatus.UPGRADE_REQUIRED, {
                "error": "this path takes WebSocket connections only", "path": path})
            response.headers["Upgrade"] = "websocket"
            return response
        if path in WS_PATHS:
            return self.admit(connection, request)
        if path == "/health":
            return json_response(http.HTTPStatus.OK, self.health())
        if path == "/ready":
            ready, reason = self.readiness()
            status = http.HTTPStatus.OK if ready else http.HTTPStatus.SERVICE_UNAVAILABLE
            return json_response(status, {"status": "ready" if ready else "not_ready", "reason": reason,
                                          "executors_ready": self.stats.get("executors_ready", 0)})
        if path == "/metrics":  # the broker's exposition of the whole pool, as of its last heartbeat
            if "metrics" not in self.stats:
                return json_response(http.HTTPStatus.SERVICE_UNAVAILABLE, {"error": "broker unreachable"})
            body = self.stats["metrics"].encode()
            return HttpResponse(200, "OK", Headers([("Content-Type", self.stats["metrics_type"]),
                                                    ("Content-Length", str(len(body)))]), body)
        return json_response(http.HTTPStatus.NOT_FOUND, {"error": "not found", "path": path,
                                                         "websocket_paths": list(WS_PATHS)})

    def health(self) -> dict:
        return {
            "status": "healthy", "service": "ccexec", "version": __version__,
            "active_sessions": self.total_sessions(), "max_sessions": self.settings.max_sessions,
            "uptime_seconds": round(self.stats.get("uptime", time.time() - self.started), 3),
            "handler_pid": os.getpid(), "broker_reachable": self.broker_alive(),
            "running_jobs": self.stats.get("running", 0), "queued_jobs": self.stats.get("queued", 0),
            "executors": self.stats.get("executors", []),
        }

    def readiness(self) -> tuple[bool, str | None]:
        if not self.broker_alive():
            return False, "broker unreachable"
        if not self.stats.get("executors_ready"):
            return False, "no executor ready"
        return True, None

    # -- connections

    async def on_connection(self, ws: ServerConnection) -> None:
        session = Session(self, ws)
        if self.total_sessions() >= self.settings.max_sessions:
            await ws.send(protocol.error_response(None, protocol.SESSION_LIMIT, "Session limit exceeded",
                                                  {"max_sessions": self.settings.max_sessions}))
            await ws.close(protocol.CLOSE_POLICY_VIOLATION, "session limit exceeded")
            return
        self.sessions.add(session)
        beat = asyncio.get_running_loop().create_task(session.heartbeat_loop())
        try:
            await session.send(protocol.connected(session.session_id, __version__))
            async for frame in ws:
                if self.closing_sessions:
                    continue
                session.handling = True
                await session.handle_frame(frame)
                session.handling = False
        except ConnectionClosed:
            pass
        finally:
            beat.cancel()
            self.sessions.discard(session)
            for job in list(session.jobs.values()):
                job.pump_task.cancel()

    async def hear_from_broker(self) -> None:
        """Wait to take connections until the broker has answered: the handlers
        share the port, and one that has not heard from it yet would answer
        /ready with 503 while the others answer 200. Bounded, so that with the
        broker down the handler still serves and /ready says why; a stop ends it."""
        waits = [asyncio.ensure_future(event.wait()) for event in (self.stats_received, self.stopping)]
        await asyncio.wait(waits, timeout=bus.HEARTBEAT_INTERVAL * bus.HEARTBEAT_LIVENESS,
                           return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()

    def handshakes_in_flight(self) -> int:
        return len(self.accepted) - len(self.sessions)

    async def hand_over(self, listener: socket.socket) -> None:
        """Stop gracefully: accept nothing more (the other handlers, sharing the
        socket, take new connections), let handshakes in flight complete,
        answer every request read so far and carry out none read after, then
        close every connection with 1012 so clients reconnect, attach and send
        again what had no answer. If the whole daemon stops, first let the
        clients see their jobs end (canceled), and close with 1001."""
        # The listening socket only leaves this loop; the server keeps serving,
        # since websockets answers 503 "shutting down" to any handshake that
        # ends after its server was closed.
        loop = asyncio.get_running_loop()
        loop.remove_reader(listener.fileno())
        logs.event(log, "handler.stopping", pid=os.getpid(), connections=len(self.sessions))
        await self.wait_while(self.handshakes_in_flight, HANDSHAKE_GRACE)
        self.closing_sessions = True
        await self.wait_while(lambda: any(s.answering() for s in self.sessions), ANSWER_GRACE)
        code, reason = CLOSE_SERVICE_RESTART, "service restart"
        if await self.daemon_stops():
            await self.wait_while(lambda: any(s.jobs for s in self.sessions),
                                  self.settings.kill_grace + JOB_END_MARGIN)
            code, reason = CLOSE_GOING_AWAY, "the daemon is stopping"
        closing = [asyncio.ensure_future(s.ws.close(code, reason)) for s in list(self.sessions)]
        if closing:
            await asyncio.wait(closing, timeout=CLOSE_TIMEOUT)

    async def daemon_stops(self) -> bool:
        """Whether the whole daemon stops, not this handler alone: the broker
        says so once every executor stops too."""
        try:
            await asyncio.wait_for(self.daemon_stopping.wait(), bus.STOP_NOTICE_TIME)
            return True
        except asyncio.TimeoutError:
            return False

    @staticmethod
    async def wait_while(condition: Callable[[], object], timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while condition() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(STOP_CHECK)

    # -- tokens: the file is checked for changes off the loop

    async def load_tokens(self) -> None:
        """(Re)load the token file if it changed; an unusable file refuses everyone."""
        path = self.settings.token_file
        loop = asyncio.get_running_loop()
        key = await loop.run_in_executor(self.io, policy.token_file_key, path)
        if key == self.token_key and self.token_key is not None:
            return
        self.token_key = key
        try:
            tokens = await loop.run_in_executor(self.io, policy.read_token_file, path)
        except policy.PolicyError as exc:
            self.tokens = policy.Tokens()
            logs.event(log, "auth.token_file_unusable", logging.ERROR, error=exc, effect="every handshake refused")
            return
        self.tokens = tokens
        logs.event(log, "auth.tokens_loaded", tokens=len(tokens), names=",".join(tokens.by_name))

    async def token_loop(self) -> None:
        while True:
            await asyncio.sleep(TOKEN_CHECK_INTERVAL)
            try:
                await self.load_tokens()
            except Exception as exc:  # never let the check die: the tokens loaded stay
                logs.event(log, "auth.token_check_failed", logging.WARNING, error=exc)

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.settings.tls_cert:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.settings.tls_cert, self.settings.tls_key)
        return context

    async def run(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        listener = socket.socket(fileno=fd)
        listener.setblocking(False)
        background = [loop.create_task(self.broker_loop(self.broker)), loop.create_task(self.broker_loop(self.data)),
                      loop.create_task(self.heartbeat_loop())]
        if self.settings.watchdog_port:
            background.append(loop.create_task(WatchdogPulse(self.settings.watchdog_port).run()))
        if self.settings.token_file:
            await self.load_tokens()
            background.append(loop.create_task(self.token_loop()))
        self.register()
        await self.hear_from_broker()
        async with serve(self.on_connection, sock=listener, process_request=self.process_request,
                         create_connection=functools.partial(AcceptedConnection, self),
                         max_size=self.settings.max_frame_bytes, ping_interval=20, ping_timeout=20,
                         ssl=self.tls_context(),
                         compression=None,  # loopback and LAN: deflate costs far more CPU than it saves
                         server_header=f"ccexec/{__version__}"):
            logs.event(log, "handler.started", pid=os.getpid())
            await self.stopping.wait()
            await self.hand_over(listener)
        for task in background:
            task.cancel()
        self.broker.close(linger=0)
        self.data.close(linger=0)


def broker_answer(request: protocol.Request, answer: dict) -> dict:
    """The broker's answer, or the JSON-RPC error it stands for."""
    if "error" in answer:
        raise ProtocolError(answer.get("code", protocol.INTERNAL_ERROR), answer["error"],
                            {"job_id": request.params.get("job_id")}, request.id)
    return answer


def json_response(status: http.HTTPStatus, body: dict) -> HttpResponse:
    data = json.dumps(body).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return HttpResponse(status.value, status.phrase, headers, data)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ccexec handler")
    parser.add_argument("--fd", type=int, required=True, help="listening socket inherited from the arbiter")
    args = parser.parse_args(argv)
    settings = config.load_effective()
    logs.setup("handler", settings.log_level)
    asyncio.run(Handler(settings).run(args.fd))
