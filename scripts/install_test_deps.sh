#!/usr/bin/env bash
# What the test suite needs beyond `pip install -e ".[dev]"`: a headless Chromium, which renders
# the study report in tests/test_report.py. Installed from Debian's packages when missing (as
# root, or through passwordless sudo); a no-op when `chromium` is already on PATH.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  exit 0
fi
install='apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null'
if [ "$(id -u)" = 0 ]; then
  sh -c "$install"
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo -n sh -c "$install"
else
  echo "install_test_deps: headless Chromium is missing and this user cannot apt-get install it;" \
    "run as root: apt-get install -y chromium" >&2
  exit 1
fi
command -v chromium >/dev/null 2>&1 || { echo "install_test_deps: chromium still not on PATH" >&2; exit 1; }
echo "install_test_deps: installed $(chromium --version 2>/dev/null || echo chromium)"
