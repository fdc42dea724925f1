#!/usr/bin/env bash
# Set up (idempotent) and run the main job: the bundled workflows end to end in a real, headless
# ComfyUI on the built-in tiny models. Prints the folder the results were written to.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup_env.sh"
VENV=${SD35_TUNER_HOME:-$HOME/.cache/sd35-tuner}/venv
cd "$ROOT"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 exec "$VENV/bin/python" -m tools.main_job "$@"
