"""`python -m ccexec ROLE`: how Circus starts each role, so `ps` shows it."""

import gc
import sys


def main() -> None:
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role == "broker":
        from ccexec.broker import main as run
    elif role == "executor":
        from ccexec.executor import main as run
    elif role == "handler":
        from ccexec.handler import main as run
    else:
        sys.exit("usage: python -m ccexec broker|executor|handler [--fd N]")
    # Modules and what they built live as long as the process: left out of
    # every collection, a full one scans only what the role made since, not
    # some hundred thousand objects (tens of ms a pass on a busy handler).
    gc.freeze()
    run(sys.argv[2:])


if __name__ == "__main__":
    main()
