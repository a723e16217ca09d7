"""Claude-aware jobs: recognise `claude -p … --output-format stream-json` runs and read them.

Pure code, no I/O and no clock, so all of it is tested without processes:

* `is_claude_job(spec)` decides from an execute spec whether a job is a
  Claude job (the program's basename is `claude` and it prints stream-json,
  or the request said `"claude": true`).
* `LineAssembler` cuts a job's stdout, fed in chunks as they are read, into
  lines with their byte offsets, each parsed as JSON (or marked invalid).
* `ClaudeReader` turns those lines into what clients are told
  (`Notice`s: `claude.event` and the rate/token limit notifications), and
  keeps the summary that goes into `process.completed`.

Limits are recognised only from fields of parsed events (an `api_retry`
with HTTP status 429, a `rate_limit_event`, an assistant message flagged
`"error": "rate_limit"`, a `stop_reason` of `max_tokens`, …), never by
searching raw output: a model answer that quotes an error text is just text.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import shlex
from dataclasses import dataclass
from typing import Any

PROGRAM = "claude"
STREAM_FORMAT = "stream-json"

# Silence after an `api_retry` that is never a stall: the announced delay plus this.
RETRY_QUIET_MARGIN = 10.0  # seconds
MAX_LINE_BYTES = 16 << 20  # a longer line is not assembled: it is reported as invalid
RESULT_CHARS = 65536  # `result` texts in events and summaries are cut to this many characters
ERROR_TEXT_CHARS = 2000  # `error_text` of limit notifications, and `error` of process.completed
DEFAULT_TOKEN_LIMIT = 32000  # `limit` when the CLI names none (as the older handler did)
DEFAULT_RETRY_AFTER = 60  # seconds, for an HTTP 429 without an announced retry delay
USAGE_LIMIT_TEXT = "Claude AI usage limit reached"

EVENT = "claude.event"
RATE_LIMIT = "error.rate_limit_exceeded"
TOKEN_LIMIT = "error.token_limit_exceeded"

USAGE_KEYS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")

_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_RESET_SUFFIX = re.compile(r"\|\s*(\d{9,13})\s*$")
_TOKEN_MAXIMUM = re.compile(r"exceeded the (\d{1,18}) output token maximum")
_SHELL_PUNCTUATION = set("();<>|&")
_ENV_OPTIONS_WITH_VALUE = {"-u", "--unset", "-C", "--chdir", "-S", "--split-string"}


# ---------------------------------------------------------------- detection

def is_claude_job(spec: dict) -> bool:
    """Whether a job (an execute spec as the executor gets it) is a Claude job."""
    if spec.get("claude") is True:
        return True
    if spec.get("argv"):
        return is_claude_argv(list(spec["argv"]))
    command = spec.get("command")
    return isinstance(command, str) and is_claude_command(command)


def is_claude_command(command: str) -> bool:
    """A shell command: does one of its simple commands run `claude` printing stream-json?

    The command is split like the shell would (quotes, `;`, `&&`, `||`,
    `|`, `&`); a claude whose stdout is piped into anything but `tee`
    does not count, since the job's stdout is then another program's.
    """
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: the shell will refuse it anyway
        return False
    commands: list[tuple[list[str], str | None]] = []  # (words, the operator after them)
    words: list[str] = []
    skip_target = False
    for token in tokens:
        if skip_target:
            skip_target = False
            continue
        if token and set(token) <= _SHELL_PUNCTUATION:
            if "<" in token or ">" in token:  # a redirection: skip its target
                skip_target = True
                continue
            commands.append((words, token))
            words = []
            continue
        words.append(token)
    commands.append((words, None))
    for index, (words, operator) in enumerate(commands):
        if not is_claude_argv(words):
            continue
        if operator not in ("|", "|&"):
            return True
        piped_into = program_of(commands[index + 1][0]) if index + 1 < len(commands) else None
        if piped_into is not None and posixpath.basename(piped_into[0]) == "tee":
            return True
    return False


def program_of(words: list[str]) -> list[str] | None:
    """The argv a simple command runs: without leading NAME=value, `env …` and `exec`."""
    i = 0
    while i < len(words) and _ASSIGNMENT.match(words[i]):
        i += 1
    while i < len(words) and (words[i] == "exec" or posixpath.basename(words[i]) == "env"):
        i += 1  # then the wrapper's own NAME=value words and options
        while i < len(words):
            word = words[i]
            if _ASSIGNMENT.match(word):
                i += 1
            elif word == "--":
                i += 1
                break
            elif word.startswith("-"):
                i += 2 if word in _ENV_OPTIONS_WITH_VALUE else 1
            else:
                break
    return words[i:] if i < len(words) else None


def is_claude_argv(argv: list[str]) -> bool:
    """`claude … --output-format stream-json` (or `=stream-json`), possibly behind env."""
    program = program_of(argv)
    if not program or posixpath.basename(program[0]) != PROGRAM:
        return False
    output_format = None
    args = program[1:]
    for i, arg in enumerate(args):
        if arg == "--output-format" and i + 1 < len(args):
            output_format = args[i + 1]
        elif arg.startswith("--output-format="):
            output_format = arg.split("=", 1)[1]
    return output_format == STREAM_FORMAT


# ---------------------------------------------------------------- lines

@dataclass(frozen=True)
class Line:
    """One stdout line: bytes [start, end) of the stream (end is just past its newline)."""

    start: int
    end: int
    value: Any = None  # the parsed JSON
    valid: bool = True  # False: not JSON (or longer than the assembler's limit)


class LineAssembler:
    """Cuts a stream fed in chunks into lines, each parsed as JSON.

    Blank lines are skipped. A line longer than `limit` bytes (its newline
    not counted) is not kept in memory: its bytes are dropped as they come
    and it is yielded as invalid once it ends. The last line may lack its
    newline: `finish()` yields it.
    """

    def __init__(self, limit: int = MAX_LINE_BYTES, offset: int = 0):
        self.limit = limit
        self.fed = offset  # bytes seen so far
        self.start = offset  # where the line being assembled starts
        self.buf = bytearray()
        self.oversize = False

    @property
    def buffered(self) -> int:
        return len(self.buf)

    def feed(self, data: bytes) -> list[Line]:
        lines = []
        pos = 0
        while (newline := data.find(b"\n", pos)) >= 0:
            line = self._complete(data[pos:newline + 1], self.fed + newline + 1)
            if line is not None:
                lines.append(line)
            pos = newline + 1
        rest = data[pos:]
        if rest and not self.oversize:
            if len(self.buf) + len(rest) > self.limit:
                self.oversize, self.buf = True, bytearray()
            else:
                self.buf += rest
        self.fed += len(data)
        return lines

    def finish(self) -> list[Line]:
        """End of stream: the last line, if it had no newline."""
        if not self.buf and not self.oversize:
            return []
        line = self._complete(b"", self.fed)
        return [line] if line is not None else []

    def _complete(self, tail: bytes, end: int) -> Line | None:
        length = len(self.buf) + len(tail) - tail.endswith(b"\n")  # the newline is not counted
        start, oversize = self.start, self.oversize or length > self.limit
        raw = b"" if oversize else (bytes(self.buf) + tail if self.buf else tail)
        self.buf, self.oversize, self.start = bytearray(), False, end
        if oversize:
            return Line(start, end, None, False)
        if not raw.strip():
            return None
        try:
            return Line(start, end, json.loads(raw))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return Line(start, end, None, False)


# ---------------------------------------------------------------- events

@dataclass(frozen=True)
class Notice:
    """A notification for the job's clients, due once stdout up to `stdout_end` is sent."""

    stdout_end: int
    method: str  # EVENT, RATE_LIMIT or TOKEN_LIMIT (protocol.CLAUDE_METHODS)
    params: dict  # without job_id: the handler adds it
    quiet_for: float | None = None  # seconds of silence that are no stall from now on


class ClaudeReader:
    """Follows one Claude job's stdout: its events, limit signals, and final summary."""

    def __init__(self) -> None:
        self.lines = LineAssembler()
        self.session_id: str | None = None
        self.result: dict | None = None  # the summary fields of the last `result` line
        self.invalid_reported = False
        self.alerted: set[str] = set()  # error_types already notified

    @property
    def buffered(self) -> int:
        return self.lines.buffered

    def feed(self, data: bytes) -> list[Notice]:
        return [n for line in self.lines.feed(data) for n in self.read(line)]

    def finish(self) -> list[Notice]:
        return [n for line in self.lines.finish() for n in self.read(line)]

    # -- one line

    def read(self, line: Line) -> list[Notice]:
        out = _Out(line)
        if not line.valid:
            if not self.invalid_reported:
                self.invalid_reported = True
                out.event("invalid_line")
            return out.notices
        event = line.value
        if not isinstance(event, dict):
            return out.notices
        if self.session_id is None and isinstance(event.get("session_id"), str):
            self.session_id = event["session_id"]
        kind, subtype = event.get("type"), event.get("subtype")
        if kind == "system" and subtype == "init":
            self.session_id = _str(event.get("session_id")) or self.session_id
            tools = event.get("tools")
            out.event("init", session_id=self.session_id, model=_str(event.get("model")),
                      tools_count=len(tools) if isinstance(tools, list) else None)
        elif kind == "system" and subtype == "api_retry":
            self.on_api_retry(event, out)
        elif kind == "assistant":
            self.on_assistant(event, out)
        elif kind == "rate_limit_event":
            self.on_rate_limit_event(event, out)
        elif kind == "result":
            self.on_result(event, out)
        return out.notices

    def on_api_retry(self, event: dict, out: "_Out") -> None:
        delay = _num(event.get("retry_delay_ms"))
        delay_ms = round(delay) if delay is not None and delay >= 0 else None
        status, error = _int(event.get("error_status")), _str(event.get("error"))
        quiet = delay_ms / 1000 + RETRY_QUIET_MARGIN if delay_ms is not None else None
        out.event("api_retry", quiet_for=quiet, attempt=_int(event.get("attempt")),
                  max_retries=_int(event.get("max_retries")), retry_delay_ms=delay_ms,
                  error=error, error_status=status)
        if status == 429 or error == "rate_limit":
            text = f"API retry {event.get('attempt')}/{event.get('max_retries')}: {error} (HTTP {status})"
            retry_after = math.ceil(delay_ms / 1000) if delay_ms is not None else DEFAULT_RETRY_AFTER
            self.rate_limited(out, "rate_limit_429", text, retry_after=retry_after)

    def on_assistant(self, event: dict, out: "_Out") -> None:
        message = event.get("message") if isinstance(event.get("message"), dict) else {}
        content = message.get("content") if isinstance(message.get("content"), list) else []
        for block in content:
            if isinstance(block, dict) and block.get("type") == "tool_use":
                out.event("tool_use", name=_str(block.get("name")), id=_str(block.get("id")))
        error = event.get("error")
        text = "".join(b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str))
        if error == "rate_limit":
            self.limit_text(out, text, status=None)
        if message.get("stop_reason") == "max_tokens" or error == "max_output_tokens":
            usage = message.get("usage") if isinstance(message.get("usage"), dict) else {}
            limit = _token_maximum(text) or (_int(usage.get("output_tokens")) if error is None else None)
            self.token_limited(out, text or "stop_reason: max_tokens", limit)

    def on_rate_limit_event(self, event: dict, out: "_Out") -> None:
        info = event.get("rate_limit_info")
        if not isinstance(info, dict) or info.get("status") != "rejected":
            return
        reset = _timestamp(info.get("resetsAt"))
        text = json.dumps(info, separators=(",", ":"), ensure_ascii=False)
        self.rate_limited(out, "usage_limit", text, reset=reset)

    def on_result(self, event: dict, out: "_Out") -> None:
        self.session_id = _str(event.get("session_id")) or self.session_id
        self.result = {"is_error": _bool(event.get("is_error")), "result": _result_text(event),
                       "subtype": _str(event.get("subtype")), "duration_ms": _num(event.get("duration_ms")),
                       "total_cost_usd": _num(event.get("total_cost_usd")), "num_turns": _int(event.get("num_turns"))}
        usage = event.get("usage") if isinstance(event.get("usage"), dict) else {}
        out.event("result", **self.result, usage={k: _int(usage.get(k)) for k in USAGE_KEYS})
        text = _str(event.get("result")) or ""
        if event.get("api_error_status") == 429 or (event.get("is_error") is True and text.startswith(USAGE_LIMIT_TEXT)):
            self.limit_text(out, text, status=event.get("api_error_status"))
        if event.get("stop_reason") == "max_tokens" or event.get("subtype") == "error_max_tokens":
            self.token_limited(out, text or f"result: {event.get('subtype')}",
                               _token_maximum(text) or _max_output_tokens(event))

    # -- limit notifications, once per job and error_type

    def limit_text(self, out: "_Out", text: str, status: Any) -> None:
        """A rate-limit error given as text: "Claude AI usage limit reached|<ts>" or a 429."""
        if text.startswith(USAGE_LIMIT_TEXT):
            match = _RESET_SUFFIX.search(text)
            self.rate_limited(out, "usage_limit", text, reset=_timestamp(int(match.group(1))) if match else None)
        else:
            self.rate_limited(out, "rate_limit_429", text or f"HTTP {status}", retry_after=DEFAULT_RETRY_AFTER)

    def rate_limited(self, out: "_Out", error_type: str, text: str, reset: int | None = None,
                     retry_after: int | None = None) -> None:
        if error_type in self.alerted:
            return
        self.alerted.add(error_type)
        usage = error_type == "usage_limit"
        out.notices.append(Notice(out.line.end, RATE_LIMIT, {
            "session_id": self.session_id, "error_type": error_type,
            "message": USAGE_LIMIT_TEXT if usage else "HTTP 429 Too Many Requests",
            "reset_timestamp": reset, "error_text": _cut(text, ERROR_TEXT_CHARS),
            "recoverable": not usage, "retry_after": None if usage else retry_after}))

    def token_limited(self, out: "_Out", text: str, limit: int | None) -> None:
        if "token_limit" in self.alerted:
            return
        self.alerted.add("token_limit")
        limit = limit or DEFAULT_TOKEN_LIMIT
        out.notices.append(Notice(out.line.end, TOKEN_LIMIT, {
            "session_id": self.session_id, "error_type": "token_limit", "limit": limit,
            "message": f"Claude's output exceeded {limit} token limit",
            "suggestion": "Retry with a more concise prompt or specify word/token limits",
            "error_text": _cut(text, ERROR_TEXT_CHARS), "recoverable": True}))

    # -- the end

    def summary(self) -> dict:
        """`process.completed`'s `claude` object."""
        result = self.result or {}
        return {"session_id": self.session_id, "is_error": result.get("is_error"), "result": result.get("result"),
                "total_cost_usd": result.get("total_cost_usd"), "duration_ms": result.get("duration_ms"),
                "num_turns": result.get("num_turns")}

    def error(self) -> str | None:
        """Why the run failed, when the CLI said it did (`is_error: true`)."""
        result = self.result
        if not result or result.get("is_error") is not True:
            return None
        text = result.get("result")
        return _cut(text, ERROR_TEXT_CHARS) if text else f"Claude reported an error ({result.get('subtype')})"


class _Out:
    """The notices one line gives."""

    def __init__(self, line: Line):
        self.line = line
        self.notices: list[Notice] = []

    def event(self, kind: str, quiet_for: float | None = None, **fields: Any) -> None:
        params = {"kind": kind, "offset": self.line.start, **fields}
        self.notices.append(Notice(self.line.end, EVENT, params, quiet_for))


# ---------------------------------------------------------------- field readers

def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _num(value: Any) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return value if math.isfinite(value) else None
    except OverflowError:  # an integer past any float: JSON allows it, nothing reads it as a number
        return None


def _int(value: Any) -> int | None:
    value = _num(value)
    return int(value) if value is not None and value == int(value) else None


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit]


def _result_text(result: dict) -> str | None:
    text = _str(result.get("result"))
    return _cut(text, RESULT_CHARS) if text is not None else None


def _timestamp(value: Any) -> int | None:
    """A Unix time in seconds (one given in milliseconds is converted)."""
    value = _num(value)
    if value is None or value <= 0:
        return None
    return int(value // 1000) if value >= 1e11 else int(value)


def _token_maximum(text: str) -> int | None:
    match = _TOKEN_MAXIMUM.search(text)
    return int(match.group(1)) if match else None


def _max_output_tokens(result: dict) -> int | None:
    models = result.get("modelUsage")
    if isinstance(models, dict):
        for usage in models.values():
            if isinstance(usage, dict) and _int(usage.get("maxOutputTokens")):
                return _int(usage["maxOutputTokens"])
    usage = result.get("usage")
    return _int(usage.get("output_tokens")) if isinstance(usage, dict) else None
