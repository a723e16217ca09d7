"""Claude-aware jobs: `claude … --output-format stream-json` runs are read as they go.

Such a job's stdout still flows as `process.output`; besides, its clients get
`claude.event` notifications (init, api_retry, tool_use, result, invalid_line),
the older handler's `error.rate_limit_exceeded` / `error.token_limit_exceeded`
notifications, each only after the output of the line it came from, and a
`claude` summary in `process.completed`. An `api_retry` delay is no stall.
"""

from __future__ import annotations

import json
import os
import shlex
import signal

import pytest

from ccexec import claude
from ccexec.claude import ClaudeReader, LineAssembler, is_claude_command, is_claude_job
from ccexec.client import NOTIFICATIONS_KEPT, Client
from ccexec.protocol import ProtocolError, Request, parse_execute
from support import async_test
from wire import Wire

CLAUDE = 'claude -p "What is 2+2?" --output-format stream-json --verbose'

# ------------------------------------------------------------------ recorded CLI output
# Lines printed by the real CLI (2.1.197), copied from its recordings.

NOT_LOGGED_IN_INIT = (
    '{"type":"system","subtype":"init","cwd":"/srv/work","session_id":"bd56247d-c2bd-4cb7-abf'
    'e-30a11875b04f","tools":["Task","Bash","CronCreate","CronDelete","CronList","DesignSync"'
    ',"Edit","EnterWorktree","ExitWorktree","NotebookEdit","Read","ReportFindings","ScheduleW'
    'akeup","SendMessage","Skill","TaskCreate","TaskGet","TaskList","TaskOutput","TaskStop","'
    'TaskUpdate","ToolSearch","WebFetch","WebSearch","Workflow","Write"],"mcp_servers":[],"mo'
    'del":"claude-opus-4-8[1m]","permissionMode":"default","slash_commands":["deep-research",'
    '"design-sync","update-config","verify","debug","code-review","simplify","batch","fewer-p'
    'ermission-prompts","loop","claude-api","run","run-skill-generator","clear","compact","co'
    'nfig","context","heapdump","init","reload-skills","review","security-review","usage","in'
    'sights","goal","team-onboarding"],"apiKeySource":"none","claude_code_version":"2.1.197",'
    '"output_style":"default","agents":["claude","Explore","general-purpose","Plan","statusli'
    'ne-setup"],"skills":["deep-research","design-sync","update-config","verify","debug","cod'
    'e-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-s'
    'kill-generator"],"plugins":[],"analytics_disabled":false,"product_feedback_disabled":fal'
    'se,"uuid":"9f8085ea-bf50-4c96-9788-5cc8229ce3a9","memory_paths":{"auto":"/home/ccexec/.c'
    'laude/projects/-srv-work/memory/"},"fast_mode_state":"off"}'
)

NOT_LOGGED_IN_ASSISTANT = (
    '{"type":"assistant","message":{"id":"90e86564-8f53-4af9-adad-c93ceca8c1f7","container":n'
    'ull,"model":"<synthetic>","role":"assistant","stop_details":null,"stop_reason":"stop_seq'
    'uence","stop_sequence":"","type":"message","usage":{"input_tokens":0,"output_tokens":0,"'
    'cache_creation_input_tokens":0,"cache_read_input_tokens":0,"server_tool_use":{"web_searc'
    'h_requests":0,"web_fetch_requests":0},"service_tier":null,"cache_creation":{"ephemeral_1'
    'h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":null,"iterations":null,'
    '"speed":null},"content":[{"type":"text","text":"Not logged in · Please run /login"}],"co'
    'ntext_management":null},"parent_tool_use_id":null,"session_id":"bd56247d-c2bd-4cb7-abfe-'
    '30a11875b04f","uuid":"4e6af17e-7e7b-48c6-8ef3-51a8794a06d8","error":"authentication_fail'
    'ed"}'
)

NOT_LOGGED_IN_RESULT = (
    '{"type":"result","subtype":"success","is_error":true,"api_error_status":null,"duration_m'
    's":250,"duration_api_ms":0,"num_turns":1,"result":"Not logged in · Please run /login","s'
    'top_reason":"stop_sequence","session_id":"bd56247d-c2bd-4cb7-abfe-30a11875b04f","total_c'
    'ost_usd":0,"usage":{"input_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_t'
    'okens":0,"output_tokens":0,"server_tool_use":{"web_search_requests":0,"web_fetch_request'
    's":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemer'
    'al_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard"},"modelUsag'
    'e":{},"permission_denials":[],"terminal_reason":"completed","fast_mode_state":"off","uui'
    'd":"ed6f4c2d-7ee5-433b-b747-8fab7eac53ee"}'
)

RETRY_1 = (
    '{"type":"system","subtype":"api_retry","attempt":1,"max_retries":10,"retry_delay_ms":581'
    '.609249273934,"error_status":null,"error":"unknown","session_id":"c4064f3a-4954-41e1-aa1'
    'c-6329432622bf","uuid":"92b2826f-eb70-4eae-b5fe-035075354daf"}'
)

RETRY_10 = (
    '{"type":"system","subtype":"api_retry","attempt":10,"max_retries":10,"retry_delay_ms":35'
    '984.10623545798,"error_status":null,"error":"unknown","session_id":"c4064f3a-4954-41e1-a'
    'a1c-6329432622bf","uuid":"51421688-1ac6-4d3f-8c47-82e1fdcf3e16"}'
)

UNREACHABLE_ASSISTANT = (
    '{"type":"assistant","message":{"id":"ae14dff7-8277-4262-9d0a-78421cc83d07","container":n'
    'ull,"model":"<synthetic>","role":"assistant","stop_details":null,"stop_reason":"stop_seq'
    'uence","stop_sequence":"","type":"message","usage":{"input_tokens":0,"output_tokens":0,"'
    'cache_creation_input_tokens":0,"cache_read_input_tokens":0,"server_tool_use":{"web_searc'
    'h_requests":0,"web_fetch_requests":0},"service_tier":null,"cache_creation":{"ephemeral_1'
    'h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":null,"iterations":null,'
    '"speed":null},"content":[{"type":"text","text":"API Error: Unable to connect to API (Con'
    'nectionRefused)"}],"context_management":null},"parent_tool_use_id":null,"session_id":"c4'
    '064f3a-4954-41e1-aa1c-6329432622bf","uuid":"60d217fe-49be-49d4-bc53-9c902ff861e7","error'
    '":"server_error"}'
)

UNREACHABLE_RESULT = (
    '{"type":"result","subtype":"success","is_error":true,"api_error_status":null,"duration_m'
    's":174258,"duration_api_ms":0,"num_turns":1,"result":"API Error: Unable to connect to AP'
    'I (ConnectionRefused)","stop_reason":"stop_sequence","session_id":"c4064f3a-4954-41e1-aa'
    '1c-6329432622bf","total_cost_usd":0,"usage":{"input_tokens":0,"cache_creation_input_toke'
    'ns":0,"cache_read_input_tokens":0,"output_tokens":0,"server_tool_use":{"web_search_reque'
    'sts":0,"web_fetch_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h'
    '_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"spee'
    'd":"standard"},"modelUsage":{},"permission_denials":[],"terminal_reason":"completed","fa'
    'st_mode_state":"off","uuid":"16453580-5d1e-4d13-ac36-99c3774429a2"}'
)

NOT_LOGGED_IN = [NOT_LOGGED_IN_INIT, NOT_LOGGED_IN_ASSISTANT, NOT_LOGGED_IN_RESULT]
UNREACHABLE = [RETRY_1, RETRY_10, UNREACHABLE_ASSISTANT, UNREACHABLE_RESULT]


def stream(*lines: str | dict) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def read_all(data: bytes, chunk: int = 7) -> tuple[ClaudeReader, list[claude.Notice]]:
    reader = ClaudeReader()
    notices = [n for i in range(0, len(data), chunk) for n in reader.feed(data[i:i + chunk])]
    return reader, notices + reader.finish()


def events(notices: list[claude.Notice]) -> list[dict]:
    return [n.params for n in notices if n.method == "claude.event"]


def line_ends(data: bytes) -> list[int]:
    return [i + 1 for i, byte in enumerate(data) if byte == ord("\n")]


# ------------------------------------------------------------------ detection


@pytest.mark.parametrize("command", [
    CLAUDE,
    'FAKE_X=1 claude -p "x" --output-format stream-json --verbose',
    "env A=b /usr/bin/claude -p hi --output-format stream-json --verbose",
    "claude -p hi --output-format=stream-json --verbose",
    "env -u HOME claude -p hi --verbose --output-format stream-json",
    f"cd /tmp && {CLAUDE} 2>&1",
    f"exec {CLAUDE}",
    f"{CLAUDE} | tee run.log",
])
def test_claude_printing_stream_json_is_a_claude_job(command):
    assert is_claude_command(command)
    assert is_claude_job({"command": command})


@pytest.mark.parametrize("command", [
    "claude -p hi --output-format json",
    "claude -p hi --output-format text",
    "claude -p hi --verbose",
    "echo '{\"type\":\"result\"}'",
    "echo claude -p hi --output-format stream-json",
    "/opt/claudette -p hi --output-format stream-json",
    f"{CLAUDE} | jq .",  # the job's stdout is jq's
    'claude -p "unbalanced --output-format stream-json',
    'claude -p "--output-format stream-json"',  # a prompt, not the option
])
def test_other_commands_are_not_claude_jobs(command):
    assert not is_claude_command(command)
    assert not is_claude_job({"command": command})


def test_argv_is_detected_without_a_shell():
    assert is_claude_job({"argv": ["env", "A=b", "/usr/bin/claude", "-p", "x", "--output-format", "stream-json"]})
    assert is_claude_job({"argv": ["claude", "--output-format=stream-json", "-p", "x"]})
    assert not is_claude_job({"argv": ["claude", "-p", "x", "--output-format", "json"]})
    assert not is_claude_job({"argv": ["python3", "claude", "--output-format", "stream-json"]})


def _execute(**params) -> Request:
    return Request("execute", params, 1, True)


def test_claude_true_in_the_request_makes_any_job_a_claude_job():
    spec = parse_execute(_execute(command="cat run.jsonl", claude=True))
    assert spec.claude and spec.to_dict()["claude"] is True
    assert is_claude_job(spec.to_dict())
    undecided = parse_execute(_execute(command="cat run.jsonl", claude=False)).to_dict()
    assert "claude" not in undecided and not is_claude_job(undecided)  # false: detection decides
    assert is_claude_job(parse_execute(_execute(command=CLAUDE, claude=False)).to_dict())
    with pytest.raises(ProtocolError) as info:
        parse_execute(_execute(command="true", claude="yes"))
    assert info.value.data == {"param": "claude"}


# ------------------------------------------------------------------ the line assembler


def test_lines_come_whole_with_their_offsets_however_the_stream_is_cut():
    data = stream(*NOT_LOGGED_IN) + b"\n" + stream({"type": "x", "text": "h\u00e9llo"})
    ends = line_ends(data)
    for chunk in (1, 2, 3, 64, 1000, len(data)):
        assembler = LineAssembler()
        lines = [line for i in range(0, len(data), chunk) for line in assembler.feed(data[i:i + chunk])]
        assert lines + assembler.finish() == lines
        assert [(line.start, line.end) for line in lines] == [(0, ends[0]), (ends[0], ends[1]), (ends[1], ends[2]),
                                                              (ends[3], ends[4])]  # the blank line is skipped
        assert [line.value["type"] for line in lines] == ["system", "assistant", "result", "x"]
        assert lines[-1].value["text"] == "h\u00e9llo"


def test_a_last_line_without_newline_comes_at_the_end():
    assembler = LineAssembler()
    assert [line.value for line in assembler.feed(b'{"a":1}\n{"b":')] == [{"a": 1}]
    assert assembler.feed(b"2}") == []
    (last,) = assembler.finish()
    assert (last.start, last.end, last.value, last.valid) == (8, 15, {"b": 2}, True)
    assert assembler.finish() == []


def test_a_line_that_is_not_json_is_invalid_and_the_next_is_read():
    assembler = LineAssembler()
    lines = assembler.feed(b'{"type":"assistant","message":{"content":[{"ty\n\xff\xfe\n{"ok":true}\n')
    assert [(line.start, line.valid) for line in lines] == [(0, False), (47, False), (50, True)]
    assert lines[2].value == {"ok": True}


def test_a_line_over_the_limit_is_dropped_as_it_comes_and_reported_invalid():
    assembler = LineAssembler(limit=100)
    for _ in range(50):
        assert assembler.feed(b"x" * 30) == []
        assert assembler.buffered <= 100  # memory stays bounded
    (long_line, short) = assembler.feed(b'x"\n{"n":1}\n')
    assert (long_line.start, long_line.end, long_line.valid) == (0, 1503, False)
    assert (short.start, short.value) == (1503, {"n": 1})
    exact = LineAssembler(limit=10).feed(b'"12345678"\n')  # 10 bytes before the newline: fine
    assert exact[0].value == "12345678"
    assert not LineAssembler(limit=10).feed(b'"123456789"\n')[0].valid


# ------------------------------------------------------------------ events from recorded output


def test_a_recorded_not_logged_in_run_gives_init_and_result_and_its_summary():
    data = stream(*NOT_LOGGED_IN)
    reader, notices = read_all(data)
    ends = line_ends(data)
    assert [(n.method, n.stdout_end) for n in notices] == [("claude.event", ends[0]), ("claude.event", ends[2])]
    init, result = events(notices)
    session = "bd56247d-c2bd-4cb7-abfe-30a11875b04f"
    assert init == {"kind": "init", "offset": 0, "session_id": session, "model": "claude-opus-4-8[1m]",
                    "tools_count": 26}
    assert result == {"kind": "result", "offset": ends[1], "is_error": True,
                      "result": "Not logged in \u00b7 Please run /login", "subtype": "success",
                      "duration_ms": 250, "total_cost_usd": 0, "num_turns": 1,
                      "usage": {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
                                "cache_read_input_tokens": 0}}
    assert reader.summary() == {"session_id": session, "is_error": True,
                                "result": "Not logged in \u00b7 Please run /login", "total_cost_usd": 0,
                                "duration_ms": 250, "num_turns": 1}
    assert reader.error() == "Not logged in \u00b7 Please run /login"


def test_recorded_api_retries_give_their_delays_and_quiet_periods():
    reader, notices = read_all(stream(*UNREACHABLE))
    retries = [n for n in notices if n.params["kind"] == "api_retry"]
    assert [n.params for n in retries] == [
        {"kind": "api_retry", "offset": 0, "attempt": 1, "max_retries": 10, "retry_delay_ms": 582,
         "error": "unknown", "error_status": None},
        {"kind": "api_retry", "offset": len(RETRY_1) + 1, "attempt": 10, "max_retries": 10,
         "retry_delay_ms": 35984, "error": "unknown", "error_status": None}]
    assert [n.quiet_for for n in retries] == [0.582 + claude.RETRY_QUIET_MARGIN, 35.984 + claude.RETRY_QUIET_MARGIN]
    assert [n.method for n in notices] == ["claude.event"] * 3  # an unreachable API is no rate limit
    assert reader.summary()["is_error"] is True
    assert reader.error() == "API Error: Unable to connect to API (ConnectionRefused)"
    assert reader.summary()["session_id"] == "c4064f3a-4954-41e1-aa1c-6329432622bf"  # no init line: from the events


def test_a_run_without_a_result_line_has_a_summary_of_nulls():
    reader, _ = read_all(stream(NOT_LOGGED_IN_INIT))
    assert reader.summary() == {"session_id": "bd56247d-c2bd-4cb7-abfe-30a11875b04f", "is_error": None,
                                "result": None, "total_cost_usd": None, "duration_ms": None, "num_turns": None}
    assert reader.error() is None
    assert ClaudeReader().summary()["session_id"] is None


def test_tool_use_blocks_are_named_with_their_ids():
    line = {"type": "assistant", "session_id": "s", "message": {"stop_reason": "tool_use", "content": [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_01abc", "name": "Bash", "input": {"command": "ls"}},
        {"type": "tool_use", "id": "toolu_01def", "name": "Read", "input": {"file_path": "/x"}}]}}
    _, notices = read_all(stream(line))
    assert events(notices) == [{"kind": "tool_use", "offset": 0, "name": "Bash", "id": "toolu_01abc"},
                               {"kind": "tool_use", "offset": 0, "name": "Read", "id": "toolu_01def"}]


def test_only_the_first_invalid_line_of_a_job_is_reported():
    data = b'{"type":"x"}\nnot json\n{"type":"y"}\nnor this\n'
    _, notices = read_all(data)
    assert events(notices) == [{"kind": "invalid_line", "offset": 13}]
    assert notices[0].stdout_end == 22


def test_each_notice_is_due_at_the_end_of_its_own_line():
    data = stream(*NOT_LOGGED_IN, *UNREACHABLE, "garbage")
    _, notices = read_all(data, chunk=100)
    ends = line_ends(data)
    for notice in notices:
        start = notice.params["offset"]
        assert notice.stdout_end == min(end for end in ends if end > start)


# ------------------------------------------------------------------ rate and token limits

SESSION = "0b6e9d43-1c53-4b43-8c5a-8d3c6f2a1e11"
INIT = {"type": "system", "subtype": "init", "session_id": SESSION, "model": "claude-sonnet-4-6", "tools": []}


def limit_notices(*lines: dict) -> list[claude.Notice]:
    return [n for n in read_all(stream(INIT, *lines))[1] if n.method != "claude.event"]


def test_a_rejected_rate_limit_event_is_a_usage_limit_with_its_reset_time():
    (notice,) = limit_notices({"type": "rate_limit_event", "session_id": SESSION, "rate_limit_info": {
        "status": "rejected", "resetsAt": 1900000000, "rateLimitType": "five_hour"}})
    assert notice.method == "error.rate_limit_exceeded"
    params = dict(notice.params)
    assert json.loads(params.pop("error_text"))["resetsAt"] == 1900000000
    assert params == {"session_id": SESSION, "error_type": "usage_limit", "message": "Claude AI usage limit reached",
                      "reset_timestamp": 1900000000, "recoverable": False, "retry_after": None}
    assert not limit_notices({"type": "rate_limit_event", "rate_limit_info": {"status": "allowed",
                                                                               "resetsAt": 1900000000}})


def test_usage_limit_text_of_a_failed_result_gives_the_reset_time_once_per_job():
    notices = limit_notices(
        {"type": "assistant", "error": "rate_limit", "session_id": SESSION, "message": {
            "stop_reason": "stop_sequence", "content": [{"type": "text", "text": "Claude AI usage limit reached|1900003600"}]}},
        {"type": "result", "subtype": "success", "is_error": True, "api_error_status": 429,
         "result": "Claude AI usage limit reached|1900003600", "session_id": SESSION})
    assert [(n.method, n.params["error_type"], n.params["reset_timestamp"]) for n in notices] == [
        ("error.rate_limit_exceeded", "usage_limit", 1900003600)]
    assert notices[0].params["error_text"] == "Claude AI usage limit reached|1900003600"


def test_an_http_429_retry_is_a_recoverable_rate_limit_with_retry_after():
    (notice,) = limit_notices(
        {"type": "system", "subtype": "api_retry", "attempt": 2, "max_retries": 10, "retry_delay_ms": 4200.5,
         "error_status": 429, "error": "rate_limit", "session_id": SESSION},
        {"type": "system", "subtype": "api_retry", "attempt": 3, "max_retries": 10, "retry_delay_ms": 9000,
         "error_status": 429, "error": "rate_limit", "session_id": SESSION})
    assert {k: notice.params[k] for k in ("error_type", "recoverable", "retry_after", "reset_timestamp",
                                          "message", "session_id")} == {
        "error_type": "rate_limit_429", "recoverable": True, "retry_after": 5, "reset_timestamp": None,
        "message": "HTTP 429 Too Many Requests", "session_id": SESSION}


def test_a_result_with_api_error_status_429_is_a_rate_limit():
    (notice,) = limit_notices({"type": "result", "subtype": "success", "is_error": True, "api_error_status": 429,
                               "result": "API Error: 429 rate_limit_error", "session_id": SESSION})
    assert (notice.params["error_type"], notice.params["retry_after"]) == ("rate_limit_429", 60)


def test_limit_texts_inside_an_answer_are_just_text():
    quoted = "The CLI prints 'Claude AI usage limit reached|1900000000' and HTTP 429 when limited."
    assert not limit_notices(
        {"type": "assistant", "session_id": SESSION, "message": {"stop_reason": "end_turn",
                                                                 "content": [{"type": "text", "text": quoted}]}},
        {"type": "result", "subtype": "success", "is_error": False, "result": quoted, "session_id": SESSION})


def test_max_tokens_is_a_token_limit_once_with_the_limit_reached():
    notices = limit_notices(
        {"type": "assistant", "session_id": SESSION, "message": {
            "stop_reason": "max_tokens", "usage": {"output_tokens": 32000},
            "content": [{"type": "text", "text": "lorem ipsum"}]}},
        {"type": "assistant", "error": "max_output_tokens", "session_id": SESSION, "message": {
            "stop_reason": "stop_sequence", "content": [{"type": "text", "text": (
                "API Error: Claude's response exceeded the 32000 output token maximum. To configure this "
                "behavior, set the CLAUDE_CODE_MAX_OUTPUT_TOKENS environment variable.")}]}})
    (notice,) = notices
    assert notice.method == "error.token_limit_exceeded"
    assert notice.params == {
        "session_id": SESSION, "error_type": "token_limit", "limit": 32000,
        "message": "Claude's output exceeded 32000 token limit",
        "suggestion": "Retry with a more concise prompt or specify word/token limits",
        "error_text": "lorem ipsum", "recoverable": True}


def test_a_synthetic_max_output_tokens_message_names_its_limit():
    (notice,) = limit_notices({"type": "assistant", "error": "max_output_tokens", "message": {"content": [
        {"type": "text", "text": "API Error: Claude's response exceeded the 64000 output token maximum."}]}})
    assert notice.params["limit"] == 64000


def test_an_error_max_tokens_result_is_a_token_limit():
    (notice,) = limit_notices({"type": "result", "subtype": "error_max_tokens", "is_error": True,
                               "session_id": SESSION, "modelUsage": {"claude-sonnet-4-6": {"maxOutputTokens": 64000}}})
    assert (notice.method, notice.params["limit"]) == ("error.token_limit_exceeded", 64000)


# ------------------------------------------------------------------ end to end


def of_method(wire: Wire, job_id: str, method: str) -> list[dict]:
    return [m["params"] for m in wire.of_job(job_id) if m.get("method") == method]


def claude_events(wire: Wire, job_id: str, kind: str | None = None) -> list[dict]:
    return [e for e in of_method(wire, job_id, "claude.event") if kind is None or e["kind"] == kind]


def output_lines(wire: Wire, job_id: str) -> list[tuple[int, str]]:
    """(offset, text) of each stdout line, its chunks joined."""
    lines, start, text = [], 0, ""
    for piece in wire.outputs(job_id):
        if not text:
            start = piece["offset"]
        text += piece["data"]
        if text.endswith("\n"):
            lines.append((start, text))
            text = ""
    return lines + ([(start, text)] if text else [])


def assert_each_event_follows_its_line(wire: Wire, job_id: str) -> int:
    """Every claude.event comes after the process.output that ends its line (any stream_mode)."""
    messages = wire.of_job(job_id)
    stdout = wire.text(job_id).encode()
    checked = 0
    for index, message in enumerate(messages):
        if message.get("method") != "claude.event":
            continue
        newline = stdout.find(b"\n", message["params"]["offset"])
        line_end = newline + 1 if newline >= 0 else len(stdout)
        last_piece = next(i for i, m in enumerate(messages) if m.get("method") == "process.output"
                          and m["params"]["type"] == "stdout"
                          and m["params"]["offset"] + m["params"]["size"] >= line_end)
        assert index > last_piece, (message, messages[last_piece])
        checked += 1
    return checked


@async_test(60)
async def test_a_successful_run_reports_init_and_result_and_sums_up_in_completed(daemon):
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(30, command=CLAUDE)
    job_id = completed["job_id"]
    (init,) = claude_events(wire, job_id, "init")
    (result,) = claude_events(wire, job_id, "result")
    init_line = json.loads(output_lines(wire, job_id)[0][1])
    assert init == {"kind": "init", "offset": 0, "session_id": init_line["session_id"],
                    "model": init_line["model"], "tools_count": len(init_line["tools"]), "job_id": job_id}
    assert (result["is_error"], result["result"], result["subtype"], result["num_turns"]) == (False, "4", "success", 1)
    assert result["total_cost_usd"] > 0 and result["duration_ms"] >= 0 and result["usage"]["output_tokens"] > 0
    assert (completed["exit_code"], completed["status"], completed["error"]) == (0, "completed", None)
    assert completed["claude"] == {"session_id": init_line["session_id"], "is_error": False, "result": "4",
                                   "total_cost_usd": result["total_cost_usd"], "duration_ms": result["duration_ms"],
                                   "num_turns": 1}
    assert assert_each_event_follows_its_line(wire, job_id) == 2
    await wire.close()


@async_test(60)
async def test_a_tool_call_is_reported_with_the_tool_name(daemon):
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(30, command=CLAUDE, env={"FAKE_CLAUDE_SCENARIO": "tool_use"})
    job_id = completed["job_id"]
    (tool,) = claude_events(wire, job_id, "tool_use")
    call = json.loads(dict(output_lines(wire, job_id))[tool["offset"]])["message"]["content"][0]
    assert (tool["name"], tool["id"]) == ("Bash", call["id"]) and tool["id"].startswith("toolu_")
    assert [e["kind"] for e in claude_events(wire, job_id)] == ["init", "tool_use", "result"]
    assert completed["claude"]["num_turns"] == 2 and completed["claude"]["is_error"] is False
    assert_each_event_follows_its_line(wire, job_id)
    await wire.close()


@async_test(90)
async def test_api_retry_waits_longer_than_stall_timeout_are_not_stalls(daemon):
    # Delays of ~3.4 s and ~8 s (scale 6.5) against a stall_timeout of 3 s, silent in between.
    wire = await Wire.open(daemon.url)
    env = {"FAKE_CLAUDE_SCENARIO": "api_retry", "FAKE_CLAUDE_RETRIES": "2", "FAKE_CLAUDE_RETRY_SCALE": "6.5"}
    _, completed = await wire.run(60, command=CLAUDE, env=env, stall_timeout=3)
    job_id = completed["job_id"]
    assert (completed["reason"], completed["exit_code"]) == ("exit", 1), completed
    assert completed["execution_time"] >= 11
    retries = claude_events(wire, job_id, "api_retry")
    printed = {offset: json.loads(text) for offset, text in output_lines(wire, job_id)}
    assert [(r["attempt"], r["max_retries"], r["retry_delay_ms"]) for r in retries] == [
        (printed[r["offset"]]["attempt"], 2, round(printed[r["offset"]]["retry_delay_ms"])) for r in retries]
    assert [r["attempt"] for r in retries] == [1, 2] and retries[1]["retry_delay_ms"] > 7500
    assert completed["claude"]["is_error"] is True
    assert completed["error"] == "API Error: Unable to connect to API (ConnectionRefused)"
    assert not of_method(wire, job_id, "error.rate_limit_exceeded")  # no 429 among them
    assert_each_event_follows_its_line(wire, job_id)
    await wire.close()


@async_test(60)
async def test_silence_after_a_retry_wait_and_its_margin_is_a_stall_again(daemon):
    retry = json.dumps({"type": "system", "subtype": "api_retry", "attempt": 1, "max_retries": 10,
                        "retry_delay_ms": 500, "error_status": None, "error": "unknown"})
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(40, command=f"echo {shlex.quote(retry)}; sleep 3600", claude=True, stall_timeout=2)
    assert (completed["reason"], completed["status"]) == ("stalled", "failed"), completed
    assert completed["execution_time"] >= 0.5 + claude.RETRY_QUIET_MARGIN + 2 - 0.2
    assert claude_events(wire, completed["job_id"], "api_retry")[0]["retry_delay_ms"] == 500
    await wire.close()


@async_test(60)
async def test_a_usage_limit_is_reported_once_with_its_reset_time(daemon):
    wire = await Wire.open(daemon.url)
    env = {"FAKE_CLAUDE_SCENARIO": "usage_limit", "FAKE_CLAUDE_RESET_AT": "1900000000"}
    _, completed = await wire.run(30, command=CLAUDE, env=env)
    job_id = completed["job_id"]
    (limit,) = of_method(wire, job_id, "error.rate_limit_exceeded")
    session = claude_events(wire, job_id, "init")[0]["session_id"]
    assert {k: limit[k] for k in ("session_id", "error_type", "reset_timestamp", "recoverable", "job_id")} == {
        "session_id": session, "error_type": "usage_limit", "reset_timestamp": 1900000000, "recoverable": False,
        "job_id": job_id}
    assert limit["message"] == "Claude AI usage limit reached" and limit["retry_after"] is None
    # after the output of the rate_limit_event line that told it
    messages = wire.of_job(job_id)
    told = next(i for i, m in enumerate(messages) if m.get("method") == "process.output"
                and '"rate_limit_event"' in m["params"]["data"])
    assert messages.index(next(m for m in messages if m.get("method") == "error.rate_limit_exceeded")) > told
    assert completed["error"] == "Claude AI usage limit reached|1900000000"
    assert completed["claude"]["is_error"] is True
    await wire.close()


@async_test(60)
async def test_an_error_result_with_exit_status_0_still_fails_in_completed_error(daemon):
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(30, command=f"FAKE_CLAUDE_SCENARIO=error_exit0 {CLAUDE}")
    assert (completed["exit_code"], completed["reason"]) == (0, "exit")
    assert completed["claude"]["is_error"] is True
    assert completed["error"].startswith("API Error: 500")
    assert completed["error"] == completed["claude"]["result"]
    await wire.close()


@async_test(60)
async def test_a_corrupt_line_is_reported_once_at_its_offset(daemon):
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(30, command=CLAUDE, env={"FAKE_CLAUDE_SCENARIO": "corrupt_line"})
    job_id = completed["job_id"]
    (invalid,) = claude_events(wire, job_id, "invalid_line")
    lines = output_lines(wire, job_id)
    corrupt = [offset for offset, text in lines if not _parses(text)]
    assert corrupt == [lines[1][0]] and invalid == {"kind": "invalid_line", "offset": lines[1][0], "job_id": job_id}
    assert completed["claude"]["result"] == "4"  # the lines after it are read
    assert assert_each_event_follows_its_line(wire, job_id) == 3
    await wire.close()


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("stream_mode", ["lines", "chunks"])
@async_test(90)
async def test_every_event_arrives_after_the_output_of_its_line(daemon, stream_mode):
    wire = await Wire.open(daemon.url)
    jobs = []
    for scenario in ("big_line", "tool_use", "success", "corrupt_line"):
        result = await wire.execute(command=CLAUDE, env={"FAKE_CLAUDE_SCENARIO": scenario,
                                                          "FAKE_CLAUDE_BIG_CHARS": "300000"},
                                    stream_mode=stream_mode, parallel=True)
        jobs.append(result["job_id"])
    checked = 0
    for job_id in jobs:
        completed = await wire.completed(job_id, 60)
        assert completed["claude"]["is_error"] is False
        checked += assert_each_event_follows_its_line(wire, job_id)
        assert wire.of_job(job_id)[-1]["method"] == "process.completed"
    assert checked == 2 + 3 + 2 + 3
    big = claude_events(wire, jobs[0], "result")[0]
    answer = json.loads(dict(output_lines(wire, jobs[0]))[big["offset"]])["result"]
    assert len(answer) == 300000 and big["result"] == answer[:claude.RESULT_CHARS]  # cut; the output has it all
    await wire.close()


@async_test(60)
async def test_claude_true_reads_any_command_as_a_claude_run(daemon, tmp_path):
    recorded = tmp_path / "not-logged-in.jsonl"
    recorded.write_text("\n".join(NOT_LOGGED_IN) + "\n")
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(30, argv=["cat", str(recorded)], claude=True)
    job_id = completed["job_id"]
    assert [e["kind"] for e in claude_events(wire, job_id)] == ["init", "result"]
    assert (completed["exit_code"], completed["status"]) == (0, "completed")
    assert completed["error"] == "Not logged in \u00b7 Please run /login"
    assert completed["claude"]["session_id"] == "bd56247d-c2bd-4cb7-abfe-30a11875b04f"
    await wire.close()


@async_test(60)
async def test_other_jobs_get_no_claude_events_and_no_claude_summary(daemon):
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(30, command="echo '{\"type\":\"result\",\"is_error\":true,\"result\":\"x\"}'")
    assert wire.text(completed["job_id"]) == '{"type":"result","is_error":true,"result":"x"}\n'
    assert [m["method"] for m in wire.of_job(completed["job_id"])] == [
        "process.started", "process.output", "process.completed"]
    assert "claude" not in completed and completed["error"] is None
    await wire.close()


@async_test(60)
async def test_a_lone_surrogate_escape_in_a_claude_line_becomes_u_fffd_and_the_connection_stays(daemon, tmp_path):
    # JSON may spell a lone surrogate ("\ud800"); no UTF-8 text frame can carry it.
    recorded = tmp_path / "lone-surrogate.jsonl"
    recorded.write_text('{"type":"system","subtype":"init","session_id":"\\ud800x","model":"m","tools":[]}\n'
                        '{"type":"result","is_error":true,"result":"bad \\udc00","num_turns":1}\n')
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(30, argv=["cat", str(recorded)], claude=True)
    job_id = completed["job_id"]
    assert [(e["kind"], e.get("session_id")) for e in claude_events(wire, job_id)] == [
        ("init", "\ufffdx"), ("result", None)]
    assert claude_events(wire, job_id, "result")[0]["result"] == "bad \ufffd"
    assert completed["claude"]["session_id"] == "\ufffdx" and completed["error"] == "bad \ufffd"
    assert wire.text(job_id) == recorded.read_text()
    status = await wire.answer(await wire.request("job.status", {"job_id": job_id}))
    assert status["result"]["state"] == "finished" and status["result"]["error"] == "bad \ufffd"  # as stored
    _, again = await wire.run(command="echo still here")  # the same connection serves on
    assert wire.text(again["job_id"]) == "still here\n"
    await wire.close()


@async_test(60)
async def test_a_number_too_large_for_a_float_is_null_and_reading_goes_on(daemon, tmp_path):
    recorded = tmp_path / "huge-number.jsonl"
    huge = "1" + "0" * 400
    recorded.write_text("\n".join([
        '{"type":"system","subtype":"api_retry","attempt":1,"max_retries":10,"retry_delay_ms":%s,'
        '"error":"unknown","error_status":null}' % huge,
        '{"type":"result","subtype":"success","is_error":false,"result":"4","duration_ms":%s,'
        '"total_cost_usd":%s.5,"num_turns":1}' % (huge, huge)]) + "\n")
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(30, argv=["cat", str(recorded)], claude=True)
    assert [e["kind"] for e in claude_events(wire, completed["job_id"])] == ["api_retry", "result"]
    assert claude_events(wire, completed["job_id"], "api_retry")[0]["retry_delay_ms"] is None
    assert completed["claude"]["result"] == "4" and completed["claude"]["num_turns"] == 1
    assert completed["claude"]["duration_ms"] is None and completed["claude"]["total_cost_usd"] is None
    await wire.close()


@async_test(60)
async def test_a_client_keeps_only_its_newest_unread_notifications(daemon, tmp_path):
    """claude.event and heartbeats go to Client.notifications: a long-lived
    client nobody reads them from must not keep them all."""
    recorded = tmp_path / "retries.jsonl"
    count = NOTIFICATIONS_KEPT + 200
    recorded.write_text("".join('{"type":"system","subtype":"api_retry","attempt":%d,"max_retries":9999,'
                                '"retry_delay_ms":1,"error":"unknown","error_status":null}\n' % n
                                for n in range(1, count + 1)))
    async with Client(daemon.url) as client:
        result = await (await client.execute(argv=["cat", str(recorded)], claude=True)).wait(30)
        assert result.exit_code == 0
        kept = [client.notifications.get_nowait() for _ in range(client.notifications.qsize())]
    attempts = [m["params"]["attempt"] for m in kept if m.get("method") == "claude.event"]
    assert len(kept) == NOTIFICATIONS_KEPT and attempts[-1] == count


# ------------------------------------------------------------------ notifications are journaled


@async_test(60)
async def test_attach_replays_the_notifications_of_the_lines_it_replays(daemon):
    wire = await Wire.open(daemon.url)
    _, completed = await wire.run(30, command=CLAUDE, env={"FAKE_CLAUDE_SCENARIO": "tool_use"})
    job_id = completed["job_id"]
    live = claude_events(wire, job_id)
    assert [e["kind"] for e in live] == ["init", "tool_use", "result"]
    second_line = output_lines(wire, job_id)[1][0]
    # (stdout_offset, claude_offset): without a claude_offset, the events of
    # the lines that end after stdout_offset; with one, all but that many.
    for offsets, expected in (((0, None), live), ((second_line - 1, None), live), ((second_line, None), live[1:]),
                              ((0, 1), live[1:]), ((second_line, 0), live), ((0, 3), []), ((0, 99), [])):
        other = await Wire.open(daemon.url)
        await other.answer(await other.request("attach", {"job_id": job_id, "stdout_offset": offsets[0],
                                                          "claude_offset": offsets[1]}))
        await other.completed(job_id)
        assert claude_events(other, job_id) == expected, offsets
        if offsets[0] == 0:  # (its helper reads offsets from the start of stdout)
            assert assert_each_event_follows_its_line(other, job_id) == len(expected)
        await other.close()
    await wire.close()


@async_test(90)
async def test_notifications_told_while_the_broker_is_down_reach_the_client(make_daemon, tmp_path):
    """The job writes its last lines (a tool call, a usage limit, its result)
    just after the broker is killed: what the executor sends then is lost on
    the way, and the client still gets all of it, from the journal."""
    d = make_daemon()
    go = tmp_path / "go"
    tool_use = json.dumps({"type": "assistant", "message": {"content": [
        {"type": "tool_use", "id": "toolu_01abc", "name": "Bash", "input": {"command": "ls"}}]}})
    limited = json.dumps({"type": "rate_limit_event", "rate_limit_info": {"status": "rejected",
                                                                         "resetsAt": 1900000000}})
    lines = [NOT_LOGGED_IN_INIT, tool_use, limited, NOT_LOGGED_IN_RESULT]
    command = (f"echo {shlex.quote(lines[0])}; while [ ! -e {go} ]; do sleep 0.02; done; "
               + "; ".join(f"echo {shlex.quote(line)}" for line in lines[1:]))
    [broker] = d.role_pids("broker")
    wire = await Wire.open(d.url)
    job_id = (await wire.execute(command=command, claude=True))["job_id"]
    await wire.until(lambda m: m.get("method") == "claude.event", 20)
    os.kill(broker, signal.SIGKILL)
    go.touch()
    completed = await wire.completed(job_id, 60)
    assert completed["reason"] == "exit" and wire.text(job_id) == "".join(line + "\n" for line in lines)
    assert [e["kind"] for e in claude_events(wire, job_id)] == ["init", "tool_use", "result"]
    (limit,) = of_method(wire, job_id, "error.rate_limit_exceeded")
    assert (limit["error_type"], limit["reset_timestamp"]) == ("usage_limit", 1900000000)
    assert assert_each_event_follows_its_line(wire, job_id) == 3
    await wire.close()


@async_test(60)
async def test_a_client_counts_the_notifications_of_each_job_it_follows(daemon):
    async with Client(daemon.url) as client:
        ran = await client.execute(CLAUDE, env={"FAKE_CLAUDE_SCENARIO": "tool_use"})
        done = await ran.wait(30)
        whole = await client.attach(done.job_id)
        await whole.wait(30)
        rest = await client.attach(done.job_id, claude_offset=2)
        await rest.wait(30)
        unknown = await client.attach(done.job_id, stdout_offset=1)  # how many were before: not said
        await unknown.wait(30)
    assert (ran.claude_offset, whole.claude_offset, rest.claude_offset, unknown.claude_offset) == (3, 3, 3, None)
