"""`bench/asha_replay.py` replays Ray's ASHA rule; checked against Ray's own `ASHAScheduler`."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

BENCH = Path(__file__).resolve().parents[1] / "bench" / "asha_replay.py"


@pytest.fixture(scope="module")
def replay():
    spec = importlib.util.spec_from_file_location("asha_replay", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def epochs_under_ray(curves: np.ndarray, order, grace: int, reduction: int) -> list[int]:
    """Epochs each trial trains under Ray's ASHA, trials run one after another."""
    epochs = curves.shape[1]
    scheduler = ASHAScheduler(
        time_attr="epochs_completed", metric="score", mode="max", max_t=epochs,
        grace_period=grace, reduction_factor=reduction,
    )  # fmt: skip
    trained = []
    for number, index in enumerate(order):
        trial = SimpleNamespace(trial_id=f"t{number}")
        scheduler.on_trial_add(None, trial)
        for epoch, score in enumerate(curves[index], start=1):
            decision = scheduler.on_trial_result(None, trial, {"epochs_completed": epoch, "score": float(score)})
            if decision == TrialScheduler.STOP or epoch == epochs:
                trained.append(epoch)
                break
        scheduler.on_trial_complete(None, trial, {})
    return trained


@pytest.mark.parametrize(("grace", "reduction"), [(1, 2), (2, 3), (4, 2)])
def test_replayed_asha_stops_where_rays_scheduler_stops(replay, grace: int, reduction: int) -> None:
    rng = np.random.default_rng(grace * 10 + reduction)
    # Noisy rising curves, as validation scores are: some trials are stopped at every rung.
    curves = np.clip(rng.uniform(0.2, 0.5, (30, 1)) + np.cumsum(rng.normal(0.01, 0.03, (30, 16)), axis=1), 0, 1)
    order = rng.integers(len(curves), size=40)
    trained = epochs_under_ray(curves, order, grace, reduction)
    budget = sum(trained)
    trace = replay.asha_search(curves, order, budget, grace, reduction, window=1)

    expected = []  # best so far after each epoch, the trials' epochs as Ray's scheduler allowed them
    for index, epochs in zip(order, trained, strict=False):
        expected += [float(v) for v in curves[index][:epochs]]
    assert trace == pytest.approx(np.maximum.accumulate(expected).tolist())
    assert len(set(trained)) > 2  # stops at more than one rung, and trials that ran to the end


def test_a_second_random_search_is_the_yardstick(replay) -> None:
    # Trials that are all alike: whichever search draws, it reaches the same best at the same epoch.
    curves = np.tile(np.linspace(0.3, 0.6, 16), (10, 1))
    summary = replay.replay(curves, budget=64, grace=16, reduction=2, window=1, resamples=20, seed=0)
    assert summary["median_ratio"] == 1.0 and summary["share_never"] == 0.0
    assert replay.rungs(2, 3, 16) == [2, 6] and replay.rungs(2, 2, 16) == [2, 4, 8]
