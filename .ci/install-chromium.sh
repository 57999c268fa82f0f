#!/usr/bin/env bash
# The browser test (tests/it/origin.rs) drives a real headless Chromium:
# Debian's `chromium`, installed here if missing. The test fails, never
# skips, without it.
set -euo pipefail
if command -v chromium >/dev/null && chromium --version >/dev/null 2>&1; then
  chromium --version
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "installing chromium needs root (apt-get)" >&2; exit 1; }
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
chromium --version
