"""A quick run of the benchmark suite (tiny sizes), so it never rots.

It asserts that every workload ran and produced sane numbers, never how
fast anything was: speed is the benchmark's business, not the tests'.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from support import ROOT


def test_benchmark_suite_quick_run_completes_with_exact_output(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "tools" / "bench" / "bench.py"), "--quick", "--json", str(out)]
    if shutil.which("websocketd") is None:
        command.append("--no-websocketd")  # never install anything from a test
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("| workload | metric | target |")
    rows = json.loads(out.read_text())["rows"]
    workloads = {r["workload"] for r in rows}
    assert {"W1 one at a time", "W1 per-connection", "W1 persistent", "W2 stream", "W3 8 MiB line", "W4 20 x sleep 2",
            "W5 handshake under load", "W5 handshake, jobs spinning", "Idle default pool"} <= workloads
    stream_targets = {r["target"] for r in rows if r["workload"] == "W2 stream"}
    assert {"ccexec", "ccexec chunks", "raw", "ceiling, ccexec messages", "ceiling, bare lines"} <= stream_targets
    idle_memory = {(r["metric"], r["target"]) for r in rows if r["workload"] == "Idle default pool"}
    assert {(metric, target) for metric in ("RSS MiB", "PSS MiB") for target in ("ccexec", "library floor")} <= idle_memory
    assert all(r["median"] == 1.0 for r in rows if r["metric"] == "exact")
    assert all(r["median"] == 100.0 for r in rows if r["metric"] == "completed %")
    assert all(r["median"] > 0 for r in rows)
