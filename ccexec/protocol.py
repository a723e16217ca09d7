"""The client-facing wire protocol: JSON-RPC 2.0 over WebSocket text frames.

Pure code with no I/O, in the manner of websockets' sans-I/O protocol layer:
frames in, requests or errors out; job events in, message texts out. The
handler process is the glue that moves these texts over sockets.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import orjson

JSONRPC = "2.0"

# JSON-RPC error codes (standard ones, then ccexec's server errors).
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
NOT_ALLOWED = -32001
JOB_NOT_FOUND = -32002
SESSION_LIMIT = -32003
SERVER_BUSY = -32005
OUTPUT_GONE = -32006

# WebSocket close codes the server uses (RFC 6455).
CLOSE_POLICY_VIOLATION = 1008

# A line longer than this many characters is sent as several chunks.
CHUNK_CHARS = 65536
FEED_PART = 16 << 10  # bytes of lines-mode output split at a time (about 200 lines) by feed_in_parts
STREAMS = ("stdout", "stderr")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")  # the daemon's are uuid4().hex; a client's must look alike
STREAM_MODES = ("lines", "chunks")
CONTROL_TYPES = {"PAUSE": "paused", "RESUME": "resumed", "CANCEL": "canceled"}
JOB_STATES = ("running", "queued", "finished")
LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # executor label names and values
# UTF-8 bytes at most in one `command` or `argv` string: Linux execs no argument
# longer (MAX_ARG_STRLEN, 128 KiB with its NUL), so nothing longer could ever run,
# and reading one (the command policy, Claude detection) would hold a loop for seconds.
MAX_ARG_BYTES = (128 << 10) - 1
MAX_LABELS = 32
CAPABILITIES = [
    "execute", "control", "stream", "heartbeat", "queue", "chunks",
    "argv", "stdin", "ping", "hook_status", "attach", "jobs", "claude", "labels", "job_id", "after",
]


class ProtocolError(Exception):
    """A request that earns a JSON-RPC error object instead of a result."""

    def __init__(self, code: int, message: str, data: Any = None, request_id: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        self.request_id = request_id

    def to_message(self) -> str:
        return error_response(self.request_id, self.code, self.message, self.data)


def output_gone(job_id: str, cause: str, request_id: Any = None) -> ProtocolError:
    """-32006: a job's output can no longer be sent (`cause` says why); with
    no request_id when it ends a replay or stream rather than answering."""
    return ProtocolError(OUTPUT_GONE, f"Output no longer available: {cause}", {"job_id": job_id}, request_id)


@dataclass(frozen=True)
class Request:
    method: str
    params: dict
    id: str | int | None
    has_id: bool


@dataclass(frozen=True)
class ExecuteSpec:
    """A validated `execute` request: what to run and how."""

    command: str | None = None
    argv: tuple[str, ...] | None = None
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    stdin: str | None = None
    timeout: float | None = None
    stall_timeout: float | None = None
    detach: bool = False
    parallel: bool = False
    stream_mode: str = "lines"
    name: str | None = None
    claude: bool = False  # true: a Claude job whatever its command (false: detection decides)
    labels: dict[str, str] = field(default_factory=dict)  # only executors carrying all of them run it
    job_id: str | None = None  # the client's: sent again, it names the job the first one started
    after: str | None = None  # the job to wait for, instead of the connection's previous one

    def to_dict(self) -> dict:
        spec = {
            "command": self.command, "argv": list(self.argv) if self.argv else None,
            "cwd": self.cwd, "env": dict(self.env), "stdin": self.stdin,
            "timeout": self.timeout, "stall_timeout": self.stall_timeout,
            "detach": self.detach, "stream_mode": self.stream_mode, "name": self.name,
        }
        if self.claude:
            spec["claude"] = True
        if self.labels:
            spec["labels"] = dict(self.labels)
        return spec


@dataclass(frozen=True)
class ControlSpec:
    action: str  # "PAUSE" | "RESUME" | "CANCEL"
    job_id: str | None


@dataclass(frozen=True)
class AttachSpec:
    job_id: str
    stdout_offset: int = 0
    stderr_offset: int = 0
    stream_mode: str = "lines"
    claude_offset: int | None = None  # Claude notifications the client has (None: those of its stdout)


# ---------------------------------------------------------------- encoding

def encode_bytes(message: dict) -> bytes:
    """Compact JSON, always valid UTF-8: a lone surrogate (JSON a job printed,
    a Claude line, may spell one as "\\ud800") becomes U+FFFD, as an
    undecodable byte of output does, so that every process, the job store and
    a WebSocket text frame can carry it."""
    try:
        return orjson.dumps(message)  # several times faster than json.dumps
    except TypeError:  # orjson stops at 64-bit integers (a client's id may be larger) and lone surrogates
        text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace").encode()


def encode(message: dict) -> str:
    return encode_bytes(message).decode()


def response(request_id: Any, result: Any) -> str:
    return encode({"jsonrpc": JSONRPC, "result": result, "id": request_id})


def error_response(request_id: Any, code: int, message: str, data: Any = None) -> str:
    error = {"code": code, "message": message, "data": data}
    return encode({"jsonrpc": JSONRPC, "error": error, "id": request_id})


def notification(method: str, params: dict) -> str:
    return encode({"jsonrpc": JSONRPC, "method": method, "params": params})


def connected(session_id: str, version: str) -> str:
    return notification("connected", {
        "session_id": session_id, "version": version, "capabilities": CAPABILITIES,
    })


def process_state(status: str, job_id: str, pid: int | None, pgid: int | None) -> str:
    """`process.started` / `.paused` / `.resumed` / `.canceled` share one shape."""
    return notification(f"process.{status}", {
        "status": status, "pid": pid, "pgid": pgid, "exit_code": None,
        "error": None, "job_id": job_id,
    })


def process_queued(job_id: str, position: int | None, after: str | None = None) -> str:
    params: dict[str, Any] = {"job_id": job_id, "position": position}
    if after is not None:
        params["after"] = after
    return notification("process.queued", params)


# The hot path, one message per line of output: a template filled in is ten
# times faster than building a dict per line and serialising it. Only the
# data needs JSON escaping; everything else is a name, an int or null.
_OUTPUT_TEMPLATE = (b'{"jsonrpc":"2.0","method":"process.output","params":{"type":%b,"data":%b,'
                    b'"truncated":%b,"chunk_index":%b,"total_chunks":%b,"job_id":%b,"offset":%d,"size":%d}}')


def _json_int_or_null(value: int | None) -> bytes:
    return b"null" if value is None else b"%d" % value


def process_output_frames(job_id: str, stream: str, pieces: list["Piece"]) -> list[bytes]:
    """`process.output` messages as the UTF-8 bytes of their frames."""
    stream_json, job_id_json = orjson.dumps(stream), orjson.dumps(job_id)
    return [_OUTPUT_TEMPLATE % (stream_json, orjson.dumps(piece.data), b"true" if piece.truncated else b"false",
                                _json_int_or_null(piece.chunk_index), _json_int_or_null(piece.total_chunks),
                                job_id_json, piece.offset, piece.size)
            for piece in pieces]


def websocket_text_frames(payloads: list[bytes]) -> bytes:
    """RFC 6455 text frames as a server sends them (final, unmasked, no
    extension), one after another in one buffer. The same bytes as the
    websockets library's Frame.serialize, at an eighth of its cost per
    message: in lines mode a chunk of output is thousands of messages."""
    parts = []
    for payload in payloads:
        size = len(payload)
        if size < 126:
            parts.append(bytes((0x81, size)))
        elif size < 1 << 16:
            parts.append(b"\x81\x7e" + size.to_bytes(2, "big"))
        else:
            parts.append(b"\x81\x7f" + size.to_bytes(8, "big"))
        parts.append(payload)
    return b"".join(parts)


def process_completed(job_id: str, pid: int | None, pgid: int | None, exit_code: int,
                      reason: str, error: str | None, execution_time: float,
                      stdout_bytes: int, stderr_bytes: int, claude: dict | None = None) -> str:
    params = {
        "status": "completed" if exit_code == 0 else "failed",
        "pid": pid, "pgid": pgid, "exit_code": exit_code, "error": error,
        "job_id": job_id, "reason": reason,
        "execution_time": round(execution_time, 6),
        "stdout_bytes": stdout_bytes, "stderr_bytes": stderr_bytes,
    }
    if claude is not None:  # Claude jobs only: the run's summary
        params["claude"] = claude
    return notification("process.completed", params)


CLAUDE_METHODS = ("claude.event", "error.rate_limit_exceeded", "error.token_limit_exceeded")


def claude_notification(method: str, job_id: str, params: dict) -> str:
    """A Claude job's `claude.event` or rate/token limit notification."""
    if method not in CLAUDE_METHODS:
        raise ValueError(f"not a Claude notification: {method!r}")
    return notification(method, {**params, "job_id": job_id})


def heartbeat(timestamp: float, jobs: list[tuple[str, float]]) -> str:
    return notification("heartbeat", {
        "timestamp": timestamp,
        "jobs": [{"job_id": j, "silent_for": round(s, 3)} for j, s in jobs],
    })


def execute_result(status: str, job_id: str, pid: int | None = None,
                   pgid: int | None = None) -> dict:
    return {"status": status, "pid": pid, "pgid": pgid, "job_id": job_id}


# ----------------------------------------------------------------- parsing

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _utf8_clean(message: Any) -> bool:
    """Whether every string of a parsed message is encodable as UTF-8."""
    try:
        json.dumps(message, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    except RecursionError:  # parsed with a frame or two of stack to spare: too deep all the same
        raise ProtocolError(PARSE_ERROR, "Parse error: nesting too deep") from None
    return True


def parse_frame(frame: str | bytes) -> Request:
    """Turn one WebSocket frame into a Request, or raise ProtocolError."""
    if isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError(INVALID_REQUEST, "Invalid Request: binary frames are not accepted, send JSON text frames")
    try:
        message = json.loads(frame)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(PARSE_ERROR, f"Parse error: {exc}"[:300]) from None
    if "\\u" in frame and _SURROGATE_ESCAPE.search(frame) and not _utf8_clean(message):
        # A lone UTF-16 surrogate escape decodes to a string no UTF-8 text can
        # carry: echoing it (an id, a method name) would break the answer.
        raise ProtocolError(INVALID_REQUEST, "Invalid Request: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
    if not isinstance(message, dict):
        raise ProtocolError(INVALID_REQUEST, "Invalid Request: a request must be a JSON object")
    has_id = "id" in message
    request_id = message.get("id")
    if has_id and (isinstance(request_id, bool) or not isinstance(request_id, (str, int))):
        raise ProtocolError(INVALID_REQUEST, "Invalid Request: 'id' must be a string or an integer")
    rid = request_id if has_id else None
    if message.get("jsonrpc") != JSONRPC:
        raise ProtocolError(INVALID_REQUEST, "Invalid Request: 'jsonrpc' must be \"2.0\"", request_id=rid)
    method = message.get("method")
    if not isinstance(method, str) or not method:
        raise ProtocolError(INVALID_REQUEST, "Invalid Request: 'method' must be a non-empty string", request_id=rid)
    params = message.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProtocolError(INVALID_PARAMS, "Invalid params: 'params' must be an object", request_id=rid)
    return Request(method=method, params=params, id=rid, has_id=has_id)


def _invalid(request: Request, param: str, why: str) -> ProtocolError:
    return ProtocolError(INVALID_PARAMS, f"Invalid params: '{param}' {why}",
                         {"param": param}, request.id)


def _seconds(request: Request, name: str, allow_zero: bool) -> float | None:
    value = request.params.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        raise _invalid(request, name, "must be a number of seconds")
    if not isinstance(value, (str, int, float)):
        raise _invalid(request, name, "must be a number of seconds")
    try:
        value = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        raise _invalid(request, name, "must be a finite number of seconds") from None
    if not math.isfinite(value):
        raise _invalid(request, name, "must be a finite number of seconds")
    if value < 0 or (value == 0 and not allow_zero):
        raise _invalid(request, name, "must be greater than zero" if not allow_zero else "must not be negative")
    return float(value)


def _optional_str(request: Request, name: str) -> str | None:
    value = request.params.get(name)
    if value is not None and not isinstance(value, str):
        raise _invalid(request, name, "must be a string")
    return value


def _flag(request: Request, name: str) -> bool:
    value = request.params.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(request, name, "must be true or false")
    return value


def _command_or_argv(request: Request) -> tuple[str | None, tuple[str, ...] | None]:
    command, argv = request.params.get("command"), request.params.get("argv")
    if argv is not None:
        if command is not None:
            raise _invalid(request, "argv", "cannot be combined with 'command'")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise _invalid(request, "argv", "must be a non-empty list of strings")
        if not argv[0] or any("\0" in a for a in argv):
            raise _invalid(request, "argv", "must not hold NUL bytes or an empty program")
        if any(_too_long(a) for a in argv):
            raise _invalid(request, "argv", f"must not hold a string of more than {MAX_ARG_BYTES} UTF-8 bytes")
        return None, tuple(argv)
    if not isinstance(command, str) or not command.strip():
        raise _invalid(request, "command", "is required and must be a non-empty string")
    if "\0" in command:
        raise _invalid(request, "command", "must not contain NUL bytes")
    if _too_long(command):
        raise _invalid(request, "command", f"must not be longer than {MAX_ARG_BYTES} UTF-8 bytes")
    return command, None


def _too_long(arg: str) -> bool:
    return len(arg) > MAX_ARG_BYTES // 4 and len(arg.encode("utf-8", "surrogatepass")) > MAX_ARG_BYTES


def _env(request: Request) -> dict[str, str]:
    env = request.params.get("env")
    if env is None:
        return {}
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and k and "=" not in k and "\0" not in k
            and isinstance(v, str) and "\0" not in v for k, v in env.items()):
        raise _invalid(request, "env", "must be an object of string names (no '=') to string values")
    return dict(env)


def _labels(request: Request) -> dict[str, str]:
    labels = request.params.get("labels")
    if labels is None:
        return {}
    if not isinstance(labels, dict) or len(labels) > MAX_LABELS or not all(
            isinstance(k, str) and LABEL.match(k) and isinstance(v, str) and LABEL.match(v)
            for k, v in labels.items()):
        raise _invalid(request, "labels", f"must be an object of up to {MAX_LABELS} names to values, "
                       "each 1-64 characters of letters, digits, '_', '.', '-'")
    return dict(labels)


def parse_execute(request: Request) -> ExecuteSpec:
    command, argv = _command_or_argv(request)
    stream_mode = _stream_mode(request)
    stdin = _optional_str(request, "stdin")
    if stdin == "pipe":
        raise _invalid(request, "stdin", "\"pipe\" is not supported yet; pass the input as a string")
    cwd = _optional_str(request, "cwd")
    if cwd is not None and ("\0" in cwd or not cwd):
        raise _invalid(request, "cwd", "must be a non-empty path")
    return ExecuteSpec(
        command=command, argv=argv, cwd=cwd, env=_env(request), stdin=stdin,
        timeout=_seconds(request, "timeout", allow_zero=False),
        stall_timeout=_seconds(request, "stall_timeout", allow_zero=True),
        detach=_flag(request, "detach"), parallel=_flag(request, "parallel"),
        stream_mode=stream_mode, name=_optional_str(request, "name"),
        claude=_flag(request, "claude"), labels=_labels(request), job_id=_optional_job_id(request, "job_id"),
        after=_after(request),
    )


def _optional_job_id(request: Request, name: str) -> str | None:
    job_id = request.params.get(name)
    if job_id is not None and (not isinstance(job_id, str) or not JOB_ID.match(job_id)):
        raise _invalid(request, name, "must be a job id: 32 lowercase hexadecimal digits (a UUID's hex)")
    return job_id


def _after(request: Request) -> str | None:
    after = _optional_job_id(request, "after")
    if after is None:
        return None
    if after == request.params.get("job_id"):
        raise _invalid(request, "after", "names the job itself")
    if _flag(request, "parallel"):
        raise _invalid(request, "after", "cannot be combined with parallel: a parallel job waits for no other")
    return after


def _job_id(request: Request) -> str:
    job_id = request.params.get("job_id")
    if not isinstance(job_id, str) or not job_id:
        raise _invalid(request, "job_id", "is required and must be a string")
    return job_id


def _offset(request: Request, name: str, unit: str = "byte offset") -> int:
    value = request.params.get(name, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _invalid(request, name, f"must be a non-negative integer {unit}")
    return value


def _stream_mode(request: Request) -> str:
    mode = request.params.get("stream_mode")
    mode = "lines" if mode is None else mode
    if mode not in STREAM_MODES:
        raise _invalid(request, "stream_mode", "must be \"lines\" or \"chunks\"")
    return mode


def parse_attach(request: Request) -> AttachSpec:
    claude_offset = None if request.params.get("claude_offset") is None else \
        _offset(request, "claude_offset", "count of notifications")
    return AttachSpec(_job_id(request), _offset(request, "stdout_offset"),
                      _offset(request, "stderr_offset"), _stream_mode(request), claude_offset)


def parse_job_status(request: Request) -> str:
    return _job_id(request)


def parse_jobs(request: Request) -> tuple[str | None, int]:
    state = request.params.get("state")
    if state is not None and state not in JOB_STATES:
        raise _invalid(request, "state", "must be one of running, queued, finished")
    limit = request.params.get("limit", 100)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise _invalid(request, "limit", "must be an integer from 1 to 1000")
    return state, limit


def parse_control(request: Request) -> ControlSpec:
    kind = request.params.get("type")
    if not isinstance(kind, str) or kind.upper() not in CONTROL_TYPES:
        raise _invalid(request, "type", "must be one of PAUSE, RESUME, CANCEL")
    return ControlSpec(action=kind.upper(), job_id=_optional_str(request, "job_id"))


# ------------------------------------------------------------ output split

class Piece(NamedTuple):  # a tuple: made per line of output, where a dataclass costs twice as much
    """One `process.output` message's worth of a stream."""

    data: str
    offset: int
    size: int
    truncated: bool = False
    chunk_index: int | None = None
    total_chunks: int | None = None


def _utf8_cut(buf: bytes | bytearray, limit: int) -> int:
    """The largest cut <= limit that does not split a UTF-8 character."""
    if len(buf) <= limit:
        return len(buf)
    cut = limit
    # Step back over continuation bytes (10xxxxxx), at most three of them.
    while cut > limit - 3 and (buf[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut if (buf[cut] & 0xC0) != 0x80 else limit


def _char_cut(buf: bytes | bytearray | memoryview, limit: int) -> int:
    """Bytes of the first `limit` characters of buf (all of buf if fewer).

    Never splits a character: decoding with surrogateescape maps each
    undecodable byte to one character and encodes back to the same bytes.
    """
    if len(buf) <= limit:
        return len(buf)
    if bytes(buf[:limit]).isascii():
        return limit
    window = bytes(buf[:4 * limit + 4])
    window = window[:_complete_utf8_prefix(window)]
    text = window.decode("utf-8", "surrogateescape")
    return len(window) if len(text) <= limit else len(text[:limit].encode("utf-8", "surrogateescape"))


def _complete_utf8_prefix(buf: bytes | bytearray) -> int:
    """Length of buf without a trailing, still incomplete UTF-8 sequence."""
    end = len(buf)
    for back in range(1, min(4, end) + 1):
        byte = buf[end - back]
        if byte & 0xC0 != 0x80:  # a lead byte or ASCII
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1
            return end - back if need > back else end
    return end


def _decode(raw: bytes | bytearray) -> str:
    return raw.decode("utf-8", errors="replace")


class OutputSplitter:
    """Cuts one output stream into `process.output` pieces.

    "lines": one piece per line, lines over CHUNK_CHARS characters cut into
    chunks of at most CHUNK_CHARS characters.
    "chunks": up to CHUNK_CHARS bytes per piece, cut at a line end if possible;
    a partial last line waits for more data until the caller flush()es it.
    Pieces never split a UTF-8 character, so each `size` is exact and a
    client can resume from the last piece's offset + size.
    """

    def __init__(self, mode: str = "lines", offset: int = 0, limit: int = CHUNK_CHARS):
        self.mode = mode
        self.offset = offset  # raw offset of the first byte still in self._buf
        self.limit = limit
        self._buf = bytearray()
        self._chunk_index = 0  # chunk number within the current long line
        self._total: int | None = None

    def feed(self, data: bytes) -> list[Piece]:
        self._buf += data
        return self._split(final=False)

    def feed_in_parts(self, data: bytes) -> Iterator[list[Piece]]:
        """feed(), in lines mode split into parts of about FEED_PART bytes that
        end at line ends, so that a caller can give up its loop between parts;
        together they are the pieces feed(data) gives (a long line is never cut
        between parts, so whether its end is known stays the same)."""
        if self.mode != "lines":  # a few pieces at most
            yield self.feed(data)
            return
        start = 0
        while start < len(data):
            end = data.find(b"\n", start + FEED_PART) + 1 or len(data)
            yield self.feed(data[start:end])
            start = end

    def finish(self) -> list[Piece]:
        """End of stream: everything still held goes out."""
        return self._split(final=True)

    def _take(self, size: int, **kw: Any) -> Piece:
        raw = bytes(self._buf[:size])
        del self._buf[:size]
        piece = Piece(_decode(raw), self.offset, size, **kw)
        self.offset += size
        return piece

    def _split(self, final: bool) -> list[Piece]:
        split = self._split_lines if self.mode == "lines" else self._split_chunks
        pieces = split(final)
        if final and self._buf:  # an undecodable tail, when final
            pieces.append(self._take(len(self._buf)))
        return pieces

    def _split_chunks(self, final: bool) -> list[Piece]:
        pieces = []
        while self._buf:
            if len(self._buf) > self.limit:
                newline = self._buf.rfind(b"\n", 0, self.limit)
                size = newline + 1 if newline >= 0 else _utf8_cut(self._buf, self.limit)
            else:  # hold a partial last line back, until more data, flush() or the end
                size = len(self._buf) if final else self._buf.rfind(b"\n") + 1
            if size == 0:
                break
            pieces.append(self._take(size))
        return pieces

    @property
    def holding(self) -> bool:
        """Chunks mode: whether flush() would send something."""
        return self.mode == "chunks" and _complete_utf8_prefix(self._buf) > 0

    def flush(self) -> list[Piece]:
        """Chunks mode, stream gone quiet: send the held partial line now."""
        size = _complete_utf8_prefix(self._buf) if self.mode == "chunks" else 0
        return [self._take(size)] if size else []

    def _split_lines(self, final: bool) -> list[Piece]:
        pieces = self._whole_short_lines() if self._chunk_index == 0 else []
        while self._buf:
            # A line of at most `limit` bytes has at most `limit` characters.
            newline = self._buf.find(b"\n", 0, self.limit)
            if newline < 0:
                head = _char_cut(self._buf, self.limit)  # the first `limit` characters
                newline = self._buf.find(b"\n", 0, head)
                if newline < 0 and head < len(self._buf):
                    pieces.append(self._long_line_chunk(head))
                    continue
                if newline < 0 and not final:
                    break
            pieces.append(self._line_end(newline + 1 if newline >= 0 else len(self._buf)))
        return pieces

    def _whole_short_lines(self) -> list[Piece]:
        """Every complete line at the front of the buffer, in one pass, while
        none is longer than the limit (the common case: the general loop
        below then has only the rest to do)."""
        end = self._buf.rfind(b"\n") + 1
        if end == 0:
            return []
        lines = bytes(self._buf[:end]).split(b"\n")[:-1]
        if max(map(len, lines)) >= self.limit:
            return []
        del self._buf[:end]
        pieces, offset = [], self.offset
        for raw in lines:
            pieces.append(Piece(_decode(raw) + "\n", offset, len(raw) + 1))
            offset += len(raw) + 1
        self.offset = offset
        return pieces

    def _line_end(self, size: int) -> Piece:
        """The last (or only) piece of a line."""
        if self._chunk_index == 0:
            return self._take(size)
        piece = self._take(size, truncated=False, chunk_index=self._chunk_index,
                           total_chunks=self._total or self._chunk_index + 1)
        self._chunk_index, self._total = 0, None
        return piece

    def _long_line_chunk(self, size: int) -> Piece:
        """A non-final chunk of a line longer than the limit."""
        if self._chunk_index == 0:
            self._total = self._count_chunks()
        piece = self._take(size, truncated=True, chunk_index=self._chunk_index,
                           total_chunks=self._total)
        self._chunk_index += 1
        return piece

    def _count_chunks(self) -> int | None:
        """Chunks of the current line, when its end is already buffered."""
        newline = self._buf.find(b"\n")
        if newline < 0:
            return None
        count, rest = 1, memoryview(self._buf)[:newline + 1]
        while (head := _char_cut(rest, self.limit)) < len(rest):
            count, rest = count + 1, rest[head:]
        return count
