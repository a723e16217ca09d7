"""`python -m ccexec ROLE`: how Circus starts each role, so `ps` shows it."""

import ctypes
import gc
import sys

# glibc's malloc options (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> None:
    """Output moves through each process in blocks of up to 256 KiB. glibc
    maps such a block afresh and unmaps it when freed (or trims the heap top
    it came from), so each block costs 64 page faults to zero-fill again:
    thousands a second in every process a stream passes. Blocks under 1 MiB
    come from the heap instead, which keeps up to 8 MiB free at its top."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 8 << 20)
    except (OSError, AttributeError):  # not glibc: its own defaults
        pass


def main() -> None:
    keep_freed_memory()
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
