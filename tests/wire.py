"""A raw WebSocket peer for protocol tests: send any frame, collect messages."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

import websockets


class Wire:
    def __init__(self, ws):
        self.ws = ws
        self.messages: list[dict] = []
        self._ids = 0

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> "Wire":
        wire = cls(await websockets.connect(url, max_size=None, open_timeout=10, **kwargs))
        await wire.until(lambda m: m.get("method") == "connected", 10)
        return wire

    async def send_raw(self, frame: str | bytes, **kwargs: Any) -> None:
        await self.ws.send(frame, **kwargs)

    async def request(self, method: str, params: dict | None = None, id: Any = "auto") -> Any:
        """Send a request; returns the id used (None when sent without one)."""
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        if id == "auto":
            self._ids += 1
            id = self._ids
        if id is not None:
            message["id"] = id
        await self.ws.send(json.dumps(message))
        return id

    async def recv(self, timeout: float) -> dict:
        message = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.messages.append(message)
        return message

    async def until(self, predicate: Callable[[dict], bool], timeout: float) -> dict:
        """Receive until a message matches; fail after timeout seconds."""
        async def loop() -> dict:
            while True:
                message = await self.recv(timeout)
                if predicate(message):
                    return message
        return await asyncio.wait_for(loop(), timeout)

    async def answer(self, request_id: Any, timeout: float = 10) -> dict:
        return await self.until(lambda m: m.get("id") == request_id and ("result" in m or "error" in m), timeout)

    async def execute(self, wait: float = 10, **params: Any) -> dict:
        """Execute and return the result (raising on an error answer).

        `wait` bounds the wait for the answer; a `timeout` goes to the job.
        """
        answer = await self.answer(await self.request("execute", params), wait)
        assert "result" in answer, answer
        return answer["result"]

    async def first(self, predicate: Callable[[dict], bool], timeout: float) -> dict:
        """The first message that matches, received already (while waiting
        for something else) or to come."""
        for message in self.messages:
            if predicate(message):
                return message
        return await self.until(predicate, timeout)

    async def completed(self, job_id: str, timeout: float = 30) -> dict:
        message = await self.first(lambda m: m.get("method") == "process.completed"
                                   and m["params"]["job_id"] == job_id, timeout)
        return message["params"]

    def outputs(self, job_id: str, stream: str = "stdout") -> list[dict]:
        return [m["params"] for m in self.messages if m.get("method") == "process.output"
                and m["params"]["job_id"] == job_id and m["params"]["type"] == stream]

    def text(self, job_id: str, stream: str = "stdout") -> str:
        return "".join(p["data"] for p in self.outputs(job_id, stream))

    def of_job(self, job_id: str) -> list[dict]:
        return [m for m in self.messages if isinstance(m.get("params"), dict)
                and m["params"].get("job_id") == job_id]

    async def run(self, wait: float = 30, **params: Any) -> tuple[dict, dict]:
        """Execute and wait for the end: (execute result, completed params)."""
        result = await self.execute(**params)
        return result, await self.completed(result["job_id"], wait)

    async def close(self) -> None:
        await self.ws.close()


