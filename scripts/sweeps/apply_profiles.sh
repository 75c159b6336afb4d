#!/usr/bin/env bash
# Apply saved profiles without searching: every profile_optspa_*.json under PROFILE_DIR (default: the
# search sweeps' output for this model), pruned with the Optspa metric and evaluated.
#   scripts/sweeps/apply_profiles.sh llava-hf/llava-1.5-7b-hf
#   PROFILE_DIR=profiles/llava-1.5-7b scripts/sweeps/apply_profiles.sh llava-hf/llava-1.5-7b-hf
source "$(dirname "$0")/common.sh"
PROFILE_DIR="${PROFILE_DIR:-$OUT/$TAG}"
found=0
while IFS= read -r -d '' f; do
  found=1
  name="$(basename "$f" .json)"
  # Sparsity only: KV bits in a joint profile are applied by --kv_profile where main.py offers it.
  "$PY" "$ROOT/main.py" --model "$MODEL" --prune_method optspa --sparsity_profile "$f" \
    --num_blocks "$NUM_BLOCKS" --save "$OUT/$TAG/applied/$name" "$@"
done < <(find "$PROFILE_DIR" -name 'profile_optspa_*.json' -print0 | sort -z)
[ "$found" = 1 ] || { echo "no profile_optspa_*.json under $PROFILE_DIR" >&2; exit 2; }
