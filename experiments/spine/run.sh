#!/usr/bin/env bash
# Finetune and joint on Split Fashion-MNIST, task- and class-incremental, seeds 0-2, the default protocol
# (MLP 784-400-400, Adam 1e-3, batch 128, 1 epoch per task, 10% of the training set held out for validation).
# Usage: bash experiments/spine/run.sh [OUT]   (default OUT: outputs/spine); then: python experiments/spine/table.py OUT
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-outputs/spine}
for method in finetune joint; do
  for scenario in task class; do
    for seed in 0 1 2; do
      .venv/bin/python -m src.train method=$method scenario=$scenario seed=$seed logger=none callbacks=none \
        hydra.run.dir="$OUT/$method-$scenario-$seed" > /dev/null 2>&1
    done
  done
done
