#!/usr/bin/env python3
"""The idle pool's library floor: one Python process in place of one of a
ccexec pool's, importing every module that process's role module brings in
from the standard library and the third-party packages, and nothing of
ccexec's own. A pool of these, idle, holds what ccexec's pool would hold
with no code or state of its own: the part of the idle footprint set by the
interpreter and the libraries (asyncio, ZeroMQ, Circus and Tornado,
websockets, prometheus-client, psutil, SQLite).

    python tools/bench/library_floor.py ROLE   # prints "ready", then holds until stdin closes

ROLE: arbiter, plugin, broker, executor or handler.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

ROLE_MODULES = {"arbiter": "ccexec.arbiter", "plugin": "ccexec.plugins", "broker": "ccexec.broker",
                "executor": "ccexec.executor", "handler": "ccexec.handler"}
OWN = ("ccexec", "__main__")
LIST_MODULES = "import sys, {module}; print('\\n'.join(m for m in sys.modules if m.partition('.')[0] not in {own}))"


def libraries(role: str) -> list[str]:
    """The modules ROLE's module loads, ccexec's own left out: listed by a
    fresh interpreter, so this one imports nothing of ccexec."""
    listed = subprocess.run([sys.executable, "-c", LIST_MODULES.format(module=ROLE_MODULES[role], own=OWN)],
                            check=True, capture_output=True, text=True)
    return listed.stdout.split()


def main() -> None:
    for name in libraries(sys.argv[1]):
        try:
            importlib.import_module(name)
        except Exception:  # made at run time (an alias, a generated module): its package is in already
            pass
    print("ready", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
