#!/bin/bash
set -e
export OMP_NUM_THREADS=1 EDGEHEBB_DATA=/work/shared/data/cifar10 PYTHONPATH=/work/run-code
PY=/work/venv/bin/python
cd /work/runs/screen-w6
for w in 4 6; do
  [ -f bank-w$w/filters.safetensors ] || $PY -m edgehebb.cli learn -K 1600 -W $w --whiten 0.1 --limit 10000 --threads 1 --out bank-w$w
done
for w in 6 4; do
  $PY -m edgehebb.cli train --spec s-w$w.json --filters-from bank-w$w --limit 20000 --no-cache --threads 1 --json --out model-w$w > train-w$w.json
done
