"""Security policy: tokens, origins, command and environment rules, rates.

Pure logic with no sockets and no event loop, so every rule can be tested
on its own and the handler and executor only apply the answers. The one
exception is `read_token_file`, which reads a file and is therefore only
ever called at start-up or from a worker thread.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import os
import posixpath
import re
import shlex
import stat
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Iterable, Mapping


class PolicyError(Exception):
    """A policy input (token file, pattern) that cannot be used; the message says why."""


# ---------------------------------------------------------------- listening

def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the port on this machine (127.0.0.0/8, ::1, localhost)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


# ---------------------------------------------------------------- tokens

_TOKEN_NAME = re.compile(r"^[A-Za-z0-9_.@:+-]{1,64}$")
# What an HTTP header carries as it is: a token of other characters reaches the
# handshake in whichever encoding the client chose, and could never match.
_TOKEN = re.compile(r"^[\x21-\x7e]+$")
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Tokens:
    """Bearer tokens by name. `match` compares in constant time per token."""

    by_name: Mapping[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.by_name)

    def match(self, presented: str | None) -> str | None:
        """The name of the token presented, or None. Every token is compared,
        whatever matched, so the time taken tells nothing about which."""
        if not presented:
            return None
        given = presented.encode("utf-8", "surrogateescape")
        found = None
        for name, token in self.by_name.items():
            if hmac.compare_digest(given, token.encode("utf-8", "surrogateescape")) and found is None:
                found = name
        return found


def parse_tokens(text: str, source: str = "token file") -> Tokens:
    """Lines `name token`; blank lines and `#` comments are skipped.

    Errors name the line, never a token."""
    tokens: dict[str, str] = {}
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise PolicyError(f"{source} line {number}: expected `name token`")
        name, token = parts
        if not _TOKEN_NAME.match(name):
            raise PolicyError(f"{source} line {number}: a token name is 1-64 letters, digits or _.@:+-")
        if name in tokens:
            raise PolicyError(f"{source} line {number}: token name {name!r} is used twice")
        if len(token) < MIN_TOKEN_CHARS:
            raise PolicyError(f"{source} line {number}: token {name!r} is shorter than {MIN_TOKEN_CHARS} characters")
        if not _TOKEN.match(token):
            raise PolicyError(f"{source} line {number}: token {name!r} holds a character other than "
                              "printable ASCII, which an Authorization header cannot carry reliably")
        if token in seen:
            raise PolicyError(f"{source} line {number}: token {name!r} repeats another name's token")
        tokens[name] = token
        seen.add(token)
    return Tokens(tokens)


def check_private_mode(mode: int, path: str) -> None:
    """A token file must not be accessible to group or others."""
    if mode & 0o077:
        raise PolicyError(f"token_file {path} is accessible to group or others "
                          f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}")


def token_file_key(path: str) -> tuple[int, int, int, int] | None:
    """What tells a changed token file from the one loaded (None: it is gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode)


def read_token_file(path: str) -> Tokens:
    """Read and check a token file (blocking: start-up or a worker thread only)."""
    try:
        with open(path, encoding="utf-8") as f:
            check_private_mode(os.fstat(f.fileno()).st_mode, path)
            text = f.read()
    except OSError as exc:
        raise PolicyError(f"cannot read token_file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"token_file {path} is not UTF-8 text") from None
    tokens = parse_tokens(text, f"token_file {path}")
    if not tokens:
        raise PolicyError(f"token_file {path} holds no token")
    return tokens


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header value."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


# ---------------------------------------------------------------- origins

def normalize_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def origin_allowed(origin: str | None, allowed: Iterable[str]) -> bool:
    """No Origin header (a non-browser client) is fine; a browser origin must be listed."""
    if origin is None:
        return True
    wanted = normalize_origin(origin)
    return any(normalize_origin(a) == wanted for a in allowed)


# ---------------------------------------------------------------- commands

_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SHELL_PUNCTUATION = set("();<>|&")
_WRAPPERS = ("env", "exec", "command", "nohup", "nice", "time", "timeout", "stdbuf", "setsid")
_WRAPPER_OPTIONS_WITH_VALUE = {"-u", "--unset", "-C", "--chdir", "-S", "--split-string", "-n",
                               "--adjustment", "-s", "--signal", "-k", "--kill-after", "-i", "-o", "-e"}
_DURATION = re.compile(r"^[0-9.]+[smhd]?$")


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused by policy: the error message and its data."""

    message: str
    data: dict = field(default_factory=dict)


def shell_programs(command: str) -> list[str] | None:
    """The programs a shell command names at the start of each simple command
    (after `;`, `&&`, `||`, `|`, `&`, `(`), leading NAME=value words skipped.
    None: the command cannot be split (unbalanced quotes)."""
    try:
        lexer = shlex.shlex(command.replace("\n", ";"), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError:
        return None
    programs: list[str] = []
    words: list[str] = []
    skip_target = False
    for token in tokens + [";"]:
        if skip_target:
            skip_target = False
            continue
        if token and set(token) <= _SHELL_PUNCTUATION:
            if "<" in token or ">" in token:
                skip_target = True  # a redirection: its target is no program
                continue
            programs.extend(argv_programs(words))
            words = []
            continue
        words.append(token)
    return programs


def argv_programs(argv: list[str]) -> list[str]:
    """argv[0] (past NAME=value words), plus the program a wrapper such as
    `env` or `exec` runs, so a deny rule cannot be stepped around with them."""
    i = 0
    while i < len(argv) and _ASSIGNMENT.match(argv[i]):
        i += 1
    programs: list[str] = []
    while i < len(argv):
        program = argv[i]
        programs.append(program)
        if posixpath.basename(program) not in _WRAPPERS:
            break
        i += 1
        while i < len(argv):  # the wrapper's options, assignments and durations
            word = argv[i]
            if word == "--":
                i += 1
                break
            if word in _WRAPPER_OPTIONS_WITH_VALUE:
                i += 2
            elif word.startswith("-") or _ASSIGNMENT.match(word) or _DURATION.match(word):
                i += 1
            else:
                break
    return programs


def _matches(program: str, patterns: Iterable[str]) -> bool:
    base = posixpath.basename(program)
    return any(fnmatchcase(base, p) or fnmatchcase(program, p) for p in patterns)


@dataclass(frozen=True)
class CommandPolicy:
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    allow_shell: bool = True

    @property
    def active(self) -> bool:
        return bool(self.allow or self.deny)

    def check(self, command: str | None = None, argv: Iterable[str] | None = None) -> Refusal | None:
        """None if the request may run, else why not."""
        if command is not None:
            if not self.allow_shell:
                return Refusal("Command not allowed by policy: shell commands are disabled "
                               "(allow_shell = false), send argv instead",
                               {"executable": None, "reason": "shell"})
            if not self.active:
                return None
            programs = shell_programs(command)
            if programs is None:
                return Refusal("Command not allowed by policy: the command cannot be parsed",
                               {"executable": None, "reason": "unparsable"})
        else:
            if not self.active:
                return None
            programs = argv_programs(list(argv or ()))
        for program in programs:
            if _matches(program, self.deny):
                return Refusal(f"Command not allowed by policy: {program} is denied (command_deny)",
                               {"executable": program, "reason": "denied"})
            if self.allow and not _matches(program, self.allow):
                return Refusal(f"Command not allowed by policy: {program} is not in command_allow",
                               {"executable": program, "reason": "not_allowed"})
        return None


# ---------------------------------------------------------------- environment

# What a job always gets from the daemon's environment, even under env_pass.
ALWAYS_PASS = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_*", "TZ", "TMPDIR", "TERM")


def _named(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def client_env_refusal(requested: Mapping[str, str], client_allow: Iterable[str]) -> Refusal | None:
    """A request's env naming a variable clients may not set."""
    client_allow = tuple(client_allow)
    for name in requested:
        if not _named(name, client_allow):
            return Refusal(f"Environment variable not allowed by policy: {name} (env_client_allow)",
                           {"env": name, "reason": "env"})
    return None


def job_environment(daemon_env: Mapping[str, str], *, env_pass: Iterable[str] = (),
                    env_set: Mapping[str, str] | None = None, requested: Mapping[str, str] | None = None,
                    client_allow: Iterable[str] = ("*",), remove: Iterable[str] = ()) -> dict[str, str]:
    """A job's environment: the daemon's (only env_pass + ALWAYS_PASS names when
    env_pass is set), then env_set, then the request's env (names clients may
    set only), then env_remove takes out what it names, whoever set it."""
    env_pass, client_allow, remove = tuple(env_pass), tuple(client_allow), tuple(remove)
    if env_pass:
        keep = env_pass + ALWAYS_PASS
        env = {k: v for k, v in daemon_env.items() if _named(k, keep)}
    else:
        env = dict(daemon_env)
    env.update(env_set or {})
    env.update({k: v for k, v in (requested or {}).items() if _named(k, client_allow)})
    return {k: v for k, v in env.items() if not _named(k, remove)}


# ---------------------------------------------------------------- limits

def job_timeout(requested: float | None, max_job_seconds: float) -> tuple[float | None, bool]:
    """The timeout a job runs with, and whether the daemon's cap set it."""
    if max_job_seconds <= 0:
        return requested, False
    if requested is None or requested > max_job_seconds:
        return max_job_seconds, True
    return requested, False


ROUNDING = 1e-6  # of a token: more than float time loses even after years of uptime


class TokenBucket:
    """Requests per second with a burst: `take(now)` is 0 when a request may
    go ahead, else the seconds until it could. Time is passed in (monotonic)."""

    def __init__(self, rate: float, burst: float, now: float):
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate, self.burst = float(rate), float(burst)
        self.tokens, self.stamp = self.burst, now

    def take(self, now: float) -> float:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        # Within rounding of a whole token: elapsed times are differences of
        # large floats, so a request made exactly when it was told to retry
        # may find 0.9999999999 tokens.
        if self.tokens >= 1 - ROUNDING:
            self.tokens -= 1
            return 0.0
        return max(0.001, math.ceil((1 - self.tokens) / self.rate * 1000) / 1000)


def burst_for(rate: float, burst: int) -> int:
    """The configured burst, or by default twice the rate (at least 1)."""
    return burst if burst > 0 else max(1, math.ceil(2 * rate))
