#!/usr/bin/env bash
# Set up (once) and run the demo: train, checkpoint, get killed, resume, compare losses.
# Arguments go to `python -m ckptio.demo` (e.g. --output s3://bucket/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m ckptio.demo "$@"
