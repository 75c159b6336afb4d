# Shared settings for the sweeps (sourced). Override any of them from the environment.
# Usage pattern: scripts/sweeps/<sweep>.sh MODEL_ID [extra main.py flags...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PY:-python}"
OUT="${OUT:-$ROOT/out/search}"            # results go here, one folder per model/setting
N_TRIALS="${N_TRIALS:-50}"
TARGETS="${TARGETS:-0.5 0.6 0.7}"
GRANULARITY="${GRANULARITY:-trend_layer}"
NUM_BLOCKS="${NUM_BLOCKS:-8}"
# Shared study storage for many nodes, e.g. STORAGE=postgresql://user:pw@db-host/optuna; empty: sqlite in --save
STORAGE="${STORAGE:-}"
# hub id -> org_name; local directory -> its basename
model_tag() { if [ -d "$1" ]; then basename "$1"; else echo "$1" | tr '/:' '__'; fi; }
storage_flags() { [ -n "$STORAGE" ] && echo "--storage $STORAGE" || true; }
if [ $# -lt 1 ]; then
  echo "usage: $0 MODEL_ID [extra main.py flags...]  (e.g. llava-hf/llava-1.5-7b-hf)" >&2
  exit 2
fi
MODEL="$1"; shift
TAG="$(model_tag "$MODEL")"
