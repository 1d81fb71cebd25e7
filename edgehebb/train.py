"""Classifier training: a softmax head on frozen NNL-CONV features, or the CONV twin end to end.

Both use Adam and cross-entropy with a class-balanced validation split held out of the training
images; the weights of the epoch with the best validation accuracy are kept (ties: the earlier
epoch), so the number of epochs is chosen on validation data, never on the test set.

:func:`train_to_dir` is ``edgehebb train``: it finds or learns the filter bank of every block
(``edgehebb learn``'s machinery, resumable, under ``OUT/banks/``), computes the frozen features
once (cached, :mod:`edgehebb.features`), fits the head and writes a model directory.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import edgehebb
from edgehebb.data import ImageSet
from edgehebb.errors import EdgehebbError
from edgehebb.features import cached_features
from edgehebb.io import CHECKPOINT_FILE, CONFIG_FILE, FILTERS_FILE, load_filters, load_tensors, read_json
from edgehebb.learn import LearnConfig, check_seed
from edgehebb.learn_dir import learn_to_dir, normalised_data_key, resolve_device, settings_differ
from edgehebb.model import MODEL_FORMAT, WEIGHTS_FILE, save_model
from edgehebb.nnl import BlockSpec, ConvNet, NetSpec, NNLNet, _Net, spec_from_dict

Log = Callable[[str], None]


def _stderr(s: str) -> None:
    print(s, file=sys.stderr)


@dataclass(frozen=True)
class FitConfig:
    """Adam on cross-entropy. The defaults are the softmax head's on frozen features; the CONV twins
    train end to end with :data:`BASELINE_FIT`."""

    epochs: int = 60            # upper bound: the best validation epoch is kept
    batch: int = 256
    lr: float = 3e-4            # Adam; 1e-3 for 30 epochs overfit n = 40 features within a few epochs
    weight_decay: float = 0.0
    val_fraction: float = 0.1   # of each class's training images, held out for choosing the epoch
    seed: int = 0
    standardise: bool = True    # head on z-scored features; False: on the raw pooled features (the
                                # steep n of the paper's ablation then also scales the classifier's input)
    augment: str = ""           # camera conditions (edgehebb.conditions names, comma-separated) applied to a
    augment_fraction: float = 0.5   # share of the training images (edgehebb.conditions.augment); "" = none

    def check(self) -> None:
        if self.epochs < 1 or self.batch < 1 or not self.lr > 0 or self.weight_decay < 0:
            raise EdgehebbError(f"invalid training settings {self}")
        if not 0 < self.val_fraction < 1:
            raise EdgehebbError(f"validation fraction must be in (0, 1), got {self.val_fraction}")
        check_seed(self.seed)
        if self.augment:
            from edgehebb.conditions import select

            select(self.augment)   # unknown names: one line listing the known ones
            if not 0 < self.augment_fraction <= 1:
                raise EdgehebbError(f"augmentation fraction must be in (0, 1], got {self.augment_fraction}")


# The end-to-end CONV twins: the settings of their measured rows (RESULTS.md, H100, 2026-11-23).
BASELINE_FIT = FitConfig(epochs=30, lr=1e-3)


def training_images(train: ImageSet, fit: FitConfig) -> np.ndarray:
    """The images a model is trained on: ``train.x``, or with ``fit.augment`` each image outside the
    validation split perturbed with probability ``fit.augment_fraction`` by one of the named camera
    conditions (:func:`edgehebb.conditions.augment`, seeded by ``fit.seed``). The validation images stay
    clean, so the epoch is chosen on the images it would be chosen on without augmentation."""
    if not fit.augment:
        return train.x
    from edgehebb.conditions import augment

    _, val_idx = validation_split(train.y, fit.val_fraction, fit.seed)
    x, _ = augment(np.asarray(train.x), fit.augment, fit.augment_fraction, seed=fit.seed)
    x[val_idx] = np.asarray(train.x)[val_idx]
    return x


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): ``round(fraction * n_c)`` (at least 1) random images of each class."""
    rng = np.random.default_rng([seed, 7919])
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        if k < 1:
            raise EdgehebbError(f"class {c} has {len(idx)} training image(s); a validation split needs at least 2")
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def fit_standardiser(net: _Net, feats: np.ndarray, chunk: int = 4096) -> None:
    """Set ``net.feature_mean`` / ``feature_scale`` from training features (float64 sums)."""
    s1 = np.zeros(feats.shape[1])
    s2 = np.zeros(feats.shape[1])
    for lo in range(0, len(feats), chunk):
        f = np.asarray(feats[lo:lo + chunk], np.float64)
        s1 += f.sum(0)
        s2 += (f * f).sum(0)
    mean = s1 / len(feats)
    std = np.sqrt(np.maximum(s2 / len(feats) - mean * mean, 0))
    # A feature that never varies carries nothing: scale 0 instead of 1 / 0 (1e-30: far below any
    # informative spread, far above float32's denormals).
    scale = np.where(std > 1e-30, 1.0 / np.maximum(std, 1e-30), 0.0)
    net.feature_mean.copy_(torch.from_numpy(mean).float())
    net.feature_scale.copy_(torch.from_numpy(scale).float())


def _fit(params, logits_of: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
         train_idx: np.ndarray, val_idx: np.ndarray, cfg: FitConfig, net: _Net, *, progress: bool,
         log: Log, what: str) -> dict:
    """Adam on cross-entropy over ``train_idx``; keep the state with the best validation accuracy."""
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    device = labels.device
    val = torch.from_numpy(val_idx).to(device)
    best, best_state, history = -1.0, None, []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=g)].to(device)
        net.train()
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        for lo in tqdm(range(0, len(order), cfg.batch), desc=f"{what} epoch {epoch + 1}/{cfg.epochs}",
                       unit="batch", disable=not progress, leave=False):
            idx = order[lo:lo + cfg.batch]
            logits = logits_of(idx)
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.detach().argmax(1) == labels[idx]).sum()
        net.eval()
        with torch.no_grad():
            hits = sum(int((logits_of(val[lo:lo + 1024]).argmax(1) == labels[val[lo:lo + 1024]]).sum())
                       for lo in range(0, len(val), 1024))
        row = {"epoch": epoch + 1, "train_loss": float(loss_sum) / len(order),
               "train_accuracy": float(correct) / len(order), "val_accuracy": hits / len(val),
               "seconds": time.perf_counter() - t0}
        history.append(row)
        log(f"{what} epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  train {row['train_accuracy']:.2%}  "
            f"val {row['val_accuracy']:.2%}  {row['seconds']:.1f}s")
        if not np.isfinite(row["train_loss"]):
            raise EdgehebbError(f"{what} training diverged at epoch {epoch + 1} (loss {row['train_loss']}); "
                                f"lower --lr (now {cfg.lr})")
        if row["val_accuracy"] > best:
            best, best_state = row["val_accuracy"], copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    net.eval()
    best_epoch = max(history, key=lambda r: (r["val_accuracy"], -r["epoch"]))["epoch"]
    return {"best_epoch": best_epoch, "val_accuracy": best, "history": history}


def train_head(net: _Net, feats: np.ndarray, labels: np.ndarray, cfg: FitConfig, *, device: str = "cpu",
               progress: bool = True, log: Log = _stderr) -> dict:
    """Fit ``net``'s standardiser and softmax head on frozen ``feats`` (N, D); the blocks are untouched."""
    cfg.check()
    train_idx, val_idx = validation_split(labels, cfg.val_fraction, cfg.seed)
    if cfg.standardise:
        fit_standardiser(net, feats[train_idx])
    else:
        net.feature_mean.zero_()
        net.feature_scale.fill_(1.0)
    net.to(device)
    torch.manual_seed(cfg.seed)
    net.head.reset_parameters()
    # Standardise once; ~3.6 GB for the fig. 2-middle features of 50k images (float32).
    x = torch.empty(feats.shape, dtype=torch.float32, device=device)
    for lo in range(0, len(feats), 4096):
        chunk = torch.from_numpy(np.array(feats[lo:lo + 4096], np.float32)).to(device)   # a copy: feats may be a read-only memmap
        x[lo:lo + 4096] = (chunk - net.feature_mean) * net.feature_scale
    y = torch.from_numpy(labels).to(device)
    result = _fit(net.head.parameters(), lambda idx: net.head(x[idx]), y, train_idx, val_idx, cfg, net,
                  progress=progress, log=log, what="head")
    return {**result, "train_images": len(train_idx), "val_images": len(val_idx)}


def train_end_to_end(net: _Net, images: np.ndarray, labels: np.ndarray, cfg: FitConfig, *, device: str = "cpu",
                     progress: bool = True, log: Log = _stderr) -> dict:
    """Train every parameter of ``net`` (a :class:`ConvNet`) on uint8 NHWC ``images`` with backprop."""
    cfg.check()
    train_idx, val_idx = validation_split(labels, cfg.val_fraction, cfg.seed)
    net.to(device)
    x = torch.from_numpy(np.array(images)).to(device)     # uint8 NHWC (copied: may be a read-only memmap) stays small on the device
    y = torch.from_numpy(labels).to(device)
    result = _fit(net.parameters(), lambda idx: net(x[idx].permute(0, 3, 1, 2).float().div_(255.0)), y,
                  train_idx, val_idx, cfg, net, progress=progress, log=log, what="end-to-end")
    return {**result, "train_images": len(train_idx), "val_images": len(val_idx)}


# ----------------------------------------------------------------------------- filter banks

def _bank_from_dir(path: Path, block: BlockSpec, channels: int) -> torch.Tensor | None:
    """A (K, C, W, W) bank in ``path`` (a filter-bank or an NNL model directory) that fits ``block``."""
    shape = (block.filters, channels, block.kernel, block.kernel)
    if not (path / CONFIG_FILE).is_file():
        return None
    config = read_json(path / CONFIG_FILE)
    fmt = config.get("format")
    if fmt == MODEL_FORMAT:
        if config.get("kind") != "nnl":
            return None
        if not isinstance(config.get("spec"), dict):
            raise EdgehebbError(f"{path / CONFIG_FILE} is an NNL model without a 'spec': not a model edgehebb wrote")
        spec = spec_from_dict(config["spec"], str(path / CONFIG_FILE))
        tensors, _ = load_tensors(path / WEIGHTS_FILE)
        for i, b in enumerate(spec.blocks):
            w = tensors.get(f"blocks.{i}.weight")
            if w is not None and tuple(w.shape) == shape and b.center == block.center:
                return w
        return None
    if fmt is not None and str(fmt).startswith("edgehebb.filters") and (path / FILTERS_FILE).is_file():
        filters, config = load_filters(path)
        if tuple(filters.shape) == shape and config.get("learn", {}).get("preprocess") == block.preprocess:
            return filters
    return None


def find_bank(sources: list[Path], block: BlockSpec, channels: int) -> tuple[torch.Tensor, Path] | None:
    """The first bank fitting ``block`` in ``sources`` or their immediate subdirectories."""
    for src in sources:
        for path in [src, *sorted(p for p in src.iterdir() if p.is_dir())] if src.is_dir() else []:
            bank = _bank_from_dir(path, block, channels)
            if bank is not None:
                return bank, path
    return None


def bank_learn_settings(path: Path) -> dict | None:
    """How the bank in ``path`` (a filter-bank or model directory) was learned, as its config.json says."""
    config = read_json(path / CONFIG_FILE)
    if str(config.get("format", "")).startswith("edgehebb.filters"):
        return config.get("learn")
    return config.get("filters", {}).get("learn") if isinstance(config.get("filters"), dict) else None


def bank_dir(out: Path, index: int, block: BlockSpec) -> Path:
    return out / "banks" / f"block{index}-W{block.kernel}-K{block.filters}-{block.preprocess}"


def filter_banks(spec: NetSpec, train: ImageSet, out: Path, *, filters_from: list[Path], learn: dict,
                 backend: str, device: str, progress: bool, log: Log) -> tuple[list[torch.Tensor], list[str]]:
    """One bank per block: found in ``filters_from`` (or ``out/banks`` from an earlier run), else learned."""
    channels = spec.input[0]
    banks, origins = [], []
    for i, block in enumerate(spec.blocks):
        if filters_from:
            found = find_bank(filters_from, block, channels)
            if found is None:
                raise EdgehebbError(f"no filter bank in {', '.join(map(str, filters_from))} fits block {i} of "
                                    f"{spec.name} (K={block.filters}, W={block.kernel}, C={channels}, preprocess "
                                    f"{block.preprocess})")
            banks.append(found[0].float())
            origins.append(str(found[1]))
            log(f"block {i}: filters from {found[1]}")
            continue
        where = bank_dir(out, i, block)
        config = LearnConfig(filters=block.filters, kernel=block.kernel, preprocess=block.preprocess, **learn)
        data_key = {"source": train.source, "split": "train", "images": len(train)}
        if (where / FILTERS_FILE).is_file():  # finished by an earlier, interrupted `train` into this OUT
            _check_bank(where, config, data_key)
            log(f"block {i}: filters from {where} (learned by an earlier run)")
        else:
            log(f"block {i}: learning K={block.filters} W={block.kernel} filters into {where}")
            learn_to_dir(train.x, config, where, data_key=data_key, backend=backend, device=device,
                         resume=(where / CHECKPOINT_FILE).is_file(), progress=progress, log=log)
        banks.append(load_filters(where)[0])
        origins.append(str(where))
    return banks, origins


def _check_bank(where: Path, config: LearnConfig, data_key: dict) -> None:
    """A bank left in OUT/banks is reused only if it was learned with these settings from this data."""
    saved = read_json(where / CONFIG_FILE)
    differ = settings_differ(saved.get("learn"), config)
    if differ or normalised_data_key(saved.get("data")) != data_key:
        what = differ or f"data {saved.get('data')}"
        raise EdgehebbError(f"{where} was learned with other settings or data ({what}) than this run asks for; "
                            f"delete it to learn it again, or choose another --out")


# ----------------------------------------------------------------------------- edgehebb train

def train_to_dir(spec: NetSpec, train: ImageSet, out: str | Path, *, fit: FitConfig | None = None,
                 filters_from: list[Path] = (), baseline: bool = False, conv_power: float = 1.0,
                 patch_norm: bool = False, learn: dict | None = None, backend: str = "auto", device: str = "auto",
                 cache: str | None = None, progress: bool = True, log: Log = _stderr) -> dict:
    """Train a model of ``spec`` on ``train`` and write it to ``out``; return the record saved with it.

    ``fit`` defaults to the head's settings (``FitConfig()``), or :data:`BASELINE_FIT` with ``baseline``.
    """
    out = Path(out)
    fit = fit or (BASELINE_FIT if baseline else FitConfig())
    device = resolve_device(device)
    if len(train.classes) != spec.classes:
        raise EdgehebbError(f"{spec.name} has {spec.classes} classes but the data has {len(train.classes)} "
                            f"({train.source})")
    if tuple(train.x.shape[1:]) != (spec.input[1], spec.input[2], spec.input[0]):
        raise EdgehebbError(f"{spec.name} expects {spec.input[1]}x{spec.input[2]} images with {spec.input[0]} "
                            f"channels; {train.source} has {train.x.shape[1:]} (H, W, C)")
    fit.check()
    t0 = time.perf_counter()
    x = training_images(train, fit)
    record: dict = {"edgehebb_version": edgehebb.__version__, "fit": dataclasses.asdict(fit),
                    "data": {"source": train.source, "images": len(train)}, "device": device}
    if baseline:
        torch.manual_seed(fit.seed)
        net = ConvNet(spec, power=conv_power, patch_norm=patch_norm)
        log(f"training the CONV twin of {spec.name} end to end (n={conv_power}, patch norm {patch_norm})")
        result = train_end_to_end(net, x, train.y, fit, device=device, progress=progress, log=log)
    else:
        learn = {"seed": fit.seed, **(learn or {})}
        banks, origins = filter_banks(spec, train, out, filters_from=[Path(p) for p in filters_from], learn=learn,
                                      backend=backend, device=device, progress=progress, log=log)
        net = NNLNet(spec, banks)
        feats = cached_features(net, x, device=device, cache=cache, progress=progress)
        log(f"features {feats.shape[1]} per image, {len(feats)} images")
        result = train_head(net, feats, train.y, fit, device=device, progress=progress, log=log)
        record["filters"] = {"from": origins, "learn": [bank_learn_settings(Path(o)) for o in origins]}
    record["training"] = {**result, "seconds": time.perf_counter() - t0}
    save_model(out, net.cpu(), train.classes, record)
    log(f"wrote {out} (validation accuracy {result['val_accuracy']:.2%} at epoch {result['best_epoch']})")
    return record
