#!/usr/bin/env bash
# Install Debian's Chromium for tests/test_visualize_browser.py (headless check of the visualisation
# page). Idempotent and quiet; never fails the caller: without root or apt-get it only says why, and
# the browser test then skips (fails in CI, where .ci/run sets SASASA2VA_REQUIRE_BROWSER=1).
set -uo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "[install_browser] chromium present: $(/usr/bin/chromium --version 2>/dev/null | head -n1)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[install_browser] apt-get not found; not installing chromium (the browser test skips, or fails under SASASA2VA_REQUIRE_BROWSER=1)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "[install_browser] not root; not installing chromium (the browser test skips, or fails under SASASA2VA_REQUIRE_BROWSER=1)." \
       "Install it with: sudo apt-get install -y --no-install-recommends chromium"
  exit 0
fi
echo "[install_browser] installing chromium with apt-get"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if apt-get update -qq >"$log" 2>&1 \
   && apt-get install -y -qq --no-install-recommends chromium >>"$log" 2>&1; then
  echo "[install_browser] installed: $(/usr/bin/chromium --version 2>/dev/null | head -n1)"
else
  echo "[install_browser] apt-get failed (the browser test skips, or fails under SASASA2VA_REQUIRE_BROWSER=1); last lines:"
  tail -n 20 "$log"
fi
rm -f "$log"
exit 0
