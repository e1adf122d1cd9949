#!/usr/bin/env bash
# Create ./.venv-speculators with the real `speculators` package (0.9.0), used by tests/export to load our
# speculators exports with the package's own loader. A separate venv because speculators pins an older
# transformers than dspark. Idempotent: a second run only checks the stamp.
# Exit status: 0 ready; 3 the package registry could not be reached (tests then skip with that reason);
# anything else: a real install failure.
# Usage: bash tools/setup_speculators_env.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-speculators}
PY=${PYTHON:-python3}
SPECULATORS=speculators==0.9.0
TORCH=torch==2.13.0
stamp="$VENV/.speculators-installed"
want=$(printf '%s %s\n' "$SPECULATORS" "$TORCH" | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
# The CPU torch wheel first (an unpinned torch pulls a multi-GB CUDA build), then speculators constrained to
# it; its torchvision/torchaudio do not match this torch (`import speculators` then fails on torchvision::nms)
# and it imports neither, so they are removed.
constraint=$(mktemp)
trap 'rm -f "$constraint"' EXIT
echo "$TORCH" > "$constraint"
log=$(mktemp)
if ! $pip install -q "$TORCH" >"$log" 2>&1 || ! $pip install -q -c "$constraint" "$SPECULATORS" >>"$log" 2>&1; then
  cat "$log" >&2
  if grep -qiE "No matching distribution|Could not find a version|connection|Max retries|Temporary failure" "$log"; then
    echo "setup_speculators_env: the package registry could not be reached or has no $SPECULATORS" >&2
    exit 3
  fi
  exit 1
fi
$pip uninstall -q -y torchvision torchaudio >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import speculators, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
