#!/usr/bin/env bash
# The paper's method at 50/60/70%: TPE search of the sparsity allocation with the Optspa metric, prune with the
# best profile (the shipped model is the scored one) and report WikiText-2 test ppl. `--prune_method optspa`
# alone already searches; the flags below only make the unit and trial count explicit. Above a 55% target each
# optspa search runs two restarts and their mean by default (N_TRIALS each): pass --restarts 1 for one search.
# Models: llava-hf/llava-1.5-7b-hf, llava-hf/llava-1.5-13b-hf, llava-hf/llava-v1.6-vicuna-7b-hf.
#   scripts/sweeps/search_sparsity.sh llava-hf/llava-1.5-7b-hf
# Many nodes on one study: STORAGE=postgresql://... run the same command on every node (each resumes the study).
source "$(dirname "$0")/common.sh"
for s in $TARGETS; do
  "$PY" "$ROOT/main.py" --model "$MODEL" --prune_method optspa --sparsity_ratio "$s" --sparsity_type unstructured \
    --search sparsity --search_granularity "$GRANULARITY" --num_blocks "$NUM_BLOCKS" --n_trials "$N_TRIALS" \
    --eval_datasets wikitext2 c4 \
    $(storage_flags) --save "$OUT/$TAG/sparsity_${GRANULARITY}/s$s" "$@"
done
