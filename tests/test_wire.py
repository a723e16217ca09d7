"""Protocol Part A (and the Part B pieces built so far) over a real WebSocket."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from support import async_test, http_get
from wire import Wire

# ------------------------------------------------------------------ HTTP side


def test_health_reports_service_version_and_sessions(daemon):
    status, body, headers = http_get(daemon.port, "/health")
    health = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert health["status"] == "healthy" and health["service"] == "ccexec"
    for key, kind in (("version", str), ("active_sessions", int), ("max_sessions", int),
                      ("uptime_seconds", float)):
        assert isinstance(health[key], kind), key


def test_ready_when_broker_and_an_executor_answer(daemon):
    status, body, _ = http_get(daemon.port, "/ready")
    assert status == 200 and json.loads(body)["status"] == "ready"


def _metrics(port: int) -> dict:
    status, body, headers = http_get(port, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def _sample(families: dict, family: str, name: str, **labels) -> float:
    return sum(s.value for s in families[family].samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@async_test()
async def test_metrics_count_the_whole_pool_in_prometheus_exposition(make_daemon):
    import os
    import signal
    from support import wait_for
    d = make_daemon()
    wire = await Wire.open(d.url)
    for command in ("echo one", "exit 3", "printf 12345 >&2"):
        await wire.run(command=command)
    os.kill(d.role_pids("executor")[0], signal.SIGKILL)

    def settled():  # handlers report connections and Circus its reaps within a heartbeat or two
        f = _metrics(d.port)
        restarts = _sample(f, "ccexec_watcher_restarts", "ccexec_watcher_restarts_total", watcher="executor")
        return f if restarts >= 1 and _sample(f, "ccexec_connections", "ccexec_connections") == 1 else None
    families = await asyncio.to_thread(wait_for, settled, 15, 0.2, "the executor's restart and this connection")
    assert _sample(families, "ccexec_jobs", "ccexec_jobs_total", reason="exit") == 3
    assert _sample(families, "ccexec_job_run_seconds", "ccexec_job_run_seconds_count") == 3
    assert _sample(families, "ccexec_job_queue_wait_seconds", "ccexec_job_queue_wait_seconds_count") == 3
    assert _sample(families, "ccexec_output_bytes", "ccexec_output_bytes_total", stream="stdout") == 4
    assert _sample(families, "ccexec_output_bytes", "ccexec_output_bytes_total", stream="stderr") == 5
    assert _sample(families, "ccexec_capacity", "ccexec_capacity") >= 8
    await wire.close()


def test_unknown_http_path_is_404(daemon):
    assert http_get(daemon.port, "/nope")[0] == 404


def _raw_http(port: int, request_line: str, headers: str = "") -> tuple[str, dict, bytes]:
    """Status line, headers and every byte after them, up to the server's close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"{request_line}\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


def test_head_gets_the_headers_of_a_get_and_no_body(daemon):
    for path in ("/health", "/ready", "/metrics", "/nope"):
        get_status, get_headers, get_body = _raw_http(daemon.port, f"GET {path} HTTP/1.1")
        status, headers, body = _raw_http(daemon.port, f"HEAD {path} HTTP/1.1")
        assert status == get_status and headers["Content-Type"] == get_headers["Content-Type"], path
        assert body == b"" and int(headers["Content-Length"]) > 0, (path, body[:100])


@pytest.mark.parametrize("method, path, allowed", [
    ("POST", "/health", "GET, HEAD"), ("DELETE", "/ready", "GET, HEAD"), ("PUT", "/nope", "GET, HEAD"),
    ("HEAD", "/ws", "GET"), ("POST", "/ws/mcp", "GET")])
def test_other_methods_are_refused_with_405_and_the_allowed_ones(daemon, method, path, allowed):
    status, headers, body = _raw_http(daemon.port, f"{method} {path} HTTP/1.1")
    assert status.split()[1] == "405" and headers["Allow"] == allowed
    assert json.loads(body) == {"error": f"method {method} not allowed", "path": path}


def test_plain_get_of_the_websocket_path_is_told_in_json_to_upgrade(daemon):
    status, body, headers = http_get(daemon.port, "/ws")
    assert status == 426 and headers["Upgrade"] == "websocket"
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"error": "this path takes WebSocket connections only", "path": "/ws"}


@async_test()
async def test_websocket_on_unknown_path_is_refused_with_404(daemon):
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"ws://127.0.0.1:{daemon.port}/other", open_timeout=10)
    assert refused.value.response.status_code == 404


# ------------------------------------------------------------------ session


@async_test()
async def test_connected_is_the_first_message(daemon):
    async with websockets.connect(daemon.url) as ws:
        first = json.loads(await ws.recv())
    assert first["jsonrpc"] == "2.0" and first["method"] == "connected" and "id" not in first
    params = first["params"]
    assert uuid.UUID(params["session_id"]).version == 4
    assert isinstance(params["version"], str)
    assert {"execute", "control", "stream"} <= set(params["capabilities"])


@pytest.mark.parametrize("path", ["/ws", "/ws/mcp"])
@async_test()
async def test_both_websocket_paths_run_jobs(daemon, path):
    wire = await Wire.open(f"ws://127.0.0.1:{daemon.port}{path}")
    _, completed = await wire.run(command="echo same")
    assert completed["exit_code"] == 0 and wire.text(completed["job_id"]) == "same\n"
    await wire.close()


@async_test()
async def test_execute_answers_then_started_output_completed_in_order(daemon):
    wire = await Wire.open(daemon.url)
    request_id = await wire.request("execute", {"command": "echo one; echo two >&2"}, id="req-1")
    answer = await wire.answer(request_id)
    result = answer["result"]
    assert answer["id"] == "req-1" and result["status"] == "started"
    assert isinstance(result["pid"], int) and result["pgid"] == result["pid"] and len(result["job_id"]) == 32
    completed = await wire.completed(result["job_id"])
    job_messages = [m for m in wire.of_job(result["job_id"]) if "method" in m]
    methods = [m["method"] for m in job_messages]
    assert methods[0] == "process.started" and methods[-1] == "process.completed"
    assert job_messages[0]["params"] == {"status": "started", "pid": result["pid"], "pgid": result["pid"],
                                         "exit_code": None, "error": None, "job_id": result["job_id"]}
    assert wire.outputs(result["job_id"]) == [{
        "type": "stdout", "data": "one\n", "truncated": False, "chunk_index": None, "total_chunks": None,
        "job_id": result["job_id"], "offset": 0, "size": 4}]
    assert wire.text(result["job_id"], "stderr") == "two\n"
    assert set(completed) == {"status", "pid", "pgid", "exit_code", "error", "job_id", "reason",
                              "execution_time", "stdout_bytes", "stderr_bytes"}
    assert (completed["status"], completed["exit_code"], completed["reason"], completed["error"]) == \
        ("completed", 0, "exit", None)
    assert (completed["stdout_bytes"], completed["stderr_bytes"]) == (4, 4)
    await wire.close()


@async_test()
async def test_integer_ids_are_echoed(daemon):
    wire = await Wire.open(daemon.url)
    answer = await wire.answer(await wire.request("ping", id=2**40))
    assert answer["id"] == 2**40 and answer["result"]["pong"] is True
    await wire.close()


@async_test()
async def test_execute_without_id_runs_without_a_response(daemon):
    wire = await Wire.open(daemon.url)
    await wire.request("execute", {"command": "echo quiet"}, id=None)
    completed = await wire.until(lambda m: m.get("method") == "process.completed", 10)
    assert completed["params"]["exit_code"] == 0
    assert not [m for m in wire.messages if "result" in m]
    await wire.close()


@async_test()
async def test_ping_pong_and_hook_status(daemon):
    wire = await Wire.open(daemon.url)
    pong = (await wire.answer(await wire.request("ping")))["result"]
    assert pong["pong"] is True and isinstance(pong["timestamp"], float)
    await wire.request("pong", {"timestamp": 1.0})  # ignored: no reply, even with an id
    hooks = (await wire.answer(await wire.request("hook_status")))["result"]
    assert hooks == {"enabled": False, "hooks_configured": []}
    assert not [m for m in wire.messages if m.get("id") == 2]
    await wire.close()


# ------------------------------------------------------------------ bad input


def _readable_id(frame: str):
    """The id an error must echo: the request's, when it could be read as valid."""
    try:
        request_id = json.loads(frame).get("id")
    except (ValueError, AttributeError, RecursionError):
        return None
    return request_id if isinstance(request_id, (str, int)) and not isinstance(request_id, bool) else None


@pytest.mark.parametrize("frame, code", [
    ("{not json", -32700),
    ("[1, 2]", -32600),
    ('{"jsonrpc": "1.0", "method": "ping", "id": 1}', -32600),
    ('{"jsonrpc": "2.0", "method": "ping", "id": true}', -32600),
    ('{"jsonrpc": "2.0", "method": "ping", "id": 1.5}', -32600),
    ('{"jsonrpc": "2.0", "method": "no.such.method", "id": 7}', -32601),
    ('{"jsonrpc": "2.0", "method": "execute", "params": {}, "id": 8}', -32602),
    ('{"jsonrpc": "2.0", "method": "execute", "params": {"command": "x", "timeout": "soon"}, "id": 9}', -32602),
    ('{"jsonrpc": "2.0", "method": "control", "params": {"type": "EXPLODE"}, "id": 10}', -32602),
    ('{"jsonrpc": "2.0", "method": "control", "params": {"type": "cancel"}, "id": 11}', -32002),
    ("[" * 100000, -32700),
])
@async_test()
async def test_bad_request_gets_error_and_connection_stays(daemon, frame, code):
    wire = await Wire.open(daemon.url)
    await wire.send_raw(frame)
    error = await wire.until(lambda m: "error" in m, 10)
    assert error["error"]["code"] == code and isinstance(error["error"]["message"], str)
    assert error["id"] == _readable_id(frame)
    assert (await wire.answer(await wire.request("ping")))["result"]["pong"] is True
    await wire.close()


@async_test()
async def test_deep_nesting_with_a_lone_surrogate_is_a_request_error_at_any_depth(daemon):
    # The handler parses with some stack already in use: try every depth around the limit.
    wire = await Wire.open(daemon.url)
    depths = range(700, 1100)
    for depth in depths:
        await wire.send_raw("[" * depth + '"\\ud800"' + "]" * depth)
    codes = [(await wire.until(lambda m: "error" in m, 10))["error"]["code"] for _ in depths]
    assert set(codes) <= {-32700, -32600}, sorted(set(codes))
    assert (await wire.answer(await wire.request("ping")))["result"]["pong"] is True
    await wire.close()


@async_test()
async def test_invalid_params_error_names_the_param(daemon):
    wire = await Wire.open(daemon.url)
    answer = await wire.answer(await wire.request("execute", {"command": "true", "stream_mode": "words"}))
    assert answer["error"]["code"] == -32602 and "stream_mode" in answer["error"]["message"]
    assert answer["error"]["data"] == {"param": "stream_mode"}
    await wire.close()


@async_test()
async def test_binary_frame_is_invalid_request_and_connection_stays(daemon):
    wire = await Wire.open(daemon.url)
    await wire.send_raw(b'{"jsonrpc":"2.0","method":"ping","id":1}')
    error = await wire.until(lambda m: "error" in m, 10)
    assert error["error"]["code"] == -32600 and error["id"] is None
    assert (await wire.answer(await wire.request("ping")))["result"]["pong"] is True
    await wire.close()


@async_test()
async def test_invalid_utf8_text_frame_closes_1007(daemon):
    wire = await Wire.open(daemon.url)
    await wire.send_raw(b"\xff\xfe not utf-8", text=True)
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await wire.recv(10)
    assert closed.value.rcvd.code == 1007


@async_test()
async def test_frame_over_the_size_limit_closes_1009(daemon):
    wire = await Wire.open(daemon.url)
    await wire.send_raw(json.dumps({"jsonrpc": "2.0", "method": "ping", "params": {"pad": "x" * (11 << 20)}}))
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await wire.recv(10)
    assert closed.value.rcvd.code == 1009


@async_test()
async def test_bad_input_on_one_connection_does_not_disturb_another(daemon):
    good, bad = await Wire.open(daemon.url), await Wire.open(daemon.url)
    result = await good.execute(command="sleep 1; echo fine")
    for frame in ("{", b"\x00\x01", "[]", '{"jsonrpc":"2.0","method":"x","id":1}'):
        await bad.send_raw(frame)
    await bad.send_raw(b"\xff", text=True)  # closes `bad` with 1007
    completed = await good.completed(result["job_id"])
    assert completed["exit_code"] == 0 and good.text(result["job_id"]) == "fine\n"
    await good.close()
