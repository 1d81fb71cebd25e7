"""The real CIFAR-10 copy: learned rows are unit-norm and beat random filters; the shipped model keeps
its accuracy.

Skipped with a reason when EDGEHEBB_DATA does not point at the data, but for the one check that needs none
(every shipped model has its floors here).

Floors. Each accuracy floor is 2 standard errors below what was measured on the same images
(SE = sqrt(p (1 - p) / n) for accuracy p on n images), so a regression of a few points fails while
the test stays deterministic here (the same images, model and seed give the same figure). Every figure
lives in ``MEASURED`` below with its date; ``python -m tests.test_real_data`` (EDGEHEBB_DATA set,
OMP_NUM_THREADS=1) measures them again and prints the table to paste, e.g. for a new shipped model.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from edgehebb.data import load_split
from edgehebb.learn.hebbian import init_weights
from edgehebb.learn.loop import LearnConfig, learn
from tests.ridge_probe import ridge_probe

CONDITIONS = [("wb-warm", 241.0), ("wb-cool", 91.0), ("low-light", 6.5), ("gamma-high", 1.0), ("gamma-low", 1.0)]
# figure -> (measured accuracy, images). Measured 2026-12-04/05 with OMP_NUM_THREADS=1 by
# `python -m tests.test_real_data` on the JPEG CIFAR-10 copy; the first n class-balanced test images.
MEASURED = {
    # the shipped fig2_left (gray-world; a hidden layer of 1,024 units in the head, trained with --augment
    # incl. gamma, --flip, --dropout 0.5, cosine schedule; issue 24, measured 2026-12-05); floors 0.737 and
    # 0.693. On the first 1,000, clean and under each condition: kept shares of the clean accuracy 0.995
    # (warm), 0.988 (cool), 0.903 (low light), 0.929 (gamma 2), 0.940 (gamma 1/2)
    "fig2_left-cifar10": {
        "clean": (0.756, 2000),
        "shadowed": (0.713, 2000),
        "clean@1000": (0.751, 1000),
        "wb-warm@241": (0.747, 1000),
        "wb-cool@91": (0.742, 1000),
        "low-light@6.5": (0.678, 1000),
        "gamma-high@1": (0.698, 1000),
        "gamma-low@1": (0.706, 1000),
    },
    # fig2_left with the paper's softmax head (shipped as fig2_left-cifar10 until 2026-12-05; gray-world; head
    # trained with --augment incl. gamma, --flip, --dropout 0.5, cosine schedule; issue 24); floors 0.673 and 0.612. On the first 1,000, clean and under each
    # condition: kept shares of the clean accuracy 0.996 (warm), 0.989 (cool), 0.877 (low light), 0.880
    # (gamma 2), 0.887 (gamma 1/2)
    "fig2_left_linear-cifar10": {
        "clean": (0.694, 2000),
        "shadowed": (0.634, 2000),
        "clean@1000": (0.698, 1000),
        "wb-warm@241": (0.695, 1000),
        "wb-cool@91": (0.69, 1000),
        "low-light@6.5": (0.612, 1000),
        "gamma-high@1": (0.614, 1000),
        "gamma-low@1": (0.619, 1000),
    },
    # the wide model (K=1600 whitened, eps 0.3, n=5; a hidden layer of 512 units in the head, issue 24's head
    # recipe at Adam 3e-4 for 20 epochs, measured 2026-12-05); floors 0.801 and 0.760. Shares kept on the first
    # 1,000: 0.985 (warm), 0.998 (cool), 0.862 (low light; 0.861 on all 10,000), 0.967 (gamma 2), 0.971
    # (gamma 1/2). Its eps 0.1 sibling, not shipped, kept 0.828 under low light (with a linear head)
    "fig2_left_wide-cifar10": {
        "clean": (0.8185, 2000),
        "shadowed": (0.779, 2000),
        "clean@1000": (0.82, 1000),
        "wb-warm@241": (0.808, 1000),
        "wb-cool@91": (0.818, 1000),
        "low-light@6.5": (0.707, 1000),
        "gamma-high@1": (0.793, 1000),
        "gamma-low@1": (0.796, 1000),
    },
}
# the ridge probe of a bank learned from 2,000 training images, and of random filters: floor 0.348 on the
# learned bank, 0.020 on the gap (measured 0.062)
PROBE = {"probe learned": (0.379, 1000), "probe random": (0.317, 1000)}
SHIPPED = list(MEASURED)


def standard_error(figure: str, model: str | None = None) -> float:
    p, n = (PROBE if model is None else MEASURED[model])[figure]
    return math.sqrt(p * (1 - p) / n)


def floor(figure: str, model: str | None = None) -> float:
    """The measured accuracy less 2 standard errors (``model`` None: a probe figure)."""
    return (PROBE if model is None else MEASURED[model])[figure][0] - 2 * standard_error(figure, model)


def probe_accuracies(root, cache) -> tuple[float, float, torch.Tensor]:
    """Ridge-probe accuracy on 1,000 test images of a bank learned from 2,000 training images (K=400, W=4,
    one epoch, B=100, seed 0) and of random filters; and the learned rows."""
    train = load_split(root, "train", limit=2000, cache_dir=cache, progress=False)
    test = load_split(root, "test", limit=1000, cache_dir=cache, progress=False)
    state = learn(train.x, LearnConfig(filters=400, kernel=4, batch=100, epochs=1, seed=0), progress=False)
    learned = state.weights.reshape(400, 3, 4, 4)
    random = init_weights(400, 48, seed=123).reshape(400, 3, 4, 4)
    return (ridge_probe(train.x, train.y, test.x, test.y, learned),
            ridge_probe(train.x, train.y, test.x, test.y, random), state.weights)


def shipped_accuracy(root, cache, model: str) -> dict:
    """A shipped model's clean and shadowed accuracy on 2,000 test images (evaluate's default shadows)."""
    from edgehebb.evaluate.accuracy import evaluate
    from edgehebb.nnl.model import load_model

    test = load_split(root, "test", limit=2000, cache_dir=cache, progress=False)
    net, config = load_model(model)
    r = evaluate(net, test, config["classes"], sweep=None, progress=False)
    return {"clean": r["clean"]["accuracy"], "shadowed": r["shadowed"]["accuracy"]}


def condition_accuracy(root, cache, model: str, condition: str | None = None, severity: float = 0.0) -> float:
    """A shipped model's accuracy on 1,000 test images, clean or under one camera condition (seed 0)."""
    from edgehebb.camera.conditions import apply_condition
    from edgehebb.evaluate.accuracy import predict
    from edgehebb.nnl.model import load_model

    test = load_split(root, "test", limit=1000, cache_dir=cache, progress=False)
    net, _ = load_model(model)
    images, labels = np.asarray(test.x), np.asarray(test.y)
    if condition is not None:
        images = apply_condition(images, condition, severity)
    return float((predict(net, images) == labels).mean())


@pytest.mark.data
@pytest.mark.slow
def test_learned_filters_are_unit_norm_and_beat_random(cifar_root, tmp_path):
    acc_learned, acc_random, weights = probe_accuracies(cifar_root, tmp_path)
    norms = weights.norm(dim=1)
    assert (norms - 1).abs().max() < 0.05, f"row norms in [{norms.min():.3f}, {norms.max():.3f}]"
    # chance is 0.10; the gap must stay within 2 SE (of a difference of two accuracies) of the measured gap
    gap = PROBE["probe learned"][0] - PROBE["probe random"][0]
    gap_floor = gap - 2 * math.hypot(standard_error("probe learned"), standard_error("probe random"))
    assert acc_learned >= floor("probe learned"), (acc_learned, PROBE["probe learned"])
    assert acc_learned - acc_random >= gap_floor, (acc_learned, acc_random, gap_floor)


def test_every_shipped_model_has_its_floors_here():
    from edgehebb.nnl.model import shipped_models

    assert sorted(SHIPPED) == shipped_models(), "measure a new shipped model: python -m tests.test_real_data"


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("model", SHIPPED)
def test_shipped_model_keeps_its_accuracy(cifar_root, tmp_path, model):
    """The embedded model on 2,000 class-balanced test images, clean and under the paper's shadows. The
    centred model shipped until 2026-12-01 (0.555 / 0.470) fails both floors, and the one shipped until
    2026-12-04 (0.6815 / 0.6025) the shadowed one."""
    got = shipped_accuracy(cifar_root, tmp_path, model)
    for figure in ("clean", "shadowed"):
        assert got[figure] >= floor(figure, model), (figure, got[figure], MEASURED[model][figure], floor(figure, model))
    # issue 24: shadowed at most 8 points below clean
    assert got["clean"] - got["shadowed"] <= 0.08 + 2 * standard_error("shadowed", model), got


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> Path:
    """One decode cache for the condition tests: the same 1,000 test images, decoded once, not per case."""
    return tmp_path_factory.mktemp("decoded")


@pytest.fixture(scope="module")
def clean_at_1000(cifar_root, decoded) -> dict:
    return {model: condition_accuracy(cifar_root, decoded, model) for model in SHIPPED}


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("model", SHIPPED)
@pytest.mark.parametrize("condition, severity", CONDITIONS)
def test_shipped_model_holds_up_under_colour_casts_and_sensor_noise(cifar_root, decoded, clean_at_1000, condition,
                                                                   severity, model):
    """Issues 15 and 24, on 1,000 test images, at the severities where the centred model of 2026-11-23 lost
    half its accuracy, and at gamma 2 and 1/2 (issue 24 asks for 85 % of the clean accuracy kept; the model
    shipped before kept 83.8 % and 85.1 % there). The floor on the share of clean accuracy kept is 2 SE of the accuracy under the
    condition below the measured share. Before issue 15 the plain model kept 39.8 % (warm), 84.5 % (cool)
    and 79.5 % (low light) of its clean accuracy, and gray-world without augmentation 79.0 % under low light."""
    figure = f"{condition}@{severity:g}"
    hit = condition_accuracy(cifar_root, decoded, model, condition, severity)
    share_floor = floor(figure, model) / MEASURED[model]["clean@1000"][0]
    assert hit >= share_floor * clean_at_1000[model], (hit, clean_at_1000[model], share_floor)


@pytest.mark.data
@pytest.mark.slow
def test_onnx_parity_tool_reports_every_client_within_the_op_spec(cifar_head, tmp_path, capsys, monkeypatch):
    """tools/onnx_parity.py (OP_SPEC.md's table) on 20 test images: one JSON row per (client, file), every
    client present (the test extra brings OpenCV) and within OP_SPEC's tolerance."""
    import json

    from edgehebb.deploy.op import PARITY_TOLERANCE

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    monkeypatch.setenv("EDGEHEBB_CACHE", str(tmp_path / "cache"))   # not ~/.cache/edgehebb
    import onnx_parity

    rows = onnx_parity.main(["--data", str(cifar_head), "--limit", "20", "--ref-limit", "2"])
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows
    assert [(r["client"], r["file"], r["images"]) for r in rows] == [
        ("onnxruntime", "default", 20), ("onnxruntime", "standard-ops", 20), ("opencv-dnn", "standard-ops", 20),
        ("onnx-reference", "default", 2), ("onnx-reference", "standard-ops", 2)]
    for r in rows:
        assert r["max_rel_of_row_max"] <= PARITY_TOLERANCE and r["top1_agreement"] == 1.0, r


@pytest.mark.data
@pytest.mark.slow
def test_screen_robustness_tool_runs_and_resumes(cifar_head, tmp_path, capsys, monkeypatch):
    """tools/screen_robustness.py on 200 training images: one row per (colour norm, sigma, augment), every
    asked condition scored on the clean validation images, and a rerun reads the rows back. Each row's
    figures are those of its saved head in a whole NNLNet on the same validation images."""
    import json

    from edgehebb.camera.conditions import apply_condition
    from edgehebb.evaluate.accuracy import predict
    from edgehebb.io import load_tensors
    from edgehebb.nnl import NNLNet, with_options
    from edgehebb.nnl.model import load_model
    from edgehebb.nnl.train import TrainConfig, validation_split

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    monkeypatch.setenv("EDGEHEBB_CACHE", str(tmp_path / "cache"))   # not ~/.cache/edgehebb
    import screen_robustness

    args = ["--data", str(cifar_head), "--out", str(tmp_path / "screen"), "--train-limit", "200", "--sigmas", "0,0.2",
            "--colour-norms", "gray-world", "--conditions", "wb-warm=241", "--augment", "low-light,wb-warm"]
    assert screen_robustness.main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["colour_norm"], r["sigma"], r["augment"]["conditions"]) for r in rows] == [
        ("gray-world", 0.0, "low-light,wb-warm"), ("gray-world", 0.2, "low-light,wb-warm")]
    assert sorted(p.name for p in (tmp_path / "screen" / "rows").iterdir()) == [
        "gray-world-s0-aug.json", "gray-world-s0-aug.safetensors", "gray-world-s0.2-aug.json",
        "gray-world-s0.2-aug.safetensors"]
    base, _ = load_model("fig2_left-cifar10")
    data = load_split(cifar_head, "train", limit=200, progress=False)
    _, val = validation_split(data.y, TrainConfig().val_fraction, TrainConfig().seed)
    val_x, val_y = np.asarray(data.x[val]), np.asarray(data.y[val])
    for r in rows:
        net = NNLNet(with_options(base.spec, sigma=r["sigma"], colour_norm="gray-world"), [base.blocks[0].weight])
        head, _ = load_tensors(tmp_path / "screen" / "rows" / f"gray-world-s{r['sigma']:g}-aug.safetensors")
        net.load_state_dict({**net.state_dict(), **head})
        assert r["val_clean"] == float((predict(net, val_x) == val_y).mean()), r
        assert r["val_wb-warm@241"] == float((predict(net, apply_condition(val_x, "wb-warm", 241)) == val_y).mean()), r
        # 20 validation images, chance 0.10: measured 0.45 (sigma 0) and 0.40 (sigma 0.2) on 2026-12-04, and
        # the floor is 2 SE below the lower (0.40 - 2 x 0.11)
        assert r["val_clean"] >= 0.18, r
    assert screen_robustness.main(args) == 0
    assert json.loads(capsys.readouterr().out) == rows


def measure(root) -> dict:
    """Every figure of MEASURED and PROBE, as the tests above compute them."""
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as cache:
        learned, random, _ = probe_accuracies(root, cache)
        for model in SHIPPED:
            got = {**shipped_accuracy(root, cache, model), "clean@1000": condition_accuracy(root, cache, model)}
            for condition, severity in CONDITIONS:
                got[f"{condition}@{severity:g}"] = condition_accuracy(root, cache, model, condition, severity)
            out[model] = {k: (round(v, 4), MEASURED[model][k][1]) for k, v in got.items()}
        out["probe"] = {"probe learned": (round(learned, 4), 1000), "probe random": (round(random, 4), 1000)}
    return out


if __name__ == "__main__":
    import os
    import time

    t0 = time.perf_counter()
    for group, figures in measure(os.environ["EDGEHEBB_DATA"]).items():
        print(f"    {group!r}: {{")
        for key, value in figures.items():
            print(f"        {key!r}: {value},")
        print("    },")
    print(f"# {time.perf_counter() - t0:.0f} s, torch threads {torch.get_num_threads()}")
