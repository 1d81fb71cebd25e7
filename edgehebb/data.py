"""Loading image sets: image-folder trees, CIFAR-10 python pickles and ``.npz`` files.

Every loader returns an :class:`ImageSet` of uint8 NHWC RGB images and int64 labels. Image-folder
trees are decoded once into a memory-mappable ``.npy`` in a cache folder (never inside the data
folder, which may be read-only or shared); later loads map that file and only re-list the tree to
check that no file changed, so a 50,000-image split opens in well under a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import sys
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFile
from tqdm import tqdm

from edgehebb.errors import EdgehebbError
from edgehebb.io import atomic_write

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CACHE_VERSION = 1
NO_DATA = ("no CIFAR-10 data found: pass --data PATH or set EDGEHEBB_DATA to an image-folder tree "
           "(split/<class>/*.jpg), a cifar-10-batches-py folder or an .npz file")
_POOL_MIN_FILES = 2000   # below this, starting worker processes costs more than it saves
_CHUNK = 500             # files per worker task: big enough to amortise pickling, small for progress
_NAMED_SKIPPED = 3       # files the --skip-bad line names; the run's config.json lists them all


@dataclass
class ImageSet:
    x: np.ndarray        # uint8 (N, H, W, C) RGB; may be a read-only memmap of the decode cache
    y: np.ndarray        # int64 (N,)
    classes: list[str]   # class names, index = label
    source: str          # where it came from, for logs and result files
    skipped: list[str] = field(default_factory=list)   # unreadable files left out (--skip-bad), relative paths

    def __len__(self) -> int:
        return len(self.y)


def data_record(data: ImageSet) -> dict:
    """How a model's config.json names the images it was trained on, without the training machine's paths:
    ``name`` (the data set's folder and split, e.g. ``cifar10/train``, or the file's name), the number of
    ``images`` and a ``fingerprint``, the SHA-256 of the uint8 pixels (N, H, W, C, C-order) and the int64
    labels. The same images give the same fingerprint wherever they are decoded, so a reader can check
    that their copy is the one a model was trained on."""
    h = hashlib.sha256()
    h.update(repr((tuple(data.x.shape), str(data.x.dtype))).encode())
    for lo in range(0, len(data.x), 4096):   # chunks: the array may be a memory-mapped decode cache
        h.update(np.ascontiguousarray(data.x[lo:lo + 4096]).data)
    h.update(np.ascontiguousarray(data.y, np.int64).data)
    return {"name": data_name(data.source), "images": len(data), "fingerprint": f"sha256:{h.hexdigest()}"}


def data_name(source: str) -> str:
    """A short, machine-independent name for an :class:`ImageSet`'s ``source``: the last two parts of its
    path (``cifar10/train``), plus what a subset's suffix says (``, 500 per class (limit 5000)``)."""
    head, sep, tail = source.partition(", ")
    path = head.split(" ", 2)[-1] if head.startswith(("image folder ", "cifar-10 pickles ")) else head.split(" ", 1)[-1]
    path, _, split = path.partition(" (")
    parts = Path(path).parts[-2:]
    name = "/".join(parts) + (f" ({split}" if split else "")
    return name + (sep + tail if sep else "")


def resolve_data_root(data: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Where the data lives: ``data`` (--data), else $EDGEHEBB_DATA, else the user cache, else download."""
    for given, what in ((data, "--data"), (os.environ.get("EDGEHEBB_DATA") or None, "EDGEHEBB_DATA")):
        if given is not None:
            path = Path(given).expanduser()
            if not path.exists():
                raise EdgehebbError(f"{what} {path} does not exist: point it at an image-folder tree, "
                                    f"a {CIFAR_DIR} folder or an .npz file")
            return path
    home = Path.home() / ".cache" / "edgehebb"
    for path in (home / "cifar10", home / CIFAR_DIR):  # a copy put there by hand, or an earlier download
        if path.exists():
            return path
    if not download:
        raise EdgehebbError(NO_DATA)
    try:
        import torchvision.datasets  # optional: only this fallback needs it
    except ImportError:
        raise EdgehebbError(f"{NO_DATA} (torchvision, needed to download it, is not installed)") from None
    try:
        for train in (True, False):
            torchvision.datasets.CIFAR10(root=str(home), train=train, download=True)
    except Exception as e:  # no network, proxy, bad checksum...: all end the same way for the user
        reason = " ".join(str(e).split())
        raise EdgehebbError(f"{NO_DATA} (download failed: {reason})") from None
    return home / CIFAR_DIR


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def load_split(root: str | os.PathLike, split: str = "train", *, limit: int | None = None,
               skip_bad: bool = False, cache_dir: str | os.PathLike | None = None,
               progress: bool = True, log: Callable[[str], None] = _stderr) -> ImageSet:
    """Load one split (``train``, ``test``, ...) of the data set at ``root``; see the module doc.

    ``limit`` keeps the first ``limit // n_classes`` images of each class. ``skip_bad`` skips
    unreadable images instead of raising: ``log`` gets one line with their count and the first few
    names, and ``ImageSet.skipped`` lists them all.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise EdgehebbError(f"data path {root} does not exist: pass an image-folder tree, a {CIFAR_DIR} "
                            f"folder or an .npz file")
    if root.is_file():
        if root.suffix != ".npz":
            raise EdgehebbError(f"{root} is a file but not an .npz; pass an .npz, an image-folder tree "
                                f"or a {CIFAR_DIR} folder")
        data = _load_npz(root)
    elif (root / "batches.meta").is_file() or (root / CIFAR_DIR).is_dir():
        data = _load_cifar_pickles(root if (root / "batches.meta").is_file() else root / CIFAR_DIR, split)
    elif (root / f"{split}.npz").is_file():
        data = _load_npz(root / f"{split}.npz")
    else:
        data = _load_image_tree(_find_split_dir(root, split), root, skip_bad, cache_dir, progress, log)
    return data if limit is None else _balanced_subset(data, limit)


# ---------------------------------------------------------------- arrays: .npz and CIFAR pickles

_PICKLED = ("edgehebb reads only plain numeric and string arrays and never unpickles a data file (it could run "
            "code); save the arrays with np.savez, class names as np.array(names, dtype=str)")


def _load_npz(path: Path) -> ImageSet:
    try:
        z = np.load(path, allow_pickle=False)  # never unpickle a user file: object arrays are refused
    except ValueError as e:  # a pickle under an .npz name; numpy's message would suggest allow_pickle
        if "pickle" in str(e):
            raise EdgehebbError(f"{path} is a Python pickle, not an .npz of arrays: {_PICKLED}") from None
        raise EdgehebbError(f"cannot read {path}: {e}") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise EdgehebbError(f"cannot read {path}: {e}") from None
    with z:
        keys = sorted(z.files)
        expect = f"expected keys x (uint8 N,H,W,3), y (int N,), optional classes (str); found {keys}"
        if "x" not in keys or "y" not in keys:
            raise EdgehebbError(f"{path}: {expect}")
        arrays = {}
        for key in ("x", "y", "classes"):
            if key in keys:
                try:
                    arrays[key] = z[key]
                except ValueError:  # an object array (e.g. a list of Python strings) would need pickle
                    raise EdgehebbError(f"{path}: '{key}' holds Python objects, not an array of numbers or "
                                        f"strings; {_PICKLED}") from None
        x, y = arrays["x"], arrays["y"]
        classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise EdgehebbError(f"{path}: x is {x.dtype} {x.shape}; {expect} (NCHW? use x.transpose(0, 2, 3, 1))")
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x) or len(y) == 0:
        raise EdgehebbError(f"{path}: y is {y.dtype} {y.shape} for {len(x)} images; {expect}")
    x = np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x  # grey -> RGB (no RGBA: NCHW with W=4 looks like it)
    classes = classes or [str(i) for i in range(int(y.max()) + 1)]
    if y.min() < 0 or y.max() >= len(classes):
        raise EdgehebbError(f"{path}: labels span {y.min()}..{y.max()} but there are {len(classes)} classes")
    return ImageSet(np.ascontiguousarray(x), y.astype(np.int64), classes, f"npz {path}")


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what the CIFAR-10 batches hold (dicts, lists, bytes, numbers and numpy arrays):
    any other global, the way a crafted pickle runs code, is refused."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),  # bytes in protocol 2
               *((f"numpy.{core}.{module}", name) for core in ("core", "_core")
                 for module, name in (("multiarray", "_reconstruct"), ("numeric", "_frombuffer")))}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never does")
        return super().find_class(module, name)


def _unpickle_cifar(path: Path) -> dict:
    # The project never unpickles user files. These exact names are the official CIFAR-10 python
    # release (a well-known format that only exists as pickles), so they are the one exception, and
    # even they go through an unpickler that can build nothing but plain data and numpy arrays.
    if path.name not in ("batches.meta", *CIFAR_BATCHES["train"], *CIFAR_BATCHES["test"]):
        raise EdgehebbError(f"refusing to unpickle {path}: not a CIFAR-10 batch file")
    if not path.is_file():
        raise EdgehebbError(f"{path} is missing: the {CIFAR_DIR} folder is incomplete, download it again")
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError) as e:
        raise EdgehebbError(f"cannot read {path}: {e}; download {CIFAR_DIR} again") from None


def _load_cifar_pickles(folder: Path, split: str) -> ImageSet:
    if split not in CIFAR_BATCHES:
        raise EdgehebbError(f"unknown split {split!r} for {folder}: CIFAR-10 has {', '.join(CIFAR_BATCHES)}")
    classes = [n.decode() for n in _unpickle_cifar(folder / "batches.meta")[b"label_names"]]
    xs, ys = [], []
    for name in CIFAR_BATCHES[split]:
        batch = _unpickle_cifar(folder / name)
        # rows are 3072 bytes: the red plane, then green, then blue (CHW); we keep images as HWC
        xs.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(batch[b"labels"], np.int64))
    x = np.ascontiguousarray(np.concatenate(xs))
    return ImageSet(x, np.concatenate(ys), classes, f"cifar-10 pickles {folder} ({split})")


# ---------------------------------------------------------------- image-folder trees

def _class_dirs(folder: Path) -> list[Path]:
    return sorted((Path(e.path) for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")),
                  key=lambda p: p.name)


def _has_images(folder: Path) -> bool:
    return any(e.name.lower().endswith(IMAGE_SUFFIXES) for e in os.scandir(folder) if e.is_file())


def _find_split_dir(root: Path, split: str) -> Path:
    if (root / split).is_dir():
        return root / split
    subdirs = _class_dirs(root)
    if any(_has_images(d) for d in subdirs):  # root is itself a split folder: root/<class>/*.jpg
        # --data .../train for a test-split evaluation would silently score on training images
        if root.name in ("train", "test", "val", "valid", "validation") and root.name != split:
            raise EdgehebbError(f"{root} looks like the {root.name!r} split but split {split!r} was asked "
                                f"for: pass the parent folder {root.parent}")
        return root
    found = ", ".join(d.name for d in subdirs) or "no subfolders"
    raise EdgehebbError(f"no split {split!r} in {root} (found: {found}): expected {root}/{split}/<class>/*.jpg, "
                        f"{root}/{split}.npz or a {CIFAR_DIR} folder")


def _list_tree(split_dir: Path) -> tuple[list[str], list[str], np.ndarray, str]:
    """Class names, relative file paths (sorted), labels, and a digest of every file's path/mtime/size."""
    classes = [d.name for d in _class_dirs(split_dir)]
    if not classes:
        raise EdgehebbError(f"no class subfolders in {split_dir}: expected {split_dir}/<class>/*.jpg")
    rels, labels, digest = [], [], hashlib.sha256()
    for label, name in enumerate(classes):
        entries = sorted((e for e in os.scandir(split_dir / name) if e.is_file() and not e.name.startswith(".")
                          and e.name.lower().endswith(IMAGE_SUFFIXES)), key=lambda e: e.name)
        if not entries:
            raise EdgehebbError(f"class folder {split_dir / name} has no .jpg/.jpeg/.png images")
        for e in entries:
            st = e.stat()
            rels.append(f"{name}/{e.name}")
            digest.update(f"{name}/{e.name}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
        labels += [label] * len(entries)
    return classes, rels, np.asarray(labels, np.int64), digest.hexdigest()


def _decode_chunk(paths: list[str]) -> list[np.ndarray | str]:
    """uint8 HWC RGB arrays; an unreadable file gives its error message instead (workers can't raise usefully)."""
    # With this flag on (any library may set it) PIL pads a truncated JPEG with grey and says nothing;
    # a half-grey training image is worse than an error, so it is off while we decode.
    saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    out: list[np.ndarray | str] = []
    try:
        for p in paths:
            try:
                with Image.open(p) as im:
                    im.load()  # decode now, inside the try: Image.open only reads the header
                    out.append(np.asarray(im.convert("RGB")))  # grey, palette, RGBA -> RGB
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                out.append(f"cannot decode image {p}: {e}")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    return out


def _decode_all(paths: list[str], progress: bool, desc: str):
    """Yield one decoded image (or error message) per path, in order; a process pool for big trees."""
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with tqdm(total=len(paths), desc=desc, unit="img", file=sys.stderr, disable=not progress) as bar:
        if len(paths) < _POOL_MIN_FILES or workers < 2:
            results = map(_decode_chunk, chunks)
            pool = None
        else:  # PIL decoding of small images is GIL-bound: threads don't help, processes do (~1.8x on 2 cores)
            pool = ProcessPoolExecutor(workers)
            results = pool.map(_decode_chunk, chunks)
        try:
            for chunk in results:
                yield from chunk
                bar.update(len(chunk))
        finally:
            if pool is not None:  # on an error, don't wait for the rest of the tree to be decoded
                pool.shutdown(wait=True, cancel_futures=True)


def _decode_tree(split_dir: Path, rels: list[str], labels: np.ndarray, skip_bad: bool, progress: bool):
    """Decode every listed file into one (N, H, W, 3) array; returns it, its labels and the skipped files."""
    paths = [str(split_dir / r) for r in rels]
    x, kept, skipped = None, [], []
    decoded = _decode_all(paths, progress, f"decoding {split_dir.name}")
    with contextlib.closing(decoded):  # on an error below, stop the worker pool now, not at GC
        for i, img in enumerate(decoded):
            if isinstance(img, str):
                if not skip_bad:
                    raise _bad_image(img)
                skipped.append(rels[i])
                continue
            if x is None:
                x, first = np.empty((len(paths), *img.shape), np.uint8), i
            elif img.shape != x.shape[1:]:
                raise EdgehebbError(f"image {paths[i]} is {img.shape[1]}x{img.shape[0]} but {paths[first]} is "
                                    f"{x.shape[2]}x{x.shape[1]}: all images of a split must share one size; "
                                    f"resize them")
            x[len(kept)] = img
            kept.append(i)
    if x is None:
        raise EdgehebbError(f"none of the {len(paths)} images in {split_dir} could be decoded")
    return x[:len(kept)], labels[kept], skipped


def _bad_image(message: str) -> EdgehebbError:
    return EdgehebbError(f"{message}; replace or delete the file, or skip unreadable images (--skip-bad)")


def _cache_folder(cache_dir, root: Path, split_dir: Path) -> Path:
    cache = Path(cache_dir or os.environ.get("EDGEHEBB_CACHE") or Path.home() / ".cache/edgehebb/decoded")
    cache = cache.expanduser().resolve()
    if cache.is_relative_to(root.resolve()) or cache.is_relative_to(split_dir):
        raise EdgehebbError(f"decode cache {cache} is inside the data folder {root}; pick a cache folder "
                            f"outside it")
    return cache


def _load_image_tree(split_dir: Path, root: Path, skip_bad: bool, cache_dir, progress: bool,
                     log: Callable[[str], None]) -> ImageSet:
    split_dir = split_dir.resolve()
    cache = _cache_folder(cache_dir, root, split_dir)
    classes, rels, labels, digest = _list_tree(split_dir)
    stem = f"{split_dir.name}-{hashlib.sha256(str(split_dir).encode()).hexdigest()[:16]}"
    npy, key_file = cache / f"{stem}.npy", cache / f"{stem}.json"
    key = {"version": CACHE_VERSION, "source": str(split_dir), "files": len(rels), "digest": digest}
    source = f"image folder {split_dir}"  # not the cache's path: resume and records key on this

    meta = _read_cache_key(key_file, key)
    if meta is not None and meta["skipped"] and not skip_bad:
        # the cache was made leaving these files out: a strict load fails on them as a fresh decode would
        message = _decode_chunk([str(split_dir / meta["skipped"][0])])[0]
        if isinstance(message, str):
            raise _bad_image(message)
        meta = None  # it decodes now (rewritten with the same mtime and size): decode the tree again
    if meta is not None:
        with contextlib.suppress(OSError, ValueError, EOFError):   # damaged (EOFError: empty): decode again
            x = np.load(npy, mmap_mode="r")
            if list(x.shape) == meta["shape"] and x.dtype == np.uint8:
                _report_skipped(meta["skipped"], split_dir, log)
                return ImageSet(x, np.asarray(meta["y"], np.int64), classes, source, list(meta["skipped"]))

    x, y, skipped = _decode_tree(split_dir, rels, labels, skip_bad, progress)
    _report_skipped(skipped, split_dir, log)
    meta = {**key, "shape": list(x.shape), "skipped": skipped, "classes": classes, "y": y.tolist()}
    try:
        cache.mkdir(parents=True, exist_ok=True)
        key_file.unlink(missing_ok=True)  # the key goes last: a crash before it leaves no valid-looking cache
        atomic_write(npy, lambda f: np.save(f, x))
        atomic_write(key_file, json.dumps(meta).encode())
    except (OSError, EdgehebbError) as e:  # a read-only cache costs a decode next time, not this run
        warnings.warn(f"could not write the decode cache in {cache} ({e}); set EDGEHEBB_CACHE to a writable "
                      f"folder", stacklevel=3)
        return ImageSet(x, y, classes, source, skipped)
    return ImageSet(np.load(npy, mmap_mode="r"), y, classes, source, skipped)


def _read_cache_key(key_file: Path, key: dict) -> dict | None:
    """The cache's metadata if its key matches the tree as it is now, else None."""
    try:
        meta = json.loads(key_file.read_text())
    except (OSError, ValueError):
        return None
    return meta if all(meta.get(k) == v for k, v in key.items()) else None


def _report_skipped(skipped: list[str], split_dir: Path, log: Callable[[str], None]) -> None:
    if skipped:
        named = ", ".join(skipped[:_NAMED_SKIPPED])
        more = f" and {len(skipped) - _NAMED_SKIPPED} more" if len(skipped) > _NAMED_SKIPPED else ""
        log(f"skipped {len(skipped)} unreadable image(s) in {split_dir} (--skip-bad): {named}{more}")


# ---------------------------------------------------------------- subsets

def _balanced_subset(data: ImageSet, limit: int) -> ImageSet:
    """The first ``limit // n_classes`` images of each class, in the set's (sorted file) order."""
    n_classes = len(data.classes)
    if limit < n_classes:
        raise EdgehebbError(f"limit {limit} is smaller than the number of classes ({n_classes}); "
                            f"use at least {n_classes} so each class gets one image")
    per_class = limit // n_classes
    picks = []
    for c, name in enumerate(data.classes):
        idx = np.flatnonzero(data.y == c)
        if len(idx) < per_class:
            usable = n_classes * min(int((data.y == k).sum()) for k in range(n_classes))
            raise EdgehebbError(f"limit {limit} needs {per_class} images of class {name!r} but it has {len(idx)}; "
                                f"use a limit of at most {usable}")
        picks.append(idx[:per_class])
    idx = np.sort(np.concatenate(picks))
    return ImageSet(np.asarray(data.x[idx]), data.y[idx], data.classes,
                    f"{data.source}, {per_class} per class (limit {limit})", data.skipped)
