#!/usr/bin/env bash
# The main job on the built-in sample data: train -> evaluate -> predict with heatmaps. Args go to `hybridmednet demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
exec .venv/bin/hybridmednet demo "$@"
