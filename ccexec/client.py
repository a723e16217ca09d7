"""Python client for ccexec: async at heart, with a small sync wrapper.

    async with Client("ws://127.0.0.1:8004/ws") as client:
        job = await client.execute("echo hello")
        async for event in job.events():        # process.* notifications
            ...
        result = await job.wait()               # or skip events() and wait
        print(result.exit_code, result.stdout)

    result = run("echo hello")                  # sync, one call

A dropped connection is resumed by itself: the client reconnects (bounded
by its RetryPolicy) and `attach`es every unfinished job from the byte
offsets it has, and the count of its Claude notifications, so each job's
output and notifications arrive exactly once, in order. It
reconnects with no job running too, and a request made meanwhile is sent
on the new connection.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Collection

import websockets
from websockets.asyncio.client import ClientConnection

from ccexec.protocol import CLAUDE_METHODS

DEFAULT_URL = "ws://127.0.0.1:8004/ws"
# Unread notifications a client keeps (heartbeats, claude.event, errors of no
# request): past this the oldest go, so a client nobody reads them from does
# not grow without end.
NOTIFICATIONS_KEPT = 1000
# A ccexec handler that restarts (1012) or a daemon that stops (1001) answers
# every request it read before it closes: one it did not answer, it did not
# carry out either, and it is sent again on the resumed connection. After
# any other close only an execute is: it names its job, and the daemon
# starts no second one for it.
CLOSES_AFTER_ANSWERING = (1001, 1012)


class ConnectionLost(ConnectionError):
    """The connection dropped and could not be resumed within the retry policy."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a client tries to get a dropped connection back."""

    attempts: int = 10
    first_delay: float = 0.1
    max_delay: float = 2.0

    def delays(self):
        delay = self.first_delay
        for _ in range(self.attempts):
            yield delay
            delay = min(delay * 2, self.max_delay)


class RPCError(Exception):
    """A JSON-RPC error answer."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.data = code, message, data


@dataclass
class Result:
    """A finished job: its output and its `process.completed` params."""

    job_id: str
    completed: dict
    stdout: str = ""
    stderr: str = ""
    outputs: list[dict] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return self.completed["exit_code"]

    @property
    def reason(self) -> str:
        return self.completed["reason"]

    @property
    def status(self) -> str:
        return self.completed["status"]


class Job:
    """A job this client started: its events, in the order the server sent them."""

    def __init__(self, client: "Client", job_id: str, status: str, pid: int | None, stream_mode: str = "lines"):
        self.client = client
        self.job_id = job_id
        self.status = status
        self.pid = pid
        self.stream_mode = stream_mode  # a resume attaches in the same mode
        self.queue: asyncio.Queue[dict] = asyncio.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.outputs: list[dict] = []
        self.completed: dict | None = None
        self.failure: Exception | None = None  # why no more of the job can come, once events() has raised it
        self.offsets = {"stdout": 0, "stderr": 0}  # where a resume picks up
        # The job's Claude notifications this client has had (they go to
        # Client.notifications); None after an attach that did not say
        # where they start, whose resume then goes by stdout_offset alone.
        self.claude_offset: int | None = 0

    def _on_event(self, method: str, params: dict) -> None:
        if method in CLAUDE_METHODS:
            if self.claude_offset is not None:
                self.claude_offset += 1
            return
        if method == "process.output":
            stream, data, end = params["type"], params["data"], params["offset"] + params["size"]
            if stream not in self.offsets or not isinstance(data, str) or not isinstance(end, int):
                raise ValueError(f"malformed process.output: {params!r:.200}")
            (self.stdout if stream == "stdout" else self.stderr).append(data)
            self.outputs.append(params)
            self.offsets[stream] = end
        elif method == "process.completed":
            self.completed = params
        self.queue.put_nowait({"method": method, "params": params})

    async def events(self, timeout: float | None = None) -> AsyncIterator[dict]:
        """Every notification of this job up to and including process.completed."""
        while True:
            if self.failure is not None:  # raised again to a later events() or wait(): nothing else will come
                raise self.failure
            event = await asyncio.wait_for(self.queue.get(), timeout)
            if event["method"] == "connection.lost":
                self.failure = ConnectionLost(event["params"]["error"])
                continue
            if event["method"] == "error":  # the server can send no more of this job (its output is gone)
                self.failure = RPCError(**{k: event["params"].get(k) for k in ("code", "message", "data")})
                continue
            yield event
            if event["method"] == "process.completed":
                return

    async def wait(self, timeout: float | None = None) -> Result:
        async def drain() -> None:
            async for _ in self.events():
                pass
        if self.completed is None:
            await asyncio.wait_for(drain(), timeout)
        return Result(self.job_id, self.completed, "".join(self.stdout), "".join(self.stderr), self.outputs)

    async def control(self, action: str) -> dict:
        return await self.client.control(action, self.job_id)


class Client:
    def __init__(self, url: str = DEFAULT_URL, *, open_timeout: float = 10, resume: bool = True,
                 retry: RetryPolicy = RetryPolicy(), **connect_kwargs: Any):
        self.url = url
        self.open_timeout = open_timeout
        self.resume = resume
        self.retry = retry
        self.reconnects = 0
        self._closing = False
        self.connect_kwargs = connect_kwargs
        self.ws: ClientConnection | None = None
        self.session: dict | None = None
        self._ids = itertools.count(1)
        self._pending: dict[Any, asyncio.Future] = {}
        self._resendable: dict[Any, str] = {}  # the messages of pending requests, by id
        self._repeatable: set[Any] = set()  # of those, the ones carried out once however often sent (executes)
        self._jobs: dict[str, Job] = {}
        self._last_sequenced: str | None = None  # the last job started without `parallel`
        self._early: dict[str, list[tuple[str, dict]]] = {}  # events that beat their job's response
        # Of this connection: requests whose caller stopped waiting (method by
        # id), jobs such a request named (their events are dropped), and jobs
        # such an execute started, to be canceled.
        self._given_up: dict[Any, str] = {}
        self._abandoned: set[str] = set()
        self._to_cancel: list[str] = []
        self._reader: asyncio.Task | None = None
        self._delays = None  # what is left of the retry policy while resumes fail in a row
        # Resolved once the reader is done with the current connection (it
        # resumed it, or gave up): a request that found it closed goes on
        # with the next one.
        self._ws_replaced: asyncio.Future | None = None
        self.notifications: asyncio.Queue[dict] = asyncio.Queue(NOTIFICATIONS_KEPT)  # heartbeats and the like

    async def __aenter__(self) -> "Client":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self._use(await self._open())
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def _use(self, ws: ClientConnection | None) -> None:
        """Send on ws from now on (None: no connection will follow)."""
        replaced = self._ws_replaced
        if ws is not None:
            self.ws, self._ws_replaced = ws, asyncio.get_running_loop().create_future()
            self._given_up.clear()
            self._abandoned.clear()
            self._to_cancel.clear()
        if replaced is not None and not replaced.done():
            replaced.set_result(None)

    async def _open(self) -> ClientConnection:
        return await websockets.connect(self.url, open_timeout=self.open_timeout,
                                        max_size=None, **self.connect_kwargs)

    async def close(self) -> None:
        self._closing = True
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()  # it may be waiting to retry a lost connection
            await asyncio.gather(self._reader, return_exceptions=True)
        self._use(None)

    async def _read(self) -> None:
        try:
            await self._read_frames()
        except Exception as exc:  # never end without a word to those who wait
            self._fail_pending()
            self._use(None)
            for job in [job for job in self._jobs.values() if job.completed is None]:
                job.queue.put_nowait({"method": "connection.lost", "params": {"error": f"client failed: {exc!r}"}})
            raise

    async def _read_frames(self) -> None:
        while True:
            try:
                async for frame in self.ws:
                    try:
                        message = json.loads(frame)
                        if isinstance(message, dict):
                            self._dispatch(message)
                    except (ValueError, KeyError, TypeError, AttributeError):
                        continue  # not a message of this protocol: skipped, as the server skips bad requests
                    while self._to_cancel:  # its answer is dropped, like any other given up
                        await self.ws.send(json.dumps({"jsonrpc": "2.0", "method": "control", "id": next(self._ids),
                                                       "params": {"type": "CANCEL", "job_id": self._to_cancel.pop()}}))
            except websockets.ConnectionClosed:
                pass
            if self._closing:
                self._fail_pending()
                return
            if self.ws.close_code in CLOSES_AFTER_ANSWERING:
                self._fail_pending(self._resendable)  # none of them was carried out
            else:
                self._fail_pending(self._repeatable)  # any may have been
            # Resumed with no unfinished job too: a restarting handler (1012)
            # is no reason for the next request to fail.
            unfinished = [job for job in self._jobs.values() if job.completed is None]
            if not (self.resume and await self._resume(unfinished)):
                self._fail_pending()
                self._use(None)
                for job in unfinished:
                    job.queue.put_nowait({"method": "connection.lost",
                                          "params": {"error": f"connection to {self.url} lost"}})
                return

    def _attach_answered(self, job: Job, answer: asyncio.Future) -> None:
        if not answer.cancelled() and isinstance(answer.exception(), ConnectionError):
            return  # the connection dropped again before the answer: the next resume attaches again
        error = answer.exception() if not answer.cancelled() else ConnectionError("canceled")
        if error is None and "error" in answer.result():
            error = RPCError(**{k: answer.result()["error"].get(k) for k in ("code", "message", "data")})
        if error is not None:
            self._jobs.pop(job.job_id, None)
            job.queue.put_nowait({"method": "connection.lost", "params": {"error": f"resume failed: {error}"}})
        else:
            self._delays = None  # resumed: a later drop gets the whole retry policy again

    def _fail_pending(self, resent: Collection = ()) -> None:
        """Fail the requests still waiting for an answer, but those to be sent again."""
        for request_id, future in list(self._pending.items()):
            if request_id not in resent:
                self._forget(request_id)
                if not future.done():
                    future.set_exception(ConnectionError("connection closed"))

    def _forget(self, request_id: Any) -> asyncio.Future | None:
        self._resendable.pop(request_id, None)
        self._repeatable.discard(request_id)
        return self._pending.pop(request_id, None)

    async def _resume(self, unfinished: list[Job]) -> bool:
        """Reconnect and attach each unfinished job where its output stopped."""
        if self._delays is None:
            self._delays = self.retry.delays()
        for delay in self._delays:  # not renewed until an attach is answered
            await asyncio.sleep(delay)
            try:
                self._use(await self._open())
                for request_id in sorted(self._resendable):
                    await self.ws.send(self._resendable[request_id])
                for job in unfinished:
                    _, answer = await self._request("attach", {
                        "job_id": job.job_id, "stdout_offset": job.offsets["stdout"],
                        "stderr_offset": job.offsets["stderr"], "claude_offset": job.claude_offset,
                        "stream_mode": job.stream_mode}, resumed=False)
                    answer.add_done_callback(functools.partial(self._attach_answered, job))
            except (OSError, websockets.InvalidHandshake, websockets.ConnectionClosed, asyncio.TimeoutError):
                continue
            self.reconnects += 1
            if not unfinished:
                self._delays = None  # nothing to attach: resumed once open
            return True
        self._delays = None
        return False

    def _job_of_error(self, message: dict) -> Job | None:
        """The job an unrequested error is about (`data.job_id`), if it is one of ours."""
        data = (message.get("error") or {}).get("data")
        return self._jobs.get(data.get("job_id")) if isinstance(data, dict) else None

    def _dispatch(self, message: dict) -> None:
        if "id" in message and ("result" in message or "error" in message):
            if message["id"] is not None:  # an answer: to a request still awaited, or to one given up
                future = self._forget(message["id"])
                if future is not None and not future.done():
                    future.set_result(message)
                elif (method := self._given_up.pop(message["id"], None)) is not None:
                    self._abandon(method, message.get("result"))
            elif (job := self._job_of_error(message)) is not None:
                self._jobs.pop(job.job_id, None)  # this connection gets no more of the job
                job.queue.put_nowait({"method": "error", "params": message["error"]})
            elif "error" in message:
                self._notify(message)
            return
        method, params = message.get("method"), message.get("params") or {}
        if method == "connected":
            self.session = params
        job_id = params.get("job_id") if isinstance(params, dict) else None
        claude = method in CLAUDE_METHODS  # notifications, not events(): the job only counts them
        process = isinstance(method, str) and method.startswith("process.")
        if claude or job_id is None or not process:
            self._notify(message)
        if job_id is None or not (claude or process):
            return
        job = self._jobs.get(job_id)
        if job is not None:
            job._on_event(method, params)
            if job.completed is not None:
                del self._jobs[job_id]  # nothing follows process.completed: not kept for a resume
        elif job_id in self._abandoned:
            if method == "process.completed":
                self._abandoned.discard(job_id)
        else:
            self._early.setdefault(job_id, []).append((method, params))

    def _abandon(self, method: str, result: Any) -> None:
        """An execute or attach answered after its caller gave up: nobody
        follows the job it names, and one it started is canceled rather than
        left to run with nobody knowing of it."""
        job_id = result.get("job_id") if isinstance(result, dict) else None
        if method not in ("execute", "attach") or not isinstance(job_id, str):
            return
        self._early.pop(job_id, None)
        self._abandoned.add(job_id)
        if method == "execute":
            self._to_cancel.append(job_id)

    def _notify(self, message: dict) -> None:
        if self.notifications.full():
            self.notifications.get_nowait()
        self.notifications.put_nowait(message)

    async def _request(self, method: str, params: dict | None, resumed: bool = True) -> tuple[int, asyncio.Future]:
        """Send a request; resumed: kept to be sent again on the connection the
        reader resumes, should this one drop before it is answered."""
        request_id = next(self._ids)
        message = json.dumps({"jsonrpc": "2.0", "method": method, "params": params or {}, "id": request_id})
        repeatable = method == "execute" and bool((params or {}).get("job_id"))
        future = self._register(request_id, message if resumed else None, repeatable)
        ws, replaced = self.ws, self._ws_replaced
        try:
            try:
                await ws.send(message)
            except websockets.ConnectionClosed:  # never sent
                if not resumed or self._closing or not self.resume:
                    raise
                await replaced  # the reader resumes the connection, or gives up
                if request_id not in self._resendable:  # failed with the old connection, not sent again
                    future = self._register(request_id, message, repeatable)
                    await self.ws.send(message)
        except BaseException:
            self._forget(request_id)
            raise
        return request_id, future

    def _register(self, request_id: int, resendable: str | None, repeatable: bool = False) -> asyncio.Future:
        future = self._pending[request_id] = asyncio.get_running_loop().create_future()
        if resendable is not None:
            self._resendable[request_id] = resendable
            if repeatable:
                self._repeatable.add(request_id)
        return future

    async def call(self, method: str, params: dict | None = None, timeout: float | None = 30) -> Any:
        request_id, future = await self._request(method, params)
        try:
            answer = await asyncio.wait_for(future, timeout)
        finally:
            if future.cancelled():  # given up (a timeout, a cancel): its late answer is not the caller's
                self._given_up[request_id] = method
            self._forget(request_id)
        if "error" in answer:
            error = answer["error"]
            raise RPCError(error["code"], error["message"], error.get("data"))
        return answer["result"]

    async def execute(self, command: str | None = None, *, argv: list[str] | None = None,
                      answer_timeout: float | None = 60, **params: Any) -> Job:
        """Start a job (params as in the protocol: timeout, cwd, env, ...).

        `answer_timeout` bounds the wait for the server's answer. A job whose
        answer comes after the caller stopped waiting (a timeout, a cancel) is
        canceled: no job runs that the caller does not know of.
        """
        if command is not None:
            params["command"] = command
        if argv is not None:
            params["argv"] = argv
        params.setdefault("job_id", uuid.uuid4().hex)  # so that sending it again cannot start it twice
        previous = self._last_sequenced
        if not params.get("parallel"):
            # Named, not left to the connection: the order holds across a
            # reconnect, whose new connection has no previous job.
            if previous is not None:
                params.setdefault("after", previous)
            self._last_sequenced = params["job_id"]
        try:
            result = await self.call("execute", params, answer_timeout)
        except BaseException:
            if self._last_sequenced == params["job_id"]:  # no job: the next one waits for the one before
                self._last_sequenced = previous
            raise
        job = Job(self, result["job_id"], result["status"], result.get("pid"), params.get("stream_mode", "lines"))
        for method, event in self._early.pop(job.job_id, []):
            job._on_event(method, event)
        if job.completed is None:
            self._jobs[job.job_id] = job
        return job

    async def control(self, action: str, job_id: str | None = None) -> dict:
        params = {"type": action} if job_id is None else {"type": action, "job_id": job_id}
        return await self.call("control", params)

    async def ping(self) -> dict:
        return await self.call("ping")

    async def attach(self, job_id: str, stdout_offset: int = 0, stderr_offset: int = 0,
                     stream_mode: str = "lines", claude_offset: int | None = None) -> Job:
        """Follow a job started elsewhere (or earlier), from byte offsets (and
        from its `claude_offset`-th Claude notification, else from those of
        the lines after stdout_offset)."""
        job = Job(self, job_id, "attached", None, stream_mode)
        job.offsets = {"stdout": stdout_offset, "stderr": stderr_offset}
        # Known from the first notification on, unless the replay starts after it by stdout_offset alone:
        job.claude_offset = claude_offset if claude_offset is not None else (None if stdout_offset else 0)
        self._jobs[job_id] = job  # events of the replay may come before the answer
        try:
            result = await self.call("attach", {"job_id": job_id, "stdout_offset": stdout_offset,
                                                "stderr_offset": stderr_offset, "claude_offset": claude_offset,
                                                "stream_mode": stream_mode})
        except BaseException:
            self._jobs.pop(job_id, None)
            raise
        job.status = result["state"]
        return job

    async def jobs(self, state: str | None = None, limit: int = 100) -> list[dict]:
        params = {"limit": limit} if state is None else {"state": state, "limit": limit}
        return (await self.call("jobs", params))["jobs"]

    async def job_status(self, job_id: str) -> dict:
        return await self.call("job.status", {"job_id": job_id})


async def run_async(command: str, url: str = DEFAULT_URL, wait_timeout: float | None = None,
                    **params: Any) -> Result:
    async with Client(url) as client:
        job = await client.execute(command, **params)
        return await job.wait(wait_timeout)


def run(command: str, url: str = DEFAULT_URL, wait_timeout: float | None = None, **params: Any) -> Result:
    """Run one command to completion and return its Result (sync wrapper)."""
    return asyncio.run(run_async(command, url, wait_timeout, **params))
