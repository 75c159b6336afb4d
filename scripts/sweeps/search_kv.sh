#!/usr/bin/env bash
# KV-only search: per-layer KV bits from {KV_CHOICES} under an average budget, on the dense model (or pass
# --prune_method ... --sparsity_ratio ... to search on a pruned one).
#   scripts/sweeps/search_kv.sh llava-hf/llava-1.5-7b-hf
source "$(dirname "$0")/common.sh"
KV_CHOICES="${KV_CHOICES:-4 6 8}"
for b in ${KV_BUDGETS:-5 6 7}; do
  "$PY" "$ROOT/main.py" --model "$MODEL" --search kv --kv_bits_choices $KV_CHOICES --kv_avg_bits "$b" \
    --n_trials "$N_TRIALS" $(storage_flags) --save "$OUT/$TAG/kv/b$b" "$@"
done
