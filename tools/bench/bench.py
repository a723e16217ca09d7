#!/usr/bin/env python3
"""ccexec benchmark suite: ccexec against websocketd and the raw pipe limit.

    .venv/bin/python tools/bench/bench.py                 # full suite, 3 runs each
    .venv/bin/python tools/bench/bench.py --quick         # tiny sizes, 1 run (a smoke test)
    .venv/bin/python tools/bench/bench.py --only W1,W2 --runs 5 --json out.json

Every workload runs against ccexec and, in the same run, against the
baselines: websocketd (one process per connection; installed with apt-get
when absent and running as root, else that column is skipped, saying why),
"python floor" (tools/bench/floor_server.py: one Python process that does
nothing but spawn and relay, the most any Python server on the same
libraries could reach; W1 and W2), "raw" (the same command spawned with
asyncio subprocess pipes, no network) and, for W2, two "ceilings"
(tools/bench/wire_ceiling_server.py: the stream sent from memory, in ccexec's
messages and in websocketd's bare lines: the most the same client can
take in each wire format, whatever the server) and, for the idle pool, the
"library floor" (tools/bench/library_floor.py: the same processes importing
only the libraries ccexec's roles import). W5 also probes ccexec while its own
jobs spin the CPU, at job_nice 0 and 5. Prints a Markdown table (median,
min-max over the runs, ratios ccexec/baseline) and writes JSON. Servers
bind 127.0.0.1 only; every loop is bounded; everything started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import websockets

ROOT = Path(__file__).resolve().parents[2]
CCEXECD = str(Path(sys.executable).parent / "ccexecd")
DONE = "__bench_done__"
IDLE_SETTLE = 1.0  # seconds after start before an idle pool is measured
JOB_TIMEOUT = 300  # seconds any one job of any workload may take: a server that stops answering fails the run
OUTPUT_PREFIX = '{"jsonrpc":"2.0","method":"process.output"'
COMPLETED_PREFIX = '{"jsonrpc":"2.0","method":"process.completed"'
# websocketd runs one program per connection; for persistent connections the
# program is this small shell loop: one command per message, then a marker.
SHELL_LOOP = f'while IFS= read -r line; do sh -c "$line"; echo {DONE}; done'


@dataclass
class Sizes:
    w1_jobs: int = 300
    w1_concurrency: int = 8
    w1_single: int = 100              # jobs one after another, nothing else running
    w2_raw_bytes: int = 50331648      # base64 makes 64 MiB of it
    w3_raw_bytes: int = 6291456       # one 8 MiB line
    w4_connections: int = 1000
    w5_streamers: int = 4
    w5_probes: int = 200


QUICK = Sizes(w1_jobs=20, w1_concurrency=4, w1_single=5, w2_raw_bytes=393216, w3_raw_bytes=196608, w4_connections=20,
              w5_streamers=2, w5_probes=20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ------------------------------------------------------------------ servers

class CcexecServer:
    def __init__(self, tmp: Path, slots: int = 8, executors: int = 2, job_nice: int = 0):
        self.port = free_port()
        self.state = tmp / f"ccexec-{self.port}"
        self.slots, self.executors, self.job_nice = slots, executors, job_nice
        self.proc: subprocess.Popen | None = None
        self.ready_after = 0.0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def __aenter__(self) -> "CcexecServer":
        config = self.state / "ccexec.ini"
        self.state.mkdir(parents=True)
        text = (ROOT / "etc" / "ccexec.ini").read_text()
        config.write_text(text.replace("slots_per_executor = 8", f"slots_per_executor = {self.slots}")
                              .replace("max_queue = 1000", "max_queue = 100000")
                              .replace("job_nice = 0", f"job_nice = {self.job_nice}"))
        started = time.monotonic()
        self.proc = subprocess.Popen([CCEXECD, "--config", str(config), "--port", str(self.port),
                                      "--state-dir", str(self.state / "state"), "--executors", str(self.executors),
                                      "--log-level", "warning"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.state,
                                     start_new_session=True)
        await wait_http(self.port, "/ready", 30)
        self.ready_after = time.monotonic() - started
        return self

    def memory(self) -> tuple[int, int]:
        """Memory of the daemon's own processes (not its jobs): (RSS summed,
        PSS summed). Blocking: call it in a thread."""
        try:
            return pool_memory([psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children())
        except psutil.Error:
            return 0, 0

    def roles(self) -> dict[int, str]:
        """The role of each of the daemon's own processes, by pid."""
        roles = {}
        for p in [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children():
            cmd = p.cmdline()
            roles[p.pid] = cmd[3] if cmd[1:3] == ["-m", "ccexec"] else ("arbiter" if p.pid == self.proc.pid else "plugin")
        return roles

    def per_process(self) -> dict[str, float]:
        return {f"{role}-{pid}": round(psutil.Process(pid).memory_info().rss / 2**20, 1)
                for pid, role in self.roles().items()}

    async def __aexit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, 60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.state, ignore_errors=True)


def pool_memory(procs: list[psutil.Process]) -> tuple[int, int]:
    """(RSS summed, PSS summed) of these processes. RSS counts the pages
    processes share (the interpreter, libraries) once per process; PSS
    splits them, so its sum is what the pool really holds. Blocking."""
    infos = [p.memory_full_info() for p in procs]
    return sum(m.rss for m in infos), sum(m.pss for m in infos)


class LibraryFloor:
    """tools/bench/library_floor.py, one process per role given: a pool that
    imports what ccexec's does from its libraries, and nothing of ccexec."""

    def __init__(self, roles: list[str]):
        self.roles = roles
        self.procs: list[subprocess.Popen] = []

    async def __aenter__(self) -> "LibraryFloor":
        script = str(Path(__file__).with_name("library_floor.py"))
        for role in self.roles:
            self.procs.append(subprocess.Popen([sys.executable, script, role], stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE, start_new_session=True))
        try:
            for proc in self.procs:
                line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
                if line != b"ready\n":
                    raise RuntimeError("library_floor.py did not start")
        except BaseException:
            await self.__aexit__()
            raise
        return self

    def memory(self) -> tuple[int, int]:
        return pool_memory([psutil.Process(p.pid) for p in self.procs])

    async def __aexit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.stdin.close()  # its signal to exit
        for proc in self.procs:
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
            proc.stdout.close()


class WebsocketdServer:
    START_TIMEOUT = 10  # seconds for its port to open

    def __init__(self, program: list[str]):
        self.port = free_port()
        self.program = program
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def command(self) -> list[str]:
        return ["websocketd", "--address", "127.0.0.1", "--port", str(self.port), "--loglevel", "error",
                *self.program]

    async def __aenter__(self):
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + self.START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.command()[0]} did not start")

    async def __aexit__(self, *exc: object) -> None:
        self.proc.terminate()
        await asyncio.to_thread(self.proc.wait, 10)


class FloorServer(WebsocketdServer):
    """tools/bench/floor_server.py: the least any Python server must do per job."""

    def __init__(self):
        super().__init__([])

    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).with_name("floor_server.py")), str(self.port)]


class WireCeilingServer(WebsocketdServer):
    """tools/bench/wire_ceiling_server.py: a stream sent from memory, the most
    a client can take in a wire format ("ccexec" or websocketd's "lines")."""

    START_TIMEOUT = 120  # it runs the command and builds every message first

    def __init__(self, wire_format: str, shell_command: str):
        super().__init__([])
        self.wire_format, self.shell_command = wire_format, shell_command

    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).with_name("wire_ceiling_server.py")), "--format", self.wire_format,
                str(self.port), self.shell_command]


async def wait_http(port: int, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status = (await reader.readline()).split()
            writer.close()
            if len(status) > 1 and status[1] == b"200":
                return
        except OSError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing answered {path} on port {port} within {timeout} s")


def websocketd_available() -> str | None:
    """None if websocketd can run here, else why not."""
    if shutil.which("websocketd"):
        return None
    if os.geteuid() != 0:
        return "websocketd is not installed and installing it needs root"
    result = subprocess.run(["apt-get", "install", "-y", "-q", "websocketd"], capture_output=True, timeout=600)
    return None if result.returncode == 0 and shutil.which("websocketd") else "apt-get install websocketd failed"


# ------------------------------------------------------------------ clients

def execute_request(command: str, **params) -> str:
    return json.dumps({"jsonrpc": "2.0", "method": "execute", "id": 1, "params": {"command": command, **params}})


async def ccexec_job(url: str, command: str, ws=None, **params) -> tuple[int, float]:
    """Run one job; (stdout bytes, seconds). Opens its own connection unless given one."""
    started = time.monotonic()
    own = ws is None
    ws = ws or await websockets.connect(url, max_size=None, open_timeout=30, ping_interval=None)
    try:
        async with asyncio.timeout(JOB_TIMEOUT):
            await ws.send(execute_request(command, **params))
            size = 0
            async for raw in ws:
                if raw.startswith(OUTPUT_PREFIX):  # as lean as the websocketd client: no JSON parsing
                    size += int(raw[raw.rindex('"size":') + 7:-2])
                elif raw.startswith(COMPLETED_PREFIX):
                    return size, time.monotonic() - started
        raise RuntimeError("connection closed before process.completed")
    finally:
        if own:
            await ws.close()


async def websocketd_oneshot(url: str) -> tuple[int, float]:
    started, size = time.monotonic(), 0
    async with websockets.connect(url, max_size=None, open_timeout=30, ping_interval=None) as ws, \
            asyncio.timeout(JOB_TIMEOUT):
        try:
            async for message in ws:
                size += len(message) + 1  # websocketd strips the newline of each line
        except websockets.ConnectionClosed:
            pass
    return size, time.monotonic() - started


async def websocketd_command(ws, command: str) -> tuple[int, float]:
    started, size = time.monotonic(), 0
    async with asyncio.timeout(JOB_TIMEOUT):
        await ws.send(command)
        async for message in ws:
            if message == DONE:
                return size, time.monotonic() - started
            size += len(message) + 1
    raise RuntimeError("websocketd closed early")


async def raw_job(command: str) -> tuple[int, float]:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec("sh", "-c", command, stdout=asyncio.subprocess.PIPE,
                                                stdin=asyncio.subprocess.DEVNULL)
    size = 0
    while chunk := await proc.stdout.read(1 << 20):
        size += len(chunk)
    await proc.wait()
    return size, time.monotonic() - started


async def bounded(jobs: int, concurrency: int, run_one) -> list[float]:
    """Run `jobs` calls of run_one() with at most `concurrency` at once; their latencies."""
    latencies: list[float] = []
    counter = iter(range(jobs))

    async def worker() -> None:
        for _ in counter:
            latencies.append((await run_one())[1])
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def on_persistent(url: str, jobs: int, concurrency: int, run_on) -> list[float]:
    """Run jobs over `concurrency` connections opened once (one job at a time on each)."""
    conns = [await websockets.connect(url, max_size=None, ping_interval=None) for _ in range(concurrency)]
    pool: asyncio.Queue = asyncio.Queue()
    for conn in conns:
        pool.put_nowait(conn)

    async def one():
        conn = await pool.get()
        try:
            return await run_on(conn)
        finally:
            pool.put_nowait(conn)
    try:
        return await bounded(jobs, concurrency, one)
    finally:
        for conn in conns:
            await conn.close()


# ------------------------------------------------------------------ workloads

@dataclass
class Results:
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, workload: str, metric: str, target: str, values: list[float], better: str) -> None:
        self.rows.append({"workload": workload, "metric": metric, "target": target, "values": values,
                          "median": statistics.median(values), "min": min(values), "max": max(values),
                          "better": better})


def throughput(latencies: list[float], wall: float) -> float:
    return len(latencies) / wall


async def one_at_a_time(sizes: Sizes, res: Results, target: str, run_one) -> None:
    """Short jobs one after another on an otherwise idle server, each on a
    connection of its own: the latency a lone client feels."""
    record_percentiles(res, "W1 one at a time", target, await bounded(sizes.w1_single, 1, run_one))


async def w1_jsonrpc(url: str, sizes: Sizes, res: Results, target: str) -> None:
    """W1 every way against a server speaking ccexec's protocol (ccexec, the floor)."""
    n, conc = sizes.w1_jobs, sizes.w1_concurrency
    await one_at_a_time(sizes, res, target, lambda: ccexec_job(url, "echo hello"))
    for mode in ("per-connection", "persistent"):
        started = time.monotonic()
        if mode == "per-connection":
            lat = await bounded(n, conc, lambda: ccexec_job(url, "echo hello"))
        else:
            lat = await on_persistent(url, n, conc, lambda c: ccexec_job(url, "echo hello", ws=c))
        record_latency(res, f"W1 {mode}", target, lat, time.monotonic() - started)


async def w1(sizes: Sizes, runs: int, res: Results, tmp: Path, websocketd: bool) -> None:
    n, conc = sizes.w1_jobs, sizes.w1_concurrency
    for _ in range(runs):
        async with CcexecServer(tmp) as server:
            await w1_jsonrpc(server.url, sizes, res, "ccexec")
        if websocketd:
            async with WebsocketdServer(["sh", "-c", "echo hello"]) as wsd:
                await one_at_a_time(sizes, res, "websocketd", lambda: websocketd_oneshot(wsd.url))
                started = time.monotonic()
                lat = await bounded(n, conc, lambda: websocketd_oneshot(wsd.url))
                record_latency(res, "W1 per-connection", "websocketd", lat, time.monotonic() - started)
            async with WebsocketdServer(["sh", "-c", SHELL_LOOP]) as wsd:
                started = time.monotonic()
                lat = await on_persistent(wsd.url, n, conc, lambda c: websocketd_command(c, "echo hello"))
                record_latency(res, "W1 persistent", "websocketd", lat, time.monotonic() - started)
        async with FloorServer() as floor:
            await w1_jsonrpc(floor.url, sizes, res, "python floor")
        await one_at_a_time(sizes, res, "raw", lambda: raw_job("echo hello"))
        started = time.monotonic()
        lat = await bounded(n, conc, lambda: raw_job("echo hello"))
        record_latency(res, "W1 per-connection", "raw", lat, time.monotonic() - started)


def record(res: Results, workload: str, metric: str, target: str, value: float, better: str) -> None:
    """Add one run's value to its row (created on the first run)."""
    row = next((r for r in res.rows if (r["workload"], r["metric"], r["target"]) == (workload, metric, target)), None)
    if row is None:
        res.add(workload, metric, target, [value], better)
        return
    row["values"].append(value)
    row.update(median=statistics.median(row["values"]), min=min(row["values"]), max=max(row["values"]))


def record_latency(res: Results, workload: str, target: str, lat: list[float], wall: float) -> None:
    record(res, workload, "jobs/s", target, throughput(lat, wall), "higher")
    record_percentiles(res, workload, target, lat)


def record_percentiles(res: Results, workload: str, target: str, lat: list[float]) -> None:
    record(res, workload, "p50 ms", target, percentile(lat, 0.5) * 1000, "lower")
    record(res, workload, "p99 ms", target, percentile(lat, 0.99) * 1000, "lower")


def base64_command(raw_bytes: int, width: int) -> str:
    return f"head -c {raw_bytes} /dev/urandom | base64 -w {width}"


def base64_size(raw_bytes: int, width: int) -> int:
    chars = 4 * -(-raw_bytes // 3)
    return chars + (-(-chars // width) if width else 1)


async def w2_w3(sizes: Sizes, runs: int, res: Results, tmp: Path, websocketd: bool) -> None:
    cases = [("W2 stream", base64_command(sizes.w2_raw_bytes, 76), base64_size(sizes.w2_raw_bytes, 76)),
             ("W3 8 MiB line", base64_command(sizes.w3_raw_bytes, 0) + "; echo", base64_size(sizes.w3_raw_bytes, 0))]
    for _ in range(runs):
        async with CcexecServer(tmp) as server:
            for workload, command, expected in cases:
                modes = ("lines", "chunks") if workload.startswith("W2") else ("lines",)
                for mode in modes:
                    size, took = await ccexec_job(server.url, command, stream_mode=mode)
                    target = "ccexec" if mode == "lines" else "ccexec chunks"
                    record(res, workload, "MiB/s", target, size / took / 2**20, "higher")
                    record(res, workload, "exact", target, float(size == expected), "higher")
        for workload, command, expected in cases:
            if websocketd:
                async with WebsocketdServer(["sh", "-c", command]) as wsd:
                    size, took = await websocketd_oneshot(wsd.url)
                    record(res, workload, "MiB/s", "websocketd", size / took / 2**20, "higher")
                    record(res, workload, "exact", "websocketd", float(size == expected), "higher")
            if workload.startswith("W2"):  # (the floor server reads lines of at most 64 KiB)
                async with FloorServer() as floor:
                    for mode, target in (("lines", "python floor"), ("chunks", "python floor chunks")):
                        size, took = await ccexec_job(floor.url, command, stream_mode=mode)
                        record(res, workload, "MiB/s", target, size / took / 2**20, "higher")
                        record(res, workload, "exact", target, float(size == expected), "higher")
                await w2_client_ceilings(workload, command, expected, res)
            size, took = await raw_job(command)
            record(res, workload, "MiB/s", "raw", size / took / 2**20, "higher")
            record(res, workload, "exact", "raw", float(size == expected), "higher")


async def w2_client_ceilings(workload: str, command: str, expected: int, res: Results) -> None:
    """What the same clients take of the stream sent from memory, one message
    a line: in ccexec's lines-mode messages (the wire contract) and in
    websocketd's bare lines. No server can stream either format faster."""
    for wire_format, read, target in (("ccexec", lambda url: ccexec_job(url, command), "ceiling, ccexec messages"),
                                      ("lines", websocketd_oneshot, "ceiling, bare lines")):
        async with WireCeilingServer(wire_format, command) as server:
            size, took = await read(server.url)
        record(res, workload, "MiB/s", target, size / took / 2**20, "higher")
        record(res, workload, "exact", target, float(size == expected), "higher")


async def w4(sizes: Sizes, runs: int, res: Results, tmp: Path) -> None:
    n = sizes.w4_connections
    for _ in range(runs):
        async with CcexecServer(tmp, slots=-(-n // 2)) as server:
            peak = await asyncio.to_thread(server.memory)
            sampling = True

            async def sample() -> None:
                nonlocal peak
                while sampling:
                    peak = tuple(map(max, peak, await asyncio.to_thread(server.memory)))
                    await asyncio.sleep(0.1)
            sampler = asyncio.ensure_future(sample())
            started = time.monotonic()
            outcomes = await asyncio.gather(*(ccexec_job(server.url, "sleep 2; echo done") for _ in range(n)),
                                            return_exceptions=True)
            wall = time.monotonic() - started
            sampling = False
            await sampler
            done = sum(1 for o in outcomes if not isinstance(o, Exception) and o[0] == 5)
            record(res, f"W4 {n} x sleep 2", "completed %", "ccexec", 100.0 * done / n, "higher")
            record(res, f"W4 {n} x sleep 2", "wall s", "ccexec", wall, "lower")
            record(res, f"W4 {n} x sleep 2", "peak RSS MiB", "ccexec", peak[0] / 2**20, "lower")
            record(res, f"W4 {n} x sleep 2", "peak PSS MiB", "ccexec", peak[1] / 2**20, "lower")


async def handshake_latencies(url: str, probes: int) -> list[float]:
    latencies = []
    for _ in range(probes):
        started = time.monotonic()
        async with websockets.connect(url, open_timeout=30, ping_interval=None) as ws:
            if "/ws" in url:
                await ws.recv()  # ccexec's `connected`: ready for requests
        latencies.append(time.monotonic() - started)
        await asyncio.sleep(0.01)
    return latencies


def start_load(kind: str, url: str, command: str, count: int) -> list[subprocess.Popen]:
    """Streaming clients in processes of their own, so that the probe's
    latency is the server's and not this process's busy event loop, and in
    sessions of their own, as separate programs are: with the kernel's
    autogroup scheduling, CPU time is shared between sessions first."""
    return [subprocess.Popen([sys.executable, __file__, "--stream-load", kind, url, command],
                             stdout=subprocess.DEVNULL, start_new_session=True) for _ in range(count)]


async def stop_load(load: list[subprocess.Popen]) -> None:
    """The probes are done: the streams only had to run meanwhile."""
    for proc in load:
        proc.terminate()
    for proc in load:
        await asyncio.to_thread(proc.wait, 10)


def stream_load(kind: str, url: str, command: str) -> None:
    asyncio.run(ccexec_job(url, command) if kind == "ccexec" else websocketd_oneshot(url))


async def w5(sizes: Sizes, runs: int, res: Results, tmp: Path, websocketd: bool) -> None:
    """Each server is probed while it streams to 4 clients; websocketd also on
    a second, idle instance of its own (what a separate service would see)."""
    command = base64_command(sizes.w2_raw_bytes, 76)
    workload = "W5 handshake under load"
    for _ in range(runs):
        async with CcexecServer(tmp) as server:
            lat = await probed_under_load("ccexec", server.url, server.url, command, sizes)
        record_percentiles(res, workload, "ccexec", lat)
        if websocketd:
            # websocketd runs one program for every connection: probes ask for
            # none (its query string reaches the program), streams for W2.
            program = ["sh", "-c", f'[ "$QUERY_STRING" = probe ] || {{ {command}; }}']
            async with WebsocketdServer(program) as wsd:
                lat = await probed_under_load("websocketd", wsd.url, wsd.url + "?probe", command, sizes)
            record_percentiles(res, workload, "websocketd", lat)
            async with WebsocketdServer(["sh", "-c", command]) as wsd, WebsocketdServer(["true"]) as idle_one:
                lat = await probed_under_load("websocketd", wsd.url, idle_one.url, command, sizes)
            record_percentiles(res, workload, "websocketd, idle probe target", lat)


SPIN = "timeout 60 sh -c 'while :; do :; done'"  # a job that only computes, bounded


async def w5_jobs(sizes: Sizes, runs: int, res: Results, tmp: Path) -> None:
    """Handshakes while jobs keep the cores busy, with the jobs at the
    daemon's priority and at job_nice 5: what lowering them buys."""
    workload = "W5 handshake, jobs spinning"
    for _ in range(runs):
        for job_nice in (0, 5):
            async with CcexecServer(tmp, job_nice=job_nice) as server:
                conns = [await websockets.connect(server.url, ping_interval=None) for _ in range(sizes.w5_streamers)]
                try:
                    for ws in conns:
                        await ws.send(execute_request(SPIN))
                        while '"process.started"' not in await asyncio.wait_for(ws.recv(), 30):
                            pass
                    lat = await handshake_latencies(server.url, sizes.w5_probes)
                finally:
                    for ws in conns:
                        await ws.close()
            record_percentiles(res, workload, f"ccexec job_nice={job_nice}", lat)


async def probed_under_load(kind: str, stream_url: str, probe_url: str, command: str, sizes: Sizes) -> list[float]:
    load = start_load(kind, stream_url, command, sizes.w5_streamers)
    try:
        await asyncio.sleep(0.5)  # let the streams get going before probing
        return await handshake_latencies(probe_url, sizes.w5_probes)
    finally:
        await stop_load(load)


async def idle(runs: int, res: Results, tmp: Path) -> None:
    for _ in range(runs):
        async with CcexecServer(tmp) as server:
            await asyncio.sleep(IDLE_SETTLE)
            record_memory(res, "ccexec", await asyncio.to_thread(server.memory))
            record(res, "Idle default pool", "ready s", "ccexec", server.ready_after, "lower")
            res.notes.append("idle RSS per process (MiB): " + json.dumps(server.per_process()))
            roles = sorted(server.roles().values())
        async with LibraryFloor(roles) as floor:
            await asyncio.sleep(IDLE_SETTLE)
            record_memory(res, "library floor", await asyncio.to_thread(floor.memory))


def record_memory(res: Results, target: str, memory: tuple[int, int]) -> None:
    rss, pss = memory
    record(res, "Idle default pool", "RSS MiB", target, rss / 2**20, "lower")
    record(res, "Idle default pool", "PSS MiB", target, pss / 2**20, "lower")


# ------------------------------------------------------------------ report

def ratio_rows(res: Results) -> list[str]:
    """The table; each baseline row says ccexec's median over its own (chunks-mode
    baselines against ccexec chunks), and ccexec chunks its share of raw."""
    lines = ["| workload | metric | target | median | min-max | ccexec / baseline |",
             "|---|---|---|---|---|---|"]
    medians = {(r["workload"], r["metric"], r["target"]): r["median"] for r in res.rows}
    for r in res.rows:
        key = (r["workload"], r["metric"])
        ratio = ""
        if r["target"] == "ccexec chunks":
            raw = medians.get((*key, "raw"))
            ratio = f"{r['median'] / raw:.2f} of raw" if raw else ""
        elif r["target"] != "ccexec" and r["median"]:
            base = medians.get((*key, "ccexec chunks" if r["target"].endswith(" chunks") else "ccexec"))
            ratio = f"{base / r['median']:.2f}" if base is not None else ""
        lines.append(f"| {r['workload']} | {r['metric']} | {r['target']} | {r['median']:.2f} | "
                     f"{r['min']:.2f}-{r['max']:.2f} | {ratio} |")
    return lines


async def main_async(args: argparse.Namespace) -> Results:
    sizes = QUICK if args.quick else Sizes()
    runs = args.runs or (1 if args.quick else 3)
    only = set(args.only.upper().split(",")) if args.only else set(WORKLOADS)
    res = Results()
    why_not = None if args.no_websocketd is False else "disabled with --no-websocketd"
    why_not = why_not or websocketd_available()
    if why_not:
        res.notes.append(f"websocketd column skipped: {why_not}")
    websocketd = why_not is None
    with tempfile.TemporaryDirectory(prefix="ccexec-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if "W1" in only:
            await w1(sizes, runs, res, tmp, websocketd)
        if "W2" in only:
            await w2_w3(sizes, runs, res, tmp, websocketd)
        if "W4" in only:
            await w4(sizes, runs, res, tmp)
        if "W5" in only:
            await w5(sizes, runs, res, tmp, websocketd)
            await w5_jobs(sizes, runs, res, tmp)
        if "IDLE" in only:
            await idle(runs, res, tmp)
    return res


WORKLOADS = ("W1", "W2", "W4", "W5", "IDLE")


def workload_list(text: str) -> str:
    unknown = set(text.upper().split(",")) - set(WORKLOADS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown workload {', '.join(sorted(unknown))}: choose from "
                                         f"{','.join(WORKLOADS)}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run: a smoke test")
    parser.add_argument("--runs", type=int, help="runs per workload (default 3; 1 with --quick)")
    parser.add_argument("--only", type=workload_list,
                        help=f"comma-separated subset of {','.join(WORKLOADS)} (W2 includes W3)")
    parser.add_argument("--json", default="bench-results.json", help="where to write the JSON results")
    parser.add_argument("--no-websocketd", action="store_true", help="skip the websocketd baseline")
    parser.add_argument("--stream-load", nargs=3, metavar=("KIND", "URL", "COMMAND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stream_load:  # W5's load generator, one streaming client per process
        stream_load(*args.stream_load)
        return
    res = asyncio.run(main_async(args))
    print("\n".join(ratio_rows(res)))
    for note in res.notes:
        print(f"\n{note}")
    Path(args.json).write_text(json.dumps({"rows": res.rows, "notes": res.notes}, indent=2))


if __name__ == "__main__":
    main()
