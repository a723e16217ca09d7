"""Stall detection: is a job's process tree still getting anywhere?

A job is stalled when, for its whole `stall_timeout`, its process tree wrote
no output, used no CPU, did no I/O, and held no ESTABLISHED TCP connection
(a CLI waiting for an API reply waits on a remote peer; that is not a
stall). A process blocked on nothing (`sleep 3600`, a read from a pipe
nobody writes) is stalled.

Sampling (`sample_tree`, blocking psutil calls: run it in a worker thread,
never on an event loop) is kept apart from the rule (`ProgressWatch`, pure
and clock-free, so it is tested without processes).
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

# CPU seconds the tree must use to count as progress. CPU times advance in
# clock ticks (10 ms at the usual CLK_TCK of 100) and are summed here as
# floats, so a change of one tick or less (rounding, a reaped child's last
# tick) is not taken as work. It is measured from the last progress, not the
# last sample, so a slow trickle of CPU still counts once it adds up.
CPU_PROGRESS = 0.01

SAMPLE_INTERVAL = 1.0  # seconds between samples of a watched job
MIN_SAMPLE_INTERVAL = 0.1


def sample_interval(stall_timeout: float) -> float:
    """Sample often enough to see a short stall_timeout pass, at most once a second."""
    return max(MIN_SAMPLE_INTERVAL, min(SAMPLE_INTERVAL, stall_timeout / 2))


@dataclass(frozen=True)
class TreeSample:
    """Activity counters summed over a process tree at one moment."""

    cpu: float  # CPU seconds: user + system, with those of reaped children
    io: int  # read/write calls and characters (pipes and sockets included), disk bytes
    connected: bool  # some process of the tree holds an ESTABLISHED TCP connection


def sample_tree(pid: int) -> TreeSample | None:
    """Sample the tree of `pid` (itself and all its descendants); None once it is gone.

    Blocking. A process that vanishes mid-walk is left out; so is a counter
    that cannot be read (e.g. /proc/<pid>/io of a setuid program).
    """
    try:
        leader = psutil.Process(pid)
        tree = [leader, *leader.children(recursive=True)]
    except psutil.Error:
        return None
    cpu, io, connected = 0.0, 0, False
    for proc in tree:
        with proc.oneshot():
            times = _read(proc.cpu_times)
            if times is not None:
                cpu += times.user + times.system + times.children_user + times.children_system
            # Like cpu_times, /proc/<pid>/io includes the counts of reaped children.
            counters = _read(proc.io_counters)
            if counters is not None:
                io += sum(counters)
            if not connected:
                connections = _read(proc.net_connections, "tcp") or []
                connected = any(c.status == psutil.CONN_ESTABLISHED for c in connections)
    return TreeSample(cpu=cpu, io=io, connected=connected)


def _read(method, *args):
    try:
        return method(*args)
    except psutil.Error:
        return None


class ProgressWatch:
    """Decides, sample by sample, whether a job has stopped making progress.

    Progress is any of: output bytes grew; the tree's CPU time moved by
    more than CPU_PROGRESS, or its I/O total changed at all (it drops only
    when a process left the tree unreaped, which is activity too), since
    the sample of the last progress; an ESTABLISHED TCP connection is held.
    `observe` returns True once none of that was seen for `stall_timeout`
    seconds.
    """

    def __init__(self, stall_timeout: float, now: float):
        if stall_timeout <= 0:
            raise ValueError("stall_timeout must be positive")
        self.stall_timeout = stall_timeout
        self.last_progress = now
        self.reference: TreeSample | None = None  # the sample at the last progress
        self.output_bytes = 0

    def idle_for(self, now: float) -> float:
        return now - self.last_progress

    def restart(self, now: float) -> None:
        """Start counting afresh (e.g. while a job is paused on request)."""
        self.last_progress = now
        self.reference = None

    def progressed(self, sample: TreeSample, output_bytes: int) -> bool:
        ref = self.reference
        if ref is None or output_bytes > self.output_bytes or sample.connected:
            return True  # (no reference: the first sample is the baseline)
        # Rounded: float sums carry noise (1.01 - 1.0 > 0.01), and one tick must stay below.
        cpu_moved = round(abs(sample.cpu - ref.cpu), 6) > CPU_PROGRESS
        return cpu_moved or sample.io != ref.io

    def observe(self, sample: TreeSample, output_bytes: int, now: float) -> bool:
        """Record one sample; True when the job is stalled."""
        if self.progressed(sample, output_bytes):
            self.last_progress, self.reference = now, sample
        self.output_bytes = max(output_bytes, self.output_bytes)
        return self.idle_for(now) >= self.stall_timeout
