#!/usr/bin/env bash
# Set up (idempotent) and run every check: lint, JS syntax, unit + integration + browser tests.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/unit -x`).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup_env.sh"
VENV=${SD35_TUNER_HOME:-$HOME/.cache/sd35-tuner}/venv
cd "$ROOT"
echo "[test] ruff" >&2
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
if command -v node >/dev/null 2>&1; then
  echo "[test] node --check web/js" >&2
  find web/js -name '*.js' -print0 | xargs -0 -r -n1 node --check
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [[ $# -eq 0 ]]; then set -- tests; fi
exec "$VENV/bin/pytest" -p no:cacheprovider "$@"
