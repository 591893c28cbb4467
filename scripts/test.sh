#!/usr/bin/env bash
# Installs what the tests need into .venv, then lints (ruff), type-checks (mypy) and runs the default
# (fast) test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,albumentations,serve,deploy
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
