"""Learning into a model directory: checkpoint every epoch, resume, and write the finished bank.

``out/checkpoint.safetensors`` holds the weights after the last completed epoch and, in its header,
the settings and history; ``--resume`` continues from it to the same result as an uninterrupted
run. When the run ends, ``filters.safetensors``, ``config.json`` and ``filters.png`` are written
(each atomically) and the checkpoint stays as the record of the last epoch.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable

import torch

import edgehebb
from edgehebb.errors import EdgehebbError
from edgehebb.io import CHECKPOINT_FILE, FILTERS_FILE, load_tensors, save_filters, save_tensors
from edgehebb.learn import EpochStats, LearnConfig, LearnState, learn, resolve_backend
from edgehebb.viz import colour_orientation_summary, save_filter_png


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EdgehebbError(f"--device {device} asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
    return device


def normalised_data_key(saved) -> dict | None:
    """A checkpoint's data key. Checkpoints written before 2026-11-23 name the decode cache in an image
    folder's source; it moves with $EDGEHEBB_CACHE and is not part of the data, so it is dropped."""
    if not isinstance(saved, dict):
        return None
    source = saved.get("source")
    if isinstance(source, str) and source.startswith("image folder ") and " (decode cache " in source:
        saved = {**saved, "source": source[:source.index(" (decode cache ")]}
    return saved


def settings_differ(saved, config: LearnConfig, ignore: tuple[str, ...] = ()) -> str:
    """The saved learn settings that differ from ``config``, as "name=saved value, ..." ("" if none)."""
    saved = saved if isinstance(saved, dict) else {}
    return ", ".join(f"{k}={saved.get(k)}" for k, v in dataclasses.asdict(config).items()
                     if k not in ignore and saved.get(k) != v)


def _load_checkpoint(out: Path, config: LearnConfig, data_key: dict) -> LearnState:
    tensors, meta = load_tensors(out / CHECKPOINT_FILE)
    needed = {"learn": dict, "data": dict, "epochs_done": int, "history": list}
    if (not isinstance(meta, dict) or "weights" not in tensors
            or not all(isinstance(meta.get(k), t) for k, t in needed.items())):
        raise EdgehebbError(f"{out / CHECKPOINT_FILE} is not an edgehebb checkpoint")
    saved = meta["learn"]
    differ = settings_differ(saved, config, ignore=("epochs",))
    if differ:
        raise EdgehebbError(f"{out} was started with other settings ({differ}); "
                            "resume with the same options or choose another --out")
    if saved.get("epochs") != config.epochs:
        raise EdgehebbError(f"{out} was started with --epochs {saved.get('epochs')}; the annealing schedule depends on it, "
                            "so resume with the same --epochs (--learn-epochs in `edgehebb train`)")
    if normalised_data_key(meta.get("data")) != data_key:
        raise EdgehebbError(f"{out} was learned from other data ({meta.get('data')}); resume with the same --data and --limit")
    return LearnState(tensors["weights"].float(), meta["epochs_done"], [EpochStats(**h) for h in meta["history"]])


def learn_to_dir(images, config: LearnConfig, out: str | Path, *, data_key: dict, backend: str = "torch",
                 device: str = "cpu", resume: bool = False, progress: bool = True,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Learn a filter bank from uint8 NHWC ``images`` into ``out``; return the run's summary dict."""
    out = Path(out)
    backend = resolve_backend(backend, device)  # before resolving device: --device cpu rules out pycuda
    device = resolve_device(device)
    state = None
    if resume:
        if not (out / CHECKPOINT_FILE).is_file():
            raise EdgehebbError(f"nothing to resume: {out / CHECKPOINT_FILE} does not exist")
        state = _load_checkpoint(out, config, data_key)
        log(f"resuming {out} after epoch {state.epochs_done}/{config.epochs}")
    elif (out / CHECKPOINT_FILE).exists() or (out / FILTERS_FILE).exists():
        raise EdgehebbError(f"{out} already holds a run; pass --resume to continue it or choose another --out")

    def checkpoint(s: LearnState) -> None:
        meta = {"learn": dataclasses.asdict(config), "data": data_key, "epochs_done": s.epochs_done,
                "history": [dataclasses.asdict(x) for x in s.history]}
        save_tensors(out / CHECKPOINT_FILE, {"weights": s.weights}, meta)
        h = s.history[-1]
        log(f"epoch {h.epoch}/{config.epochs}  eps {h.eps:.4g}  |norm-1| {h.norm_error:.4f}  "
            f"dead {h.dead_fraction:.1%}  {h.seconds:.1f}s  {h.patches_per_s / 1e6:.2f} M patches/s")

    c = images.shape[3]
    state = learn(images, config, backend=backend, device=device, state=state, on_epoch=checkpoint, progress=progress)
    filters = state.weights.reshape(config.filters, c, config.kernel, config.kernel)
    stats = colour_orientation_summary(filters)
    summary = {
        "edgehebb_version": edgehebb.__version__,
        "learn": dataclasses.asdict(config),
        "data": data_key,
        "image_shape": list(images.shape[1:]),
        "backend": backend,
        "device": device,
        "history": [dataclasses.asdict(x) for x in state.history],
        "colour_orientation": stats,
    }
    save_filters(out, filters, summary)
    save_filter_png(filters, out / "filters.png", title=f"{config.filters} filters, W={config.kernel}, "
                    f"{stats['colour_units']} colour / {stats['bw_units']} black-and-white")
    return summary
