"""Learning runs: convergence, resume, model directories, and the CLI's happy and bad-input paths."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgehebb.cli import cli, main
from edgehebb.errors import EdgehebbError
from edgehebb.io import load_filters
from edgehebb.learn import LearnConfig, learn
from edgehebb.learn_dir import learn_to_dir

SMALL = dict(filters=16, kernel=4, batch=20, lr=0.1, seed=7)


def test_rows_converge_toward_unit_norm(images):
    state = learn(images, LearnConfig(epochs=3, **SMALL), progress=False)
    errors = [h.norm_error for h in state.history]
    # standard-normal rows of 48 values start near norm 6.9
    assert errors[-1] < 0.05, errors
    assert errors[-1] < errors[0]
    assert all(0 <= h.dead_fraction <= 1 and h.patches_per_s > 0 for h in state.history)


def test_power_3_rows_converge_toward_unit_3_norm(images):
    state = learn(images, LearnConfig(epochs=3, power=3.0, **SMALL), progress=False)
    assert state.history[-1].norm_error < 0.05, [h.norm_error for h in state.history]
    assert (state.weights.norm(p=3, dim=1) - 1).abs().mean() == pytest.approx(state.history[-1].norm_error, abs=1e-6)


def test_weights_to_continue_from_must_fit_the_config(images):
    from edgehebb.learn import LearnState

    for shape in [(5, 48), (16, 27)]:
        with pytest.raises(EdgehebbError, match=re.escape(f"continue from are {shape}; 16 filters of 4x4x3 need (16, 48)")):
            learn(images, LearnConfig(epochs=1, **SMALL), state=LearnState(torch.randn(*shape)), progress=False)


def test_same_seed_same_filters_other_seed_different(images):
    cfg = LearnConfig(epochs=1, **SMALL)
    a = learn(images, cfg, progress=False).weights
    b = learn(images, cfg, progress=False).weights
    c = learn(images, LearnConfig(epochs=1, **{**SMALL, "seed": 8}), progress=False).weights
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_resume_equals_uninterrupted(images, tmp_path):
    cfg = LearnConfig(epochs=3, **SMALL)
    key = {"source": "synthetic"}
    learn_to_dir(images, cfg, tmp_path / "full", data_key=key, progress=False, log=lambda s: None)

    class Interrupted(Exception):
        pass

    def stop_after_first_epoch(line):
        if line.startswith("epoch 1/"):
            raise Interrupted

    with pytest.raises(Interrupted):
        learn_to_dir(images, cfg, tmp_path / "cut", data_key=key, progress=False, log=stop_after_first_epoch)
    assert (tmp_path / "cut" / "checkpoint.safetensors").is_file()
    assert not (tmp_path / "cut" / "filters.safetensors").exists()
    learn_to_dir(images, cfg, tmp_path / "cut", data_key=key, resume=True, progress=False, log=lambda s: None)
    full, full_cfg = load_filters(tmp_path / "full")
    resumed, resumed_cfg = load_filters(tmp_path / "cut")
    assert torch.equal(full, resumed)
    assert [h["epoch"] for h in resumed_cfg["history"]] == [1, 2, 3]


def test_resume_refuses_other_settings_and_existing_runs(images, tmp_path):
    key = {"source": "synthetic"}
    learn_to_dir(images, LearnConfig(epochs=1, **SMALL), tmp_path / "run", data_key=key, progress=False,
                 log=lambda s: None)
    with pytest.raises(EdgehebbError, match="already holds a run"):
        learn_to_dir(images, LearnConfig(epochs=1, **SMALL), tmp_path / "run", data_key=key, progress=False)
    with pytest.raises(EdgehebbError, match="other settings.*delta"):
        learn_to_dir(images, LearnConfig(epochs=1, **{**SMALL, "delta": 0.1}), tmp_path / "run", data_key=key,
                     resume=True, progress=False)
    with pytest.raises(EdgehebbError, match="nothing to resume"):
        learn_to_dir(images, LearnConfig(epochs=1, **SMALL), tmp_path / "new", data_key=key, resume=True)


def test_resume_survives_a_moved_decode_cache_and_bad_checkpoints(images, tmp_path):
    from edgehebb.io import CHECKPOINT_FILE, save_tensors
    from edgehebb.learn_dir import normalised_data_key

    # checkpoints written before 2026-11-23 named the decode cache in an image folder's source
    old = {"source": "image folder /d/train (decode cache /c/train-1.npy)", "split": "train", "images": 3}
    assert normalised_data_key(old) == {**old, "source": "image folder /d/train"}
    learn_to_dir(images, LearnConfig(epochs=2, **SMALL), tmp_path / "run", data_key={"source": "s"},
                 progress=False, log=lambda s: None)
    for meta in ({"learn": {}}, {"learn": [], "data": {}, "epochs_done": 1, "history": []}):
        save_tensors(tmp_path / "run" / CHECKPOINT_FILE, {"weights": torch.zeros(2, 2)}, meta)
        with pytest.raises(EdgehebbError, match="is not an edgehebb checkpoint"):
            learn_to_dir(images, LearnConfig(epochs=2, **SMALL), tmp_path / "run",
                         data_key={"source": "s"}, resume=True, progress=False)


def test_auto_backend_obeys_device_cpu(monkeypatch):
    from edgehebb import learn as learn_mod

    monkeypatch.setattr(learn_mod, "_pycuda_usable", lambda: True)
    assert learn_mod.resolve_backend("auto", "cpu") == "torch"   # pycuda would run on the GPU
    assert learn_mod.resolve_backend("auto", "auto") == "pycuda"
    assert learn_mod.resolve_backend("torch", "cuda") == "torch"
    with pytest.raises(EdgehebbError, match="unknown backend 'cupy'"):
        learn_mod.resolve_backend("cupy")


def test_learn_rejects_bad_shapes(images):
    with pytest.raises(EdgehebbError, match="larger than the images"):
        learn(images, LearnConfig(filters=4, kernel=17), progress=False)
    with pytest.raises(EdgehebbError, match="at least 2 filters"):
        learn(images, LearnConfig(filters=1), progress=False)
    with pytest.raises(EdgehebbError, match="uint8"):
        learn(images.astype(np.float32), LearnConfig(filters=4), progress=False)
    with pytest.raises(EdgehebbError, match="larger than the"):
        learn(images[:1], LearnConfig(filters=4, batch=10**6), progress=False)


def run_cli(args, env=None):
    return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)


def test_cli_learn_and_show(image_tree, tmp_path):
    out = tmp_path / "model"
    r = CliRunner().invoke(cli, ["learn", "--data", str(image_tree), "--out", str(out), "-K", "8", "-W", "3",
                                 "-B", "50", "--epochs", "2", "--device", "cpu", "--json"],
                           env={"EDGEHEBB_CACHE": str(tmp_path / "cache")})
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["learn"]["filters"] == 8 and len(summary["history"]) == 2
    config = json.loads((out / "config.json").read_text())
    for key in ("learn", "data", "edgehebb_version", "history", "colour_orientation"):
        assert key in config
    assert config["learn"]["seed"] == 0 and config["data"]["images"] == 24
    filters, _ = load_filters(out)
    assert filters.shape == (8, 3, 3, 3)
    assert (out / "filters.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(cli, ["show", str(out), "--out", str(tmp_path / "again.png"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["colour_units"] + json.loads(r.stdout)["bw_units"] == 8
    assert (tmp_path / "again.png").is_file()


@pytest.mark.parametrize("seed", ["-1", str(2 ** 32)])
def test_cli_seed_out_of_range_is_a_usage_error(image_tree, tmp_path, seed):
    r = CliRunner().invoke(cli, ["learn", "--data", str(image_tree), "--out", str(tmp_path / "m"), "--seed", seed])
    assert r.exit_code == 2 and "--seed" in r.output and not (tmp_path / "m").exists()


@pytest.mark.parametrize("extra,message", [
    (["-K", "1"], "at least 2 filters"),
    (["-W", "40"], "larger than the images"),
    (["-m", "9", "-K", "8"], "rank m"),
])
def test_cli_bad_values_give_one_line_errors(image_tree, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        main(["learn", "--data", str(image_tree), "--out", str(tmp_path / "m"), "--device", "cpu", *extra])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("Error: ") and message in err[-1]


def test_cli_bad_data_paths(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    bad_npz = tmp_path / "bad.npz"
    np.savez(bad_npz, images=np.zeros((2, 8, 8, 3), np.uint8))
    for data in (tmp_path / "missing", tmp_path / "empty", bad_npz):
        with pytest.raises(SystemExit):
            main(["learn", "--data", str(data), "--out", str(tmp_path / "m"), "--device", "cpu"])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("Error: ") and data.name in line, line
    assert not (tmp_path / "m").exists()


def test_cli_truncated_jpeg_names_the_file(image_tree, tmp_path, capsys):
    from PIL import Image

    bad = image_tree / "train" / "cat" / "9999.jpg"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(tmp_path / "ok.jpg", quality=90)
    bad.write_bytes((tmp_path / "ok.jpg").read_bytes()[:100])
    args = ["learn", "--data", str(image_tree), "--out", str(tmp_path / "m"), "-K", "4", "-B", "50", "--device", "cpu"]
    with pytest.raises(SystemExit):
        main(args)
    assert "9999.jpg" in capsys.readouterr().err
    r = run_cli([*args, "--skip-bad"], env={"EDGEHEBB_CACHE": str(tmp_path / "cache")})
    assert r.exit_code == 0


def test_import_and_help_load_no_heavy_modules():
    code = ("import sys, edgehebb; from edgehebb.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('torch', 'pycuda', 'tensorrt', 'onnxruntime') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
