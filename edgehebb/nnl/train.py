"""Classifier training: a softmax head on frozen NNL-CONV features, or the CONV twin end to end.

Both use Adam and cross-entropy with a class-balanced validation split held out of the training
images; the weights of the epoch with the best validation accuracy are kept (ties: the earlier
epoch), so the number of epochs is chosen on validation data, never on the test set.

:func:`train_to_dir` is ``edgehebb train``: it finds or learns the filter bank of every block
(``edgehebb learn``'s machinery, resumable, under ``OUT/banks/``), computes the frozen features
once (cached, :mod:`edgehebb.nnl.features`), fits the head and writes a model directory. The banks
themselves are found or learned by :mod:`edgehebb.nnl.banks`.
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
from edgehebb.allocator import keep_freed_memory
from edgehebb.data import ImageSet, data_record
from edgehebb.devices import resolve_device
from edgehebb.errors import EdgehebbError
from edgehebb.io import CONFIG_FILE, check_writable_dir
from edgehebb.learn.loop import check_seed
from edgehebb.nnl.banks import filter_banks, require_bank
from edgehebb.nnl.features import cached_features
from edgehebb.nnl.layers import ConvNet, HiddenHead, Net, NNLNet
from edgehebb.nnl.model import save_model
from edgehebb.nnl.spec import NetSpec

Log = Callable[[str], None]


def _stderr(s: str) -> None:
    print(s, file=sys.stderr)


SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Adam on cross-entropy. The defaults are the softmax head's on frozen features; the CONV twins
    train end to end with :data:`BASELINE_TRAINING`."""

    epochs: int = 60            # upper bound: the best validation epoch is kept
    batch: int = 256
    lr: float = 3e-4            # Adam; 1e-3 for 30 epochs overfit n = 40 features within a few epochs
    weight_decay: float = 0.0
    val_fraction: float = 0.1   # of each class's training images, held out for choosing the epoch
    seed: int = 0
    standardise: bool = True    # head on z-scored features; False: on the raw pooled features (the
                                # steep n of the paper's ablation then also scales the classifier's input)
    augment: str = ""           # camera conditions (edgehebb.camera.conditions names, comma-separated) applied to a
    augment_fraction: float = 0.5   # share of the training images (edgehebb.camera.augment.augment); "" = none
    flip: bool = False          # the head also trains on each training image mirrored left-right (its features)
    dropout: float = 0.0        # dropout on the standardised features while the head trains, and on its hidden
                                # layer if it has one (none at inference)
    schedule: str = "constant"  # the learning rate: constant, or "cosine": annealed to 0 over the epochs, step by step

    def check(self) -> None:
        if self.epochs < 1 or self.batch < 1 or not self.lr > 0 or self.weight_decay < 0:
            raise EdgehebbError(f"invalid training settings {self}")
        if not 0 < self.val_fraction < 1:
            raise EdgehebbError(f"validation fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 <= self.dropout < 1:
            raise EdgehebbError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.schedule not in SCHEDULES:
            raise EdgehebbError(f"unknown learning-rate schedule {self.schedule!r}; choose {' or '.join(SCHEDULES)}")
        check_seed(self.seed)
        if self.augment:
            from edgehebb.camera.conditions import select

            select(self.augment)   # unknown names: one line listing the known ones
            if not 0 < self.augment_fraction <= 1:
                raise EdgehebbError(f"augmentation fraction must be in (0, 1], got {self.augment_fraction}")


# The end-to-end CONV twins: the settings of their measured rows (RESULTS.md, H100, 2026-11-23).
BASELINE_TRAINING = TrainConfig(epochs=30, lr=1e-3)


def training_images(train: ImageSet, fit: TrainConfig) -> np.ndarray:
    """The images a model is trained on: ``train.x``, or with ``fit.augment`` each image outside the
    validation split perturbed with probability ``fit.augment_fraction`` by one of the named camera
    conditions (:func:`edgehebb.camera.augment.augment`, seeded by ``fit.seed``). The validation images stay
    clean, so the epoch is chosen on the images it would be chosen on without augmentation."""
    if not fit.augment:
        return train.x
    from edgehebb.camera.augment import augment

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


def fit_standardiser(net: Net, *sources: np.ndarray, rows: np.ndarray | None = None, chunk: int = 4096) -> None:
    """Set ``net.feature_mean`` / ``feature_scale`` from training features (float64 sums): the ``rows`` (all
    if None) of every array in ``sources`` (the features of the images, and of their mirror images),
    read a chunk at a time, so a memory-mapped cache is never copied whole."""
    d = sources[0].shape[1]
    s1, s2, count = np.zeros(d), np.zeros(d), 0
    for feats in sources:
        picks = np.arange(len(feats)) if rows is None else rows
        for lo in range(0, len(picks), chunk):
            f = np.asarray(feats[picks[lo:lo + chunk]], np.float64)
            s1 += f.sum(0)
            s2 += (f * f).sum(0)
            count += len(f)
    mean = s1 / count
    std = np.sqrt(np.maximum(s2 / count - mean * mean, 0))
    # A feature that never varies carries nothing: scale 0 instead of 1 / 0 (1e-30: far below any
    # informative spread, far above float32's denormals).
    scale = np.where(std > 1e-30, 1.0 / np.maximum(std, 1e-30), 0.0)
    net.feature_mean.copy_(torch.from_numpy(mean).float())
    net.feature_scale.copy_(torch.from_numpy(scale).float())


def _fit(params, logits_of: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
         train_idx: np.ndarray, val_idx: np.ndarray, cfg: TrainConfig, net: Net, *, progress: bool,
         log: Log, what: str) -> dict:
    """Adam on cross-entropy over ``train_idx``; keep the state with the best validation accuracy."""
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * -(-len(train_idx) // cfg.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cfg.schedule == "cosine" else None
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
            if sched is not None:
                sched.step()
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


def _set_hidden_dropout(net: Net, p: float) -> None:
    """The training's dropout also on the hidden layer of a :class:`HiddenHead` (a linear head has none)."""
    if isinstance(net.head, HiddenHead):
        net.head.dropout = p


def train_head(net: Net, feats: np.ndarray, labels: np.ndarray, cfg: TrainConfig, *, device: str = "cpu",
               flipped: np.ndarray | None = None, progress: bool = True, log: Log = _stderr) -> dict:
    """Fit ``net``'s standardiser and head on frozen ``feats`` (N, D); the blocks are untouched.

    ``flipped``: the features of the same N images mirrored left-right (``cfg.flip``); the rows of the
    training split join the training set, the validation split stays the unflipped images."""
    cfg.check()
    train_idx, val_idx = validation_split(labels, cfg.val_fraction, cfg.seed)
    sources = [feats] if flipped is None else [feats, flipped]
    if cfg.standardise:
        fit_standardiser(net, *sources, rows=train_idx)
    else:
        net.feature_mean.zero_()
        net.feature_scale.fill_(1.0)
    net.to(device)
    torch.manual_seed(cfg.seed)
    net.head.reset_parameters()
    _set_hidden_dropout(net, cfg.dropout)
    # Standardise once; ~3.6 GB for the fig. 2-middle features of 50k images (float32). A matrix above 4 GB
    # is kept in float16 (z-scores, ~5e-4 relative), each batch widened to float32 for the head.
    n, d = len(feats), feats.shape[1]
    rows = np.concatenate([train_idx + k * n for k in range(len(sources))])
    store = torch.float16 if len(sources) * n * d * 4 > 4e9 else torch.float32
    x = torch.empty((len(sources) * n, d), dtype=store, device=device)
    for k, src in enumerate(sources):
        for lo in range(0, n, 4096):
            chunk = torch.from_numpy(np.array(src[lo:lo + 4096], np.float32)).to(device)   # a copy: may be a memmap
            x[k * n + lo:k * n + lo + len(chunk)] = (chunk - net.feature_mean) * net.feature_scale
    y = torch.from_numpy(np.concatenate([labels] * len(sources))).to(device)

    def logits_of(idx: torch.Tensor) -> torch.Tensor:
        z = x[idx].float()
        return net.head(F.dropout(z, cfg.dropout, net.training) if cfg.dropout else z)

    result = _fit(net.head.parameters(), logits_of, y, rows, val_idx, cfg, net, progress=progress, log=log,
                  what="head")
    return {**result, "train_images": len(rows), "val_images": len(val_idx)}


def train_end_to_end(net: Net, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, *, device: str = "cpu",
                     progress: bool = True, log: Log = _stderr) -> dict:
    """Train every parameter of ``net`` (a :class:`ConvNet`) on uint8 NHWC ``images`` with backprop."""
    cfg.check()
    train_idx, val_idx = validation_split(labels, cfg.val_fraction, cfg.seed)
    net.to(device)
    _set_hidden_dropout(net, cfg.dropout)
    if torch.device(device).type == "cpu":
        keep_freed_memory()   # each step's maps come and go: 0.47 instead of 0.6 s a step for fig2_left's twin
    x = torch.from_numpy(np.array(images)).to(device)     # uint8 NHWC (copied: may be a read-only memmap) stays small on the device
    y = torch.from_numpy(labels).to(device)
    mirror = torch.Generator().manual_seed(cfg.seed * 7919 + 1)   # which training images a step mirrors (cfg.flip)

    def logits_of(idx: torch.Tensor) -> torch.Tensor:
        batch = x[idx].permute(0, 3, 1, 2).float().div_(255.0)
        if cfg.flip and net.training:   # each image mirrored left-right with probability 1/2
            flip = (torch.rand(len(batch), generator=mirror) < 0.5).to(batch.device)
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        feats = net.features(batch)
        return net.classify(F.dropout(feats, cfg.dropout, net.training) if cfg.dropout else feats)

    result = _fit(net.parameters(), logits_of, y, train_idx, val_idx, cfg, net, progress=progress, log=log,
                  what="end-to-end")
    return {**result, "train_images": len(train_idx), "val_images": len(val_idx)}


# ----------------------------------------------------------------------------- edgehebb train

def training_config(baseline: bool, **given) -> TrainConfig:
    """The settings of a run: the mode's defaults (the head's, or :data:`BASELINE_TRAINING` for a CONV twin)
    with the ``given`` fields (None: not given) replacing them; checked."""
    base = BASELINE_TRAINING if baseline else TrainConfig()
    config = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    config.check()   # e.g. an unknown augment name, before any image is decoded
    return config


def check_request(spec: NetSpec, out: str | Path, *, filters_from: list[Path] = (), baseline: bool = False,
                  baseline_only: list[str] = (), learning_only: list[str] = ()) -> None:
    """Everything about a ``train`` run that can be refused before the data is decoded: ``out`` free and
    writable, options that do not fit the mode (``baseline_only`` / ``learning_only``: the flags given that
    apply only with / only without ``--baseline``), and a bank in ``filters_from`` for every block."""
    out = Path(out)
    if (out / CONFIG_FILE).exists():
        raise EdgehebbError(f"{out} already holds a model; choose another --out")
    check_writable_dir(out)
    if baseline_only and not baseline:
        raise EdgehebbError(f"{', '.join(baseline_only)} only apply with --baseline")
    if baseline and learning_only:
        raise EdgehebbError(f"{', '.join(learning_only)} do not apply with --baseline "
                            f"(it learns no filter bank and caches no features)")
    for i in range(len(spec.blocks) if filters_from else 0):   # reads (and checks) the banks
        require_bank([Path(p) for p in filters_from], spec, i)


def train_to_dir(spec: NetSpec, train: ImageSet, out: str | Path, *, training: TrainConfig | None = None,
                 filters_from: list[Path] = (), baseline: bool = False, conv_power: float = 1.0,
                 patch_norm: bool = False, learn: dict | None = None, backend: str = "auto", device: str = "auto",
                 cache: str | None = None, progress: bool = True, log: Log = _stderr,
                 extra: dict | None = None) -> dict:
    """Train a model of ``spec`` on ``train`` and write it to ``out``; return the record saved with it.

    ``training`` defaults to the head's settings (``TrainConfig()``), or :data:`BASELINE_TRAINING` with
    ``baseline``. ``extra`` is added to the record (what the caller knows: threads, skipped files).
    The record names the data by :func:`edgehebb.data.data_record` (name and fingerprint), never by a
    path of the machine it was trained on.
    """
    out = Path(out)
    cfg = training or (BASELINE_TRAINING if baseline else TrainConfig())
    device = resolve_device(device)
    if len(train.classes) != spec.classes:
        raise EdgehebbError(f"{spec.name} has {spec.classes} classes but the data has {len(train.classes)} "
                            f"({train.source})")
    if tuple(train.x.shape[1:]) != (spec.input[1], spec.input[2], spec.input[0]):
        raise EdgehebbError(f"{spec.name} expects {spec.input[1]}x{spec.input[2]} images with {spec.input[0]} "
                            f"channels; {train.source} has {train.x.shape[1:]} (H, W, C)")
    cfg.check()
    t0 = time.perf_counter()
    x = training_images(train, cfg)
    record: dict = {"edgehebb_version": edgehebb.__version__, "fit": dataclasses.asdict(cfg),
                    "data": data_record(train), "device": device}
    if baseline:
        torch.manual_seed(cfg.seed)
        net = ConvNet(spec, power=conv_power, patch_norm=patch_norm)
        log(f"training the CONV twin of {spec.name} end to end (n={conv_power}, patch norm {patch_norm})")
        result = train_end_to_end(net, x, train.y, cfg, device=device, progress=progress, log=log)
    else:
        learn = {"seed": cfg.seed, **(learn or {})}
        banks, origins, learned = filter_banks(spec, train, out, filters_from=[Path(p) for p in filters_from], learn=learn,
                                      backend=backend, device=device, progress=progress, log=log)
        net = NNLNet(spec, banks)
        feats = cached_features(net, x, device=device, cache=cache, progress=progress)
        flipped = (cached_features(net, np.ascontiguousarray(x[:, :, ::-1]), device=device, cache=cache,
                                   progress=progress, desc="features, mirrored") if cfg.flip else None)
        log(f"features {feats.shape[1]} per image, {len(feats)} images" + (" and their mirror images" if cfg.flip else ""))
        result = train_head(net, feats, train.y, cfg, device=device, flipped=flipped, progress=progress, log=log)
        record["filters"] = {"from": origins, "learn": learned}
    record["training"] = {**result, "seconds": time.perf_counter() - t0}
    record.update(extra or {})
    save_model(out, net.cpu(), train.classes, record)
    log(f"wrote {out} (validation accuracy {result['val_accuracy']:.2%} at epoch {result['best_epoch']})")
    return record
