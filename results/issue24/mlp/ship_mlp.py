"""Ship a head that screen_mlp.py trained: its model directory into a shipped one (issue 24).

    python results/issue24/mlp/ship_mlp.py SCREENED_MODEL_DIR models/fig2_left-cifar10 "why" "description"

screen_mlp.py keeps the shipped blocks' tensors bit for bit (checked here) and writes the new head
and its standardiser, so model.safetensors is copied whole. config.json keeps the shipped record
(data, filters, threads) and takes the screened spec (``head_hidden``), format, "fit" and "training",
with "head": WHY and the spec's description replaced by DESCRIPTION.
"""
import shutil
import sys
from pathlib import Path

import torch

from edgehebb.io import atomic_write_json, load_tensors, read_json

screened, shipped, why, description = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
new, _ = load_tensors(screened / "model.safetensors")
old, _ = load_tensors(shipped / "model.safetensors")
blocks = sorted(k for k in old if k.startswith("blocks."))
assert blocks == sorted(k for k in new if k.startswith("blocks.")), "different blocks"
assert all(torch.equal(old[k], new[k]) for k in blocks), "the blocks' tensors changed"
record, screened_record = read_json(shipped / "config.json"), read_json(screened / "config.json")
assert {**record["spec"], "head_hidden": 0} == {**screened_record["spec"], "head_hidden": 0}, "a different network"
spec = {**screened_record["spec"], "description": description}
record.update(format=screened_record["format"], spec=spec, fit=screened_record["fit"],
              training=screened_record["training"], head=why)
shutil.copyfile(screened / "model.safetensors", shipped / "model.safetensors")
atomic_write_json(shipped / "config.json", record)
print(f"{shipped}: head from {screened} (validation {record['training']['val_accuracy']:.2%}, "
      f"epoch {record['training']['best_epoch']})")
