"""Threads: each thread's loop is a loop of its own, and the run's counters add them up exactly.

The rules of docs/architecture.md, "What an iteration is", applied to each thread alone:

- an evaluation loop (calls with no ``backward()`` or step between them) ends an iteration
  when a model is called again after 8 such calls *of that thread*: a thread calling its
  model ``n`` times ends ``n - 8`` iterations;
- a training step ends an iteration when the run's step (the furthest optimizer's) moves:
  optimizers stepped ``n`` times each make ``n`` steps and ``n`` such iterations, in any
  number of threads;
- a ``backward()`` ends one while no optimizer of the run has stepped yet.

What a single thread making the same calls would count is the sum over the threads of
these. Every iteration is counted once: the indices of ``IterationEnd`` run from 1 to the
clock, each once.
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch
from torch import nn

import gradguard
from gradguard.detector import Detector, on
from gradguard.detectors import DETECTORS
from gradguard.events import BackwardPost, IterationEnd

from .helpers import line_of

THREADS = 4
STREAK = 8  # calls of a model with no backward() or step between them that make an evaluation loop


class IterationLog(Detector):
    """Test double: records every ``IterationEnd``; consumes ``BackwardPost`` so that backward() calls are counted."""

    consumes = (IterationEnd, BackwardPost)

    def setup(self) -> None:
        self.ends: list[tuple[int, int, str]] = []

    @on(IterationEnd)
    def _end(self, event):
        self.ends.append((event.index, event.step, event.by))

    @on(BackwardPost)
    def _backward(self, event):
        return None


@pytest.fixture
def installed():
    """``gradguard.install(policy="collect", ...)``, uninstalled after the test whatever happens."""
    guards = []

    def install(**kwargs):
        guard = gradguard.install(policy="collect", **kwargs)
        guards.append(guard)
        return guard

    yield install
    if guards and gradguard.installed() is guards[-1]:
        gradguard.uninstall()


@pytest.fixture
def switch_often():
    """Switch threads every few bytecodes, so that an unprotected read-modify-write shows."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def run_threads(work, n: int = THREADS) -> None:
    """Run ``work(i)`` in ``n`` threads at once; re-raise the first exception of any."""
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,), name=f"worker-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def assert_counted_once(log: IterationLog, clock: int) -> None:
    assert sorted(index for index, _, _ in log.ends) == list(range(1, clock + 1))


def evaluate(models: list[nn.Module], calls: int, barrier: threading.Barrier | None = None):
    """A worker: build a model of its own (discovered in its thread), call it ``calls`` times with no grad."""

    def work(i: int) -> None:
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        models[i] = model
        x = torch.ones(2, 4)
        with torch.no_grad():
            for _ in range(calls):
                if barrier is not None:
                    barrier.wait()
                model(x)

    return work


def test_evaluation_loops_in_lockstep_threads_count_as_each_thread_alone(installed):
    calls = 40
    log = IterationLog()
    guard = installed(detectors=[*DETECTORS, log])
    models: list[nn.Module] = [nn.Identity()] * THREADS
    run_threads(evaluate(models, calls, threading.Barrier(THREADS)))  # the threads' calls alternate
    known = guard.models()
    assert all(any(k is m for k in known) for m in models)
    assert guard.iteration == THREADS * calls
    assert guard.run.clock == THREADS * (calls - STREAK)
    assert {by for _, _, by in log.ends} == {"forward"}
    assert_counted_once(log, guard.run.clock)
    assert guard.findings == []


def test_evaluation_loops_in_free_running_threads_count_exactly(installed, switch_often):
    calls = 400
    log = IterationLog()
    guard = installed(detectors=[*DETECTORS, log])
    models: list[nn.Module] = [nn.Identity()] * THREADS
    run_threads(evaluate(models, calls))
    known = guard.models()
    assert len(known) == THREADS
    assert all(any(k is m for k in known) for m in models)
    assert guard.iteration == THREADS * calls
    assert guard.run.clock == THREADS * (calls - STREAK)
    assert_counted_once(log, guard.run.clock)
    assert guard.findings == []


def test_training_threads_step_once_per_step_of_the_furthest_optimizer(installed, switch_often):
    steps = 100
    log = IterationLog()
    guard = installed(detectors=[log])  # no detector reads gradients: the threads run fully at once
    models: list[nn.Module] = [nn.Identity()] * THREADS
    optimizers: list[torch.optim.Optimizer | None] = [None] * THREADS  # held: a guard holds them weakly

    def work(i: int) -> None:
        torch.manual_seed(i)
        model = models[i] = nn.Linear(4, 1)
        opt = optimizers[i] = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.randn(2, 4)
        for _ in range(steps):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    run_threads(work)
    known = guard.models()
    assert all(any(k is m for k in known) for m in models)
    assert len(guard.optimizers()) == THREADS
    assert guard.step == steps
    assert guard.iteration == THREADS * steps
    assert guard.run.backwards == THREADS * steps
    ended_by = [by for _, _, by in log.ends]
    assert sorted(step for _, step, by in log.ends if by == "step") == list(range(1, steps + 1))
    # the backward() calls that returned before any optimizer of the run stepped: one per thread at most
    assert 1 <= ended_by.count("backward") <= THREADS
    assert guard.run.clock == steps + ended_by.count("backward")
    assert_counted_once(log, guard.run.clock)


def correct_loop(model, opt, x, steps, lock):
    for _ in range(steps):
        out = model(x)
        with lock:
            opt.zero_grad()
            out.pow(2).mean().backward()
            opt.step()  # correct step


def loop_without_zero_grad(model, opt, x, steps, lock):
    for _ in range(steps):
        out = model(x)
        with lock:
            out.pow(2).mean().backward()
            opt.step()  # step without zero_grad


def test_a_mistake_in_one_thread_is_reported_and_none_in_the_others(installed):
    # The forwards run at once; backward() and step() take turns, as gradguard's checks read the
    # gradients of every optimizer's parameters, and torch lets no thread read a gradient that
    # another thread's backward() is writing.
    steps = 100
    log = IterationLog()
    guard = installed(detectors=["GG101", log])
    lock = threading.Lock()

    def work(i: int) -> None:
        torch.manual_seed(i)
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loop = loop_without_zero_grad if i == 0 else correct_loop
        loop(model, opt, torch.randn(2, 4), steps, lock)

    run_threads(work)
    assert guard.step == steps
    assert guard.iteration == THREADS * steps
    # the first backward() (no optimizer stepped yet) ends an iteration, then each step
    assert guard.run.clock == steps + 1
    assert_counted_once(log, guard.run.clock)
    (finding,) = guard.findings
    assert finding.code == "GG101"
    assert finding.location is not None
    assert finding.location.line == line_of("# step without zero_grad")


def test_a_replica_that_shares_a_watched_modules_hooks_is_not_another_model():
    # DataParallel calls copies of the module that share its hooks, each in a thread of its own
    # while the wrapper's forward runs: they are part of the wrapper's call, not models.
    model = nn.Linear(4, 1)
    with gradguard.Guard(model, policy="collect", detectors=[]) as guard:
        replica = model._replicate_for_data_parallel()  # what torch.nn.parallel.replicate() makes
        for name, param in model.named_parameters():
            setattr(replica, name, param.detach())
        run_threads(lambda i: replica(torch.ones(2, 4)), n=2)
        assert guard.models() == [model]
        assert guard.iteration == 0
        model(torch.ones(2, 4))
        assert guard.iteration == 1
