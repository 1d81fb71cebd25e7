"""tools/zoo_tradeoff.py: the MFLOP it counts per frame, checked by hand for the paper's networks, and one
run over a shipped model and a model directory on a few real test images, JSON and PNG written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture
def zoo(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    import zoo_tradeoff

    return zoo_tradeoff


def test_mflop_counts_dot_products_norms_whitening_and_head(zoo):
    from edgehebb.nnl.spec import load_spec

    # fig. 2 left: a 29 x 29 map of 400 dot products over N = 48, one |v|^2 sum of 48 per position, the
    # head 6,400 x 10; every multiply-add is 2 FLOP
    left = 2 * (29 * 29 * (400 * 48 + 48) + 4 * 4 * 400 * 10) / 1e6
    assert zoo.mflop(load_spec("fig2_left")) == pytest.approx(left)
    # the CONV twin has no patch norm
    assert zoo.mflop(load_spec("fig2_left"), normalised=False) == pytest.approx(left - 2 * 29 * 29 * 48 / 1e6)
    # the wide model: K = 1,600 over the whitened patch, plus the N x N whitening at each position
    wide = load_spec("fig2_left_wide")
    b = wide.blocks[0]
    mh, mw = b.map_size(32, 32)
    fh, fw = b.out_size(32, 32)
    expected = 2 * (mh * mw * (1600 * 48 + 48 + 48 * 48) + fh * fw * 1600 * 10) / 1e6
    assert zoo.mflop(wide) == pytest.approx(expected)
    # a head with a hidden layer of 1,024 units: 6,400 x 1,024 + 1,024 x 10 instead of 6,400 x 10
    from edgehebb.nnl.spec import with_options

    hidden = left + 2 * (6400 * 1024 + 1024 * 10 - 6400 * 10) / 1e6
    assert zoo.mflop(with_options(load_spec("fig2_left"), head_hidden=1024)) == pytest.approx(hidden)


@pytest.mark.data
def test_one_run_writes_json_and_a_plot(zoo, cifar_head, tmp_path, capsys, monkeypatch):
    import shutil

    from edgehebb.nnl.model import load_model, resolve_model

    monkeypatch.setenv("EDGEHEBB_CACHE", str(tmp_path / "cache"))   # not ~/.cache/edgehebb
    copy = tmp_path / "my-model"
    shutil.copytree(resolve_model("fig2_left-cifar10"), copy)
    out = tmp_path / "zoo" / "tradeoff.json"
    assert zoo.main(["fig2_left-cifar10", str(copy), "--data", str(cifar_head), "--limit", "20", "--rounds", "1",
                     "--reps", "1", "--batch", "4", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed and out.with_suffix(".png").is_file()
    rows = {r["model"]: r for r in printed["models"]}
    assert set(rows) == {"fig2_left-cifar10", "my-model"}
    # the same network twice: the same errors on the same 20 images, the same cost
    a, b = rows["fig2_left-cifar10"], rows["my-model"]
    assert a["test_error_clean"] == b["test_error_clean"] and a["test_error_shadowed"] == b["test_error_shadowed"]
    assert a["test_error_clean"] <= 0.6, a   # the shipped model: 24 % error on all 10,000, chance is 90 %
    assert a["mflop_per_frame"] == b["mflop_per_frame"] == pytest.approx(zoo.mflop(load_model(copy)[0].spec))
    assert a["images"] == 20 and a["features"] == 6400 and a["kind"] == "nnl"
    assert set(a["ms_per_frame"]) == {"1", "4"} and all(v > 0 for v in a["ms_per_frame"].values())
    assert [p["model"] for p in printed["paper"]] == ["paper fig2_left", "paper fig2_middle"]
