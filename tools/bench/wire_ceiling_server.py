#!/usr/bin/env python3
"""The client's ceiling for a stream: a server that runs COMMAND once, at
start, and then sends its stdout to every client from memory, one message
per line, as fast as the connection takes it. Nothing is spawned, read or
relayed per client, so whatever rate a client reaches here is the most any
server could give it in that wire format.

  --format ccexec   ccexec's lines-mode `process.output` messages, built by
                    ccexec.protocol and written as the handler writes them,
                    in answer to an `execute` (then `process.completed`)
  --format lines    bare lines without their newline, as websocketd sends
                    them, from the moment a client connects (then a close)

    python tools/bench/wire_ceiling_server.py --format ccexec PORT COMMAND
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import uuid

import orjson
import websockets

from ccexec import protocol

BATCH = 256  # messages a write, as the handler gives up its loop between writes


def lines_frames(stdout: bytes) -> list[bytes]:
    payloads = [line.removesuffix(b"\n") for line in stdout.splitlines(keepends=True)]
    return batched_frames(payloads)


def ccexec_frames(stdout: bytes, job_id: str) -> list[bytes]:
    splitter = protocol.OutputSplitter("lines")
    pieces = splitter.feed(stdout) + splitter.finish()
    return batched_frames(protocol.process_output_frames(job_id, "stdout", pieces))


def batched_frames(payloads: list[bytes]) -> list[bytes]:
    return [protocol.websocket_text_frames(payloads[start:start + BATCH]) for start in range(0, len(payloads), BATCH)]


async def send_all(ws, frames: list[bytes]) -> None:
    for frame in frames:
        async with ws.send_context():  # websockets' own flow control, as the handler uses it
            ws.transport.write(frame)
        await asyncio.sleep(0)


async def serve_ccexec(ws, frames: list[bytes], job_id: str, size: int) -> None:
    async for raw in ws:
        request = orjson.loads(raw)
        await ws.send(protocol.response(request.get("id"), {"status": "started", "job_id": job_id, "pid": None}))
        await send_all(ws, frames)
        await ws.send(protocol.process_completed(job_id, None, None, 0, "exited", None, 0.0, size, 0))


async def main(fmt: str, port: int, command: str) -> None:
    stdout = subprocess.run(["/bin/sh", "-c", command], stdout=subprocess.PIPE, check=True).stdout
    job_id = uuid.uuid4().hex
    if fmt == "ccexec":
        frames = ccexec_frames(stdout, job_id)

        async def serve(ws):
            await serve_ccexec(ws, frames, job_id, len(stdout))
    else:
        frames = lines_frames(stdout)

        async def serve(ws):
            await send_all(ws, frames)
    async with websockets.serve(serve, "127.0.0.1", port, compression=None, max_size=None, ping_interval=None):
        await asyncio.Future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=("ccexec", "lines"), required=True)
    parser.add_argument("port", type=int)
    parser.add_argument("command")
    args = parser.parse_args()
    asyncio.run(main(args.format, args.port, args.command))
