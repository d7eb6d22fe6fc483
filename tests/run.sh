#!/usr/bin/env bash
# Set up what the test suite needs (idempotent; reuses what is already there), then run it.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
# Stages, each idempotent: host tools (Go, systemd-analyze), CPU training stack + Unsloth venv + converter, the
# real-systemd container. Under CI=true whatever they leave missing fails its tests (tests/helpers.py: need).
for stage in .ci/host-setup.sh .ci/train-setup.sh .ci/system-setup.sh; do
    if [ -f "$stage" ]; then bash "$stage"; fi
done
exec .venv/bin/python -m pytest "$@"
