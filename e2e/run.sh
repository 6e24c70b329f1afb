#!/usr/bin/env bash
# End to end: the real Claude Code CLI and OpenClaw run an agent task through `tokensaver proxy`
# to the offline emulator (see e2e/agents.py). Clients are installed with npm into
# ${TOKENSAVER_E2E_CACHE:-~/.cache/tokensaver-e2e}; prints "SKIPPED <client>: <reason>" when npm
# cannot install one. Uses the active Python (or ./.venv when none is active).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    . .venv/bin/activate
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "SKIPPED claude-code: npm not found on PATH"
    echo "SKIPPED openclaw: npm not found on PATH"
    exit 0
fi
exec timeout "${TOKENSAVER_E2E_TIMEOUT:-900}" python e2e/agents.py "$@"
