#!/usr/bin/env bash
# The whole grid of the issue: sparsity search at 0.5/0.6/0.7 on LLaVA-1.5 7B/13B and LLaVA-1.6 7B.
# Pass extra main.py flags after the script name, e.g. --data_dir /shared/data for offline nodes.
set -euo pipefail
HERE="$(dirname "$0")"
for m in llava-hf/llava-1.5-7b-hf llava-hf/llava-1.5-13b-hf llava-hf/llava-v1.6-vicuna-7b-hf; do
  "$HERE/search_sparsity.sh" "$m" "$@"
done
