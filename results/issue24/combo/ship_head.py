"""Put a screened head into a shipped model directory; the blocks stay bit for bit as shipped.

    python results/issue24/combo/ship_head.py SCREENED_MODEL_DIR models/fig2_left_wide-cifar10 "why"

screen_combo.py rebuilds the network from the shipped unit filters, and saving re-normalises them (a
last-bit change); this copies only the head and the standardiser from SCREENED into SHIPPED, and
replaces SHIPPED's record of the head's training ("fit", "training") with SCREENED's, plus "head": WHY.
"""
import sys
from pathlib import Path

from edgehebb.io import atomic_write_json, load_tensors, read_json, save_tensors

screened, shipped, why = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
new, _ = load_tensors(screened / "model.safetensors")
state, meta = load_tensors(shipped / "model.safetensors")
assert new.keys() == state.keys(), (sorted(new), sorted(state))
for k in ("head.weight", "head.bias", "feature_mean", "feature_scale"):
    state[k] = new[k]
record, screened_record = read_json(shipped / "config.json"), read_json(screened / "config.json")
assert record["spec"] == screened_record["spec"], "a different network"
record.update(fit=screened_record["fit"], training=screened_record["training"], head=why)
save_tensors(shipped / "model.safetensors", state, meta)
atomic_write_json(shipped / "config.json", record)
print(f"{shipped}: head from {screened} (validation {record['training']['val_accuracy']:.2%}, "
      f"epoch {record['training']['best_epoch']})")
