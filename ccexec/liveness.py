"""Heartbeats to Circus's watchdog plugin.

Each process sends "pid;timestamp" over UDP from its own event loop; if the
loop stops turning the beats stop, and the plugin kills the process so its
watcher respawns it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

PULSE_INTERVAL = 0.5  # matches loop_rate of [plugin:supervision]


class WatchdogPulse:
    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.address = (host, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))  # else the first send binds it to every address
        self.sock.setblocking(False)
        self.next_due = 0.0

    def beat(self) -> None:
        try:
            self.sock.sendto(f"{os.getpid()};{time.time()}".encode(), self.address)
        except OSError:
            pass  # the plugin restarts with the arbiter; a lost beat is harmless
        self.next_due = time.monotonic() + PULSE_INTERVAL

    def beat_if_due(self) -> None:
        if time.monotonic() >= self.next_due:
            self.beat()

    async def run(self) -> None:
        while True:
            self.beat()
            await asyncio.sleep(PULSE_INTERVAL)
