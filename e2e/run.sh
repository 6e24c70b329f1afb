#!/usr/bin/env bash
# End to end: the real Claude Code CLI and OpenClaw each do a scripted 23-tool-call coding session
# twice, straight to the offline emulator and through `tokensaver proxy`, and the billed cost of both
# routes is printed beside the report's "saved" (see e2e/agents.py); then each runs once through its
# launcher (`tokensaver claude -p`, `tokensaver openclaw agent --local`), which must print the
# session's report. Clients are installed with npm into
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
# each agent session has its own timeout (e2e/agents.py); this bounds installs and all four
exec timeout "${TOKENSAVER_E2E_TIMEOUT:-900}" python e2e/agents.py "$@"
