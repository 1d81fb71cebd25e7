"""The thread policy: measured choice, re-measuring when the load changes, --threads, and results that do
not depend on the thread count (so a run may switch and still resume to the same filters)."""

import numpy as np
import pytest
import torch

from edgehebb import threads
from edgehebb.errors import EdgehebbError
from edgehebb.learn.loop import LearnConfig, learn
from edgehebb.threads import ThreadTuner


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run_units(tuner, seconds_at, units, clock=None):
    """Run ``units`` units; ``seconds_at[n]`` is how long one takes at n threads. Returns the counts used."""
    used = []
    for _ in range(units):
        n = tuner.choose()
        used.append(n)
        if clock is not None:
            clock.now += seconds_at[n]
        tuner.record(seconds_at[n], 1000)
    return used


def test_candidates():
    assert threads.candidates(1) == [1]
    assert threads.candidates(2) == [1, 2]
    assert threads.candidates(12) == [1, 2, 4, 8, 12]


def test_tuner_measures_each_count_and_keeps_the_fastest():
    with ThreadTuner(n_cores=2, probe_s=0.0) as tuner:
        used = run_units(tuner, {1: 0.002, 2: 0.010}, 20)   # a loaded machine: two threads spin
        assert used[:2] == [1, 2]                            # two is 5x slower: dropped after one unit
        assert set(used[2:]) == {1} and tuner.current == 1
        assert tuner.rates[1] == pytest.approx(500_000) and tuner.rates[2] == pytest.approx(100_000)
    with ThreadTuner(n_cores=2, probe_s=0.0) as tuner:
        used = run_units(tuner, {1: 0.004, 2: 0.002}, 20)   # a quiet one
        assert used[:3] == [1, 2, 2] and set(used[3:]) == {2}   # the switch's first unit is not measured
    with ThreadTuner(n_cores=2, probe_s=0.01) as tuner:
        assert run_units(tuner, {1: 0.004, 2: 0.003}, 10)[:7] == [1, 1, 1, 2, 2, 2, 2]   # until probe_s adds up


def test_tuner_measures_again_when_the_rate_halves_or_after_a_while():
    clock = Clock()
    with ThreadTuner(n_cores=2, probe_s=0.0, reprobe_s=30.0, clock=clock) as tuner:
        run_units(tuner, {1: 0.004, 2: 0.002}, 10, clock)
        assert tuner.current == 2
        # other jobs start: two threads become 6x slower than one; a new round once min_gap_s has passed
        used = run_units(tuner, {1: 0.004, 2: 0.024}, 300, clock)
        assert tuner.current == 1 and used[-5:] == [1] * 5 and used.count(2) < 230
        # they stop: nothing slows down, so only the periodic probe finds that two are faster again
        run_units(tuner, {1: 0.004, 2: 0.002}, 50, clock)
        assert tuner.current == 1
        clock.now += 31
        run_units(tuner, {1: 0.004, 2: 0.002}, 10, clock)
        assert tuner.current == 2


def test_fixed_threads_never_probe_and_the_callers_count_comes_back():
    before = torch.get_num_threads()
    with ThreadTuner(3, n_cores=2) as tuner:
        assert set(run_units(tuner, {3: 0.001}, 5)) == {3} and torch.get_num_threads() == 3
        assert tuner.report()["requested"] == 3 and tuner.report()["units_by_threads"] == {"3": 5}
    assert torch.get_num_threads() == before
    with pytest.raises(EdgehebbError, match="threads must be >= 1"):
        ThreadTuner(0)


def test_configured_sets_the_process_wide_count_for_a_block():
    assert threads.requested() is None
    with threads.configured(1):
        assert threads.requested() == 1 and ThreadTuner().fixed == 1
    assert threads.requested() is None and ThreadTuner().fixed is None


def test_learned_filters_do_not_depend_on_the_thread_count(monkeypatch):
    # the real sizes (K=400, B=1000), so that torch does split the ops between threads; 10 steps an epoch
    images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    cfg = LearnConfig(epochs=2)
    one = learn(images, cfg, threads=1, progress=False).weights
    two = learn(images, cfg, threads=2, progress=False).weights
    flips = iter(range(10 ** 6))

    def alternate(self):   # a tuner that switches on every step
        n = 1 + next(flips) % 2
        torch.set_num_threads(n)
        return n

    monkeypatch.setattr(ThreadTuner, "choose", alternate)
    switching = learn(images, cfg, progress=False).weights
    assert torch.equal(one, two) and torch.equal(one, switching)


def test_features_do_not_depend_on_the_thread_count():
    from edgehebb.nnl.features import compute_features
    from edgehebb.nnl import NNLNet, spec_from_dict

    spec = spec_from_dict({"name": "t", "input": [3, 16, 16], "classes": 3,
                           "blocks": [{"kernel": 4, "filters": 12, "power": 10, "pool": 5, "pool_stride": 4}]})
    net = NNLNet(spec, [torch.randn(12, 3, 4, 4, generator=torch.Generator().manual_seed(0))])
    x = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    a = compute_features(net, x, batch=8, threads=1, progress=False)
    b = compute_features(net, x, batch=8, threads=2, progress=False)
    assert np.array_equal(a, b)
