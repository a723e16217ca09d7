"""The old CC Executor handler's ten-scenario stress suite, against ccexec.

Driven exactly the way that suite's client drove the old handler: a new
connection per command, `execute` sent the moment the handshake completes,
5 s receive timeouts, any top-level `error` fails the scenario, more than
30 s without a message counts as stalled, `process.completed` ends it. All
ten run against one daemon that is never restarted between them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

import pytest
import websockets

from support import finish, run, wait_for

CLAUDE_FLAGS = "--output-format stream-json --verbose --dangerously-skip-permissions --allowedTools none"
RECV_TIMEOUT = 5.0
STALL_LIMIT = 30.0


@dataclass
class Outcome:
    success: bool = False
    exit_code: int | None = None
    error: str | None = None
    chunks: list[str] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    duration: float = 0.0
    pid: int | None = None
    job_id: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.chunks)


async def old_client(url: str, command: str, timeout: float) -> Outcome:
    """The old suite's client loop, faithfully."""
    outcome, start = Outcome(), time.monotonic()
    last_message = start
    async with websockets.connect(url, ping_timeout=None, max_size=None) as ws:
        await ws.send(json.dumps({"jsonrpc": "2.0", "method": "execute",
                                  "params": {"command": command}, "id": str(uuid.uuid4())}))
        while True:
            try:
                raw = await asyncio.wait_for(ws.recv(), RECV_TIMEOUT)
            except asyncio.TimeoutError:
                now = time.monotonic()
                if now - start > timeout:
                    outcome.error = "Timeout"
                    break
                if now - last_message > STALL_LIMIT:
                    outcome.error = "Stalled"
                    break
                continue
            last_message = time.monotonic()
            message = json.loads(raw)
            outcome.messages.append(message)
            if "error" in message:
                outcome.error = message["error"].get("message")
                break
            params = message.get("params") or {}
            if message.get("method") == "process.started":
                outcome.pid, outcome.job_id = params["pid"], params["job_id"]
            elif message.get("method") == "process.output":
                outcome.chunks.append(params["data"])
            elif message.get("method") == "process.completed":
                outcome.exit_code = params["exit_code"]
                outcome.success = outcome.exit_code == 0
                break
    outcome.duration = time.monotonic() - start
    return outcome


def scenario(daemon, command: str, timeout: float) -> Outcome:
    return run(old_client(daemon.url, command, timeout), timeout + 60)


def result_line(outcome: Outcome) -> dict:
    """The stream-json `result` object among a Claude job's output lines."""
    for chunk in outcome.chunks:
        if chunk.startswith("{") and '"type":"result"' in chunk.replace(" ", ""):
            return json.loads(chunk)
    raise AssertionError(f"no result line in {outcome.text[:500]!r}")


@pytest.fixture(scope="module")
def stress_daemon(tmp_path_factory):
    from support import Daemon

    tmp = tmp_path_factory.mktemp("stress")
    (tmp / "src").mkdir()
    d = Daemon(tmp, env={"PYTHONPATH": str(tmp / "src")}).start()
    d.first_pids = (d.proc.pid, d.role_pids("handler"), d.role_pids("broker"), d.role_pids("executor"))
    yield d
    finish(d)


def test_01_simple_prompt(stress_daemon):
    outcome = scenario(stress_daemon, f'claude -p "What is 2+2?" {CLAUDE_FLAGS}', 30)
    assert outcome.success, outcome
    assert result_line(outcome)["result"] == "4"


@pytest.mark.slow
def test_02_essay_survives_40s_silent_thinking(stress_daemon):
    prompt = "Write a 1000 word essay about the history and future of artificial intelligence."
    outcome = scenario(stress_daemon, f'FAKE_CLAUDE_THINK=40 claude -p "{prompt}" {CLAUDE_FLAGS}', 120)
    assert outcome.error is None and outcome.success, outcome.error
    assert outcome.duration > 40
    heartbeats = [m for m in outcome.messages if m.get("method") == "heartbeat"]
    assert heartbeats, "a 40 s silence must be bridged by heartbeats"
    assert heartbeats[0]["params"]["jobs"][0]["silent_for"] >= 5
    assert len(result_line(outcome)["result"].split()) >= 1000


def test_03_formatted_answer(stress_daemon):
    prompt = ("Explain recursion in programming. Format your response with: 1) Initial explanation, "
              "2) Code example, 3) Common pitfalls, 4) Best practices.")
    outcome = scenario(stress_daemon, f'claude -p "{prompt}" {CLAUDE_FLAGS}', 120)
    assert outcome.success
    text = outcome.text.lower()
    for words in (("explanation", "recursion"), ("example", "def"), ("pitfall", "mistake"), ("practice", "tip")):
        assert any(w in text for w in words), words


def test_04_json_streaming(stress_daemon):
    outcome = scenario(stress_daemon, f'claude -p "List 5 programming languages with their main use cases." {CLAUDE_FLAGS}', 60)
    assert outcome.success
    lines = [json.loads(chunk) for chunk in outcome.chunks]  # every line is one whole JSON object
    assert [line["type"] for line in lines][0] == "system" and lines[-1]["type"] == "result"
    assert any(len(chunk) > 10 for chunk in outcome.chunks)


def test_05_client_timeout_then_job_is_canceled(stress_daemon):
    outcome = scenario(stress_daemon, "sleep 15", 6)
    assert outcome.error == "Timeout" and outcome.duration >= 6
    # The client went away: after detach_grace the job is canceled, not left running.
    finished = f"job.finished job_id={outcome.job_id}"
    line = wait_for(lambda: next((l for l in stress_daemon.log_tail(400).splitlines() if finished in l), None),
                    20, 0.2, "the abandoned job to finish")
    assert "reason=canceled" in line


def test_06_three_sequential_requests_on_fresh_connections(stress_daemon):
    for question, answer in (("What is 5+5?", "10"), ("What is 10*10?", "100"), ("What is 100-50?", "50")):
        outcome = scenario(stress_daemon, f'claude -p "{question}" {CLAUDE_FLAGS}', 30)
        assert outcome.success, question
        assert result_line(outcome)["result"] == answer


def test_07_unknown_command(stress_daemon):
    outcome = scenario(stress_daemon, "nonexistent_command --help", 10)
    assert outcome.error is None  # a completed job, not a JSON-RPC error
    assert not outcome.success and outcome.exit_code == 127
    assert outcome.messages[-1]["params"]["status"] == "failed"


def test_08_environment_and_working_directory(stress_daemon):
    command = ("python -c \"import os; print('PYTHONPATH:', os.environ.get('PYTHONPATH', 'NOT SET')); "
               "print('Working Dir:', os.getcwd())\"")
    outcome = scenario(stress_daemon, command, 10)
    assert outcome.success
    assert f"PYTHONPATH: {stress_daemon.tmp / 'src'}\n" in outcome.chunks
    assert f"Working Dir: {stress_daemon.workdir}\n" in outcome.chunks


def test_09_hundred_thousand_byte_line(stress_daemon):
    outcome = scenario(stress_daemon, "python -c \"print('A' * 100000)\"", 10)
    assert outcome.success
    assert [len(c) for c in outcome.chunks] == [65536, 34465]
    assert outcome.text == "A" * 100000 + "\n"


def test_10_claude_with_mcp_config(stress_daemon):
    mcp = stress_daemon.workdir / ".mcp.json"
    mcp.write_text(json.dumps({"mcpServers": {"perplexity-ask": {"command": "true"}}}))
    command = ('claude -p "What is the capital of France?" --output-format stream-json --verbose '
               '--mcp-config .mcp.json --allowedTools "mcp__perplexity-ask mcp__brave-search" '
               '--dangerously-skip-permissions')
    outcome = scenario(stress_daemon, command, 60)
    assert outcome.success
    assert "paris" in outcome.text.lower()


def test_11_daemon_was_never_restarted(stress_daemon):
    now = (stress_daemon.proc.pid, stress_daemon.role_pids("handler"), stress_daemon.role_pids("broker"),
           stress_daemon.role_pids("executor"))
    assert now == stress_daemon.first_pids
