#!/usr/bin/env bash
# Regenerates docs/results.md and its figures from fresh runs on the current code: the default model with its
# built-in draft, the best measured configuration (token trees sized by adaptive) and the LayerSkip-style chain,
# each against autoregressive decoding side by side, on four datasets. SAMPLES / STEPS scale it (defaults: a
# ~10-minute run on 2 cores); run directories go to RUNS (default runs/results).
#   bash benchmarks/results.sh            SAMPLES=20 STEPS=128 bash benchmarks/results.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SAMPLES=${SAMPLES:-5} STEPS=${STEPS:-128} RUNS=${RUNS:-runs/results}
for dataset in gsm8k human_eval xsum_summarization cnn_dm_summarization; do
  skiplayer benchmark --dataset "$dataset" --num_samples "$SAMPLES" --max_steps "$STEPS" --draft_source both \
    --dynamic_early_exit_mode adaptive --num_speculations 2 --output_dir "$RUNS/$dataset-tree" --no_progress
  skiplayer benchmark --dataset "$dataset" --num_samples "$SAMPLES" --max_steps "$STEPS" --draft_source self \
    --num_speculations 1 --output_dir "$RUNS/$dataset-chain" --no_progress
done
skiplayer report "$RUNS"/* --output docs/results.md \
  --title "skiplayer results: SmolLM2-135M-Instruct (float16, built-in draft) on a 2-core CPU"
