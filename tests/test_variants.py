"""tools/variants.py: the accuracy-variant runner is cached, resumable and refuses bad variants in one line."""

import json
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
TINY = {"input": [3, 16, 16], "classes": 3,
        "blocks": [{"kernel": 4, "filters": 6, "power": 10, "pool": 5, "pool_stride": 4}]}


@pytest.fixture
def run(tmp_path, monkeypatch):
    """run(data, items, *extra): tools/variants.py's exit status on a variants file of ``items``, writing to
    tmp_path/out; images it decodes are cached in tmp_path, not ~/.cache/edgehebb."""
    monkeypatch.syspath_prepend(str(TOOLS))
    monkeypatch.setenv("EDGEHEBB_CACHE", str(tmp_path / "cache"))
    import variants

    def run(data, items, *extra):
        file = tmp_path / "v.json"
        file.write_text(json.dumps(items))
        return variants.main([str(file), "--data", str(data), "--out", str(tmp_path / "out"),
                              "--learn-limit", "0", "--train-limit", "0", "--test-limit", "0", *extra])

    return run


@pytest.fixture
def gratings(tmp_path) -> Path:
    """train.npz (240) and test.npz (90): 3 classes of oriented gratings (tests/test_train.py)."""
    from tests.test_train import _grating_folder

    return _grating_folder(tmp_path / "gratings", 240, 90)


def test_rows_for_every_power_share_one_bank_and_one_pooled_map_and_rerun_from_cache(run, tmp_path, gratings, capsys):
    import numpy as np

    from edgehebb.data import load_split
    from edgehebb.io import load_filters
    from edgehebb.nnl import NNLNet, spec_from_dict
    from edgehebb.nnl.features import compute_features

    item = {"name": "plain", "spec": TINY, "learn": {"batch": 50, "init": "patches", "rank_by": "cosine"},
            "block": {"center": False}, "powers": [1, 10],
            "fit": {"epochs": 15, "lr": 0.01, "batch": 32, "val_fraction": 0.2}}
    assert run(gratings, [item]) == 0
    out = tmp_path / "out"
    rows = json.loads((out / "summary.json").read_text())
    assert [r["row"] for r in rows] == ["plain-n1", "plain-n10"]
    for r in rows:
        # measured 1.0 validation accuracy and 0 test and shadowed error for both rows (2026-12-04; chance is
        # 1/3): a floor of 0.9 and a ceiling of 0.1 (with p = 1 the binomial SE is 0: one error in ten fails)
        assert r["val_accuracy"] >= 0.9 and r["test_error"] <= 0.1 and r["shadowed_error"] <= 0.1, r
        assert r["banks"][0]["dead_fraction"] is not None and r["features"]["dim"] == 6 * 3 * 3
        assert r["settings"]["variant"]["learn"]["rank_by"] == "cosine"
    assert len(list((out / "banks").iterdir())) == 1 and len(list((out / "pooled").iterdir())) == 1
    # the one pooled map, raised to each n, is the features of the network with that n (ReLU^n commutes with
    # the max-pool): the shortcut every row's figures come from
    (bank_dir,) = (out / "banks").iterdir()
    (pooled,) = (out / "pooled").iterdir()
    test = load_split(gratings, "test", progress=False)
    with np.load(pooled) as z:
        maps = z["test"].astype(np.float64)
    for n in (1, 10):
        spec = spec_from_dict({**TINY, "blocks": [{**TINY["blocks"][0], "power": n, "center": False}]})
        want = compute_features(NNLNet(spec, [load_filters(bank_dir)[0]]), test.x, progress=False)
        np.testing.assert_allclose(maps ** n, want, rtol=1e-5, atol=1e-30, err_msg=f"n={n}")
    capsys.readouterr()
    assert run(gratings, [item]) == 0
    assert capsys.readouterr().err.count(": cached") == 2
    assert json.loads((out / "summary.json").read_text()) == rows
    # a changed head setting reruns the rows but reuses the bank and the pooled map
    assert run(gratings, [{**item, "fit": {**item["fit"], "epochs": 3}}]) == 0
    assert "cached" not in capsys.readouterr().err
    assert len(list((out / "banks").iterdir())) == 1 and len(list((out / "pooled").iterdir())) == 1


@pytest.mark.parametrize("item,message", [
    ({"name": "x", "colour": 1}, "unknown key"),
    ({"name": "x", "block": {"centre": False}}, "unknown block field"),
    ({"name": "x", "learn": {"deltaa": 0.1}}, "unknown learn field"),
    ({"name": "x", "fit": {"epoch": 3}}, "unknown fit field"),
    ({"name": "x", "powers": [0]}, "'powers' must be a list of numbers > 0"),
    ({"spec": TINY}, "non-empty 'name'"),
])
def test_bad_variants_are_one_line_errors(run, image_tree, capsys, item, message):
    assert run(image_tree, [{"spec": TINY, **item}]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and message in err and "\n" not in err


def test_the_op_options_get_their_own_pooled_maps(run, tmp_path, image_tree):
    base = {"spec": TINY, "learn": {"batch": 50, "init": "patches", "rank_by": "cosine"}, "fit": {"epochs": 1}}
    items = [{**base, "name": "off"}, {**base, "name": "sigma", "block": {"sigma": 0.5}},
             {**base, "name": "grey", "spec": {**TINY, "colour_norm": "gray-world"}}]
    assert run(image_tree, items) == 0
    out = tmp_path / "out"
    assert len(list((out / "banks").iterdir())) == 1 and len(list((out / "pooled").iterdir())) == 3
