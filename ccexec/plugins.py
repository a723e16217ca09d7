"""Circus's watchdog and flapping plugins, run as one plugin process.

Circus runs each plugin in a process of its own, an interpreter with Circus
imported (about 29 MiB of RSS). `Supervision` is the watchdog, with the
flapping plugin beside it on the same loop: one process for both. Each part
keeps its own connections to the arbiter and its own subscription to its
events; their options do not overlap, so both read the one section.

Each part has one bug of Circus's mended:
- WatchDog.look_after() deletes from `pid_status` while iterating over it,
  so the first kill of a pass raised RuntimeError: it iterates a snapshot.
- Flapping sends its "stop" as a fire-and-forget cast, which the arbiter
  drops with a ConflictError while it is busy respawning the very processes
  that flap: the stop is sent as a call and repeated until it is taken.
Everything else (heartbeat format, limits, retry timers) is Circus's.
"""

import time

from circus.plugins.flapping import Flapping as CircusFlapping
from circus.plugins.watchdog import WatchDog as CircusWatchDog

COMMAND_ATTEMPTS = 50
COMMAND_RETRY_DELAY = 0.1  # seconds; the arbiter is busy for a moment at most


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


class Flapping(CircusFlapping):
    def cast(self, command, **props):
        for _ in range(COMMAND_ATTEMPTS):
            if self.call(command, **props).get("status") == "ok":
                return
            time.sleep(COMMAND_RETRY_DELAY)


class Supervision(WatchDog):
    name = "supervision"

    def __init__(self, *args, **config):
        super().__init__(*args, **config)
        self.flapping = Flapping(*args, **config)
        self.flapping.loop.close()
        self.flapping.loop = self.loop

    def initialize(self):
        super().initialize()
        self.flapping.initialize()

    def handle_stop(self):
        self.flapping.handle_stop()
        super().handle_stop()
        for socket in (self.flapping.substream, self.flapping.client, self.flapping.sub_socket):
            socket.close()
        self.flapping.context.destroy()
