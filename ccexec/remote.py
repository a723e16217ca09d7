"""Remote executor nodes: the head's CURVE-secured ZeroMQ face, and the nodes' end of it.

ZeroMQ's own security, CurveZMQ (Curve25519 keys; every message encrypted
and authenticated) with a ZAP handler: the head's broker holds a server key
pair and admits only executors whose public key is a certificate file in
its curve_clients directory (the zmq.auth format `ccexecctl keys generate`
writes; files added or removed take effect within seconds). ZeroMQ's
heartbeats drop a dead TCP link within LINK_TIMEOUT_MS, and a node's socket
reconnects by itself when the link returns.
"""

from __future__ import annotations

import logging
import os
import time

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ccexec import bus, config, logs

log = logging.getLogger("ccexec.remote")

LINK_HEARTBEAT_MS = 1000  # ZMTP PINGs on an idle link
LINK_TIMEOUT_MS = 3000  # no traffic for this long: the TCP connection is dropped and redialled
RECONNECT_MAX_MS = 2000  # a node redials at most this far apart while the head is unreachable
ZAP_DOMAIN = "ccexec"
KEY_RECHECK = 2.0  # seconds between looks at the curve_clients directory


def generate_keys(directory: str, name: str) -> tuple[str, str]:
    """A new key pair as NAME.key (public, to share) and NAME.key_secret (mode 600)."""
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret


def _certificate(path: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise config.ConfigError(f"cannot read CURVE key file {path}: {exc}") from None


def load_key_pair(path: str) -> tuple[bytes, bytes]:
    public, secret = _certificate(path)
    if secret is None:
        raise config.ConfigError(f"{path} holds no secret key: name the .key_secret file")
    if os.stat(path).st_mode & 0o077:
        raise config.ConfigError(f"{path} must not be readable by group or others (chmod 600)")
    return public, secret


def load_public_key(path: str) -> bytes:
    return _certificate(path)[0]


def check_keys(settings: config.Settings) -> None:
    """Fail at start, with a clear message, on keys the link could not use."""
    if settings.remote:
        load_key_pair(settings.curve_secret_key)
        load_public_key(settings.curve_server_key)
    elif settings.remote_listen:
        load_key_pair(settings.curve_secret_key)
        if not os.path.isdir(settings.curve_clients):
            raise config.ConfigError(f"[ccexec] curve_clients: {settings.curve_clients} is not a directory")


def _link_options(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.HEARTBEAT_IVL, LINK_HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, LINK_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, LINK_TIMEOUT_MS)


class AllowedKeys:
    """The ZAP credentials check: public keys of the curve_clients directory."""

    def __init__(self, directory: str):
        self.directory = directory
        self.keys: dict[bytes, bool] = {}
        self.seen: float | None = None
        self.next_check = 0.0

    def reload_if_changed(self) -> None:
        if time.monotonic() < self.next_check:
            return
        self.next_check = time.monotonic() + KEY_RECHECK
        try:
            mtime = os.stat(self.directory).st_mtime
            if mtime != self.seen:
                self.keys, self.seen = zmq.auth.load_certificates(self.directory), mtime
                logs.event(log, "remote.keys_loaded", keys=len(self.keys), directory=self.directory)
        except (OSError, ValueError) as exc:
            logs.event(log, "remote.keys_unreadable", logging.WARNING, directory=self.directory, error=exc)

    def callback(self, domain: str, key: bytes) -> bool:  # called from the authenticator's thread
        allowed = self.keys.get(key, False)
        if not allowed:
            logs.event(log, "remote.refused", logging.WARNING, key=key.decode(errors="replace"),
                       why="public key not in curve_clients")
        return allowed


class RemoteFace:
    """The broker's ROUTER for executor nodes, bound on remote_listen."""

    def __init__(self, ctx: zmq.Context, settings: config.Settings):
        self.allowed = AllowedKeys(settings.curve_clients)
        self.allowed.reload_if_changed()
        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("ccexec.remote.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self.allowed)
        public, secret = load_key_pair(settings.curve_secret_key)
        self.sock = ctx.socket(zmq.ROUTER)
        bus.tune(self.sock, receive_hwm=bus.DATA_HIGH_WATER_MARK)  # nodes send output: their sends wait
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a node that redials takes its identity back
        self.sock.curve_publickey, self.sock.curve_secretkey = public, secret
        self.sock.curve_server = True
        self.sock.zap_domain = ZAP_DOMAIN.encode()
        _link_options(self.sock)
        self.sock.bind(settings.remote_listen)
        logs.event(log, "remote.listening", endpoint=settings.remote_listen, keys=len(self.allowed.keys))

    def close(self) -> None:
        self.auth.stop()


def connect_to_head(ctx: zmq.Context, settings: config.Settings, identity: bytes) -> zmq.Socket:
    """An executor node's DEALER to the head's remote face."""
    public, secret = load_key_pair(settings.curve_secret_key)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    bus.tune(sock, send_hwm=bus.DATA_HIGH_WATER_MARK)
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_serverkey = load_public_key(settings.curve_server_key)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, LINK_TIMEOUT_MS)  # a cut link: redial, not wait out TCP's SYN retries
    _link_options(sock)
    sock.connect(settings.broker)
    return sock
