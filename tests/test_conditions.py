"""Camera conditions: identity at severity 0, deterministic per (seed, image index), each moving the
image the way its physical model says; the accuracy sweep over models and ``edgehebb eval --conditions``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgehebb.camera import conditions as cond
from edgehebb.cli import cli
from edgehebb.cli.options import CONDITION_NAMES
from edgehebb.camera.conditions import CONDITIONS, GAMMA, LUMA, apply_condition, cast_gains, tint_gains
from edgehebb.data import ImageSet
from edgehebb.errors import EdgehebbError
from edgehebb.evaluate.accuracy import evaluate_conditions, predict, save_conditions_png
from edgehebb.nnl.model import save_model
from edgehebb.nnl import NNLNet, spec_from_dict
from edgehebb.camera.shadow import apply_shadow

RANDOM = {"low-light", "gradient", "shadow"}   # the conditions that draw per-image random numbers


def linear(p) -> np.ndarray:
    return (np.asarray(p, np.float64) / 255.0) ** GAMMA


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """Textured colour images in 40..215 (nothing clips under mild conditions): gratings plus noise."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:32, 0:32]
    out = []
    for _ in range(24):
        a, f = rng.uniform(0, np.pi), rng.uniform(0.2, 1.0)
        wave = np.sin(f * (np.cos(a) * xx + np.sin(a) * yy) + rng.uniform(0, 6.3))
        img = 128 + 70 * wave[..., None] * rng.uniform(0.3, 1.0, 3) + rng.normal(0, 8, (32, 32, 3))
        out.append(np.clip(img, 40, 215).astype(np.uint8))
    return np.stack(out)


def mid(name: str) -> float:
    sweep = CONDITIONS[name].sweep
    return sweep[len(sweep) // 2]


# ---------------------------------------------------------------- every condition

def test_registry_describes_every_condition():
    assert CONDITION_NAMES == tuple(CONDITIONS)   # the CLI's help lists them without importing numpy
    for name, c in CONDITIONS.items():
        assert c.sweep[0] == 0 and list(c.sweep) == sorted(set(c.sweep)) and c.sweep[-1] <= c.most, name
        assert len(c.model) > 60 and c.unit, name
        json.dumps([c.describe(), *(c.level(s) for s in c.sweep)])   # JSON-ready


@pytest.mark.parametrize("name", list(CONDITIONS))
def test_severity_zero_is_the_identity_and_others_change_the_image(name, photos):
    out = apply_condition(photos, name, 0, seed=3)
    assert np.array_equal(out, photos) and out is not photos
    changed = apply_condition(photos, name, mid(name), seed=3)
    assert changed.dtype == np.uint8 and changed.shape == photos.shape
    assert (changed != photos).mean() > 0.05


@pytest.mark.parametrize("name", list(CONDITIONS))
def test_deterministic_and_independent_of_the_batch(name, photos, monkeypatch):
    s = mid(name)
    whole = apply_condition(photos, name, s, seed=5)
    assert np.array_equal(whole, apply_condition(photos, name, s, seed=5))
    parts = np.concatenate([apply_condition(photos[:7], name, s, seed=5),
                            apply_condition(photos[7:], name, s, seed=5, start=7)])
    assert np.array_equal(whole, parts)
    monkeypatch.setattr(cond, "_CHUNK", 5)   # the internal chunks too
    assert np.array_equal(whole, apply_condition(photos, name, s, seed=5))
    other = apply_condition(photos, name, s, seed=6)
    if name in RANDOM:
        assert all(not np.array_equal(whole[i], other[i]) for i in range(len(photos)))
    else:
        assert np.array_equal(whole, other)


# ---------------------------------------------------------------- each moves the image as its model says

def test_low_light_noise_grows_as_light_falls_and_matches_the_sensor_model():
    grey = np.full((40, 32, 32, 3), 128, np.uint8)
    stds = [apply_condition(grey, "low-light", s, seed=0).astype(float).std() for s in (2, 4, 6, 8, 10)]
    assert all(a < b for a, b in zip(stds, stds[1:])), stds
    s = 6   # ~34 electrons: no clipping at 0 or 1, so the linear statistics are the model's
    out = linear(apply_condition(grey, "low-light", s, seed=0))
    electrons = linear(128) * cond.FULL_WELL * 2.0 ** -s
    expected_std = np.sqrt(electrons + cond.READ_NOISE ** 2) * 2.0 ** s / cond.FULL_WELL
    assert out.std() == pytest.approx(expected_std, rel=0.1)
    assert out.mean() == pytest.approx(linear(128), rel=0.02)   # auto-gain restores the brightness


@pytest.mark.parametrize("name, severities", [("wb-warm", (50, 200, 300)), ("wb-cool", (25, 100)),
                                              ("tint-green", (0.5, 1.0)), ("tint-magenta", (0.5, 1.0))])
def test_casts_scale_channel_means_by_the_stated_luminance_neutral_gains(name, severities, photos):
    lin = linear(photos)
    for s in severities:
        gains = np.array(CONDITIONS[name].level(s)["gains"])
        assert LUMA @ gains == pytest.approx(1.0, abs=1e-3)   # a grey keeps its luminance
        out = linear(apply_condition(photos, name, s))
        ratio = out.mean((0, 1, 2)) / lin.mean((0, 1, 2))
        assert ratio == pytest.approx(gains, rel=0.02, abs=0.005), (s, ratio, gains)


def test_white_balance_gains_follow_the_colour_temperature():
    kelvin, gains = cast_gains(0)
    assert kelvin == pytest.approx(cond.REFERENCE_KELVIN) and gains == pytest.approx([1, 1, 1])
    assert cast_gains(200)[0] == pytest.approx(2827, abs=2)   # tungsten
    warm = [cast_gains(m)[1] for m in (50, 100, 200, 300)]
    assert all(a[0] / a[2] < b[0] / b[2] for a, b in zip(warm, warm[1:]))   # redder as the light warms
    cool = [cast_gains(-m)[1] for m in (25, 50, 100)]
    assert all(a[2] / a[0] < b[2] / b[0] for a, b in zip(cool, cool[1:]))   # bluer as it cools
    assert tint_gains(1)[1] > 1 > tint_gains(1)[0] == tint_gains(1)[2]
    assert tint_gains(-1)[1] < 1 < tint_gains(-1)[0]


def test_exposure_gain_clips_highlights_and_underexposure_loses_levels(photos):
    ramp = np.arange(256, dtype=np.uint8).reshape(1, 1, 256, 1).repeat(3, -1)
    over = apply_condition(ramp, "overexposure", 1)[0, 0, :, 0].astype(int)
    unclipped = (over < 255) & (np.arange(256) > 20)
    assert np.abs(over[unclipped] - np.arange(256)[unclipped] * 2 ** (1 / GAMMA)).max() <= 0.5 + 1e-9
    assert (over == 255).sum() == 256 - int(np.ceil(254.5 / 2 ** (1 / GAMMA)))   # everything above ~186 clips
    clipped = [(apply_condition(photos, "overexposure", s) == 255).mean() for s in (0.5, 1, 2, 3)]
    assert all(a < b for a, b in zip(clipped, clipped[1:]))
    under = apply_condition(ramp, "underexposure", 4)[0, 0, :, 0]
    assert under.max() == int(255 * 2 ** (-4 / GAMMA) + 0.5)
    levels = [len(np.unique(apply_condition(ramp, "underexposure", s))) for s in (0, 2, 4, 6, 8)]
    assert all(a > b for a, b in zip(levels, levels[1:]))


def test_gamma_keeps_black_and_white_and_moves_mid_tones(photos):
    ramp = np.arange(256, dtype=np.uint8).reshape(1, 1, 256, 1).repeat(3, -1)
    for name in ("gamma-high", "gamma-low"):
        for s in (0.5, 2):
            out = apply_condition(ramp, name, s)[0, 0, :, 0].astype(int)
            assert out[0] == 0 and out[255] == 255 and np.all(np.diff(out) >= 0)
    assert apply_condition(ramp, "gamma-high", 1)[0, 0, 128, 0] == round(255 * (128 / 255) ** 2)
    assert apply_condition(ramp, "gamma-low", 1)[0, 0, 128, 0] == round(255 * (128 / 255) ** 0.5)
    assert apply_condition(photos, "gamma-high", 1).mean() < photos.mean() < apply_condition(photos, "gamma-low", 1).mean()


def test_gradient_spans_the_stated_stops_in_a_direction_drawn_per_image():
    grey = np.full((30, 32, 32, 3), 60, np.uint8)   # dark enough that 2^(3/2) more light does not clip
    s = 3
    out = linear(apply_condition(grey, "gradient", s, seed=1))[..., 0]
    ratio = out.reshape(30, -1).max(1) / out.reshape(30, -1).min(1)
    # pixel centres fall just inside the corners the ramp is defined on
    assert np.all(ratio <= 2 ** s * 1.05) and np.all(ratio >= 2 ** (s * 0.85)), ratio
    assert np.exp(np.log(out).mean()) == pytest.approx(linear(60), rel=0.03)   # geometric mean kept
    dy, dx = np.mgrid[0:32, 0:32] - 15.5
    angles = np.arctan2((out * dy).sum((1, 2)), (out * dx).sum((1, 2)))   # towards the light
    assert len(set(np.floor(angles / (np.pi / 4)).astype(int))) >= 6   # directions vary from image to image


def test_vignette_darkens_corners_by_the_stated_stops():
    grey = np.full((1, 32, 32, 3), 200, np.uint8)
    for s in (1, 2, 4):
        out = linear(apply_condition(grey, "vignette", s))[0, ..., 0]
        def light(r2):   # r2: squared distance from the centre over the squared half-diagonal
            return 1 / (1 + (2 ** (s / 2) - 1) * r2) ** 2

        centre = out[15:17, 15:17].mean() / linear(200)
        corner = out[0, 0] / linear(200)
        assert centre == pytest.approx(light(0.5 / 512), rel=0.01) and centre > 0.98
        assert corner == pytest.approx(light(2 * 15.5 ** 2 / 512), rel=0.03)   # pixel (0, 0)'s centre
        assert 2.0 ** -s <= corner < 2.0 ** -(s * 0.85)


def test_jpeg_error_grows_as_quality_falls(photos):
    errors = [np.abs(apply_condition(photos, "jpeg", s).astype(int) - photos).mean() for s in (10, 50, 80, 95)]
    assert all(a < b for a, b in zip(errors, errors[1:])), errors
    assert CONDITIONS["jpeg"].level(25) == {"quality": 75}
    grey = apply_condition(photos[..., :1], "jpeg", 50)   # a monochrome camera's frames too
    assert grey.shape == photos[..., :1].shape and 0 < np.abs(grey.astype(int) - photos[..., :1]).mean() < 10


def test_shadow_is_the_papers_shadow(photos):
    for s in (0.3, 0.7):
        assert np.array_equal(apply_condition(photos, "shadow", s, seed=4), apply_shadow(photos, 1 - s, 0.8, seed=4))


# ---------------------------------------------------------------- user errors are one line

@pytest.mark.parametrize("call, message", [
    (lambda x: apply_condition(x, "fog", 1), "unknown camera condition 'fog'"),
    (lambda x: apply_condition(x, "low-light", -1), r"low-light severity must be a number in \[0, 16\]"),
    (lambda x: apply_condition(x, "low-light", float("nan")), "low-light severity"),
    (lambda x: apply_condition(x, "low-light", "dark"), "low-light severity"),
    (lambda x: apply_condition(x, "jpeg", 12.5), "jpeg severity must be a whole number"),
    (lambda x: apply_condition(x, "shadow", 1.5), "shadow severity"),
    (lambda x: apply_condition(x.astype(np.float32), "jpeg", 10), "must be uint8"),
    (lambda x: apply_condition(x[..., :2], "wb-warm", 10), "needs RGB images"),
    (lambda x: cond.select("low-light,,fog"), "unknown camera condition 'fog'"),
    (lambda x: cond.select(" , "), "no camera condition given"),
    (lambda x: cond.parse_sweep("low-light"), "expected NAME=S1,S2"),
    (lambda x: cond.parse_sweep("low-light=2,x"), "low-light severity"),
    (lambda x: cond.plan("jpeg", {"low-light": (2,)}), "severities given for low-light"),
])
def test_bad_names_and_severities_are_one_line_errors(call, message, photos):
    with pytest.raises(EdgehebbError, match=message) as e:
        call(photos[:2])
    assert "\n" not in str(e.value)


def test_sweeps_are_sorted_and_start_clean():
    assert cond.parse_sweep("jpeg=50, 10") == ("jpeg", (0.0, 10.0, 50.0))
    assert cond.plan("all") == {n: c.sweep for n, c in CONDITIONS.items()}


def test_halving_severity_interpolates_the_crossing():
    assert cond.halving_severity([0, 1, 2], [0.6, 0.4, 0.2], 0.6) == pytest.approx(1.5)
    assert cond.halving_severity([0, 2, 4], [0.6, 0.5, 0.4], 0.6) is None
    assert cond.halving_severity([0, 2], [0.6, 0.3], 0.6) == pytest.approx(2.0)
    assert cond.halving_severity([0, 2], [0.0, 0.0], 0.0) is None


# ---------------------------------------------------------------- the sweep over models, and the CLI

SPEC = {"name": "tiny", "input": [3, 16, 16], "classes": 3,
        "blocks": [{"kernel": 4, "filters": 12, "power": 4, "pool": 5, "pool_stride": 4}]}


def _test_set(n: int = 30) -> ImageSet:
    rng = np.random.default_rng(0)
    x = rng.integers(30, 220, (n, 16, 16, 3), dtype=np.uint8)
    x[np.arange(n) % 3 == 1, :, :, 0] //= 3   # something for the classes to tell apart
    return ImageSet(x, np.arange(n) % 3, ["a", "b", "c"], "synthetic")


@pytest.fixture
def model_dirs(tmp_path):
    out = []
    for k in range(2):
        torch.manual_seed(k)
        save_model(tmp_path / f"m{k}", NNLNet(spec_from_dict(SPEC), [torch.randn(12, 3, 4, 4)]), ["a", "b", "c"])
        out.append(tmp_path / f"m{k}")
    return out


def test_evaluate_conditions_reports_every_level_of_every_model(model_dirs, tmp_path):
    from edgehebb.nnl.model import load_model

    test = _test_set()
    net, config = load_model(model_dirs[0])
    r = evaluate_conditions({"first": (net, config["classes"]), "second": model_dirs[1]}, test, "low-light,jpeg",
                            sweeps={"jpeg": (50, 90)}, seed=2, progress=False)
    assert list(r["conditions"]) == ["low-light", "jpeg"] and r["seed"] == 2
    assert r["conditions"]["jpeg"]["severities"] == [0.0, 50.0, 90.0]
    assert [lv["quality"] for lv in r["conditions"]["jpeg"]["levels"]] == [100, 50, 10]
    assert r["conditions"]["low-light"]["params"]["full_well_electrons"] == cond.FULL_WELL
    for label in ("first", "second"):
        m = r["models"][label]
        for name, c in m["conditions"].items():
            assert c["levels"][0] == {"severity": 0.0, "accuracy": m["clean"]["accuracy"]}
            assert [lv["severity"] for lv in c["levels"]] == r["conditions"][name]["severities"]
            accs = [lv["accuracy"] for lv in c["levels"]]
            assert c["halved_at"] == cond.halving_severity(r["conditions"][name]["severities"], accs,
                                                           m["clean"]["accuracy"])
    expected = (predict(net, apply_condition(test.x, "jpeg", 90, seed=2)) == test.y).mean()
    assert r["models"]["first"]["conditions"]["jpeg"]["levels"][2]["accuracy"] == pytest.approx(expected)
    json.dumps(r)
    per = evaluate_conditions({"first": (net, config["classes"])}, test, ["wb-warm"], sweeps={"wb-warm": [100]},
                              per_class=True, progress=False)
    assert set(per["models"]["first"]["conditions"]["wb-warm"]["levels"][1]["per_class"]) == {"a", "b", "c"}
    save_conditions_png(r, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(EdgehebbError, match="classes"):
        evaluate_conditions({"x": (net, ["p", "q", "r"])}, test, "jpeg", progress=False)


def _data_dir(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    t = _test_set()
    np.savez(data / "test.npz", x=t.x, y=t.y, classes=np.array(t.classes))
    return data


def test_cli_eval_conditions_json_png_and_text(model_dirs, tmp_path):
    data = _data_dir(tmp_path)
    png = tmp_path / "out" / "cond.png"
    args = ["eval", *map(str, model_dirs), "--data", str(data), "--device", "cpu", "--conditions", "vignette,shadow",
            "--severities", "shadow=0.5,0.9", "--seed", "3", "--per-class", "--png", str(png), "--limit", "12"]
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["data"]["images"] == 12 and out["seed"] == 3
    assert set(out["models"]) == set(map(str, model_dirs))
    assert out["conditions"]["shadow"]["severities"] == [0.0, 0.5, 0.9]
    assert out["conditions"]["vignette"]["severities"] == list(CONDITIONS["vignette"].sweep)
    assert "per_class" in out["models"][str(model_dirs[0])]["conditions"]["shadow"]["levels"][1]
    assert png.read_bytes()[:4] == b"\x89PNG" and "wrote" in res.stderr
    text = CliRunner().invoke(cli, [*args[:2], *args[3:]])   # one model, text on stdout
    assert text.exit_code == 0, text.output
    assert "shadow" in text.stdout and "0.9: " in text.stdout and "halved" in text.stdout
    # one model directory and no --png: the picture goes beside the model
    res = CliRunner().invoke(cli, ["eval", str(model_dirs[0]), "--data", str(data), "--device", "cpu",
                                   "--conditions", "gamma-low", "--severities", "gamma-low=1"])
    assert res.exit_code == 0, res.output
    assert (model_dirs[0] / "conditions.png").is_file()


def test_cli_eval_draws_nothing_into_the_current_folder_unasked(model_dirs, tmp_path, monkeypatch):
    data = _data_dir(tmp_path)
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    for extra in (["--conditions", "gamma-low", "--severities", "gamma-low=1"], ["--limit", "6"]):
        res = CliRunner().invoke(cli, ["eval", *map(str, model_dirs), "--data", str(data), "--device", "cpu", *extra])
        assert res.exit_code == 0, res.output
        assert "wrote" not in res.stderr
    assert list(here.iterdir()) == [], "several models and no --png: no picture, and none in the current folder"


@pytest.mark.parametrize("extra, message", [
    (["--conditions", "fog"], "unknown camera condition 'fog'; expected one of: low-light"),
    (["--conditions", "jpeg", "--severities", "jpeg=101"], "jpeg severity must be a whole number in [0, 99]"),
    (["--conditions", "jpeg", "--severities", "shadow=0.5"], "severities given for shadow"),
    (["--conditions", "jpeg", "--severities", "jpeg"], "expected NAME=S1,S2"),
    (["--conditions", "all", "--intensity", "0.5", "--no-sweep"], "--intensity, --sweep/--no-sweep do not apply"),
    (["--seed", "3"], "--seed apply only with --conditions"),
    (["--severities", "jpeg=10", "--per-class"], "--severities, --per-class apply only with --conditions"),
])
def test_cli_eval_conditions_bad_input_fails_before_the_data(model_dirs, tmp_path, monkeypatch, extra, message):
    import edgehebb.data

    monkeypatch.setattr(edgehebb.data, "load_split", lambda *a, **k: pytest.fail("data read before the check"))
    res = CliRunner().invoke(cli, ["eval", str(model_dirs[0]), "--data", str(tmp_path), *extra])
    assert isinstance(res.exception, EdgehebbError), res.output
    assert message in str(res.exception) and "\n" not in str(res.exception)


def test_augment_is_seeded_per_image_and_applies_the_named_conditions(photos):
    from edgehebb.camera.augment import augment

    out, applied = augment(photos, "low-light,wb-warm", fraction=0.5, seed=3)
    again, same = augment(photos, ["low-light", "wb-warm"], fraction=0.5, seed=3)
    assert np.array_equal(out, again) and applied == same
    assert 0 < sum(a is not None for a in applied) < len(photos)   # 24 images at 0.5
    for i, a in enumerate(applied):
        if a is None:
            assert np.array_equal(out[i], photos[i])
        else:
            assert a[0] in ("low-light", "wb-warm") and a[1] in CONDITIONS[a[0]].sweep and a[1] > 0
            assert np.array_equal(out[i:i + 1], apply_condition(photos[i:i + 1], *a, seed=3, start=i))
    tail, tail_applied = augment(photos[10:], "low-light,wb-warm", fraction=0.5, seed=3, start=10)
    assert np.array_equal(tail, out[10:]) and tail_applied == applied[10:]   # batch-independent
    assert np.array_equal(augment(photos, "jpeg", fraction=0.0)[0], photos)
    with pytest.raises(EdgehebbError, match="fraction"):
        augment(photos, "jpeg", fraction=1.5)
