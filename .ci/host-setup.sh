#!/usr/bin/env bash
# Host tools the fast tests check against (idempotent; quiet; apt only for what is missing):
#
#   - golang-go: tests/unit/test_templates.py renders the Ollama Go templates with Go's own text/template and
#     compares them with the Jinja renders (the only check that Ollama prompts the way the model was trained);
#   - systemd (systemd-analyze): tests/unit/test_unit_render.py verifies the rendered units and scores them;
#   - chromium: tests/integration/test_report.py renders the `report` page in a real headless browser and checks the
#     screenshot (~11 s more the first time on 2 cores: 25 packages with apt-get update).
#
# Under CI=true a missing tool fails those tests (tests/helpers.py: need), so CI must install them here.
# Needs root for apt; elsewhere it only says what is missing. Measured on 2 cores: ~40 s the first time, ~0 s after.
set -euo pipefail

say() { printf '[host-setup] %s\n' "$*"; }

missing=()
command -v go >/dev/null || missing+=(golang-go)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then
    say "go, systemd-analyze and chromium present"
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    say "not root: install ${missing[*]} yourself (apt-get install ${missing[*]}); those tests skip until then"
    exit 0
fi
say "installing ${missing[*]}"
start=$SECONDS
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
say "installed in $((SECONDS - start)) s"
