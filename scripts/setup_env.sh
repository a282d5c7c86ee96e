#!/usr/bin/env bash
# Create .venv with the pinned stack and timm-gpd installed in editable mode (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# torch first and pinned: a bare 'torch' requirement could pull a different build
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e '.[dev,bench]'
