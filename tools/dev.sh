#!/usr/bin/env bash
# Set up everything ccexec needs (idempotent), then run the daemon or the tests.
#
#   tools/dev.sh serve [ccexecd options]   run ccexecd on 127.0.0.1:8004
#   tools/dev.sh test [pytest options]     run the whole test suite
#
# Needs only Python 3.11+ (with venv) and git. The virtualenv lives in .venv;
# the real Claude Code CLI, used by one test, is installed from npm into
# .cache/npm when npm is present.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.ccexec-installed

setup_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    # Reinstall only when the package metadata changed.
    local want
    want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
    if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        "$VENV/bin/python" -m pip install --quiet -e '.[test]'
        echo "$want" > "$STAMP"
    fi
}

setup_claude_cli() {
    # The real CLI without credentials: a test checks its failure arrives whole.
    if command -v npm >/dev/null 2>&1 && [ ! -x .cache/npm/node_modules/.bin/claude ]; then
        mkdir -p .cache/npm
        npm install --silent --no-audit --no-fund --prefix .cache/npm @anthropic-ai/claude-code \
            || echo "warning: npm install of @anthropic-ai/claude-code failed; its test will be skipped" >&2
    fi
}

case "${1:-}" in
    serve)
        shift
        setup_venv
        exec "$VENV/bin/ccexecd" "$@"
        ;;
    test)
        shift
        setup_venv
        setup_claude_cli
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: tools/dev.sh serve [ccexecd options] | test [pytest options]" >&2
        exit 2
        ;;
esac
