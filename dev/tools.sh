#!/usr/bin/env bash
# The project's Python tools, pinned, in a virtualenv under the cache (installed from PyPI once):
# chdb embeds a current ClickHouse; schemathesis fuzzes the HTTP APIs; pyarrow and DuckDB read the
# archive's Parquet files as analysts' tools do. `dev/tools.sh plot`: matplotlib, in a virtualenv
# of its own, for loadtest/plot.py; `dev/tools.sh k8s`: checkov (the policy scan of k8s/);
# `dev/tools.sh browser`: Selenium, which drives Debian's chromium for dev/dashboard_test.py.
# Prints the virtualenv's python.
set -euo pipefail
TALLY_CACHE="${TALLY_CACHE:-$HOME/.cache/tally}"
case "${1:-tools}" in
  tools) TOOLS="chdb==4.4.0 schemathesis==4.32.5 duckdb==2.0.0 pyarrow==26.0.1" ;;
  plot) TOOLS="matplotlib==3.11.2" ;;
  k8s) TOOLS="checkov==3.3.30" ;; # with PyYAML: dev/k8s_check.sh, dev/k8s_invariants.py
  browser) TOOLS="selenium==4.50.0" ;; # 4.52 wants a certifi newer than PyPI serves here
  *) echo "usage: dev/tools.sh [tools|plot|k8s|browser]" >&2; exit 2 ;;
esac
VENV="$TALLY_CACHE/venv-tools-$(echo "$TOOLS" | sha256sum | cut -c1-12)"
if [[ ! -f "$VENV/.installed" ]]; then
  echo "[tools] installing $TOOLS from PyPI into $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q --disable-pip-version-check $TOOLS >&2
  touch "$VENV/.installed"
fi
echo "$VENV/bin/python"
