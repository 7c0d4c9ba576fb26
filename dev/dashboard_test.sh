#!/usr/bin/env bash
# The dashboard's browser test (dev/dashboard_test.py) with what it needs: Debian's chromium and
# chromium-driver (installed once with apt-get when missing) and Selenium from PyPI (dev/tools.sh
# browser). The services are the debug binaries `cargo build` (or `cargo test`) made.
#   dev/dashboard_test.sh [--screenshots DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TALLY_CACHE="${TALLY_CACHE:-$HOME/.cache/tally}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TALLY_CACHE/target}"
if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  echo "[dashboard] installing chromium and chromium-driver from Debian's packages" >&2
  mkdir -p "$ROOT/.dev/log"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver >"$ROOT/.dev/log/apt-chromium.log" 2>&1 \
    || { tail -n 20 "$ROOT/.dev/log/apt-chromium.log" >&2; echo "apt-get install chromium chromium-driver failed" >&2; exit 1; }
fi
PYTHON="$(bash "$ROOT/dev/tools.sh" browser)"
TALLY_BIN_DIR="$CARGO_TARGET_DIR/debug" exec "$PYTHON" "$ROOT/dev/dashboard_test.py" "$@"
