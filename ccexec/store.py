"""Job records in an embedded SQLite database (WAL mode), with retention.

The broker is the only writer. Records outlive every process: a restarted
broker reads back what was running, a restarted daemon marks what a crash
left behind as lost, and `jobs` / `job.status` answer from here.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time

from ccexec.journal import job_dir

PUBLIC = ("job_id", "name", "command", "state", "pid", "node", "exit_code", "reason", "error", "created_at",
          "started_at", "finished_at", "stdout_bytes", "stderr_bytes")
PRUNE_BATCH = 200  # journals removed per pass, so one pass never blocks for long
JOURNAL_BYTES = "stdout_bytes + stderr_bytes + claude_bytes"  # what a job's journal holds on disk

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, name TEXT, command TEXT, state TEXT NOT NULL, pid INTEGER,
    pgid INTEGER, exit_code INTEGER, reason TEXT, error TEXT, client TEXT,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL,
    stdout_bytes INTEGER NOT NULL DEFAULT 0, stderr_bytes INTEGER NOT NULL DEFAULT 0,
    completed TEXT, node TEXT, spec TEXT, after TEXT, claude_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created_at);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at);
"""


def describe_command(spec: dict) -> str:
    return spec.get("command") or " ".join(spec.get("argv") or [])


class JobStore:
    def __init__(self, state_dir: str):
        self.jobs_dir = os.path.join(state_dir, "jobs")
        path = os.path.join(state_dir, "jobs.db")
        # Commands and queued jobs' environments: for this user only. SQLite
        # gives its -wal and -shm files the database file's mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes
        self.db.execute("PRAGMA busy_timeout=2000")
        self.db.executescript(SCHEMA)
        columns = {row["name"] for row in self.db.execute("PRAGMA table_info(jobs)")}
        # A database from before remote executors, kept queues or journaled Claude notifications:
        for column, kind in (("node", "TEXT"), ("spec", "TEXT"), ("after", "TEXT"),
                             ("claude_bytes", "INTEGER NOT NULL DEFAULT 0")):
            if column not in columns:
                self.db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self.commit()
        self.db.close()

    # -- writes (the broker's): grouped into one transaction until commit()

    def _write(self, sql: str, params: tuple) -> None:
        if not self.db.in_transaction:
            self.db.execute("BEGIN")
        self.db.execute(sql, params)

    def commit(self) -> None:
        """End the current group of writes: the broker calls this once per
        loop turn, so a busy turn's many job updates cost one commit."""
        if self.db.in_transaction:
            self.db.execute("COMMIT")

    def accepted(self, job_id: str, spec: dict, client: str | None, state: str, after: str | None = None) -> None:
        """A new job; its spec is kept until it starts, for a broker started
        after this one to run it."""
        self._write(
            "INSERT OR IGNORE INTO jobs (job_id, name, command, state, client, created_at, spec, after)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (job_id, spec.get("name"), describe_command(spec), state, client, time.time(), json.dumps(spec), after))

    def started(self, job_id: str, pid: int | None, pgid: int | None, started_at: float | None,
                node: str | None = None) -> None:
        """node: the executor node's name for a job on another host (whose pgid is not ours to kill)."""
        self._write("UPDATE jobs SET state='running', pid=?, pgid=?, started_at=?, node=?, spec=NULL WHERE job_id=?",
                        (pid, None if node else pgid, started_at or time.time(), node, job_id))

    def finished(self, completed: dict) -> None:
        self._write(
            "UPDATE jobs SET state='finished', exit_code=?, reason=?, error=?, finished_at=?, spec=NULL,"
            " stdout_bytes=COALESCE(?, stdout_bytes), stderr_bytes=COALESCE(?, stderr_bytes),"
            " claude_bytes=COALESCE(?, claude_bytes), pid=COALESCE(?, pid), completed=? WHERE job_id=?",
            (completed.get("exit_code"), completed.get("reason"), completed.get("error"), time.time(),
             completed.get("stdout_bytes"), completed.get("stderr_bytes"), completed.get("claude_bytes"),
             completed.get("pid"), json.dumps(completed), completed["job_id"]))

    # -- reads

    def get(self, job_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return dict(row) if row else None

    def completed(self, job_id: str) -> dict | None:
        """The process.completed params of a finished job."""
        row = self.db.execute("SELECT completed FROM jobs WHERE job_id=? AND state='finished'",
                              (job_id,)).fetchone()
        return json.loads(row["completed"]) if row and row["completed"] else None

    def unfinished(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM jobs WHERE state != 'finished'")]

    def list(self, state: str | None = None, limit: int = 100) -> list[dict]:
        if state:
            states = ("queued", "held") if state == "queued" else ("running", "dispatched") \
                if state == "running" else (state,)
            rows = self.db.execute(
                f"SELECT * FROM jobs WHERE state IN ({','.join('?' * len(states))})"
                " ORDER BY created_at DESC LIMIT ?", (*states, limit))
        else:
            rows = self.db.execute("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        return [public(dict(r)) for r in rows]

    # -- retention

    def prune(self, max_age: float, max_bytes: int) -> int:
        """Forget the oldest finished jobs past the age or total-size limit."""
        victims = [r[0] for r in self.db.execute(
            "SELECT job_id FROM jobs WHERE state='finished' AND finished_at < ? ORDER BY finished_at LIMIT ?",
            (time.time() - max_age, PRUNE_BATCH))]
        total = self.db.execute(f"SELECT COALESCE(SUM({JOURNAL_BYTES}), 0) FROM jobs").fetchone()[0]
        if total > max_bytes and len(victims) < PRUNE_BATCH:
            for job_id, size in self.db.execute(
                    f"SELECT job_id, {JOURNAL_BYTES} FROM jobs WHERE state='finished'"
                    " ORDER BY finished_at LIMIT ?", (PRUNE_BATCH,)):
                if total <= max_bytes:
                    break
                if job_id not in victims:
                    victims.append(job_id)
                total -= size
        for job_id in victims:
            shutil.rmtree(job_dir(self.jobs_dir, job_id), ignore_errors=True)
            self._write("DELETE FROM jobs WHERE job_id=?", (job_id,))
        return len(victims)


def public(record: dict) -> dict:
    """A record as clients see it (`jobs`, `job.status`)."""
    out = {k: record.get(k) for k in PUBLIC}
    if out["state"] in ("held", "dispatched"):
        out["state"] = "queued" if out["state"] == "held" else "running"
    return out
