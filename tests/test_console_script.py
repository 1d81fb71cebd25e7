"""The installed ``edgehebb`` script's exit codes for export, bench, train and eval.

0 when the command did its work; 1 for a mistake the user can fix, printed as one ``Error: ...`` line on
stderr (``--debug`` shows the traceback instead); 2 for a usage error, with click's usage text. The
script is the one pip installed beside this Python (``pip install -e .`` puts it there); it runs this
checkout's code (PYTHONPATH). Every run is a fresh process that imports torch, so they run four at a
time, once for the whole module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from edgehebb.io import save_filters
from edgehebb.nnl import NNLNet, spec_from_dict
from edgehebb.nnl.model import save_model
from tests.test_train import SPEC, _grating_folder

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("export", "bench", "train", "eval")


def installed_script() -> Path:
    script = Path(sys.executable).parent / "edgehebb"
    assert script.is_file(), (f"no edgehebb script beside {sys.executable}: install the package into this "
                              f"environment (pip install -e .), as the README's test command does")
    return script


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """(command, case) -> CompletedProcess of every run below."""
    tmp = tmp_path_factory.mktemp("script")
    data = _grating_folder(tmp / "data", 60, 12)
    spec = spec_from_dict(SPEC)
    model = save_model(tmp / "model", NNLNet(spec, [torch.randn(12, 3, 4, 4, generator=torch.Generator().manual_seed(0))]),
                       ["h", "v", "d"])
    bank = tmp / "bank"
    save_filters(bank, torch.randn(12, 3, 4, 4, generator=torch.Generator().manual_seed(1)), {"learn": {"preprocess": "unit"}})
    (tmp / "tiny.json").write_text(json.dumps(SPEC))
    m, d = str(model), str(data)
    ok = {"export": ["export", m, "--out", str(tmp / "m.onnx"), "--json"],
          "bench": ["bench", m, "--data", d, "--backends", "torch", "--batch", "2", "--limit", "6", "--warmup", "0",
                    "--iters", "1", "--png", str(tmp / "bench.png"), "--json"],
          "train": ["train", "--spec", str(tmp / "tiny.json"), "--data", d, "--out", str(tmp / "trained"),
                    "--filters-from", str(bank), "--epochs", "1", "--device", "cpu", "--no-cache", "--val-fraction",
                    "0.2", "--json"],
          "eval": ["eval", m, "--data", d, "--device", "cpu", "--no-sweep", "--json"]}
    user_error = {"export": ["export", m, "--out", str(tmp / "m.engine")],
                  "bench": ["bench", "no-such-model", "--data", d, "--png", str(tmp / "b.png")],
                  "train": ["train", "--spec", "no-such-spec", "--data", d, "--out", str(tmp / "t")],
                  "eval": ["eval", "no-such-model", "--data", d, "--no-sweep"]}
    usage_error = {"export": ["export", m],                                        # --out is required
                   "bench": ["bench", m, "--backends", "cuda-magic"],
                   "train": ["train", "--spec", str(tmp / "tiny.json"), "--epochs", "many"],
                   "eval": ["eval"]}                                               # no MODEL
    cases = {(c, "ok"): ok[c] for c in COMMANDS}
    cases.update({(c, "user error"): user_error[c] for c in COMMANDS})
    cases.update({(c, "--debug"): ["--debug", *user_error[c]] for c in COMMANDS})
    cases.update({(c, "usage error"): usage_error[c] for c in COMMANDS})
    script = installed_script()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "EDGEHEBB_CACHE": str(tmp / "cache")}

    def run(args):
        return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, cwd=tmp, timeout=300)

    with ThreadPoolExecutor(4) as pool:
        done = dict(zip(cases, pool.map(run, cases.values())))
    return {**done, "tmp": tmp}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_that_did_its_work_exits_0(runs, command):
    r = runs[command, "ok"]
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    tmp = runs["tmp"]
    if command == "export":
        assert Path(out["onnx"]) == tmp / "m.onnx" and (tmp / "m.onnx").stat().st_size == out["bytes"]
    elif command == "bench":
        assert out["backends"]["torch"]["status"] == "ok" and (tmp / "bench.png").is_file()
    elif command == "train":
        assert (tmp / "trained" / "model.safetensors").is_file() and out["training"]["val_images"] == 12
    else:
        assert out["clean"]["images"] == 12 and 0 <= out["clean"]["accuracy"] <= 1


@pytest.mark.parametrize("command, message", [
    ("export", "--out must name a .onnx file"), ("bench", "model 'no-such-model' is neither a directory"),
    ("train", "unknown model spec 'no-such-spec'"), ("eval", "model 'no-such-model' is neither a directory")])
def test_a_user_error_is_one_line_and_exit_1(runs, command, message):
    r = runs[command, "user error"]
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("command", COMMANDS)
def test_debug_shows_the_traceback_of_the_same_error(runs, command):
    r, plain = runs[command, "--debug"], runs[command, "user error"]
    assert r.returncode == 1, r.stderr
    assert "Traceback (most recent call last)" in r.stderr
    message = plain.stderr.strip().removeprefix("Error: ")
    assert r.stderr.strip().splitlines()[-1] == f"edgehebb.errors.EdgehebbError: {message}"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_usage_error_exits_2_with_the_usage(runs, command):
    r = runs[command, "usage error"]
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"Usage: edgehebb {command} ") and "\nError: " in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
