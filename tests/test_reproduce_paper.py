"""tools/reproduce_paper.py runs the rows it lists: on a small CIFAR-10 subset, the shipped models' recipes
(a plain and a whitened bank, the issue-24 head) go through learn, train and eval, and cached rows resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.data, pytest.mark.slow]


def test_the_shipped_rows_run_and_resume(cifar_head, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    monkeypatch.setenv("EDGEHEBB_CACHE", str(tmp_path / "cache"))   # not ~/.cache/edgehebb
    import reproduce_paper

    from edgehebb.nnl import load_model

    args = ["--data", str(cifar_head), "--out", str(tmp_path / "paper"), "--rows", "shipped-fig2_left,shipped-fig2_left_wide",
            "--limit", "200", "--test-limit", "100", "--learn-batch", "100", "--quiet", "--threads", "1"]
    monkeypatch.setattr(reproduce_paper, "rows", lambda real=reproduce_paper.rows: _small(real()))
    assert reproduce_paper.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["row"]: r for r in out}
    assert set(rows) == {"shipped-fig2_left", "shipped-fig2_left_wide"}
    wide, _ = load_model(tmp_path / "paper" / "models" / "shipped-fig2_left_wide")
    assert wide.blocks[0].whitening is not None
    left, _ = load_model(tmp_path / "paper" / "models" / "shipped-fig2_left")
    assert left.spec.head_hidden == 1024 and wide.spec.head_hidden == 512
    fit = json.loads((tmp_path / "paper" / "models" / "shipped-fig2_left" / "config.json").read_text())["fit"]
    assert fit["flip"] and fit["dropout"] == 0.5 and fit["schedule"] == "cosine" and "gamma-low" in fit["augment"]
    for r in rows.values():
        assert 0.1 <= r["val_accuracy"] <= 1.0 and r["test"]["clean"]["error"] < 0.9, r   # above chance on 100 images
    assert reproduce_paper.main(args) == 0   # cached: read back
    assert json.loads(capsys.readouterr().out) == out


def test_the_shipped_rows_train_as_the_shipped_models_record(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    import reproduce_paper

    from edgehebb.nnl import load_model

    table = reproduce_paper.rows()
    for row, shipped in (("shipped-fig2_left", "fig2_left-cifar10"), ("shipped-fig2_left_wide", "fig2_left_wide-cifar10")):
        net, config = load_model(shipped)
        recipe = table[row]["training"]
        assert recipe == {k: config["fit"][k] for k in recipe}, (row, recipe, config["fit"])
        unnamed = ("name", "description")
        assert ({k: v for k, v in table[row]["spec"].to_dict().items() if k not in unnamed}
                == {k: v for k, v in net.spec.to_dict().items() if k not in unnamed}), row


def _small(table: dict) -> dict:
    """The same rows with fewer filters and head epochs, so that a CI run takes seconds."""
    from edgehebb.nnl.spec import spec_from_dict

    small = {}
    for name in ("shipped-fig2_left", "shipped-fig2_left_wide"):
        how = dict(table[name])
        d = how["spec"].to_dict()
        d["blocks"] = [{**b, "filters": 32} for b in d["blocks"]]
        how["spec"] = spec_from_dict(d, name)
        how["training"] = {**how["training"], "epochs": 3, "lr": 1e-3}   # a faster step: 3 epochs only
        small[name] = how
    return small
