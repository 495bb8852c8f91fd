#!/usr/bin/env bash
# Sets up the project and its test server (jongodb, from npm), then runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
FFF_EXTRAS=test bash scripts/setup.sh
npm install --silent --no-audit --no-fund --prefix tests/server >/dev/null
exec .venv/bin/python -m pytest "$@"
