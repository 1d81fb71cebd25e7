"""Copy a model directory `edgehebb train` wrote into models/fig2_left_wide-cifar10 (issue 24).

The weights are copied byte for byte; config.json gets the shipped spec's name and description (from
models/fig2_left_wide.json, whose block must equal the trained one), a readable filters.from, and the
bank's filters.png comes along.

    python results/issue24/eps02/ship_model.py RUN_DIR BANK_DIR "LEARN COMMAND"
"""
import json
import shutil
import sys
from pathlib import Path

from edgehebb.io import atomic_write_json

run, bank, how = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
repo = Path(__file__).resolve().parents[3]
dest = repo / "models" / "fig2_left_wide-cifar10"
spec = json.loads((repo / "models" / "fig2_left_wide.json").read_text())
config = json.loads((run / "config.json").read_text())
trained = config["spec"]["blocks"][0]
assert {k: trained[k] for k in spec["blocks"][0]} == spec["blocks"][0], (trained, spec["blocks"][0])
config["spec"]["name"], config["spec"]["description"] = spec["name"], spec["description"]
config["filters"]["from"] = [f"runs/{bank.name} ({how} on all 50,000 training images, 2026-12-05)"]
shutil.copyfile(run / "model.safetensors", dest / "model.safetensors")
shutil.copyfile(bank / "filters.png", dest / "filters.png")
atomic_write_json(dest / "config.json", config)
print(f"{run} -> {dest}")
