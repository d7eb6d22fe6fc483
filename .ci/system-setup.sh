#!/usr/bin/env bash
# What the system tests (tests/system, a real systemd in a container) need on the host (idempotent; quiet):
#
#   1. apt packages debootstrap + systemd-container (systemd-nspawn), installed only when missing;
#   2. the container rootfs: a minimal Debian (the host's release, from the host's configured apt mirror)
#      debootstrapped into a cache folder with a venv holding the project's runtime dependencies; reused
#      while its recipe (packages, dependency list) is unchanged. Each test boot overlays it (--volatile=overlay),
#      so the cached tree itself is never modified by a test.
#
# Env: CHATOS_RETRAIN_CACHE (default ~/.cache/chatos-retrain; the rootfs is <cache>/system-rootfs),
#      CHATOS_RETRAIN_SYSTEM_ROOTFS to put the rootfs elsewhere.
# Needs root. Measured on 2 cores: step 1 ~20 s, step 2 ~110 s the first time (debootstrap ~105 s), ~0 s after.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"

say() { printf '[system-setup] %s\n' "$*"; }

if [ "$(id -u)" != "0" ]; then
    say "not root: the system tests will skip (systemd-nspawn and debootstrap need root)"
    exit 0
fi

# 1. host tools
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    start=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    say "installed in $((SECONDS - start)) s"
else
    say "debootstrap and systemd-nspawn present"
fi

# 2. the rootfs (built or reused; the harness prints what it does and how long it took)
"$PY" "$ROOT/tests/system/container.py" build
