#!/usr/bin/env bash
# Installs what the tests need into .venv, then lints (ruff), type-checks (mypy) and runs the default
# (fast) test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,albumentations,serve,deploy,3d
# The web page's browser test (tests/test_serve_browser.py) drives Debian's Chromium; where it cannot be
# installed the test skips and says why, so a failure here is not fatal.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if ! (timeout 900 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 \
      apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1; then
    echo "chromium and chromium-driver could not be installed: the browser test will skip" >&2
  fi
fi
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
