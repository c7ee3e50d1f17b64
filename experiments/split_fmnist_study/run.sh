#!/usr/bin/env bash
# The whole study, from the repository root: bash experiments/split_fmnist_study/run.sh
# Finetune, joint, EWC, LwF, SI, MAS, ER and DER++ (their default configs) x task-, domain- and class-incremental x
# 5 seeds on Split Fashion-MNIST (the default protocol), two jobs at a time, then the report (table and plots) next to
# this file. METHODS / SCENARIOS / SEEDS (comma-separated) run a part of it, e.g. METHODS=si,mas SEEDS=0,1.
set -euo pipefail
STUDY=experiments/split_fmnist_study
METHODS=${METHODS:-finetune,joint,ewc,lwf,si,mas,er,derpp}
SCENARIOS=${SCENARIOS:-task,domain,class}
SEEDS=${SEEDS:-0,1,2,3,4}
python -m src.train -m hydra/launcher=joblib hydra.launcher.n_jobs=2 \
  hydra.sweep.dir=$STUDY/runs 'hydra.sweep.subdir=${hydra.runtime.choices.method}-${hydra.runtime.choices.scenario}-seed${seed}' \
  method=$METHODS scenario=$SCENARIOS seed=$SEEDS \
  logger=none save_checkpoints=false callbacks=none
python -m src.report $STUDY/runs --out $STUDY
