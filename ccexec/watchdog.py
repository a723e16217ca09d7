"""Circus's watchdog plugin, with one bug of its own mended.

Circus's WatchDog.look_after() deletes from `pid_status` while iterating
over it, so the first kill of a pass raises RuntimeError. Iterating over a
snapshot instead is all this subclass changes; everything else (UDP
heartbeats "pid;timestamp", loop_rate x max_count, the kill) is Circus's.
"""

from circus.plugins.watchdog import WatchDog as CircusWatchDog


class _SnapshotItems(dict):
    def items(self):
        return list(super().items())


class WatchDog(CircusWatchDog):
    def __init__(self, *args, **config):
        super().__init__(*args, **config)
        self.pid_status = _SnapshotItems()

    def _discover_monitored_pids(self):
        super()._discover_monitored_pids()
        self.pid_status = _SnapshotItems(self.pid_status)
