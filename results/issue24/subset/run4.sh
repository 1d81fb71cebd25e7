#!/bin/bash
set -e
export OMP_NUM_THREADS=1 EDGEHEBB_DATA=/work/shared/data/cifar10 PYTHONPATH=/work/run-code
PY=/work/venv/bin/python
cd /work/runs/screen-w6
AUG=low-light,wb-warm,wb-cool,tint-green,tint-magenta,gamma-high,gamma-low
$PY -m edgehebb.cli train --spec s-w4.json --filters-from bank-w4 --limit 20000 --augment $AUG --augment-fraction 1.0 --no-cache --threads 1 --json --out aug-f1 > aug-f1.json
$PY -m edgehebb.cli eval aug-f1 --device cpu --json --limit 1000 --conditions low-light,gamma-high --severities low-light=6.5 --severities gamma-high=1 > aug-f1-cond.json
