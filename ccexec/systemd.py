"""systemd integration of the arbiter (Type=notify).

READY=1 goes out once the daemon really serves (its own /ready answers
200: socket bound, broker up, an executor registered; an executor node,
which has no port, once its arbiter runs); WATCHDOG=1 goes out
from the arbiter's event loop at half of WatchdogSec, so a hung arbiter is
restarted by systemd. Without NOTIFY_SOCKET this does nothing.
"""

from __future__ import annotations

import os
import ssl
import time

import sdnotify
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.ioloop import PeriodicCallback

from ccexec.config import Settings, local_address, local_tls_context

TICK_MS = 250
DEFAULT_WATCHDOG_INTERVAL = 5.0  # seconds, when systemd sets no WATCHDOG_USEC


class SystemdNotify:
    def __init__(self, settings: Settings):
        self.tls_cert = settings.tls_cert  # with TLS the port speaks https only
        self.ready_url = f"{'https' if self.tls_cert else 'http'}://{local_address(settings.host, settings.port)}/ready"
        self.ssl_options: ssl.SSLContext | None = None
        self.listen = f"{settings.host}:{settings.port}"
        self.executor_node_of = settings.broker if settings.remote else None
        usec = os.environ.get("WATCHDOG_USEC")
        self.watchdog_interval = int(usec) / 2e6 if usec and usec.isdigit() else DEFAULT_WATCHDOG_INTERVAL
        self.next_watchdog = 0.0
        self.ready = False
        self.checking = False
        self.notifier: sdnotify.SystemdNotifier | None = None

    def start(self) -> None:
        """Call from the thread that runs the arbiter's loop, before it starts."""
        if not os.environ.get("NOTIFY_SOCKET"):
            return
        if self.tls_cert:
            self.ssl_options = local_tls_context(self.tls_cert)
        self.notifier = sdnotify.SystemdNotifier()
        PeriodicCallback(self.tick, TICK_MS).start()

    def stopping(self) -> None:
        if self.notifier is not None:
            self.notifier.notify("STOPPING=1")

    async def tick(self) -> None:
        now = time.monotonic()
        if now >= self.next_watchdog:
            self.next_watchdog = now + self.watchdog_interval
            self.notifier.notify("WATCHDOG=1")
        if not self.ready and self.executor_node_of:  # no port: ready once its arbiter runs
            self.ready = True
            self.notifier.notify(f"READY=1\nSTATUS=executor node of {self.executor_node_of}\nMAINPID={os.getpid()}")
        if not self.ready and not self.checking:
            self.checking = True
            try:
                reply = await AsyncHTTPClient().fetch(self.ready_url, raise_error=False, request_timeout=2,
                                                      ssl_options=self.ssl_options)
            except (OSError, HTTPClientError):  # refused, timed out, closed: not ready yet
                pass
            else:
                if reply.code == 200:
                    self.ready = True
                    self.notifier.notify(f"READY=1\nSTATUS=serving on {self.listen}\nMAINPID={os.getpid()}")
            finally:
                self.checking = False
