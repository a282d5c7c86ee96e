#!/usr/bin/env bash
# Set up everything on a fresh machine, then run the test suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/get_fashion_mnist.sh data
.venv/bin/python -m pytest -q "$@"
