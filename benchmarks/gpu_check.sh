#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): one offline command, under 8 minutes.
#   benchmarks/gpu_check.sh [--out DIR] [--budget-s 450] [--steps 10] [--rounds 2]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# a hard stop at 7.5 minutes whatever happens; the script itself stops starting steps earlier
exec timeout --kill-after=15 450 python3 -m benchmarks.gpu_check "$@"
