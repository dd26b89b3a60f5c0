#!/usr/bin/env bash
# The K x decoder-depth sweep of PRORec on Amazon Beauty (paper Figs. 9 and 6): 12 trials of
# Stage II on the Stage I embeddings of one pipeline run, then the best config's test metrics.
#
# Needs a GPU (out of reach on the 2-core CPU machine where this project is developed; no
# number from it is reported yet). On one GPU the trials share it, four at a time (0.25 GPU and
# 2 CPUs each: Stage II is small on Beauty); on a cluster every GPU node takes trials.
#
#   bash benchmarks/tune_beauty.sh                        # DATA, RUN, SWEEP as below
#   DATA=/home/ubuntu/data/amazon-beauty RUN=/mnt/efs/runs/beauty bash benchmarks/tune_beauty.sh
#
# Outputs: $SWEEP/results.md (every trial's validation NDCG@10 and Recall@10), $SWEEP/best.yaml,
# $SWEEP/final_test_metrics.json, $SWEEP/valid_ndcg_vs_params.png; the log in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/amazon-beauty}
RUN=${RUN:-runs/beauty}
SWEEP=${SWEEP:-sweeps/beauty_k_depth}
PY=${PY:-python}
LOG=benchmarks/results/tune_beauty.log
mkdir -p benchmarks/results
export TOKENIZERS_PARALLELISM=false

{
  echo "# command: DATA=$DATA RUN=$RUN SWEEP=$SWEEP bash benchmarks/tune_beauty.sh"
  echo "# started on $(hostname): $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  # 1. The upstream stages once (skipped stage by stage when $RUN is already up to date).
  $PY jobs/pipeline.py --config jobs/configs/beauty/prorec.yaml --data "$DATA" --out "$RUN"
  # 2. The sweep on $RUN's data, embeddings and Stage I; codes once per K into $SWEEP/codes/.
  $PY jobs/tune.py --run "$RUN" --space jobs/configs/tune/default.yaml --out "$SWEEP"
} 2>&1 | tee "$LOG"
