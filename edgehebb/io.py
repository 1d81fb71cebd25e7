"""Model directories and checkpoints: tensors in safetensors, everything else in JSON, written atomically.

A learned filter bank is a directory with ``config.json`` (hyperparameters, data source, seed,
package version, per-epoch history) and ``filters.safetensors`` (tensor ``filters``, float32,
shape (K, C, W, W): a ``conv2d`` weight). Nothing here unpickles anything.

Every safetensors file written here carries a SHA-256 of its tensors (names, dtypes, shapes and
bytes) in its metadata, checked on load: a file damaged on disk or in transit is refused with one
line naming it, instead of loading silently and scoring at chance. Files written before the checksum
existed have none and load as before.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from edgehebb.errors import EdgehebbError

FILTERS_FILE = "filters.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "edgehebb.filters/1"
CHECKSUM_KEY = "edgehebb.sha256"   # in the safetensors metadata, beside our JSON


@functools.cache
def _umask() -> int:
    # read once: os.umask can only be read by setting it, which briefly changes it for every thread
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cannot_write(path: Path, e: OSError) -> EdgehebbError:
    return EdgehebbError(f"cannot write {path}: {e.strerror or e}")


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half of one.

    ``data`` is the bytes, or a function that writes them to the open file (a large array need not
    be copied into memory first).

    The file gets the permissions a plain ``open(path, "w")`` would (0666 minus the umask): mkstemp's
    0600 would hide a model from a pipeline that runs as another user. A path that cannot be written
    raises one ``EdgehebbError`` line naming it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _cannot_write(path, e) from None
        raise


def check_writable(path: str | os.PathLike) -> Path:
    """Fail now, with one line, if ``path`` could not be written later (before a long run, not after)."""
    path = Path(path)
    if path.is_dir():
        raise EdgehebbError(f"cannot write {path}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(path, e) from None
    if not os.access(path.parent, os.W_OK):
        raise EdgehebbError(f"cannot write {path}: {path.parent} is not writable")
    return path


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Fail now, with one line, if files could not be created in the folder ``path`` later.

    It creates and removes a probe file in ``path``, or in its nearest existing parent when ``path``
    does not exist yet (which is not created: a run that fails later leaves nothing behind). Permission
    bits say nothing about a read-only mount, and nothing at all to root.
    """
    path = Path(path)
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise EdgehebbError(f"cannot write into {path}: {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".edgehebb-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise EdgehebbError(f"cannot write into {path}: {e.strerror or e}") from None
    return path


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EdgehebbError(f"{path} does not exist")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgehebbError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise EdgehebbError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def save_figure(fig, path: str | os.PathLike, **savefig_kw) -> None:
    """Render a matplotlib figure to PNG, close it, and write the file atomically."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kw)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """safetensors file with the tensors' checksum; ``meta`` travels JSON-encoded in the header's metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {CHECKSUM_KEY: tensors_checksum(tensors)}
    if meta is not None:
        header["json"] = json.dumps(meta)
    atomic_write(path, st_save(tensors, metadata=header))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(tensors, the JSON ``meta`` saved with them) of a safetensors file; its checksum, if it has one, must hold."""
    path = Path(path)
    if not path.is_file():
        raise EdgehebbError(f"{path} does not exist")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, AttributeError) as e:
        raise EdgehebbError(f"{path} is not a safetensors file: {e}") from None
    stored = meta.get(CHECKSUM_KEY)
    if stored is not None and stored != tensors_checksum(tensors):
        raise EdgehebbError(f"{path} is corrupt: its tensors do not match the checksum written with them; "
                            f"restore the file or create it again")
    try:
        return tensors, (json.loads(meta["json"]) if "json" in meta else None)
    except json.JSONDecodeError as e:
        raise EdgehebbError(f"{path}: its metadata is not valid JSON ({e})") from None


def save_filters(model_dir: str | os.PathLike, filters: torch.Tensor, config: dict,
                 whitening: torch.Tensor | None = None) -> None:
    """Write a filter bank (K, C, W, W) and its config into ``model_dir``; a whitened bank's filters are
    (K, N, 1, 1) over the whitened patch, and ``whitening`` (N, C, W, W) is the convolution that whitens."""
    model_dir = Path(model_dir)
    tensors = {"filters": filters.float(), **({"whitening": whitening.float()} if whitening is not None else {})}
    save_tensors(model_dir / FILTERS_FILE, tensors)
    atomic_write_json(model_dir / CONFIG_FILE, {"format": FORMAT, **config})


def load_filters(model_dir: str | os.PathLike) -> tuple[torch.Tensor, dict]:
    """(filters (K, C, W, W) float32, config) of a model directory written by ``save_filters``."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise EdgehebbError(f"{model_dir} is not a directory")
    config = read_json(model_dir / CONFIG_FILE)
    if config.get("format") != FORMAT:
        raise EdgehebbError(f"{model_dir / CONFIG_FILE} is not an edgehebb filter bank (format {config.get('format')!r})")
    tensors, _ = load_tensors(model_dir / FILTERS_FILE)
    filters = tensors.get("filters")
    if filters is None or filters.dim() != 4:
        raise EdgehebbError(f"{model_dir / FILTERS_FILE} holds no (K, C, W, W) tensor named 'filters'")
    return filters, config


def load_whitening(model_dir: str | os.PathLike) -> torch.Tensor | None:
    """The whitening convolution (N, C, W, W) a bank written by ``save_filters`` carries, or None."""
    tensors, _ = load_tensors(Path(model_dir) / FILTERS_FILE)
    return tensors.get("whitening")
