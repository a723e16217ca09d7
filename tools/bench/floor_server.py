#!/usr/bin/env python3
"""The floor for any Python design: one process, nothing but a websockets
server that spawns each `execute` with asyncio subprocess pipes and sends
its stdout back as JSON-RPC `process.output` messages (one per line, or per
64 KiB read in "chunks" mode), then `process.completed`. No broker, executors, journal, records, policy or
resume. Whatever this cannot reach on a machine, no Python daemon built on
the same libraries can: bench.py runs W1 and W2 against it next to ccexec.

    python tools/bench/floor_server.py PORT      # serves ws://127.0.0.1:PORT/
"""

from __future__ import annotations

import asyncio
import os
import sys

import orjson
import websockets


async def run(ws, request: dict) -> None:
    params = request["params"]
    proc = await asyncio.create_subprocess_exec("/bin/sh", "-c", params["command"], stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE)
    await ws.send(orjson.dumps({"jsonrpc": "2.0", "id": request.get("id"),
                                "result": {"status": "started", "pid": proc.pid}}).decode())
    offset = 0
    read = proc.stdout.readline if params.get("stream_mode", "lines") == "lines" else \
        (lambda: proc.stdout.read(65536))  # chunks (unlike ccexec, not cut at line or character ends)
    while data := await read():
        await ws.send(orjson.dumps({"jsonrpc": "2.0", "method": "process.output", "params": {
            "type": "stdout", "data": data.decode(errors="replace"), "offset": offset, "size": len(data)}}).decode())
        offset += len(data)
    code = await proc.wait()
    await ws.send(orjson.dumps({"jsonrpc": "2.0", "method": "process.completed", "params": {
        "status": "completed", "exit_code": code, "stdout_bytes": offset}}).decode())


async def serve_connection(ws) -> None:
    async for raw in ws:
        await run(ws, orjson.loads(raw))


async def main(port: int) -> None:
    async with websockets.serve(serve_connection, "127.0.0.1", port, compression=None, max_size=None,
                                ping_interval=None):
        await asyncio.Future()


if __name__ == "__main__":
    if hasattr(os, "pidfd_open") and sys.version_info < (3, 12):  # as ccexec's executors do
        asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
    asyncio.run(main(int(sys.argv[1])))
