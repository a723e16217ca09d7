"""ccexec: a supervised daemon that runs commands for WebSocket clients."""

__version__ = "0.1.0"
