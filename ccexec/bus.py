"""Messages between ccexec's own processes, over ZeroMQ.

The broker is a ROUTER with two faces (the Majordomo / Paranoid Pirate
shape of the ZeroMQ guide): handlers and executors connect DEALER sockets
with a stable identity, register with READY, and exchange HEARTBEATs so
each side notices the other's death or restart. Every message is a
multipart frame list: [kind, JSON header] plus, for OUTPUT, the raw bytes.

Output bound for handlers travels on a socket pair of its own (the data
plane): when a handler falls behind, its output queue fills and further
output is dropped (the journal has it, and the next heartbeat says how far
it goes), while answers and job events on the control plane never wait
behind bulk data.
"""

from __future__ import annotations

import json
import os
from typing import Any

import orjson
import zmq

from ccexec.journal import JOURNALS
from ccexec.protocol import STREAMS, encode_bytes

# --- handler -> broker
SUBMIT = b"SUBMIT"        # {job_id, spec, conn, after, client}
CONTROL = b"CONTROL"      # {job_id, action, ref}
DETACH = b"DETACH"        # {job_ids}: no client of this handler follows them now
SUBSCRIBE = b"SUBSCRIBE"  # {job_ids}: this handler follows these jobs again
QUERY = b"QUERY"          # {ref, what: attach|job|jobs, job_id?, state?, limit?}
# --- broker -> handler
QUEUED = b"QUEUED"        # {job_id, position, after}
REJECTED = b"REJECTED"    # {job_id, code, message, data}
CONTROL_RESULT = b"CONTROL_RESULT"  # {job_id, action, ref, ok, status, error, pid, pgid}
QUERY_RESULT = b"QUERY_RESULT"  # {ref, record? | records? | error, code, completed?}
DAEMON_STOPPING = b"DAEMON_STOPPING"  # {}: the broker and every executor stop, not a handler alone
# --- broker -> executor
DISPATCH = b"DISPATCH"    # {job_id, spec}
COMPLETED_ACK = b"COMPLETED_ACK"  # {job_id}: the end is recorded; until then the executor tells it again
RESEND = b"RESEND"        # {job_id, stream, offset}: to an executor node, journal the head's replica lacks
# --- executor -> broker (and forwarded to handlers)
STARTED = b"STARTED"      # {job_id, pid, pgid, started_at}
OUTPUT = b"OUTPUT"        # {job_id, stream, offset} + raw bytes frame
COMPLETED = b"COMPLETED"  # {job_id, exit_code, reason, error, {stdout,stderr,claude}_bytes, ..., claude?}
CLAUDE_EVENT = b"CLAUDE_EVENT"  # {job_id, stream: "claude", offset} + records of the claude journal
DECLINED = b"DECLINED"    # {job_id}: a DISPATCH that came while the executor stops; it goes back to the queue
# --- executor -> broker, and the broker's answer
STOPPING = b"STOPPING"    # {}: dispatch no more; answered with STOPPING, after which no DISPATCH follows
# --- both directions, both faces
READY = b"READY"          # register: {role, pid, capacity, jobs, completed, node, labels} or {role, pid, jobs, connections}
# executor {running, dropped?}, handler {connections}, broker -> handler: pool stats and dropped?, where
# {job_id: {stream: end}} says how far the journals go of jobs whose output had a live copy dropped
# since the last one (a full queue, a peer not yet connected): a handler reads the rest from there
# even if the job then writes nothing for a long time
HEARTBEAT = b"HEARTBEAT"
REREGISTER = b"REREGISTER"  # broker to an unknown peer: send READY again

HEARTBEAT_INTERVAL = 1.0  # seconds between heartbeats on both faces
HEARTBEAT_LIVENESS = 3    # missed heartbeats before a peer counts as dead
# How long a stopping broker or handler waits to hear whether the whole
# daemon stops (Circus sends every process SIGTERM at once) or it alone.
STOP_NOTICE_TIME = HEARTBEAT_INTERVAL
HIGH_WATER_MARK = 1000    # queued messages per peer before EAGAIN
# Wherever output flows (executor -> broker, broker -> handler data): up to
# 256 KiB a message, so at most 4 MiB queued per side and peer. A peer that
# reads slower makes the sender wait or drop (the journal has every byte),
# never buffer in memory.
DATA_HIGH_WATER_MARK = 16


def pack(kind: bytes, header: dict, *payload: bytes) -> list[bytes]:
    return [kind, encode_bytes(header), *payload]


def unpack(frames: list[bytes]) -> tuple[bytes, dict, list[bytes]]:
    """Split a message into (kind, header, payload frames)."""
    if len(frames) < 2:
        raise ValueError(f"short message of {len(frames)} frames")
    try:
        header = orjson.loads(frames[1])
    except orjson.JSONDecodeError:  # a header json wrote: an integer of 64+ bits
        header = json.loads(frames[1])
    if not isinstance(header, dict):
        raise ValueError("message header is not an object")
    return frames[0], header, frames[2:]


def frontend_endpoint(run_dir: str) -> str:
    return f"ipc://{os.path.join(run_dir, 'broker-handlers.ipc')}"


def handler_data_endpoint(run_dir: str) -> str:
    return f"ipc://{os.path.join(run_dir, 'broker-handlers-data.ipc')}"


def backend_endpoint(run_dir: str) -> str:
    return f"ipc://{os.path.join(run_dir, 'broker-executors.ipc')}"


def peer_identity(role: str, node: str = "") -> bytes:
    """Unique among the broker's peers: role, node name for another host, pid."""
    return f"{role}-{node + '-' if node else ''}{os.getpid()}".encode()


def tune(sock: zmq.Socket, send_hwm: int = HIGH_WATER_MARK, receive_hwm: int = HIGH_WATER_MARK) -> None:
    """Options every ccexec ZeroMQ socket shares."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, send_hwm)
    sock.setsockopt(zmq.RCVHWM, receive_hwm)


def dealer(ctx: zmq.Context, role: str, endpoint: str, send_hwm: int = HIGH_WATER_MARK,
           receive_hwm: int = HIGH_WATER_MARK) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, peer_identity(role))
    tune(sock, send_hwm, receive_hwm)
    sock.connect(endpoint)
    return sock


# The fields of a COMPLETED, as the head records and relays one from another host.
_NULL = type(None)
COMPLETED_FIELDS = (
    ("exit_code", (int,), "an integer"), ("reason", (str,), "a string"),
    ("execution_time", (int, float), "a number"), ("error", (str, _NULL), "a string or null"),
    ("pid", (int, _NULL), "an integer or null"), ("pgid", (int, _NULL), "an integer or null"),
    *((f"{name}_bytes", (int, _NULL), "an integer or null") for name in JOURNALS),
    ("claude", (dict, _NULL), "an object or null"),
)


def completed_flaw(header: dict[str, Any]) -> str | None:
    """What makes a COMPLETED from another host unfit to record (a node of
    another version, say), or None."""
    for name, kinds, what in COMPLETED_FIELDS:
        value = header.get(name)
        if isinstance(value, bool) or not isinstance(value, kinds):  # a bool is an int to Python
            return f"{name!r} is not {what}"
    return None


def output_ends(ends: object) -> dict[str, int]:
    """The {stream: end} of a `dropped` note or a job's `output`, what of it is sound."""
    if not isinstance(ends, dict):
        return {}
    return {stream: end for stream, end in ends.items() if stream in STREAMS and isinstance(end, int)}


def header_field(header: dict[str, Any], name: str, kind: type) -> Any:
    value = header.get(name)
    if not isinstance(value, kind):
        raise ValueError(f"message field {name!r} missing or not {kind.__name__}")
    return value
