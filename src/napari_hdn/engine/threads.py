"""How many CPU threads torch uses, for every caller: the engine, the CLI and the widgets.

- :func:`at_most` caps the count for a block (``napari-hdn predict --threads``), and
  :func:`small_tensors` caps it at :data:`SMALL_TENSOR_THREADS` for noise-model fitting and its
  diagnostics;
- :func:`using` sets it for a block (a widget's worker thread);
- :func:`job_threads` is what a job started from the GUI gets: the user's setting, else every core
  but the one the GUI needs (:func:`default_job_threads`), or every core for a short job the user
  waits on while nothing else runs;
- :class:`ThreadGovernor` adapts the count of a training to a busy machine, and
  :class:`BusyMonitor` says when the machine is shared.

Why training needs a governor:

With every core running one of torch's OpenMP threads, a second CPU-heavy process makes each
parallel region wait for a descheduled thread: measured on a 2-core machine, two trainings side by
side with 2 threads each ran 4-19x slower per step than one alone, while with 1 thread each they ran
1.0-1.1x slower than one 1-thread job alone (and 1.6-1.9x slower than one 2-thread job alone).
Shorter OpenMP spinning (``OMP_WAIT_POLICY=PASSIVE`` or a small ``GOMP_SPINCOUNT``) also avoids the
collapse but costs 30-60% of the speed when the machine is quiet, every time.

:class:`ThreadGovernor` keeps the fast setting on a quiet machine and leaves it when it stops being
fast: it times every training step, now and then tries the neighbouring thread count for a couple
of steps, and keeps whichever is faster. A sudden slowdown (another job started) triggers a try at
once; tries of a setting that lost are spaced out further each time it loses again.
"""

from __future__ import annotations

import os
import statistics
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: threads for small tensors (binned noise-model fits, their mini-batches and diagnostics: a few
#: ten thousand elements): one is about as fast as several there, and it cannot collapse the way
#: spinning OpenMP threads do when other processes keep the cores busy
SMALL_TENSOR_THREADS = 1


@contextmanager
def at_most(n: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Cap torch's CPU threads at ``n`` for a block (restored after); nothing on other devices."""
    old = torch.get_num_threads()
    limit = torch.device(device).type == "cpu" and old > n
    if limit:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if limit:
            torch.set_num_threads(old)


def small_tensors(device: torch.device | str = "cpu"):
    """:func:`at_most` :data:`SMALL_TENSOR_THREADS`: for work on small tensors."""
    return at_most(SMALL_TENSOR_THREADS, device)


@contextmanager
def using(n: int) -> Iterator[None]:
    """Set torch's CPU threads to ``n`` for a block (per OS thread, as OpenMP's are); restored
    after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_job_threads() -> int:
    """Threads for a job started from a GUI: all cores but one (at least 1), at most torch's count.

    The GUI thread (and, without a GPU, OpenGL rendering) needs a core: OpenMP threads that wait
    for each other at every operation slow everything down when all cores are taken (figures:
    docs/lab-notes.md).
    """
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1))


def job_threads(chosen: int | None = None, *, interactive: bool = False,
                alone: bool = True) -> int:
    """Threads for the next job started from a GUI.

    ``chosen`` (the user's setting) wins. Otherwise long jobs (training, prediction, the levels'
    description) get :func:`default_job_threads`. A short job the user waits on (``interactive``,
    e.g. the artefact preview) gets every core when no other job runs (``alone``): the GUI thread
    idles while the user waits. With another job running it keeps to all cores but one, so the
    two never wait on each other's OpenMP threads.
    """
    if chosen:
        return chosen
    if interactive and alone:
        return max(1, torch.get_num_threads())
    return default_job_threads()


class ThreadGovernor:
    """Chooses torch's intra-op thread count from measured step times.

    Parameters
    ----------
    max_threads : int
        The largest count tried (default: torch's current count, normally the machine's cores).
    first_probe : int
        Steps before a count is first tried (and again after it won a try).
    max_interval : int
        The longest spacing (steps) between tries of a count that keeps losing.
    max_wait_s : float
        The longest time (seconds of steps) before the first try, however slow the steps: a
        machine that is busy from the start makes every step slow, and counting steps alone would
        then wait minutes. (Later tries are spaced by steps: a try of a count that loses costs a
        slow step, and on a busy machine the count that loses is very slow.)
    min_step_s : float
        Steps faster than this (median) are left alone: the thread count cannot matter much there,
        and timings that short are mostly noise. It also keeps short runs (tests, tiny images) on
        one fixed count, so that they repeat bit for bit.

    Call :meth:`observe` with the duration of every step; it sets the count for the next step.
    """

    def __init__(self, max_threads: int | None = None, first_probe: int = 20, max_interval: int = 320,
                 min_step_s: float = 0.05, max_wait_s: float = 20.0):
        n = max(1, int(max_threads or torch.get_num_threads()))
        ladder = [n]
        while ladder[-1] > 1:
            ladder.append(max(1, ladder[-1] // 2))
        self.ladder = ladder  # e.g. [8, 4, 2, 1] or [2, 1]
        self.first_probe, self.max_interval = first_probe, max_interval
        self.min_step_s, self.max_wait_s = min_step_s, max_wait_s
        self.waited_s = 0.0  # seconds of steps since the last change of count
        self.tries = 0
        self.times: dict[int, deque] = {k: deque(maxlen=7) for k in ladder}
        self.interval = {k: first_probe for k in ladder}
        self.history: list[tuple[int, int]] = []  # (step, threads) at every change
        self.current = n
        self.since_change = 0
        self._probe: list[float] | None = None  # step times of the count being tried
        self._back = n
        self._step = 0
        self._set(n)

    @property
    def active(self) -> bool:
        return len(self.ladder) > 1

    def _set(self, k: int) -> None:
        if k != torch.get_num_threads():
            torch.set_num_threads(k)
            self.history.append((self._step, k))
        self.current = k
        self.since_change = 0
        self.waited_s = 0.0

    def _neighbour(self) -> int:
        """The count to try next: fewer threads first (the remedy for a busy machine)."""
        i = self.ladder.index(self.current)
        return self.ladder[i + 1] if i + 1 < len(self.ladder) else self.ladder[i - 1]

    def observe(self, seconds: float) -> int:
        """Record the duration of the step just run; set the count for the next one. Returns it."""
        self._step += 1
        self.since_change += 1
        self.waited_s += seconds
        if not self.active:
            return self.current
        if self._probe is not None:
            self._probe.append(seconds)
            self._judge_probe()
            return self.current
        t = self.times[self.current]
        base = statistics.median(t) if len(t) >= 3 else None
        t.append(seconds)
        if (base if base is not None else seconds) < self.min_step_s:
            return self.current  # steps too short to matter (or to time reliably)
        # another job started (or stopped sharing): the figures no longer describe the machine
        sudden = base is not None and seconds > 2.0 * base and t[-2] > 2.0 * base
        if sudden:
            for d in self.times.values():
                d.clear()
            t.append(seconds)
        due = self.since_change >= self.interval[self._neighbour()] or (
            self.tries == 0 and self.waited_s >= self.max_wait_s and self.since_change >= 2)
        if sudden or due:
            self._back = self.current
            self._probe = []
            self.tries += 1
            self._set(self._neighbour())
        return self.current

    def _judge_probe(self) -> None:
        k, back, times = self.current, self._back, self._probe
        ref = statistics.median(self.times[back]) if self.times[back] else None
        # a try that is clearly slower is ended after one step; otherwise two steps decide
        if ref is not None and len(times) < 2 and times[0] < 1.5 * ref:
            return
        self._probe = None
        self.times[k].extend(times)
        if ref is not None and min(times) < 0.9 * ref:
            self.interval[back] = min(2 * self.interval[back], self.max_interval)
            self.interval[k] = self.first_probe
            self.since_change, self.waited_s = 0, 0.0  # stay with k
        else:
            self.interval[k] = min(2 * self.interval[k], self.max_interval)
            self._set(back)


class BusyMonitor:
    """Notices other processes keeping this machine's cores busy while a job runs.

    Linux only (``/proc/stat``; elsewhere :meth:`poll` always returns None). Every ``every_s``
    seconds :meth:`poll` compares the CPU time all processes used with what this process used: the
    rest is other work competing for the same cores. Two CPU-heavy jobs on the same cores slow each
    other 5-40x when both run as many threads as there are cores (OpenMP threads spin waiting for
    each other), so a user should know when the machine is shared. :meth:`poll` returns a message
    the first time the other work reaches ``threshold`` cores (and again if it grows by a core).
    """

    def __init__(self, every_s: float = 10.0, threshold: float = 0.5) -> None:
        self.every_s, self.threshold = every_s, threshold
        self.cores = os.cpu_count() or 1
        self.load: float | None = None  # other processes' load in cores over the last window
        self._said = 0.0
        self._last = self._sample()

    @staticmethod
    def _sample():
        import time

        try:
            with open("/proc/stat") as fh:
                fields = fh.readline().split()[1:]
        except OSError:
            return None
        if len(fields) < 4:
            return None
        v = [int(x) for x in fields[:8]]
        busy = v[0] + v[1] + v[2] + sum(v[5:8])  # user nice system irq softirq steal
        t = os.times()
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), t.user + t.system

    def poll(self) -> str | None:
        """A message when other work is competing for the cores (see the class), else None."""
        import time

        if self._last is None or time.monotonic() - self._last[0] < self.every_s:
            return None
        now = self._sample()
        if now is None:
            return None
        dt = now[0] - self._last[0]
        other = max(0.0, ((now[1] - self._last[1]) - (now[2] - self._last[2])) / dt)
        self._last = now
        self.load = other
        if other < self.threshold or other < self._said + 1.0:
            return None
        self._said = other
        return (f"other processes are keeping about {other:.1f} of this machine's {self.cores} "
                "cores busy, so this job runs slower than on a quiet machine (two jobs that each "
                "use every core can slow each other 5-40x); napari-hdn adapts its thread count "
                f"(now {torch.get_num_threads()})")
