"""Security: authentication, origins, TLS, command and environment policy, limits.

Every test runs a real daemon with the settings it is about and talks to it
over real sockets; waits are bounded and event-driven.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import websockets

from ccexec import policy
from support import async_test, http_get, self_signed_cert, wait_for
from wire import Wire

TOKENS = {"alice": "alice-0123456789abcdef-secret", "bob": "bob-fedcba9876543210-secret"}


def write_tokens(path, tokens: dict[str, str], mode: int = 0o600) -> str:
    """Write a token file atomically (a new inode, as an editor or deploy tool would)."""
    tmp = f"{path}.new"
    with open(tmp, "w") as f:
        f.write("# name token\n")
        for name, token in tokens.items():
            f.write(f"{name} {token}\n")
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return str(path)


def bearer(token: str) -> dict:
    return {"additional_headers": {"Authorization": f"Bearer {token}"}}


async def refused_status(url: str, **kwargs) -> int:
    """The HTTP status a WebSocket handshake is refused with (fails if it is accepted)."""
    with pytest.raises(websockets.InvalidStatus) as refused:
        ws = await websockets.connect(url, open_timeout=10, **kwargs)
        await ws.close()
    return refused.value.response.status_code


async def handshake_status(url: str, **kwargs) -> int:
    """101 if the handshake is accepted (the connection is closed again), else the refusal's status."""
    try:
        ws = await websockets.connect(url, open_timeout=10, **kwargs)
    except websockets.InvalidStatus as exc:
        return exc.response.status_code
    await ws.close()
    return 101


def log_has(daemon, *needles: str) -> bool:
    return any(all(n in line for n in needles) for line in daemon.log_tail(2000).splitlines())


async def wait_log(daemon, *needles: str, timeout: float = 10) -> None:
    await asyncio.to_thread(wait_for, lambda: log_has(daemon, *needles), timeout, 0.1,
                            f"log line with {needles}")


# ------------------------------------------------------------------ 1. tokens


@async_test(90)
async def test_bearer_tokens_gate_the_websocket_and_leave_http_open(make_daemon, tmp_path):
    d = make_daemon(settings={"token_file": write_tokens(tmp_path / "tokens", TOKENS)})
    assert await refused_status(d.url) == 401                                   # no token
    assert await refused_status(d.url, **bearer("not-" + TOKENS["alice"])) == 401  # wrong token
    assert await refused_status(d.url, additional_headers={"Authorization": f"Basic {TOKENS['alice']}"}) == 401
    # A 401 reveals nothing: no token names, no reason.
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(d.url, open_timeout=10, **bearer("wrong-token-xxxxxxxx"))
    response = refused.value.response
    assert json.loads(response.body) == {"error": "unauthorized"}
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    await wait_log(d, "auth.refused", "client=127.0.0.1:", "reason=\"wrong token\"")
    await wait_log(d, "auth.refused", "client=127.0.0.1:", "reason=\"no bearer token\"")
    assert TOKENS["alice"] not in d.log_tail(2000)

    for name, token in TOKENS.items():  # every token of the file works, and its name is logged
        wire = await Wire.open(d.url, **bearer(token))
        _, completed = await wire.run(command="echo authorized")
        assert completed["exit_code"] == 0 and wire.text(completed["job_id"]) == "authorized\n"
        await wire.close()
        await wait_log(d, "auth.accepted", f"token={name}")
    await wait_log(d, "job.accepted", "token=alice")

    for path in ("/health", "/ready", "/metrics"):  # open: no token needed
        assert http_get(d.port, path)[0] == 200, path


@async_test(90)
async def test_token_file_changes_are_picked_up_and_a_shared_file_is_refused(make_daemon, tmp_path):
    path = tmp_path / "tokens"
    d = make_daemon(settings={"token_file": write_tokens(path, {"alice": TOKENS["alice"]})})
    wire = await Wire.open(d.url, **bearer(TOKENS["alice"]))

    write_tokens(path, {"bob": TOKENS["bob"]})  # alice's token revoked, bob's added

    async def statuses() -> tuple[int, int]:
        return (await handshake_status(d.url, **bearer(TOKENS["alice"])),
                await handshake_status(d.url, **bearer(TOKENS["bob"])))
    deadline = time.monotonic() + 10  # the file is checked every second, in each handler
    while (got := await statuses()) != (401, 101) or [await statuses() for _ in range(3)] != [(401, 101)] * 3:
        assert time.monotonic() < deadline, f"new tokens not in effect: {got}"
        await asyncio.sleep(0.2)
    # A connection opened before the change is not cut.
    assert (await wire.answer(await wire.request("ping")))["result"]["pong"] is True
    await wire.close()

    os.chmod(path, 0o644)  # readable by others: refused until fixed, fail closed
    await wait_log(d, "auth.token_file_unusable", "chmod 600")
    deadline = time.monotonic() + 10
    while [await handshake_status(d.url, **bearer(TOKENS["bob"])) for _ in range(4)] != [401] * 4:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    os.chmod(path, 0o600)
    deadline = time.monotonic() + 10
    while [await handshake_status(d.url, **bearer(TOKENS["bob"])) for _ in range(4)] != [101] * 4:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)


def test_ccexecd_refuses_to_listen_beyond_loopback_without_tokens(make_daemon):
    d = make_daemon(start=False)
    for host in ("0.0.0.0", "::", "192.0.2.1"):
        done = d.run_to_exit("--host", host)
        assert done.returncode != 0, done.stderr
        assert "without authentication" in done.stderr and "token_file" in done.stderr, done.stderr
    with pytest.raises(OSError):  # nothing was bound
        http_get(d.port, "/health", timeout=2)
    assert policy.is_loopback("127.0.0.1") and policy.is_loopback("::1") and policy.is_loopback("localhost")
    assert policy.is_loopback("127.8.9.10") and not policy.is_loopback("0.0.0.0")


def test_ccexecd_refuses_a_token_file_others_may_read(make_daemon, tmp_path):
    path = write_tokens(tmp_path / "tokens", TOKENS, mode=0o640)
    d = make_daemon(start=False, settings={"token_file": path})
    done = d.run_to_exit("--host", "0.0.0.0")
    assert done.returncode != 0 and "chmod 600" in done.stderr, done.stderr
    os.chmod(path, 0o600)
    with open(path, "a") as f:
        f.write("carol\n")  # malformed line
    done = d.run_to_exit()
    assert done.returncode != 0 and "line 4" in done.stderr and TOKENS["alice"] not in done.stderr, done.stderr


@async_test()
async def test_job_records_and_journals_are_private_to_the_daemons_user(make_daemon):
    d = make_daemon()
    async with d.client() as client:
        await (await client.execute("echo secret; echo more >&2")).wait(20)
    state = d.state_dir
    private = {path: stat.S_IMODE(path.stat().st_mode) for path in (
        state / "jobs", *state.glob("jobs.db*"))}
    assert {path.name for path in private} >= {"jobs", "jobs.db", "jobs.db-wal", "jobs.db-shm"}
    assert private == {path: 0o700 if path.is_dir() else 0o600 for path in private}


def test_a_token_an_http_header_cannot_carry_is_refused_by_name_not_loaded(make_daemon, tmp_path):
    # Header bytes reach the handshake decoded as ISO-8859-1: "s\u00e9same…" sent as
    # UTF-8 (as curl or a UTF-8 terminal sends it) never matched, and a character
    # beyond Latin-1 matched no bytes at all.
    for token in ("s\u00e9same-0123456789abcdef", "\u20ac" * 16, "tab\x7fdelete-0123456789"):
        with pytest.raises(policy.PolicyError, match="line 1: token 'alice' holds a character") as refused:
            policy.parse_tokens(f"alice {token}")
        assert token not in str(refused.value)
    assert policy.parse_tokens("alice " + "A-z_0~9.+/=!#$%&*" * 2).match("A-z_0~9.+/=!#$%&*" * 2) == "alice"
    token = "s\u00e9same-0123456789abcdef"
    d = make_daemon(start=False, settings={"token_file": write_tokens(tmp_path / "tokens", {"alice": token})})
    done = d.run_to_exit()
    assert done.returncode != 0 and "line 2" in done.stderr and "printable ASCII" in done.stderr, done.stderr
    assert token not in done.stderr


# ------------------------------------------------------------------ 2. origins


@async_test(60)
async def test_browser_origins_must_be_listed(make_daemon, daemon):
    # Default: every browser origin refused, non-browser clients accepted.
    assert await refused_status(daemon.url, origin="http://127.0.0.1:3000") == 403
    assert await handshake_status(daemon.url) == 101
    d = make_daemon(settings={"allowed_origins": "https://app.example http://localhost:3000"})
    assert await refused_status(d.url, origin="https://evil.example") == 403
    assert await refused_status(d.url, origin="https://app.example.evil") == 403
    assert await refused_status(d.url, origin="null") == 403
    assert await handshake_status(d.url, origin="https://app.example") == 101
    assert await handshake_status(d.url, origin="http://localhost:3000") == 101
    await wait_log(d, "handshake.refused", "status=403", "origin=https://evil.example")


# ------------------------------------------------------------------ 3. TLS


def _tls_get(port: int, path: str, context: ssl.SSLContext) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", timeout=2, context=context) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@async_test(90)
async def test_tls_serves_wss_and_https_with_a_self_signed_certificate(make_daemon, tmp_path):
    ca, cert_path, key_path = self_signed_cert(tmp_path)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    d = make_daemon(start=False, settings={"tls_cert": str(cert_path), "tls_key": str(key_path),
                                           "token_file": write_tokens(tmp_path / "tokens", TOKENS)})

    def tls_ready() -> bool:
        if d.proc.poll() is not None:
            raise RuntimeError(f"ccexecd exited with {d.proc.returncode}:\n{d.log_tail()}")
        try:
            if _tls_get(d.port, "/ready", client_ctx)[0] != 200:
                return False
            pid = json.loads(_tls_get(d.port, "/health", client_ctx)[1])["handler_pid"]
            return psutil.Process(pid).ppid() == d.proc.pid
        except (OSError, psutil.Error):
            return False
    d.ready = tls_ready
    await asyncio.to_thread(d.start)

    url = f"wss://127.0.0.1:{d.port}/ws"
    wire = await Wire.open(url, ssl=client_ctx, **bearer(TOKENS["bob"]))
    _, completed = await wire.run(command="printf 'over tls\\n'")
    assert completed["exit_code"] == 0 and wire.text(completed["job_id"]) == "over tls\n"
    await wire.close()
    assert _tls_get(d.port, "/metrics", client_ctx)[0] == 200
    assert await refused_status(url, ssl=client_ctx) == 401
    # ccexecctl finds TLS and a token in the daemon's config by itself.
    ctl = [str(Path(sys.executable).parent / "ccexecctl"), "--state-dir", str(d.state_dir)]
    done = await asyncio.to_thread(subprocess.run, [*ctl, "run", "--", "echo", "via ccexecctl"],
                                   capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "via ccexecctl\n", done.stderr
    done = await asyncio.to_thread(subprocess.run, [*ctl, "health"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust the CA
        await websockets.connect(url, ssl=ssl.create_default_context(), open_timeout=10)
    with pytest.raises(Exception):  # plain ws:// gets no WebSocket
        await websockets.connect(d.url, open_timeout=5)


# ------------------------------------------------------------------ 4. command and environment policy


async def _refused(wire: Wire, **params) -> dict:
    answer = await wire.answer(await wire.request("execute", params))
    assert "error" in answer, answer
    return answer["error"]


@async_test(60)
async def test_command_allow_and_deny_lists(make_daemon):
    d = make_daemon(settings={"command_allow": "echo printf /usr/bin/* true", "command_deny": "rm shred"})
    wire = await Wire.open(d.url)
    for params in ({"command": "echo allowed"}, {"argv": ["printf", "allowed\n"]},
                   {"command": "FOO=1 printf 'allowed\\n' | true"}):
        _, completed = await wire.run(**params)
        assert completed["exit_code"] == 0, (params, completed)
    cases = [
        ({"command": "ls -l"}, "ls"),
        ({"argv": ["ls", "-l"]}, "ls"),
        ({"argv": ["/bin/rm", "-rf", "x"]}, "/bin/rm"),
        ({"argv": ["/usr/bin/rm", "x"]}, "/usr/bin/rm"),  # allowed by path, denied by basename: deny wins
        ({"command": "echo hi; ls"}, "ls"),
        ({"command": "echo hi && FOO=1 rm -rf x"}, "rm"),
        ({"command": "env -u HOME rm x"}, "env"),
        ({"argv": ["/usr/bin/env", "rm", "x"]}, "rm"),
    ]
    for params, executable in cases:
        error = await _refused(wire, **params)
        assert error["code"] == -32001, (params, error)
        assert error["message"].startswith("Command not allowed by policy") and executable in error["message"]
        assert error["data"]["executable"] == executable, (params, error)
    # Nothing refused was run: only the three allowed jobs ever started.
    assert sum(1 for m in wire.messages if m.get("method") == "process.started") == 3
    await wait_log(d, "policy.refused", "executable=ls")
    await wire.close()


@async_test(60)
async def test_allow_shell_false_accepts_argv_only(make_daemon):
    d = make_daemon(settings={"allow_shell": "false"})
    wire = await Wire.open(d.url)
    error = await _refused(wire, command="echo no shell")
    assert error["code"] == -32001 and "allow_shell" in error["message"]
    assert error["data"] == {"executable": None, "reason": "shell"}
    _, completed = await wire.run(argv=["echo", "argv works"])
    assert completed["exit_code"] == 0 and wire.text(completed["job_id"]) == "argv works\n"
    await wire.close()


@async_test(60)
async def test_environment_policy(make_daemon):
    d = make_daemon(settings={"env_pass": "KEEP_*", "env_client_allow": "CLIENT_* ANTHROPIC_API_KEY"},
                    env={"KEEP_ME": "kept", "DROP_ME": "dropped", "ANTHROPIC_API_KEY": "sk-daemon-secret",
                         "LC_TEST_LOCALE": "C"})
    wire = await Wire.open(d.url)
    _, completed = await wire.run(argv=["env"], env={"CLIENT_SET": "yes", "ANTHROPIC_API_KEY": "sk-client"})
    assert completed["exit_code"] == 0
    env = dict(line.split("=", 1) for line in wire.text(completed["job_id"]).splitlines() if "=" in line)
    assert env["KEEP_ME"] == "kept" and env["CLIENT_SET"] == "yes"   # env_pass, client env
    assert env["PYTHONUNBUFFERED"] == "1"                              # env_set
    assert {"PATH", "HOME", "LC_TEST_LOCALE"} <= set(env)              # always passed
    assert "DROP_ME" not in env                                        # not in env_pass
    assert "ANTHROPIC_API_KEY" not in env                              # env_remove wins over everyone
    assert [k for k in env if k.startswith(("CCEXEC_", "CIRCUS"))] == ["CCEXEC_JOB_ID"]
    assert env["CCEXEC_JOB_ID"] == completed["job_id"]                 # its own id
    error = await _refused(wire, argv=["env"], env={"LD_PRELOAD": "/tmp/evil.so"})
    assert error["code"] == -32001 and "LD_PRELOAD" in error["message"]
    assert error["data"] == {"env": "LD_PRELOAD", "reason": "env"}
    await wire.close()


# ------------------------------------------------------------------ 5. limits


async def _open_until(url: str, predicate, timeout: float = 15, **kwargs) -> None:
    """Retry a fresh handshake until predicate(status) holds for 4 in a row (the
    pool-wide counts travel with the once-a-second heartbeats)."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = [await handshake_status(url, **kwargs) for _ in range(4)]
        if all(predicate(s) for s in statuses):
            return
        assert time.monotonic() < deadline, f"handshakes still answered {statuses}"
        await asyncio.sleep(0.2)


@async_test(90)
async def test_frame_size_and_total_session_limits(make_daemon):
    d = make_daemon(settings={"max_frame_bytes": 4096, "max_sessions": 2})
    wire = await Wire.open(d.url)
    await wire.send_raw(json.dumps({"jsonrpc": "2.0", "method": "ping", "params": {"pad": "x" * 5000}}))
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await wire.recv(10)
    assert closed.value.rcvd.code == 1009

    held = [await Wire.open(d.url), await Wire.open(d.url)]
    deadline = time.monotonic() + 15
    while True:  # the pool's count reaches every handler within a heartbeat or two
        async with websockets.connect(d.url, open_timeout=10) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if "error" in first:
                assert first["error"]["code"] == -32003 and first["error"]["data"] == {"max_sessions": 2}
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 10)
                assert closed.value.rcvd.code == 1008
                break
        assert time.monotonic() < deadline, "the session limit never took effect"
        await asyncio.sleep(0.2)
    for wire in held:
        await wire.close()


@async_test(90)
async def test_sessions_per_address_limit_is_503_at_the_handshake(make_daemon):
    # One handler: its count is exact at once (across handlers it follows the
    # heartbeats, so for a second a burst can pass; that is documented).
    d = make_daemon(settings={"max_sessions_per_address": 2}, handlers=1)
    held = [await Wire.open(d.url), await Wire.open(d.url)]
    await _open_until(d.url, lambda status: status == 503)
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(d.url, open_timeout=10)
    assert json.loads(refused.value.response.body)["max_sessions_per_address"] == 2
    await wait_log(d, "handshake.refused", "status=503", "client=127.0.0.1:")
    assert (await held[0].answer(await held[0].request("ping")))["result"]["pong"]
    await held[1].close()
    await _open_until(d.url, lambda status: status == 101)
    await held[0].close()


@async_test(90)
async def test_jobs_per_connection_and_queue_limits(make_daemon):
    d = make_daemon(settings={"max_jobs_per_connection": 2, "slots_per_executor": 1, "max_queue": 1},
                    executors=1)
    wire = await Wire.open(d.url)
    first = await wire.execute(command="sleep 30", parallel=True)
    second = await wire.execute(command="sleep 30", parallel=True)
    assert (first["status"], second["status"]) == ("started", "queued")
    error = await _refused(wire, command="echo third", parallel=True)     # this connection's limit
    assert error["code"] == -32005 and "max_jobs_per_connection" in error["message"]
    assert error["data"]["retry_after"] >= 1 and error["data"]["unfinished"] == 2
    other = await Wire.open(d.url)
    error = await _refused(other, command="echo elsewhere")               # the queue is full
    assert error["code"] == -32005 and error["data"]["retry_after"] >= 1 and error["data"]["queued"] == 1
    await wire.answer(await wire.request("control", {"type": "CANCEL", "job_id": second["job_id"]}))
    await wire.completed(second["job_id"])
    third = await wire.execute(command="echo third", parallel=True)        # room again
    await wire.answer(await wire.request("control", {"type": "CANCEL", "job_id": first["job_id"]}))
    completed = await wire.completed(third["job_id"])
    assert completed["exit_code"] == 0 and wire.text(third["job_id"]) == "third\n"
    await wire.close()
    await other.close()


@async_test(60)
async def test_stdin_size_limit_counts_utf8_bytes(make_daemon):
    d = make_daemon(settings={"max_stdin_bytes": 10})
    wire = await Wire.open(d.url)
    _, completed = await wire.run(command="cat", stdin="é" * 5)  # 10 bytes
    assert wire.text(completed["job_id"]) == "é" * 5
    for stdin in ("x" * 11, "é" * 6):
        error = await _refused(wire, command="cat", stdin=stdin)
        assert error["code"] == -32602 and "'stdin'" in error["message"] and error["data"]["param"] == "stdin"
    await wire.close()


@async_test(60)
async def test_request_rate_is_limited_per_connection_with_a_burst(make_daemon):
    d = make_daemon(settings={"max_requests_per_second": 5, "request_burst": 5})
    wire = await Wire.open(d.url)
    for i in range(20):  # sent at once: the burst passes, the rest is refused
        await wire.request("ping", id=f"p{i}")
    answers = [await wire.answer(f"p{i}") for i in range(20)]
    passed = [a for a in answers if "result" in a]
    limited = [a["error"] for a in answers if "error" in a]
    assert 5 <= len(passed) <= 7 and len(passed) + len(limited) == 20
    assert all(e["code"] == -32005 and e["message"].startswith("Rate limited") for e in limited)
    assert all(0 < e["data"]["retry_after"] <= 1 for e in limited)
    await asyncio.sleep(limited[-1]["data"]["retry_after"])  # the wait the daemon asked for
    assert "result" in await wire.answer(await wire.request("ping"))
    # Other connections have buckets of their own; pong (never answered) counts too.
    other = await Wire.open(d.url)
    for _ in range(5):
        await other.request("pong", id=None)
    error = (await other.answer(await other.request("ping", id="after-pongs")))["error"]
    assert error["code"] == -32005 and error["data"]["max_requests_per_second"] == 5
    await wire.close()
    await other.close()


@async_test(60)
async def test_max_job_seconds_is_the_default_timeout_and_caps_larger_ones(make_daemon):
    d = make_daemon(settings={"max_job_seconds": 1})
    wire = await Wire.open(d.url)
    for params in ({}, {"timeout": 30}):
        started = time.monotonic()
        _, completed = await wire.run(command="sleep 30", **params)
        assert completed["reason"] == "timeout" and completed["exit_code"] in (-15, -9), completed
        assert "max_job_seconds" in completed["error"] and time.monotonic() - started < 5
    _, completed = await wire.run(command="sleep 30", timeout=0.3)
    assert completed["reason"] == "timeout" and completed["error"] == "timed out after 0.3 s"
    _, completed = await wire.run(command="echo quick")
    assert completed["reason"] == "exit" and completed["exit_code"] == 0
    await wire.close()


@async_test(60)
async def test_max_output_bytes_ends_the_job_with_output_limit(make_daemon):
    d = make_daemon(settings={"max_output_bytes": 100000})
    wire = await Wire.open(d.url)
    _, completed = await wire.run(command="yes", stream_mode="chunks")
    assert completed["reason"] == "output_limit" and completed["status"] == "failed"
    assert completed["exit_code"] in (-15, -9) and "max_output_bytes" in completed["error"]
    assert completed["stdout_bytes"] + completed["stderr_bytes"] == 100000
    assert wire.text(completed["job_id"]) == "y\n" * 50000
    _, completed = await wire.run(command="head -c 60000 /dev/zero; head -c 40000 /dev/zero >&2",
                                  stream_mode="chunks")  # exactly the limit, both streams
    assert completed["reason"] == "exit" and completed["exit_code"] == 0
    assert (completed["stdout_bytes"], completed["stderr_bytes"]) == (60000, 40000)
    await wire.close()
