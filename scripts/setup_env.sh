#!/usr/bin/env bash
# Create (or reuse) .venv with dopq installed against the pinned constraints. Idempotent: a stamp
# of the set-up files' hash skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.dopq-setup-stamp
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install --quiet pip==26.3  # pinned: --build-constraint needs pip >= 25.3
    # --build-constraint pins the build backend (setuptools) too: -c no longer reaches build environments
    .venv/bin/python -m pip install --quiet -c constraints.txt --build-constraint constraints.txt \
        -e ".[dev,hf,openvino,bench]"
    echo "$want" > "$stamp"
fi
