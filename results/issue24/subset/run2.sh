#!/bin/bash
set -e
export OMP_NUM_THREADS=1 EDGEHEBB_DATA=/work/shared/data/cifar10 PYTHONPATH=/work/run-code
PY=/work/venv/bin/python
cd /work/runs/screen-w6
AUG=low-light,wb-warm,wb-cool,tint-green,tint-magenta,gamma-high,gamma-low
[ -f bank-e1/filters.safetensors ] || $PY -m edgehebb.cli learn -K 1600 -W 4 --whiten 1.0 --limit 10000 --threads 1 --out bank-e1
python3 -c "
import json; d=json.load(open('s-w4.json')); d['name']='s-e1'; d['blocks'][0]['whiten']=1.0; json.dump(d, open('s-e1.json','w'), indent=1)"
for e in e1 w4; do
  $PY -m edgehebb.cli train --spec s-$e.json --filters-from bank-$e --limit 20000 --augment $AUG --no-cache --threads 1 --json --out aug-$e > aug-$e.json
  $PY -m edgehebb.cli eval aug-$e --device cpu --json --limit 1000 --conditions low-light,gamma-high --severities low-light=6.5 --severities gamma-high=1 > aug-$e-cond.json
done
