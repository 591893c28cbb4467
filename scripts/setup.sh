#!/usr/bin/env bash
# Creates .venv (once) and installs HybridMedNet with the given extras; re-runs only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python3 -m venv .venv 2>/dev/null || python3 -m venv --without-pip .venv
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  echo "setting up .venv (torch, torchvision, timm, ...): this takes a few minutes the first time" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -e ".[${extras}]"
  rm -f .venv/.installed-* && touch "$stamp"
fi
