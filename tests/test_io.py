"""Atomic writes: permissions like a plain open(), one-line errors naming the path, nothing left behind."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from edgehebb.errors import EdgehebbError
from edgehebb.io import atomic_write, check_writable


def test_atomic_write_bytes_and_writer_with_umask_permissions(tmp_path):
    from edgehebb import io

    old = os.umask(0o022)
    io._umask.cache_clear()   # the umask is read once per process
    try:
        atomic_write(tmp_path / "a" / "x.bin", b"abc")  # creates the folder
        atomic_write(tmp_path / "y.npy", lambda f: np.save(f, np.arange(3)))
    finally:
        os.umask(old)
        io._umask.cache_clear()
    assert (tmp_path / "a" / "x.bin").read_bytes() == b"abc"
    assert np.load(tmp_path / "y.npy").tolist() == [0, 1, 2]
    for name in ("a/x.bin", "y.npy"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name  # not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "y.npy"]  # no temporary files left


def test_atomic_write_failure_is_one_line_and_keeps_the_old_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(EdgehebbError, match=f"cannot write {tmp_path / 'file' / 'm.onnx'}"):
        atomic_write(tmp_path / "file" / "m.onnx", b"new")
    (tmp_path / "keep").write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(EdgehebbError, match="cannot write .*keep: No space left on device"):
        atomic_write(tmp_path / "keep", fail)
    assert (tmp_path / "keep").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "keep"]


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "new" / "c.png") == tmp_path / "new" / "c.png"
    with pytest.raises(EdgehebbError, match="it is a folder"):
        check_writable(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(EdgehebbError, match="cannot write"):
        check_writable(tmp_path / "file" / "c.png")


def test_tensors_carry_a_checksum_that_is_checked_on_load(tmp_path):
    import torch
    from safetensors.torch import save_file

    from edgehebb.io import load_tensors, save_tensors

    path = tmp_path / "t.safetensors"
    save_tensors(path, {"w": torch.arange(64, dtype=torch.float32), "b": torch.ones(3)}, {"note": 1})
    tensors, meta = load_tensors(path)
    assert meta == {"note": 1} and torch.equal(tensors["w"], torch.arange(64, dtype=torch.float32))
    data = bytearray(path.read_bytes())
    data[-40:-36] = b"\x12\x34\x56\x78"   # a few bytes of tensor data, as a bad disk or copy would change them
    path.write_bytes(bytes(data))
    with pytest.raises(EdgehebbError) as err:
        load_tensors(path)
    assert str(err.value).startswith(f"{path} is corrupt") and "\n" not in str(err.value)
    # files written before the checksum existed have none and still load
    save_file({"w": torch.zeros(2)}, str(tmp_path / "old.safetensors"))
    assert load_tensors(tmp_path / "old.safetensors")[1] is None


def test_check_writable_dir_probes_without_creating(tmp_path):
    from edgehebb.io import check_writable_dir

    assert check_writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []   # no probe left behind either
    (tmp_path / "file").write_text("x")
    with pytest.raises(EdgehebbError, match="cannot write into .*file is a file"):
        check_writable_dir(tmp_path / "file" / "run")
