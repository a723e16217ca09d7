"""Job records (SQLite, WAL) and their retention, without a daemon."""

from __future__ import annotations

import json
import os
import time

import pytest

from ccexec.store import JobStore


@pytest.fixture
def store(tmp_path):
    (tmp_path / "jobs").mkdir()
    s = JobStore(str(tmp_path))
    yield s
    s.close()


def _job(store: JobStore, tmp_path, job_id: str, size: int = 0, finished: bool = True, claude: int = 0) -> None:
    store.accepted(job_id, {"command": f"echo {job_id}", "name": None}, "127.0.0.1:1", "queued")
    store.started(job_id, 100, 100, time.time())
    journal = tmp_path / "jobs" / job_id
    journal.mkdir()
    (journal / "stdout").write_bytes(b"x" * size)
    (journal / "claude").write_bytes(b"y" * claude)
    if finished:
        store.finished({"job_id": job_id, "exit_code": 0, "reason": "exit", "error": None,
                        "stdout_bytes": size, "stderr_bytes": 0, "claude_bytes": claude, "pid": 100})


def test_database_is_in_wal_mode(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_spec_is_kept_until_the_job_starts_or_ends(store):
    """A broker started in another's place runs the queued jobs from their
    spec; a started or finished job needs it no more (it may hold secrets)."""
    spec = {"command": "echo x", "env": {"API_KEY": "k"}}
    store.accepted("a" * 32, spec, None, "queued")
    store.accepted("b" * 32, spec, None, "held", after="a" * 32)
    assert [(json.loads(r["spec"]), r["after"]) for r in store.unfinished()] == [(spec, None), (spec, "a" * 32)]
    store.started("a" * 32, 100, 100, time.time())
    store.finished({"job_id": "b" * 32, "exit_code": -15, "reason": "canceled", "error": None})
    assert store.get("a" * 32)["spec"] is None and store.get("b" * 32)["spec"] is None


def test_record_follows_a_job_through_its_states(store, tmp_path):
    _job(store, tmp_path, "a" * 32, size=5, finished=False)
    assert store.get("a" * 32)["state"] == "running"
    assert [r["job_id"] for r in store.unfinished()] == ["a" * 32]
    store.finished({"job_id": "a" * 32, "exit_code": 3, "reason": "exit", "error": None,
                    "stdout_bytes": 5, "stderr_bytes": 0, "pid": 100})
    record = store.get("a" * 32)
    assert (record["state"], record["exit_code"], record["stdout_bytes"]) == ("finished", 3, 5)
    assert store.completed("a" * 32)["exit_code"] == 3
    assert store.list("finished")[0]["command"] == "echo " + "a" * 32


def test_prune_forgets_jobs_past_the_age_limit(store, tmp_path):
    _job(store, tmp_path, "a" * 32)
    store.db.execute("UPDATE jobs SET finished_at = ?", (time.time() - 3600,))
    _job(store, tmp_path, "b" * 32)
    assert store.prune(max_age=60, max_bytes=2**40) == 1
    assert store.get("a" * 32) is None and not (tmp_path / "jobs" / ("a" * 32)).exists()
    assert store.get("b" * 32) is not None and (tmp_path / "jobs" / ("b" * 32)).exists()


def test_prune_keeps_total_journal_size_under_the_limit_oldest_first(store, tmp_path):
    for name in "abc":
        _job(store, tmp_path, name * 32, size=1000)
    assert store.prune(max_age=86400, max_bytes=2500) == 1
    assert store.get("a" * 32) is None
    assert sorted(os.listdir(tmp_path / "jobs")) == ["b" * 32, "c" * 32]


def test_prune_counts_a_claude_jobs_notifications_in_its_journal_size(store, tmp_path):
    for name in "ab":
        _job(store, tmp_path, name * 32, size=1000, claude=600)
    assert store.prune(max_age=86400, max_bytes=2500) == 1  # 3,200 bytes in all; 2,000 of output
    assert store.get("a" * 32) is None and store.get("b" * 32)["claude_bytes"] == 600


def test_prune_never_touches_running_jobs(store, tmp_path):
    _job(store, tmp_path, "a" * 32, size=5000, finished=False)
    assert store.prune(max_age=0, max_bytes=0) == 0
    assert store.get("a" * 32)["state"] == "running"


def test_a_job_on_a_node_is_recorded_with_its_node_and_no_local_group(store, tmp_path):
    store.accepted("c" * 32, {"command": "x"}, None, "queued")
    store.started("c" * 32, 4242, 4242, time.time(), node="far-node")
    record = store.get("c" * 32)
    assert (record["node"], record["pid"], record["pgid"]) == ("far-node", 4242, None)


def test_a_database_of_an_older_version_gains_the_new_columns(tmp_path):
    import sqlite3

    old = sqlite3.connect(tmp_path / "jobs.db")
    old.execute("CREATE TABLE jobs (job_id TEXT PRIMARY KEY, name TEXT, command TEXT, state TEXT NOT NULL,"
                " pid INTEGER, pgid INTEGER, exit_code INTEGER, reason TEXT, error TEXT, client TEXT,"
                " created_at REAL NOT NULL, started_at REAL, finished_at REAL,"
                " stdout_bytes INTEGER NOT NULL DEFAULT 0, stderr_bytes INTEGER NOT NULL DEFAULT 0, completed TEXT)")
    old.execute("INSERT INTO jobs (job_id, state, created_at) VALUES (?, 'finished', 0)", ("d" * 32,))
    old.commit()
    old.close()
    store = JobStore(str(tmp_path))
    try:
        assert store.get("d" * 32)["node"] is None and store.get("d" * 32)["claude_bytes"] == 0
    finally:
        store.close()


# ------------------------------------------------------------------ journal replica


def test_replica_writes_each_byte_once_in_order_and_refuses_gaps(tmp_path):
    from ccexec.journal import JournalReplica

    replica = JournalReplica(str(tmp_path), "e" * 32)
    assert replica.accept("stdout", 0, b"hello ") == (0, b"hello ")
    assert replica.accept("stdout", 12, b"later") is None  # bytes 6-11 were lost on the way
    assert replica.accept("stdout", 3, b"lo world") == (6, b"world")  # a resend overlapping what is there
    assert replica.accept("stdout", 0, b"hello") == (11, b"")  # a pure repeat: nothing new
    assert replica.accept("stderr", 0, b"e") == (0, b"e")
    replica.close()
    assert (tmp_path / ("e" * 32) / "stdout").read_bytes() == b"hello world"
    reopened = JournalReplica(str(tmp_path), "e" * 32)  # a restarted broker goes on where it was
    assert reopened.sizes == {"stdout": 11, "stderr": 1, "claude": 0}
    reopened.close()


def test_journal_makes_a_stream_file_only_when_the_stream_is_written(tmp_path):
    from ccexec.journal import JournalWriter, stream_size

    job_id = "f" * 32
    journal = JournalWriter(str(tmp_path), job_id)
    assert not (tmp_path / job_id).exists() and journal.sizes == {"stdout": 0, "stderr": 0, "claude": 0}
    assert journal.append("stdout", b"hi\n") == 0
    assert journal.append("stdout", b"there\n") == 3
    journal.close()
    assert sorted(os.listdir(tmp_path / job_id)) == ["stdout"]
    assert stream_size(str(tmp_path), job_id, "stdout") == 9
    assert stream_size(str(tmp_path), job_id, "stderr") == 0
    assert (tmp_path / job_id / "stdout").read_bytes() == b"hi\nthere\n"


def test_claude_records_come_whole_however_they_are_cut_and_skip_lines_the_client_has():
    from ccexec.journal import ClaudeRecords, claude_record

    first = '{"jsonrpc":"2.0","method":"claude.event","params":{"kind":"init","offset":0,"text":"a b"}}'
    second = '{"jsonrpc":"2.0","method":"claude.event","params":{"kind":"result","offset":120}}'
    data = claude_record(120, first.encode()) + claude_record(300, second.encode())
    assert data == f"120 {first}\n300 {second}\n".encode()
    for cut in range(len(data) + 1):
        reader = ClaudeRecords()
        assert reader.feed(data[:cut]) + reader.feed(data[cut:]) == [(120, first), (300, second)]
    # From stdout byte 120 on, the first line is the client's already; from 119, a byte of it is not.
    assert ClaudeRecords(after=120).feed(data) == [(300, second)]
    assert ClaudeRecords(after=119).feed(data) == [(120, first), (300, second)]
    assert ClaudeRecords(after=300).feed(data) == []
    # A count of records the client has, however the records are cut.
    for cut in range(len(data) + 1):
        reader = ClaudeRecords(skip=1)
        assert reader.feed(data[:cut]) + reader.feed(data[cut:]) == [(300, second)]
    assert ClaudeRecords(skip=2).feed(data) == [] and ClaudeRecords(skip=0).feed(data) == [(120, first), (300, second)]
    # A line damaged on disk is passed over; the records around it still come.
    assert ClaudeRecords().feed(b"12x garbage\n\n40\n" + data) == [(120, first), (300, second)]
