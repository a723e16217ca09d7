"""Per-job output journals: every byte a job writes, on disk, by stream.

Executors append; handlers read any byte range at their own pace, which is
what lets a slow client fall behind without the daemon buffering its output
in memory, and lets a client resume from byte offsets on any handler.
Layout: <state_dir>/jobs/<job_id>/{stdout,stderr,claude}, each made on its
first write. `claude` holds a Claude job's notifications (`claude.event`
and the limit errors), one record per line: the stdout offset at which the
notification is due, a space, and the notification as clients get it. So
they survive what the output survives, and are replayed with it.
These are plain blocking file calls: callers on an event loop run them in
a worker thread.
"""

from __future__ import annotations

import os

from ccexec.protocol import JOB_ID, STREAMS

CLAUDE = "claude"
JOURNALS = (*STREAMS, CLAUDE)  # the files of a job's journal
READ_BLOCK = 256 << 10  # bytes read from a journal at a time (about 3,000 lines of output)


def job_dir(jobs_dir: str, job_id: str) -> str:
    if not JOB_ID.match(job_id):  # never let a client-supplied id name a path
        raise ValueError(f"not a job id: {job_id!r}")
    return os.path.join(jobs_dir, job_id)


class JournalWriter:
    """A job's directory and each stream's file are made on its first write:
    most jobs never write to stderr, and creating files is most of what a
    short job costs the filesystem. A stream without a file is empty. Making
    one touches no file: a job's executor writes its journal from the start."""

    def __init__(self, jobs_dir: str, job_id: str):
        self.path = job_dir(jobs_dir, job_id)
        self.fds: dict[str, int] = {}
        self.sizes = dict.fromkeys(JOURNALS, 0)

    def append(self, stream: str, data: bytes) -> int:
        """Append data; returns the stream offset it was written at."""
        offset = self.sizes[stream]
        fd = self.fds.get(stream)
        if fd is None:
            fd = self.fds[stream] = self._create(stream)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        self.sizes[stream] = offset + len(data)
        return offset

    def _create(self, stream: str) -> int:
        os.makedirs(self.path, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        return os.open(os.path.join(self.path, stream), flags, 0o600)

    def close(self) -> None:
        # No fsync: a write() is in the page cache, which every process crash
        # leaves intact; only a kernel crash could lose it, and fsync-ing each
        # job would cost more than the whole rest of a short job.
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


class JournalReplica(JournalWriter):
    """The head node's copy of a remote job's journal. Chunks come over the
    network, where a dropped connection can lose some or a resend repeat
    them: each byte is written once, in order, and a chunk past the end
    (a gap) is refused so the caller can ask for a resend from `sizes`."""

    def __init__(self, jobs_dir: str, job_id: str):
        super().__init__(jobs_dir, job_id)
        self.sizes = {s: _size(os.path.join(self.path, s)) for s in JOURNALS}  # a restarted broker goes on

    def accept(self, stream: str, offset: int, data: bytes) -> tuple[int, bytes] | None:
        """(offset, the bytes that were new) or None for a gap."""
        have = self.sizes[stream]
        if offset > have:
            return None
        fresh = data[have - offset:]
        if fresh:
            self.append(stream, fresh)
        return have, fresh


def read_range(jobs_dir: str, job_id: str, stream: str, offset: int, end: int) -> bytes:
    """Bytes [offset, min(end, offset + READ_BLOCK)) of a stream."""
    path = os.path.join(job_dir(jobs_dir, job_id), stream)
    with open(path, "rb", buffering=0) as f:
        return os.pread(f.fileno(), min(end - offset, READ_BLOCK), offset)


def stream_size(jobs_dir: str, job_id: str, stream: str) -> int:
    return _size(os.path.join(job_dir(jobs_dir, job_id), stream))


def recorded_sizes(jobs_dir: str, job_id: str) -> dict[str, int]:
    """The byte counts of a job whose executor died before it could report
    them: what its journal holds."""
    return byte_counts({name: stream_size(jobs_dir, job_id, name) for name in JOURNALS})


def byte_counts(sizes: dict[str, int] | None = None) -> dict[str, int]:
    """`stdout_bytes`, `stderr_bytes` and `claude_bytes` of a job's end
    (each 0 without sizes): how much of each file its clients are due."""
    sizes = sizes or dict.fromkeys(JOURNALS, 0)
    return {f"{name}_bytes": sizes[name] for name in JOURNALS}


def claude_record(stdout_end: int, message: bytes) -> bytes:
    """One line of the `claude` journal (a notification holds no newline: it is compact JSON)."""
    return b"%d %s\n" % (stdout_end, message)


class ClaudeRecords:
    """Reads the `claude` journal, fed in pieces as they come: (stdout_end,
    notification) of each whole record the client does not have. It has
    the first `skip` records, and those of lines that end by stdout byte
    `after`."""

    def __init__(self, after: int = 0, skip: int = 0):
        self.after, self.skip = after, skip
        self.partial = b""

    def feed(self, data: bytes) -> list[tuple[int, str]]:
        *records, self.partial = (self.partial + data).split(b"\n")
        due = []
        for record in records:
            end, _, message = record.partition(b" ")
            if not (end.isdigit() and message):  # damaged on disk: not a record, and not one to count
                continue
            if self.skip:
                self.skip -= 1
            elif int(end) > self.after:
                due.append((int(end), message.decode(errors="replace")))
        return due


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:  # the stream has not been written to
        return 0
