"""The slow-link settings of ``benchmarks.frontier_runs.SLOWLINK`` (issue 11 §1-§2) build valid
strategies with this checkout's ``direction_groups`` and ``local_steps``, and one of them trains."""

from __future__ import annotations

import pytest

from benchmarks import baselines, frontier_runs
from lightning_holograd import HoloGradStrategy
from lightning_holograd.demos import ToyModule, fit


@pytest.mark.parametrize("name", list(frontier_runs.SLOWLINK))
def test_slowlink_runs_build_strategies_that_pass_the_setup_checks(name):
    spec = frontier_runs.SLOWLINK[name]
    assert frontier_runs.missing_features(spec) == []  # not "pending" on this checkout
    strategy, callbacks = baselines.build_strategy(spec)
    assert isinstance(strategy, HoloGradStrategy) and callbacks == []
    init = spec["init_args"]
    assert strategy.config.local_steps == init.get("local_steps", 1)
    assert strategy.config.direction_groups == init.get("direction_groups", 1)
    for ranks in (2, 4):  # the frontier's world sizes: the check setup runs once N is known
        expected = ranks if init.get("direction_groups") == "per_rank" else 1
        assert strategy.config.num_groups(ranks) == expected


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_slowlink_setting_trains_on_the_toy_task(tmp_path):
    """K = 4096 per rank, per-rank directions, H = 16 (with the worker's AdamW-like Adam):
    two rounds on 2 ranks, one chain step per round, identical replicas at the end."""
    spec = frontier_runs.SLOWLINK["sketch-4096-perrank-h16"]
    strategy = HoloGradStrategy(start_method="fork", **spec["init_args"])
    states = fit(ToyModule(adam=True), strategy, tmp_path, max_steps=32, max_epochs=-1)
    exchange = states[0]["exchange"]
    assert exchange["chain"]["step"] == 2 and exchange["traffic"]["steps"] == 32
    assert exchange["direction_groups"] == 2
    for name, tensor in states[0]["params"].items():
        assert (tensor == states[1]["params"][name]).all(), name
