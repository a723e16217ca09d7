"""systemd integration: the unit verifies, and the notify protocol for real."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import ROOT, self_signed_cert, wait_for

UNIT = ROOT / "systemd" / "ccexec.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart exists: point it at this checkout's ccexecd.
    ccexecd = Path(sys.executable).parent / "ccexecd"
    unit = tmp_path / "ccexec.service"
    unit.write_text(UNIT.read_text().replace("/opt/ccexec/.venv/bin/ccexecd", str(ccexecd)))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    assert "Type=notify" in UNIT.read_text() and "WatchdogSec=" in UNIT.read_text()


class NotifySocket:
    """A NOTIFY_SOCKET of a test's own: what the daemon tells systemd, and when."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []

    def receive(self) -> list[tuple[float, str]]:
        """Every message so far, after waiting up to 0.2 s for one more."""
        try:
            self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
        except socket.timeout:
            pass
        return self.messages


def test_notify_socket_gets_ready_once_serving_then_periodic_watchdog(make_daemon, tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    daemon = make_daemon(start=False, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
    receive, messages = notify.receive, notify.messages
    try:
        daemon.start()
        wait_for(lambda: any("READY=1" in m for _, m in receive()), 20, 0, "READY=1")
        assert daemon.ready()  # READY=1 only once the daemon really serves
        ready_at = next(t for t, m in messages if "READY=1" in m)
        wait_for(lambda: sum("WATCHDOG=1" in m for t, m in receive() if t > ready_at) >= 3, 10, 0,
                 "three WATCHDOG=1 after READY=1")
        ready = next(m for _, m in messages if "READY=1" in m)
        assert f"MAINPID={daemon.proc.pid}" in ready and "STATUS=serving" in ready
        assert daemon.stop() == 0
        wait_for(lambda: any("STOPPING=1" in m for _, m in receive()), 10, 0, "STOPPING=1")
    finally:
        notify.sock.close()


def test_notify_socket_gets_ready_from_a_daemon_serving_tls(make_daemon, tmp_path):
    """With tls_cert the port speaks https only: readiness is asked over https."""
    _, cert_path, key_path = self_signed_cert(tmp_path)
    notify = NotifySocket(tmp_path / "notify.sock")
    daemon = make_daemon(start=False, settings={"tls_cert": str(cert_path), "tls_key": str(key_path)},
                         env={"NOTIFY_SOCKET": notify.path})
    daemon.ready = lambda: daemon.proc.poll() is None  # plain http gets no answer: READY=1 is the test
    try:
        daemon.start()
        wait_for(lambda: any("READY=1" in m for _, m in notify.receive()), 20, 0, "READY=1")
        assert f"MAINPID={daemon.proc.pid}" in next(m for _, m in notify.messages if "READY=1" in m)
    finally:
        notify.sock.close()
