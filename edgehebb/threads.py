"""How many threads torch may use for CPU work: measured as the work runs, so shared cores do not stall it.

torch runs CPU ops on an OpenMP pool with one thread per core. On a machine whose cores are also
busy with other processes that is the worst choice: each op ends at a barrier where the threads spin
waiting for a peer that the scheduler has parked (on a loaded 2-core machine one thread ran a
learning step 5x faster than two). The best count depends on the load, which changes while a run
goes on, so :class:`ThreadTuner` times the work under each candidate count, keeps the fastest, and
tries the others again every ``reprobe_s`` seconds or as soon as the rate halves. ``--threads N``
(:func:`configure`) fixes the count instead.

Switching is safe for results: the learning step and the feature computation are bitwise
independent of the thread count (tests/test_threads.py), so a run that switches still resumes to
the same filters and caches the same features.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from edgehebb.errors import EdgehebbError

_requested: int | None = None   # set once by the CLI's --threads; None: measure


def configure(threads: int | None) -> None:
    """Fix the thread count of every later CPU learning and feature run in this process (None: measure)."""
    global _requested
    if threads is not None and threads < 1:
        raise EdgehebbError(f"--threads must be >= 1, got {threads}")
    _requested = threads


def requested() -> int | None:
    return _requested


@contextmanager
def configured(threads: int | None):
    """:func:`configure` for the length of a ``with`` block; a fixed count also holds for torch's other
    CPU work in the block (a classifier head's training), which no tuner measures."""
    import torch

    global _requested
    saved, saved_torch = _requested, torch.get_num_threads()
    configure(threads)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        _requested = saved
        torch.set_num_threads(saved_torch)


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def candidates(n_cores: int) -> list[int]:
    """1, powers of two below ``n_cores``, and ``n_cores``: few enough to probe cheaply."""
    out, k = {1, n_cores}, 2
    while k < n_cores:
        out.add(k)
        k *= 2
    return sorted(out)


class ThreadTuner:
    """Chooses torch's thread count unit of work by unit of work: ``choose()`` before, ``record()`` after.

    A probe round runs each candidate in turn, the current count first: the first unit after a
    switch is not measured (waking a parked pool costs something), then units are measured until
    ``probe_s`` seconds add up, and the fastest count wins. A candidate whose unit runs at less than
    half the best rate of the round is dropped after that one unit: on a loaded machine one step with
    too many threads costs as much as twenty with one. A new round starts every ``reprobe_s``
    seconds, or when the moving average of the rate falls below half of what the round measured,
    but not within ``min_gap_s`` of the last one. Use as a context manager: the caller's thread count
    is restored on exit.
    """

    def __init__(self, threads: int | None = None, *, n_cores: int | None = None, probe_s: float = 0.05,
                 reprobe_s: float = 30.0, min_gap_s: float = 5.0, clock=time.perf_counter):
        threads = requested() if threads is None else threads
        if threads is not None and threads < 1:
            raise EdgehebbError(f"threads must be >= 1, got {threads}")
        self.fixed = threads
        self.candidates = [threads] if threads is not None else candidates(n_cores or cores())
        self.probe_s, self.reprobe_s, self.min_gap_s, self.clock = probe_s, reprobe_s, min_gap_s, clock
        self.rates: dict[int, float] = {}     # the last round's rate (work per second) of each count
        self.units: dict[int, int] = {}       # units of work run at each count (the record in config.json)
        self.current = self.candidates[0]
        self._queue: list[int] = []           # counts still to measure in this round, the one running first
        self._round: dict[int, float] = {}
        self._probe = [0, 0.0, 0.0]           # units seen, seconds and work measured at the count running
        self._chosen_rate = self._recent = None
        self._chosen_at = clock()
        self._settling = False                # the first unit after a round's switch is not a fair sample
        self._saved: int | None = None
        if len(self.candidates) > 1:
            self._start_round()

    def __enter__(self) -> "ThreadTuner":
        import torch

        self._saved = torch.get_num_threads()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self._saved is not None:
            torch.set_num_threads(self._saved)

    def choose(self) -> int:
        """The thread count for the next unit of work, already set in torch."""
        import torch

        want = self._queue[0] if self._queue else self.current
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)
        return want

    def record(self, seconds: float, work: float = 1.0) -> None:
        """The unit just run under :meth:`choose`'s count took ``seconds`` for ``work`` (e.g. patches)."""
        n = self._queue[0] if self._queue else self.current
        self.units[n] = self.units.get(n, 0) + 1
        rate = work / max(seconds, 1e-12)
        if self._queue:
            self._record_probe(n, seconds, work, rate)
            return
        if self._settling:
            self._settling = False
            return
        self._recent = rate if self._recent is None else 0.9 * self._recent + 0.1 * rate
        since = self.clock() - self._chosen_at
        if len(self.candidates) > 1 and (since > self.reprobe_s
                                         or (since > self.min_gap_s and self._recent < 0.5 * self._chosen_rate)):
            self._start_round()   # the load changed, or may have: measure again

    def _start_round(self) -> None:
        self._queue = [self.current] + [c for c in self.candidates if c != self.current]
        self._round, self._probe = {}, [0, 0.0, 0.0]

    def _record_probe(self, n: int, seconds: float, work: float, rate: float) -> None:
        p = self._probe
        p[0] += 1
        if self._round and rate < 0.5 * max(self._round.values()):
            self._finish_probe(n, rate)           # clearly slower: one unit is proof enough
            return
        if p[0] > 1 or n == self.current:         # a switch's first unit pays for waking the pool
            p[1] += seconds
            p[2] += work
        if p[1] >= self.probe_s and p[2] > 0:
            self._finish_probe(n, p[2] / p[1])

    def _finish_probe(self, n: int, rate: float) -> None:
        self._round[n] = self.rates[n] = rate
        self._queue.pop(0)
        self._probe = [0, 0.0, 0.0]
        if not self._queue:
            best = max(self._round, key=self._round.get)
            self._settling = best != n
            self.current, self._chosen_rate, self._recent = best, self._round[best], None
            self._chosen_at = self.clock()

    def report(self) -> dict:
        """What config.json records: the setting, the cores, and how many units ran at each count."""
        used = max(self.units, key=self.units.get) if self.units else self.current
        return {"requested": "auto" if self.fixed is None else self.fixed, "cores": cores(), "used": used,
                "units_by_threads": {str(k): v for k, v in sorted(self.units.items())}}
