#!/usr/bin/env bash
# Joint search: per-block sparsity and per-layer KV bits (6 or 8, 7-bit average) at 50/60/70%.
#   scripts/sweeps/search_joint.sh llava-hf/llava-1.5-13b-hf
source "$(dirname "$0")/common.sh"
for s in $TARGETS; do
  "$PY" "$ROOT/main.py" --model "$MODEL" --prune_method optspa --sparsity_ratio "$s" \
    --search joint --search_granularity "$GRANULARITY" --num_blocks "$NUM_BLOCKS" \
    --kv_bits_choices ${KV_CHOICES:-6 8} --kv_avg_bits "${KV_AVG_BITS:-7}" --n_trials "$N_TRIALS" \
    $(storage_flags) --save "$OUT/$TAG/joint_${GRANULARITY}/s$s" "$@"
done
