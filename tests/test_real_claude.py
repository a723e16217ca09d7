"""The real Claude Code CLI (npm @anthropic-ai/claude-code) run through ccexec.

Without credentials it fails fast in a known way: system/init, a synthetic
assistant message, and a `result` with is_error true ("Not logged in"),
exit status 1. That failure must arrive whole: every stream-json line intact
and in order. tools/dev.sh installs the CLI into .cache/npm when npm exists.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from support import ROOT, async_test
from wire import Wire


def _real_claude() -> str | None:
    local = ROOT / ".cache" / "npm" / "node_modules" / ".bin" / "claude"
    if local.exists():
        return str(local)
    found = shutil.which("claude", path=os.environ.get("PATH", ""))
    return found if found and "fake_claude" not in found else None


CLAUDE = _real_claude()
pytestmark = [pytest.mark.realcli,
              pytest.mark.skipif(CLAUDE is None, reason="the real Claude CLI is not installed "
                                 "(tools/dev.sh installs it from npm when npm is present)")]


@async_test(120)
async def test_real_cli_without_credentials_fails_whole_and_in_order(make_daemon, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    d = make_daemon(env={"ANTHROPIC_API_KEY": "must-not-reach-the-job"})
    wire = await Wire.open(d.url)
    _, completed = await wire.run(90, command=f'{CLAUDE} -p "What is 2+2?" --output-format stream-json --verbose',
                                  env={"HOME": str(home)})
    assert (completed["exit_code"], completed["reason"], completed["status"]) == (1, "exit", "failed")
    outputs = wire.outputs(completed["job_id"])
    assert all(o["data"].endswith("\n") and o["chunk_index"] is None for o in outputs)
    lines = [json.loads(o["data"]) for o in outputs]  # each message one whole JSON line
    assert [(line["type"], line.get("subtype")) for line in lines] == [
        ("system", "init"), ("assistant", None), ("result", "success")]
    init, result = lines[0], lines[-1]
    assert init["apiKeySource"] == "none"  # the daemon's ANTHROPIC_API_KEY was withheld
    assert result["is_error"] is True and "Not logged in" in result["result"]
    assert completed["stdout_bytes"] == sum(o["size"] for o in outputs)
    # Read as a Claude job: its events, and the failure in completed even without parsing output.
    events = [m["params"] for m in wire.of_job(completed["job_id"]) if m.get("method") == "claude.event"]
    assert [e["kind"] for e in events] == ["init", "result"]
    assert events[0]["session_id"] == init["session_id"] and events[0]["tools_count"] == len(init["tools"])
    assert (events[1]["is_error"], events[1]["result"], events[1]["offset"]) == (True, result["result"], outputs[2]["offset"])
    assert completed["claude"] == {"session_id": init["session_id"], "is_error": True, "result": result["result"],
                                   "total_cost_usd": result["total_cost_usd"], "duration_ms": result["duration_ms"],
                                   "num_turns": result["num_turns"]}
    assert completed["error"] == result["result"] and "Not logged in" in completed["error"]
    await wire.close()
