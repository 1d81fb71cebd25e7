"""edgehebb.data: the three input formats, the decode cache, bad files, subsets, and where data is found."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgehebb.data as data
from edgehebb.data import ImageSet, load_split, resolve_data_root
from edgehebb.errors import EdgehebbError

CLASSES = ["cat", "dog", "frog"]


def colour(label: int, i: int) -> tuple[int, int, int]:
    """A distinct, known colour for image ``i`` of class ``label`` (PNG keeps it exactly)."""
    return (10 + 80 * label, 5 * i, 200 - 7 * i)


def make_tree(split_dir: Path, per_class: int = 4, size: int = 32, ext: str = "png") -> Path:
    for label, name in enumerate(CLASSES):
        (split_dir / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), colour(label, i)).save(split_dir / name / f"{i:04d}.{ext}")
    return split_dir


@pytest.fixture
def tree(tmp_path):
    """tmp/data/{train,test}/{cat,dog,frog}/NNNN.png, 4 + 2 images per class."""
    make_tree(tmp_path / "data" / "train")
    make_tree(tmp_path / "data" / "test", per_class=2)
    return tmp_path / "data"


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def load(root, split="train", **kw):
    kw.setdefault("progress", False)
    return load_split(root, split, **kw)


# ---------------------------------------------------------------- image-folder trees

def test_image_tree_shapes_labels_and_pixels(tree, cache):
    s = load(tree, cache_dir=cache)
    assert isinstance(s, ImageSet) and len(s) == 12
    assert s.x.shape == (12, 32, 32, 3) and s.x.dtype == np.uint8
    assert s.y.dtype == np.int64 and s.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert s.classes == CLASSES
    assert tuple(s.x[5, 7, 9]) == colour(1, 1)  # dog/0001.png
    assert "train" in s.source
    assert len(load(tree, "test", cache_dir=cache)) == 6


def test_grey_and_rgba_become_rgb(tmp_path, cache):
    split = make_tree(tmp_path / "d" / "train", per_class=1)
    Image.new("L", (32, 32), 77).save(split / "cat" / "0001.png")
    Image.new("RGBA", (32, 32), (1, 2, 3, 4)).save(split / "dog" / "0001.png")
    s = load(tmp_path / "d", cache_dir=cache)
    assert s.x.shape == (5, 32, 32, 3)
    assert tuple(s.x[1, 0, 0]) == (77, 77, 77) and tuple(s.x[3, 0, 0]) == (1, 2, 3)


def test_root_can_be_the_split_folder(tree, cache):
    s = load(tree / "test", "test", cache_dir=cache)
    assert len(s) == 6 and s.classes == CLASSES


def test_split_folder_named_for_another_split_is_refused(tree, cache):
    with pytest.raises(EdgehebbError, match="looks like the 'train' split"):
        load(tree / "train", "test", cache_dir=cache)


def test_unknown_split_lists_what_is_there(tree, cache):
    with pytest.raises(EdgehebbError, match=r"no split 'val'.*found: test, train"):
        load(tree, "val", cache_dir=cache)


def test_missing_empty_and_classless_folders(tmp_path, cache):
    with pytest.raises(EdgehebbError, match="does not exist"):
        load(tmp_path / "nowhere", cache_dir=cache)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(EdgehebbError, match="no class subfolders"):
        load(tmp_path / "empty", cache_dir=cache)
    (tmp_path / "empty" / "train" / "cat").mkdir()
    with pytest.raises(EdgehebbError, match=r"cat has no \.jpg"):
        load(tmp_path / "empty", cache_dir=cache)


def test_mismatched_size_names_the_file(tmp_path, cache):
    split = make_tree(tmp_path / "d" / "train", per_class=2)
    Image.new("RGB", (40, 32)).save(split / "frog" / "0001.png")
    with pytest.raises(EdgehebbError, match=r"frog/0001\.png is 40x32.*one size"):
        load(tmp_path / "d", cache_dir=cache)


# ---------------------------------------------------------------- decode cache

def forbid_decoding(monkeypatch):
    def boom(paths):
        raise AssertionError(f"decoded {len(paths)} files instead of using the cache")
    monkeypatch.setattr(data, "_decode_chunk", boom)


def test_cache_outside_data_and_reused(tree, cache, monkeypatch):
    first = load(tree, cache_dir=cache)
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".npy"]
    assert not [p for p in tree.rglob("*") if p.suffix in (".npy", ".json", ".tmp")]
    forbid_decoding(monkeypatch)
    second = load(tree, cache_dir=cache)
    assert isinstance(second.x, np.memmap) and not second.x.flags.writeable
    np.testing.assert_array_equal(second.x, first.x)
    np.testing.assert_array_equal(second.y, first.y)
    assert second.classes == first.classes


def test_cache_defaults_to_env_var(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEHEBB_CACHE", str(tmp_path / "envcache"))
    load(tree)
    assert len(list((tmp_path / "envcache").glob("train-*.npy"))) == 1


def test_cache_inside_data_folder_is_refused(tree):
    with pytest.raises(EdgehebbError, match="inside the data folder"):
        load(tree, cache_dir=tree / "train" / ".cache")


def test_touched_or_added_file_invalidates_cache(tree, cache, monkeypatch):
    load(tree, cache_dir=cache)
    img = tree / "train" / "dog" / "0002.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(img)
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    s = load(tree, cache_dir=cache)
    assert tuple(s.x[6, 0, 0]) == (1, 2, 3)

    Image.new("RGB", (32, 32), (9, 9, 9)).save(tree / "train" / "cat" / "0009.png")
    s = load(tree, cache_dir=cache)
    assert len(s) == 13 and tuple(s.x[4, 0, 0]) == (9, 9, 9)
    forbid_decoding(monkeypatch)
    assert len(load(tree, cache_dir=cache)) == 13
    assert len(list(cache.glob("*.npy"))) == 1  # one cache file per split folder, rewritten in place


@pytest.mark.parametrize("damage", ["empty", "header only", "truncated pixels", "garbage", "other shape"])
def test_a_damaged_decode_cache_is_decoded_again_and_replaced(tree, cache, monkeypatch, damage):
    first = load(tree, cache_dir=cache)
    x, y = np.array(first.x), first.y   # a copy: first.x maps the file damaged below
    del first
    (npy,) = cache.glob("train-*.npy")
    good = npy.read_bytes()
    header = len(good) - x.nbytes
    npy.unlink()   # a new file, as a crash or a full disk would leave it
    if damage == "other shape":   # a readable array that is not this tree (e.g. written by a half-finished copy)
        np.save(npy, np.zeros((3, 32, 32, 3), np.uint8))
    else:
        npy.write_bytes({"empty": b"", "header only": good[:header], "truncated pixels": good[:len(good) // 2],
                         "garbage": bytes(range(256)) * 8}[damage])
    again = load(tree, cache_dir=cache)
    np.testing.assert_array_equal(again.x, x)
    np.testing.assert_array_equal(again.y, y)
    assert npy.read_bytes() == good   # rewritten: the next load reads it instead of decoding
    forbid_decoding(monkeypatch)
    np.testing.assert_array_equal(load(tree, cache_dir=cache).x, x)


def test_interrupted_cache_write_leaves_nothing(tree, cache, monkeypatch):
    def die(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(data.np, "save", die)
    with pytest.raises(KeyboardInterrupt):
        load(tree, cache_dir=cache)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    assert len(load(tree, cache_dir=cache)) == 12


def test_process_pool_matches_serial(tree, cache, monkeypatch):
    serial = load(tree, cache_dir=cache / "a")
    monkeypatch.setattr(data, "_POOL_MIN_FILES", 1)
    monkeypatch.setattr(data, "_CHUNK", 5)
    pooled = load(tree, cache_dir=cache / "b")
    np.testing.assert_array_equal(pooled.x, serial.x)
    np.testing.assert_array_equal(pooled.y, serial.y)


def test_unwritable_cache_warns_and_still_loads(tree, cache, monkeypatch):
    def refuse(path, write):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(data, "atomic_write", refuse)
    with pytest.warns(UserWarning, match="could not write the decode cache"):
        s = load(tree, cache_dir=cache)
    assert s.x.shape == (12, 32, 32, 3) and s.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4


# ---------------------------------------------------------------- bad images

@pytest.fixture
def bad_tree(tmp_path):
    """A JPEG tree where dog/0001.jpg is cut to its first 100 bytes."""
    split = make_tree(tmp_path / "d" / "train", per_class=3, ext="jpg")
    bad = split / "dog" / "0001.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    return tmp_path / "d"


def test_truncated_jpeg_names_the_file(bad_tree, cache):
    with pytest.raises(EdgehebbError, match=r"dog/0001\.jpg.*--skip-bad"):
        load(bad_tree, cache_dir=cache)
    assert not cache.exists() or not list(cache.glob("*.json"))


def test_truncated_jpeg_in_pool_names_the_file(bad_tree, cache, monkeypatch):
    monkeypatch.setattr(data, "_POOL_MIN_FILES", 1)
    monkeypatch.setattr(data, "_CHUNK", 2)
    with pytest.raises(EdgehebbError, match=r"dog/0001\.jpg"):
        load(bad_tree, cache_dir=cache)


def test_truncated_jpeg_rejected_even_if_pil_is_lenient(bad_tree, cache, monkeypatch):
    # cut in the middle of the scan data: PIL with LOAD_TRUNCATED_IMAGES would pad it with grey
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    bad = bad_tree / "train" / "dog" / "0001.jpg"
    Image.fromarray(noise).save(bad)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    from PIL import ImageFile
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(EdgehebbError, match=r"dog/0001\.jpg.*truncated"):
        load(bad_tree, cache_dir=cache)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it


def test_skip_bad_skips_counts_and_remembers(bad_tree, cache, monkeypatch):
    lines = []
    s = load(bad_tree, cache_dir=cache, skip_bad=True, log=lines.append)
    assert len(s) == 8 and s.y.tolist() == [0, 0, 0, 1, 1, 2, 2, 2] and s.skipped == ["dog/0001.jpg"]
    assert len(lines) == 1 and lines[0].startswith("skipped 1 unreadable") and lines[0].endswith(": dog/0001.jpg")
    # the cache left the file out: a strict load must still fail on it, a lenient one reuses the cache
    with pytest.raises(EdgehebbError, match=r"dog/0001\.jpg"):
        load(bad_tree, cache_dir=cache)
    forbid_decoding(monkeypatch)
    again = load(bad_tree, cache_dir=cache, skip_bad=True, log=lines.append)
    assert len(again) == 8 and again.skipped == ["dog/0001.jpg"] and lines[1] == lines[0]


def test_skip_bad_is_one_line_naming_the_first_files_not_a_warning(tmp_path, cache, recwarn):
    split = make_tree(tmp_path / "d" / "train", per_class=3, ext="jpg")
    bad = sorted(split.rglob("*.jpg"))[:5]
    for p in bad:
        p.write_bytes(p.read_bytes()[:100])
    lines = []
    s = load(tmp_path / "d", cache_dir=cache, skip_bad=True, log=lines.append)
    names = [f"{p.parent.name}/{p.name}" for p in bad]
    assert s.skipped == names and len(recwarn) == 0
    assert lines == [f"skipped 5 unreadable image(s) in {split} (--skip-bad): {', '.join(names[:3])} and 2 more"]


# ---------------------------------------------------------------- CIFAR-10 pickles

def write_cifar(folder: Path, n: int = 4) -> np.ndarray:
    """A fake cifar-10-batches-py in the real layout; returns the CHW images of data_batch_1."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    chw = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": chw.reshape(n, 3072), b"labels": list(range(n)), b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}, f)
    return chw


def test_cifar_pickles_chw_to_hwc(tmp_path):
    chw = write_cifar(tmp_path / "cifar-10-batches-py")
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        s = load(root)
        assert s.x.shape == (20, 32, 32, 3) and s.x.dtype == np.uint8 and s.x.flags.c_contiguous
        assert s.y.dtype == np.int64 and s.y.tolist() == [0, 1, 2, 3] * 5
        assert s.classes == [f"c{i}" for i in range(10)]
        # pixel (row 5, col 7) of image 2: red, green, blue come from the three planes
        assert tuple(s.x[2, 5, 7]) == tuple(chw[2, :, 5, 7])
    assert len(load(tmp_path, "test")) == 4


def test_cifar_pickles_bad_split_and_missing_batch(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    with pytest.raises(EdgehebbError, match="unknown split 'val'"):
        load(tmp_path, "val")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(EdgehebbError, match="data_batch_3 is missing"):
        load(tmp_path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickles_of_any_protocol_load(tmp_path, protocol):
    chw = write_cifar(tmp_path / "cifar-10-batches-py")
    for name in [f"data_batch_{i}" for i in range(1, 6)]:  # arrays, not lists, in several protocols
        with open(tmp_path / "cifar-10-batches-py" / name, "wb") as f:
            pickle.dump({b"data": chw.reshape(4, 3072), b"labels": np.arange(4)}, f, protocol=protocol)
    assert load(tmp_path).x.shape == (20, 32, 32, 3)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _Payload(), b"labels": []}, f)
    with pytest.raises(EdgehebbError, match=r"cannot read .*data_batch_2: it refers to (posix|os)\.system"):
        load(tmp_path)


# ---------------------------------------------------------------- .npz

def test_npz_file_and_folder(tmp_path):
    x = np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3)
    np.savez(tmp_path / "set.npz", x=x, y=np.array([0, 1, 1, 0]), classes=np.array(["a", "b"]))
    s = load(tmp_path / "set.npz")
    np.testing.assert_array_equal(s.x, x)
    assert s.y.dtype == np.int64 and s.classes == ["a", "b"]

    (tmp_path / "tree").mkdir()
    np.savez(tmp_path / "tree" / "test.npz", x=x[..., :1], y=np.array([0, 2, 1, 0], np.uint8))
    s = load(tmp_path / "tree", "test")
    assert s.x.shape == (4, 8, 8, 3) and s.classes == ["0", "1", "2"]  # grey repeated to RGB


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "y": np.zeros(2, int)}, r"found \['images', 'y'\]"),
    ({"x": np.zeros((2, 4, 4, 3), np.float32), "y": np.zeros(2, int)}, "x is float32"),
    ({"x": np.zeros((2, 3, 4, 4), np.uint8), "y": np.zeros(2, int)}, "NCHW"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.zeros(3, int)}, "y is int64 \\(3,\\) for 2 images"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0, 5]), "classes": np.array(["a", "b"])},
     "labels span 0..5"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.zeros(2, int), "classes": np.array(["a", None])},
     "classes"),
])
def test_npz_wrong_content_names_file_and_keys(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(EdgehebbError, match="bad.npz") as err:
        load(tmp_path / "bad.npz")
    assert err.match(message)


def test_npz_needing_pickle_is_refused_in_our_words(tmp_path):
    x = np.zeros((2, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "objects.npz", x=x, y=np.zeros(2, int), classes=np.array(["a", None], dtype=object))
    np.savez(tmp_path / "xobj.npz", x=np.array([x[0], x[1]], dtype=object), y=np.zeros(2, int))
    with open(tmp_path / "pickled.npz", "wb") as f:
        pickle.dump({"x": x}, f)
    for name, key in (("objects.npz", "'classes' holds Python objects"), ("xobj.npz", "'x' holds Python objects"),
                      ("pickled.npz", "is a Python pickle")):
        with pytest.raises(EdgehebbError) as err:
            load(tmp_path / name)
        message = str(err.value)
        assert name in message and key in message and "never unpickles" in message, message
        assert "allow_pickle" not in message and "\n" not in message


def test_npz_not_a_zip(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(EdgehebbError, match="junk.npz"):
        load(tmp_path / "junk.npz")


# ---------------------------------------------------------------- limit

def test_limit_is_class_balanced_and_deterministic(tree, cache):
    full = load(tree, cache_dir=cache)
    s = load(tree, cache_dir=cache, limit=7)  # 7 // 3 = 2 per class
    assert s.y.tolist() == [0, 0, 1, 1, 2, 2] and not isinstance(s.x, np.memmap)
    np.testing.assert_array_equal(s.x, full.x[[0, 1, 4, 5, 8, 9]])
    np.testing.assert_array_equal(load(tree, cache_dir=cache, limit=7).x, s.x)


def test_limit_out_of_range(tree, cache):
    with pytest.raises(EdgehebbError, match="smaller than the number of classes"):
        load(tree, cache_dir=cache, limit=2)
    with pytest.raises(EdgehebbError, match="at most 12"):
        load(tree, cache_dir=cache, limit=15)


# ---------------------------------------------------------------- resolve_data_root

def test_resolve_precedence(tmp_path, monkeypatch):
    home, arg, env = tmp_path / "home", tmp_path / "arg", tmp_path / "env"
    for p in (arg, env, home / ".cache" / "edgehebb" / "cifar10"):
        p.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("EDGEHEBB_DATA", str(env))
    assert resolve_data_root(arg, download=False) == arg
    assert resolve_data_root(None, download=False) == env
    monkeypatch.delenv("EDGEHEBB_DATA")
    assert resolve_data_root(None, download=False) == home / ".cache" / "edgehebb" / "cifar10"


def test_resolve_missing_paths_and_no_data(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("EDGEHEBB_DATA", raising=False)
    with pytest.raises(EdgehebbError, match="--data .*nowhere does not exist"):
        resolve_data_root(tmp_path / "nowhere")
    monkeypatch.setenv("EDGEHEBB_DATA", str(tmp_path / "gone"))
    with pytest.raises(EdgehebbError, match="EDGEHEBB_DATA .*gone does not exist"):
        resolve_data_root(None)
    monkeypatch.delenv("EDGEHEBB_DATA")
    with pytest.raises(EdgehebbError) as err:
        resolve_data_root(None, download=False)
    assert str(err.value) == data.NO_DATA and "\n" not in str(err.value)
    monkeypatch.setitem(__import__("sys").modules, "torchvision", None)  # import fails, as without it
    with pytest.raises(EdgehebbError, match="torchvision.*not installed") as err:
        resolve_data_root(None, download=True)
    assert str(err.value).startswith("no CIFAR-10 data found") and "\n" not in str(err.value)


# ---------------------------------------------------------------- the real copy

@pytest.mark.data
def test_real_cifar10_test_split(cifar_root, tmp_path, monkeypatch):
    s = load(cifar_root, "test", cache_dir=tmp_path)
    assert s.x.shape == (10_000, 32, 32, 3) and s.x.dtype == np.uint8
    assert len(s.classes) == 10 and np.bincount(s.y).tolist() == [1000] * 10
    forbid_decoding(monkeypatch)   # the second load maps the cache: not one image is decoded again
    again = load(cifar_root, "test", cache_dir=tmp_path)
    assert isinstance(again.x, np.memmap)
    np.testing.assert_array_equal(again.x[::997], s.x[::997])



def test_image_folder_source_does_not_depend_on_the_cache(tree, tmp_path):
    # resume and training records key on the source: moving $EDGEHEBB_CACHE must not change it
    a = load(tree, cache_dir=tmp_path / "c1").source
    assert a == load(tree, cache_dir=tmp_path / "c2").source and "cache" not in a


def test_read_json_wants_an_object(tmp_path):
    from edgehebb.io import read_json

    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(EdgehebbError, match="config.json holds a JSON list, not an object"):
        read_json(tmp_path / "config.json")


def test_data_record_names_the_images_by_content_not_by_path(tree, cache, tmp_path):
    import shutil

    from edgehebb.data import data_record

    here = data_record(load_split(tree, "train", cache_dir=cache, progress=False))
    moved = tmp_path / "elsewhere" / "mydata"
    shutil.copytree(tree, moved)
    there = data_record(load_split(moved, "train", cache_dir=cache, progress=False))
    assert here["fingerprint"] == there["fingerprint"] and here["fingerprint"].startswith("sha256:")
    assert here["name"].endswith("/train") and str(tmp_path) not in json_dump(there)
    one = load_split(tree, "train", cache_dir=cache, progress=False)
    one.x = np.array(one.x)
    one.x[0, 0, 0, 0] ^= 1   # one bit of one pixel
    assert data_record(one)["fingerprint"] != here["fingerprint"]
    sub = data_record(load_split(tree, "train", cache_dir=cache, progress=False, limit=len(one.classes)))
    assert "per class" in sub["name"] and sub["images"] == len(one.classes)


def json_dump(obj) -> str:
    import json

    return json.dumps(obj)
