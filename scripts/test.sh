#!/usr/bin/env bash
# Set up (idempotent) and run every check: lint, JS syntax, unit tests once, and the integration and
# browser groups (real ComfyUI servers, real frontend) on each ComfyUI version setup built: 0.3.75 and,
# when ../shared/comfyui holds its source, the newest (in parallel with the first run's groups).
# Extra arguments go to one pytest run on $SD35_TUNER_COMFY_HOME, else 0.3.75 (`bash scripts/test.sh tests/unit -x`).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup_env.sh"
HOME_DIR=${SD35_TUNER_HOME:-$HOME/.cache/sd35-tuner}
VENV=$HOME_DIR/venv
cd "$ROOT"
echo "[test] ruff" >&2
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
if command -v node >/dev/null 2>&1; then
  echo "[test] node --check web/js" >&2
  find web/js -name '*.js' -print0 | xargs -0 -r -n1 node --check
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# one torch thread per process (servers inherit it): the two versions' runs share the cores, and two threads
# per process on 2 busy cores made a tiny model's training step 10x slower (spinning), not faster
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PYTEST=("$VENV/bin/pytest" -p no:cacheprovider)
if [[ $# -gt 0 ]]; then exec "${PYTEST[@]}" "$@"; fi

version_of() { sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui/comfyui_version.py"; }
OLDEST=$(version_of "$HOME_DIR")
NEWEST_HOME=$(cat "$HOME_DIR/newest-comfyui" 2>/dev/null || true)
NEWEST_PID=""
if [[ -n $NEWEST_HOME ]]; then
  NEWEST=$(version_of "$NEWEST_HOME")
  NEWEST_LOG=$(mktemp -t "sd35-tests-comfyui-$NEWEST.XXXXXX.log")
  echo "[test] ComfyUI $NEWEST: integration + browser groups in the background (log: $NEWEST_LOG)" >&2
  # its own --basetemp: two pytest runs must not clean up each other's tmp_path folders
  SD35_TUNER_COMFY_HOME=$NEWEST_HOME "${PYTEST[@]}" --basetemp="${NEWEST_LOG%.log}.tmp" \
      tests/integration tests/browser > "$NEWEST_LOG" 2>&1 &
  NEWEST_PID=$!
  trap 'if [[ -n $NEWEST_PID ]]; then kill "$NEWEST_PID" 2>/dev/null || true; fi' EXIT
fi

echo "[test] ComfyUI $OLDEST: unit, integration and browser groups" >&2
status=0
SD35_TUNER_COMFY_HOME=$HOME_DIR "${PYTEST[@]}" tests || status=$?
summary=("ComfyUI $OLDEST: $([[ $status -eq 0 ]] && echo passed || echo FAILED) (unit, integration, browser)")

if [[ -n $NEWEST_PID ]]; then
  newest_status=0
  wait "$NEWEST_PID" || newest_status=$?
  NEWEST_PID=""
  echo "[test] ---- ComfyUI $NEWEST run ----" >&2
  cat "$NEWEST_LOG"
  summary+=("ComfyUI $NEWEST: $([[ $newest_status -eq 0 ]] && echo passed || echo FAILED) (integration, browser)")
  [[ $newest_status -eq 0 ]] || status=$newest_status
else
  summary+=("ONLY ComfyUI $OLDEST WAS TESTED: no ComfyUI-*.tar.gz in ../shared/comfyui next to this checkout")
fi
for line in "${summary[@]}"; do echo "[test] $line" >&2; done
exit "$status"
