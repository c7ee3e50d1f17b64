#!/usr/bin/env bash
# The whole study, from the repository root: bash experiments/split_fmnist_study/run.sh
# Finetune, joint, EWC and LwF (their default configs) x task- and class-incremental x 5 seeds on Split Fashion-MNIST
# (the default protocol), two jobs at a time, then the report (table and plots) next to this file.
set -euo pipefail
STUDY=experiments/split_fmnist_study
python -m src.train -m hydra/launcher=joblib hydra.launcher.n_jobs=2 \
  hydra.sweep.dir=$STUDY/runs 'hydra.sweep.subdir=${hydra.runtime.choices.method}-${hydra.runtime.choices.scenario}-seed${seed}' \
  method=finetune,joint,ewc,lwf scenario=task,class seed=0,1,2,3,4 \
  logger=none save_checkpoints=false callbacks=none
python -m src.report $STUDY/runs --out $STUDY
