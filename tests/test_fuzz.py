"""Fuzzing: property-based tests of the pure layers, then a real daemon under
malformed frames and under a flood of connections.

(a) Properties (hypothesis) that tests/test_protocol.py does not already
    cover: any JSON value as a frame, any params through every validator,
    lone surrogates, and the pure policy rules.
(b) A network fuzz: >= 10,000 malformed or mutated frames from several
    connections against one daemon; afterwards the same processes serve, a
    normal job is byte-exact and no process is left over.
(c) A flood: 2,000 idle connections plus a garbage sender, while a probe
    client's handshake and `echo` job stay fast.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import math
import random
import resource
import string
import time
from collections import Counter

import psutil
import pytest
import websockets
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ccexec import policy, protocol
from ccexec.protocol import ProtocolError, Request
from support import async_test, wait_for
from wire import Wire

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Every code the daemon may answer a bad or refused request with.
CLIENT_ERRORS = {-32700, -32600, -32601, -32602, -32001, -32002, -32005, -32006}

# ================================================================ (a) properties

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                | st.text() | st.sampled_from(["2.0", "execute", "control", "attach", "jobs",
                                               "job.status", "ping", "", "\x00"]))
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=20)

PARAM_NAMES = ["command", "argv", "cwd", "env", "stdin", "timeout", "stall_timeout", "detach", "parallel",
               "stream_mode", "name", "claude", "type", "job_id", "stdout_offset", "stderr_offset",
               "state", "limit", "other"]
any_params = st.dictionaries(st.sampled_from(PARAM_NAMES) | st.text(max_size=6), json_values, max_size=6)

VALIDATORS = {
    "execute": protocol.parse_execute, "control": protocol.parse_control, "attach": protocol.parse_attach,
    "jobs": protocol.parse_jobs, "job.status": protocol.parse_job_status,
}


def assert_wire_error(error: ProtocolError) -> dict:
    """The error a client would get: valid JSON-RPC, UTF-8 encodable, a valid id."""
    text = error.to_message()
    text.encode("utf-8")  # a WebSocket text frame must be UTF-8
    message = json.loads(text)
    assert message["jsonrpc"] == "2.0" and set(message) == {"jsonrpc", "error", "id"}
    assert isinstance(message["error"]["code"], int) and isinstance(message["error"]["message"], str)
    rid = message["id"]
    assert rid is None or (isinstance(rid, (str, int)) and not isinstance(rid, bool))
    return message


@PROPERTY
@given(json_values)
def test_any_json_value_as_a_frame_is_a_request_or_the_right_error(value):
    text = json.dumps(value)
    try:
        request = protocol.parse_frame(text)
    except ProtocolError as error:
        assert error.code in (-32600, -32602), error
        assert_wire_error(error)
        if error.code == -32602:  # only an object with a valid envelope gets this far
            assert isinstance(value, dict) and not isinstance(value.get("params"), (dict, type(None)))
    else:
        assert isinstance(value, dict) and value["jsonrpc"] == "2.0"
        assert isinstance(request.method, str) and request.method and isinstance(request.params, dict)
        assert request.has_id == ("id" in value)


@PROPERTY
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200),
                 json_values.map(lambda v: json.dumps(v)[:-1] if json.dumps(v) else "x")))
def test_any_frame_even_truncated_json_gets_request_or_error(frame):
    try:
        protocol.parse_frame(frame)
    except ProtocolError as error:
        assert error.code in (-32700, -32600, -32602)
        assert_wire_error(error)


@PROPERTY
@given(st.sampled_from(sorted(VALIDATORS)), any_params,
       st.one_of(st.integers(), st.text(max_size=10), st.none()))
def test_any_params_through_every_validator_give_a_spec_or_invalid_params(method, params, request_id):
    request = Request(method=method, params=params, id=request_id, has_id=request_id is not None)
    try:
        spec = VALIDATORS[method](request)
    except ProtocolError as error:
        assert error.code == -32602, error
        assert error.request_id == request_id
        assert isinstance(error.data["param"], str) and f"'{error.data['param']}'" in error.message
        assert_wire_error(error)
    else:
        assert spec is not None
        if method == "execute":
            assert (spec.command is None) != (spec.argv is None)
            json.dumps(spec.to_dict())


@PROPERTY
@given(st.sampled_from(['"id":"%s"', '"method":"%s"', '"params":{"command":"%s"}', '"params":{"%s":1}']),
       st.integers(0xD800, 0xDFFF))
def test_lone_surrogate_escapes_are_invalid_request_not_a_broken_answer(where, code_point):
    body = where % f"\\u{code_point:04x}"
    frame = '{"jsonrpc":"2.0","method":"ping","id":1,' + body + "}"
    with pytest.raises(ProtocolError) as info:
        protocol.parse_frame(frame.replace('"method":"ping",', "", 1) if '"method"' in body else frame)
    assert info.value.code == -32600
    assert_wire_error(info.value)


def test_surrogate_pairs_and_escaped_backslashes_stay_valid():
    request = protocol.parse_frame('{"jsonrpc":"2.0","method":"ping","id":"\\ud83d\\ude00 \\\\ud800"}')
    assert request.id == "\U0001F600 \\ud800"


# -- policy (pure)

@PROPERTY
@given(st.text(max_size=80), st.lists(st.text(max_size=10), max_size=5),
       st.lists(st.sampled_from(["echo", "rm", "*sh", "/usr/bin/*", "[ab]*", "*"]), max_size=3),
       st.lists(st.sampled_from(["rm", "sh", "env", "*"]), max_size=2), st.booleans())
def test_command_policy_never_raises_and_deny_wins(command, argv, allow, deny, allow_shell):
    rules = policy.CommandPolicy(tuple(allow), tuple(deny), allow_shell)
    refusal = rules.check(command=command)
    if not allow_shell:
        assert refusal is not None and refusal.data["reason"] == "shell"
    if argv:
        refusal = rules.check(argv=argv)
        programs = policy.argv_programs(argv)
        if any(policy._matches(p, deny) for p in programs):
            assert refusal is not None and refusal.data["reason"] in ("denied", "not_allowed")
        if refusal is None:
            assert all(not policy._matches(p, deny) and (not allow or policy._matches(p, allow))
                       for p in programs)


names = st.text(alphabet=string.ascii_uppercase + "_", min_size=1, max_size=6)


@PROPERTY
@given(st.dictionaries(names, st.text(max_size=4), max_size=8), st.dictionaries(names, st.text(max_size=4), max_size=4),
       st.lists(st.sampled_from(["A*", "B", "KEEP_*", "*"]), max_size=2),
       st.lists(st.sampled_from(["C*", "D", "*"]), max_size=2), st.lists(names | st.just("A*"), max_size=3))
def test_environment_policy_remove_always_wins_and_clients_set_only_what_is_allowed(
        daemon_env, requested, env_pass, client_allow, remove):
    env = policy.job_environment(daemon_env, env_pass=env_pass, env_set={"SET": "1"}, requested=requested,
                                 client_allow=client_allow, remove=remove)
    for name in env:
        assert not policy._named(name, remove)
    for name, value in requested.items():
        if name in env and env[name] == value and daemon_env.get(name) != value and name != "SET":
            assert policy._named(name, client_allow)
    if env_pass:
        for name in daemon_env:
            if name in env and name not in requested and name != "SET":
                assert policy._named(name, tuple(env_pass) + policy.ALWAYS_PASS)
    if not policy._named("SET", remove) and not ("SET" in requested and policy._named("SET", client_allow)):
        assert env["SET"] == "1"


@PROPERTY
@given(st.floats(0.5, 200), st.integers(1, 50),
       st.lists(st.floats(0, 0.5, allow_nan=False), min_size=1, max_size=300))
@example(25.0, 1, [0.0, 0.0])  # told to wait 0.04 s, it found 0.99999999999909 tokens then
def test_token_bucket_never_lets_more_than_burst_plus_rate_times_time(rate, burst, gaps):
    now = 1000.0
    bucket = policy.TokenBucket(rate, burst, now)
    passed = 0
    for gap in gaps:
        now += gap
        wait = bucket.take(now)
        assert wait >= 0 and math.isfinite(wait)
        if wait == 0:
            passed += 1
        else:  # the wait it names is enough
            probe = policy.TokenBucket(rate, burst, 0)
            probe.tokens, probe.stamp = bucket.tokens, bucket.stamp
            assert probe.take(now + wait) == 0
    assert passed <= burst + rate * (now - 1000.0) + policy.ROUNDING * len(gaps)


@PROPERTY
@given(st.text(max_size=300))
def test_token_file_parser_raises_only_policy_errors_naming_no_token(text):
    try:
        tokens = policy.parse_tokens(text)
    except policy.PolicyError as error:
        assert str(error).startswith("token file line ")
        names = {line.split()[0] for line in text.splitlines() if line.split()}
        secrets = {line.split()[1] for line in text.splitlines() if len(line.split()) == 2}
        for secret in secrets - names:
            if len(secret) >= policy.MIN_TOKEN_CHARS and not any(secret in n for n in names):
                assert secret not in str(error)
    else:
        for name, token in tokens.by_name.items():
            assert tokens.match(token) == name
            assert tokens.match(token + "x") is None


# ================================================================ (b) network fuzz

FUZZ_FRAMES = 30_000
FUZZ_CONNECTIONS = 6
FUZZ_SEED = 20_240_601
FUZZ_MAX_FRAME = 256 * 1024


class FuzzClient:
    """One fuzzing connection: a sender that does not wait for answers and a
    reader that drains them (and counts them) all the time."""

    def __init__(self, index: int, url: str, rng: random.Random, shared: dict):
        self.index, self.url, self.rng, self.shared = index, url, rng, shared
        self.pick = random.Random(index)  # which foreign job: apart, so timing never shifts the frames drawn
        self.codes: Counter = Counter()
        self.closes: Counter = Counter()
        self.results = self.notifications = self.sent = 0
        self.foreign_answers: list[dict] = []
        self.job_ids: list[str] = []
        self.ws = None
        self.reader: asyncio.Task | None = None
        self.final: asyncio.Future | None = None

    async def connect(self) -> None:
        self.ws = await websockets.connect(self.url, max_size=None, open_timeout=20, ping_interval=None)
        self.reader = asyncio.ensure_future(self.read(self.ws))

    async def read(self, ws) -> None:
        try:
            async for raw in ws:
                message = json.loads(raw)
                if "error" in message:
                    self.codes[message["error"]["code"]] += 1
                    if str(message.get("id", "")).startswith("foreign-"):
                        self.foreign_answers.append(message)
                elif "result" in message:
                    self.results += 1
                    result = message["result"]
                    if isinstance(result, dict) and "job_id" in result and "status" in result \
                            and result.get("status") in ("started", "queued", "rejected"):
                        self.job_ids.append(result["job_id"])
                        self.shared.setdefault(self.index, []).append(result["job_id"])
                    if str(message.get("id", "")).startswith("foreign-"):
                        self.foreign_answers.append(message)
                else:
                    self.notifications += 1
                if message.get("id") == f"final-{self.index}" and self.final and not self.final.done():
                    self.final.set_result(True)
        except websockets.ConnectionClosed:
            pass
        self.closes[ws.close_code] += 1

    async def closing_frame(self, frame, text: bool, expected: int) -> None:
        """Send a frame the server answers by closing; wait for the close and reconnect."""
        await self.ws.send(frame, text=text)
        self.sent += 1
        await asyncio.wait_for(self.reader, 15)
        assert self.ws.close_code == expected, (self.ws.close_code, expected)
        await self.connect()

    def foreign_job(self) -> str | None:
        others = [j for i, ids in self.shared.items() if i != self.index for j in ids[-50:]]
        return self.pick.choice(others) if others else None

    async def run(self, frames: int) -> None:
        await self.connect()
        for n in range(frames):
            kind, frame = make_frame(self.rng, n, self)
            if kind == "invalid_utf8":
                await self.closing_frame(frame, True, 1007)
            elif kind == "oversized":
                await self.closing_frame(frame, False if isinstance(frame, bytes) else True, 1009)
            else:
                try:
                    await self.ws.send(frame)
                except websockets.ConnectionClosed:  # must not happen: a bad frame never closes
                    raise AssertionError(f"connection {self.index} closed after a {kind} frame: "
                                         f"{self.ws.close_code} {self.ws.close_reason}")
                self.sent += 1
            if n % 32 == 0:
                await asyncio.sleep(0)
        self.final = asyncio.get_running_loop().create_future()
        await self.ws.send(json.dumps({"jsonrpc": "2.0", "method": "ping", "id": f"final-{self.index}"}))
        await asyncio.wait_for(self.final, 30)  # every answer before it has been drained
        await self.ws.close()
        await asyncio.wait_for(self.reader, 10)


TEMPLATES = [
    {"jsonrpc": "2.0", "method": "ping", "id": 1},
    {"jsonrpc": "2.0", "method": "pong"},
    {"jsonrpc": "2.0", "method": "hook_status", "id": "h"},
    {"jsonrpc": "2.0", "method": "execute", "params": {"argv": ["echo", "fuzz"]}, "id": 2},
    {"jsonrpc": "2.0", "method": "execute", "params": {"argv": ["true"], "parallel": True, "stream_mode": "chunks"}, "id": 3},
    {"jsonrpc": "2.0", "method": "execute", "params": {"command": "echo shell", "timeout": 5}, "id": 4},
    {"jsonrpc": "2.0", "method": "execute", "params": {"argv": ["printf", "%s", "x"], "stdin": "in", "env": {"A": "b"}}, "id": 5},
    {"jsonrpc": "2.0", "method": "control", "params": {"type": "CANCEL"}, "id": 6},
    {"jsonrpc": "2.0", "method": "attach", "params": {"job_id": "0" * 32, "stdout_offset": 0}, "id": 7},
    {"jsonrpc": "2.0", "method": "job.status", "params": {"job_id": "f" * 32}, "id": 8},
    {"jsonrpc": "2.0", "method": "jobs", "params": {"state": "finished", "limit": 3}, "id": 9},
    {"jsonrpc": "2.0", "method": "no.such.method", "id": 10},
]
NOISE = ['"', "{", "}", "[", "]", ",", ":", "\\", "\\u", "\\ud800", "null", "true", "-1", "1e999", "0x10",
         "\x00", "é", "\U0001F600", "\u2028", " ", "NaN", "Infinity", "\n"]


def mutate(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 4)):
        if not text:
            text = rng.choice(NOISE)
        i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
        op = rng.randrange(5)
        if op == 0:
            text = text[:i] + rng.choice(NOISE) + text[i + 1:]
        elif op == 1:
            text = text[:i] + text[j:]
        elif op == 2:
            text = text[:i] + rng.choice(NOISE) + text[i:]
        elif op == 3:
            text = text[:j] + text[i:j] + text[j:]
        else:
            text = text[:i]
    return text


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**31, 2**63, -(2**64), 10**rng.randint(1, 300)])
    if kind == 3:
        return rng.choice([0.5, -1e300, 1e-300, 3.0])
    if kind in (4, 5):
        return "".join(rng.choice(NOISE[:20] + list("abc")) for _ in range(rng.randint(0, 12)))
    if kind == 6:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["command", "argv", "type", "job_id", "env", "timeout", "x"]): random_json(rng, depth + 1)
            for _ in range(rng.randint(0, 4))}


def make_frame(rng: random.Random, n: int, client: FuzzClient):
    """One frame of a kind drawn with fixed weights: (kind, frame)."""
    roll = rng.random()
    if roll < 0.30:
        return "mutated", mutate(rng, json.dumps(rng.choice(TEMPLATES)))
    if roll < 0.45:  # wrong types anywhere in a request
        message = dict(rng.choice(TEMPLATES))
        message[rng.choice(["jsonrpc", "method", "id", "params"])] = random_json(rng)
        if rng.random() < 0.5:
            message["params"] = {k: random_json(rng) for k in ("command", "argv", "timeout", "env", "type",
                                                                "job_id", "stdin", "limit") if rng.random() < 0.4}
        return "wrong_types", json.dumps(message)
    if roll < 0.52:  # written by hand: past 4,300 digits Python's own json refuses the integer
        big = rng.choice(["-" * rng.randint(0, 1) + "1" + "0" * rng.randint(20, 6000),
                          json.dumps("x" * rng.randint(1000, 20000)), "1" + "0" * 400 + ".5", "1e400"])
        return "huge_id", '{"jsonrpc":"2.0","method":"ping","id":%s}' % big
    if roll < 0.57:
        depth = rng.choice([50, 500, 5000, 40000])  # under max_frame_bytes even as {"a":…}
        opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
        inner = opener * depth + "1" + closer * depth
        return "deep", rng.choice([inner, '{"jsonrpc":"2.0","method":"ping","id":1,"params":{"x":%s}}' % inner])
    if roll < 0.62:
        return "binary", rng.randbytes(rng.randint(0, 300))
    if roll < 0.69:
        method = rng.choice(["", "EXECUTE", "input", "rpc.discover", "x" * 300, "\u00e9", "execute ", "jobs."])
        return "unknown_method", json.dumps({"jsonrpc": "2.0", "method": method, "id": n})
    if roll < 0.76:
        action, job_id = rng.choice(["PAUSE", "RESUME", "CANCEL"]), client.foreign_job()
        if job_id is not None:
            return "foreign_control", json.dumps({"jsonrpc": "2.0", "method": "control", "id": f"foreign-{n}",
                                                  "params": {"type": action, "job_id": job_id}})
        return "control", json.dumps(TEMPLATES[7])
    if roll < 0.79:
        return "surrogate", '{"jsonrpc":"2.0","method":"ping","id":"\\udc%02x"}' % rng.randrange(256)
    if roll < 0.80:
        return "invalid_utf8", rng.choice([b"\xff\xfe", b'{"a":"\xc3\x28"}', b"\xed\xa0\x80", b"ok\x80"])
    if roll < 0.801:
        return "oversized", "x" * (FUZZ_MAX_FRAME + rng.randint(1, 4096))
    if roll < 0.83:  # valid requests, some of which run jobs
        return "valid", json.dumps(rng.choice(TEMPLATES))
    return "random_json", json.dumps(random_json(rng))


def _no_running_jobs(d) -> bool:
    health = d.health()
    return health["running_jobs"] == 0 and health["queued_jobs"] == 0


def _job_processes(d) -> list[psutil.Process]:
    found = []
    for pid in d.role_pids("executor"):
        try:
            found += psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            pass
    return found


@pytest.mark.timeout(240)
@async_test(200)
async def test_network_fuzz_leaves_the_daemon_serving_with_the_same_processes(make_daemon):
    d = make_daemon(settings={"max_frame_bytes": FUZZ_MAX_FRAME, "allow_shell": "false",
                              "command_allow": "echo true printf"})
    before = {role: d.role_pids(role) for role in ("broker", "executor", "handler")}
    master = random.Random(FUZZ_SEED)
    shared: dict[int, list[str]] = {}
    clients = [FuzzClient(i, d.url, random.Random(master.random()), shared) for i in range(FUZZ_CONNECTIONS)]
    per_client = math.ceil(FUZZ_FRAMES / FUZZ_CONNECTIONS)
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(c.run(per_client) for c in clients)), 120)
    elapsed = time.monotonic() - started

    sent = sum(c.sent for c in clients)
    codes = sum((c.codes for c in clients), Counter())
    closes = sum((c.closes for c in clients), Counter())
    foreign = [a for c in clients for a in c.foreign_answers]
    print(f"\nnetwork fuzz: {sent} frames over {FUZZ_CONNECTIONS} connections in {elapsed:.1f} s "
          f"= {sent / elapsed:.0f} frames/s (seed {FUZZ_SEED})")
    print(f"  errors by code: {dict(sorted(codes.items()))}")
    print(f"  results: {sum(c.results for c in clients)}, notifications: {sum(c.notifications for c in clients)}, "
          f"jobs submitted: {sum(len(c.job_ids) for c in clients)}")
    print(f"  connections closed by the server, by close code (reconnected): "
          f"{ {k: v for k, v in closes.items() if k not in (None,)} }")
    print(f"  control of other connections' jobs: {len(foreign)}, all -32002: "
          f"{all(a.get('error', {}).get('code') == -32002 for a in foreign)}")

    assert sent >= FUZZ_FRAMES and elapsed < 90
    assert set(codes) <= CLIENT_ERRORS, f"unexpected error codes: {codes}"  # no -32603: no internal error
    assert foreign and all(a.get("error", {}).get("code") == -32002 for a in foreign), foreign[:3]
    assert closes[1007] >= 1 and closes[1009] >= 1

    await asyncio.to_thread(wait_for, lambda: _no_running_jobs(d), 60, 0.2, "every fuzz job finished")
    await asyncio.to_thread(wait_for, lambda: not _job_processes(d), 15, 0.2, "no job process left")
    assert {role: d.role_pids(role) for role in ("broker", "executor", "handler")} == before
    assert "Traceback" not in d.log_tail(100000), d.log_tail(80)

    payload = "".join(chr(c) for c in range(32, 127)) + "é✓\U0001F600" * 300 + "\n"
    wire = await Wire.open(d.url)
    _, completed = await wire.run(argv=["printf", "%s", payload])
    assert completed["exit_code"] == 0 and wire.text(completed["job_id"]) == payload
    assert completed["stdout_bytes"] == len(payload.encode())
    await wire.close()


# ================================================================ (c) flood

IDLE_CONNECTIONS = 2000
PROBE_BOUND = 2.0  # seconds: the probe's handshake, and its echo job from execute to completion


def _raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def _garbage(url: str, stop: asyncio.Event, counter: Counter) -> None:
    rng = random.Random(7)
    async with websockets.connect(url, max_size=None, open_timeout=20) as ws:
        async def drain():
            async for _ in ws:
                counter["answers"] += 1
        reader = asyncio.ensure_future(drain())
        while not stop.is_set():
            await ws.send(rng.choice(["{", "[]", '{"jsonrpc":"2.0","method":"nope","id":1}', "null",
                                      '{"jsonrpc":"2.0","method":"execute","params":{"command":7},"id":2}'])
                          if rng.random() < 0.8 else rng.randbytes(64))
            counter["sent"] += 1
            if counter["sent"] % 16 == 0:
                await asyncio.sleep(0)
        reader.cancel()


async def _probe(url: str) -> tuple[float, float]:
    started = time.monotonic()
    wire = await Wire.open(url)
    handshake = time.monotonic() - started
    started = time.monotonic()
    _, completed = await wire.run(command="echo probe")
    done = time.monotonic() - started
    assert completed["exit_code"] == 0 and wire.text(completed["job_id"]) == "probe\n"
    await wire.close()
    return handshake, done


@pytest.mark.timeout(300)
@async_test(240)
async def test_flood_of_idle_connections_and_garbage_does_not_starve_a_probe(make_daemon):
    limit = _raise_nofile(IDLE_CONNECTIONS + 1000)
    if limit < IDLE_CONNECTIONS + 200:
        pytest.skip(f"RLIMIT_NOFILE {limit} is too low for {IDLE_CONNECTIONS} connections")
    d = make_daemon(settings={"max_sessions": IDLE_CONNECTIONS + 500})
    handler_limits = [psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)[0] for pid in d.role_pids("handler")]
    assert all(n >= IDLE_CONNECTIONS for n in handler_limits), handler_limits
    effective = configparser.ConfigParser(interpolation=None)  # rlimit_nofile, capped to the hard limit
    effective.read(d.state_dir / "run" / "ccexec.ini")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert effective.getint("watcher:handler", "rlimit_nofile") == (
        65536 if hard == resource.RLIM_INFINITY else min(65536, hard))
    handlers = d.role_pids("handler")

    baseline = [await _probe(d.url) for _ in range(3)]
    idle: list = []
    started = time.monotonic()
    for batch in range(0, IDLE_CONNECTIONS, 100):  # 100 handshakes in flight at a time
        idle += await asyncio.gather(*(
            websockets.connect(d.url, open_timeout=30, ping_interval=None, max_queue=None)
            for _ in range(min(100, IDLE_CONNECTIONS - batch))))
    opened = time.monotonic() - started
    await asyncio.to_thread(wait_for, lambda: d.health()["active_sessions"] >= IDLE_CONNECTIONS, 15, 0.2,
                            "the pool counting every idle connection")

    stop, garbage = asyncio.Event(), Counter()
    senders = [asyncio.ensure_future(_garbage(d.url, stop, garbage)) for _ in range(2)]
    try:
        await asyncio.to_thread(wait_for, lambda: garbage["answers"] > 500, 20, 0.05, "garbage flowing")
        probes = [await _probe(d.url) for _ in range(5)]
    finally:
        stop.set()
        await asyncio.wait(senders, timeout=10)
    for task in senders:
        if task.done() and task.exception():
            raise task.exception()

    handshakes, completions = [p[0] for p in probes], [p[1] for p in probes]
    print(f"\nflood: {len(idle)} idle connections opened in {opened:.1f} s "
          f"({len(idle) / opened:.0f}/s); handler RLIMIT_NOFILE {handler_limits}; "
          f"{d.health()['active_sessions']} sessions in the pool")
    print(f"  garbage: {garbage['sent']} frames sent, {garbage['answers']} answers, by 2 clients")
    print(f"  probe without load: handshake max {max(b[0] for b in baseline) * 1000:.0f} ms, "
          f"echo max {max(b[1] for b in baseline) * 1000:.0f} ms")
    print(f"  probe under flood:  handshake max {max(handshakes) * 1000:.0f} ms "
          f"(mean {sum(handshakes) / len(handshakes) * 1000:.0f}), echo max {max(completions) * 1000:.0f} ms "
          f"(mean {sum(completions) / len(completions) * 1000:.0f}); bound {PROBE_BOUND:.0f} s each")
    assert max(handshakes) < PROBE_BOUND and max(completions) < PROBE_BOUND
    assert garbage["sent"] > 500
    assert all(ws.close_code is None for ws in idle), "an idle connection was dropped"
    assert d.role_pids("handler") == handlers

    await asyncio.gather(*(ws.close() for ws in idle))
    await asyncio.to_thread(wait_for, lambda: d.health()["active_sessions"] < 10, 30, 0.2,
                            "idle connections gone")
