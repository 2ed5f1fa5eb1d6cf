"""aggregation_path='sharded' end to end: the toy task fitted on real gloo ranks gives bitwise
the parameters of the all_gather path (docs/PROTOCOL.md §4.5), at N = 3, 4 and 8."""

from __future__ import annotations

import pytest
import torch
from replicas import assert_identical_replicas

from lightning_holograd import HoloGradStrategy
from lightning_holograd.demos import ToyModule, fit

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]


@pytest.mark.parametrize("world, aggregation", [(3, "median"), (4, "mean"), (8, "trimmed_mean")])
def test_sharded_fit_is_bitwise_the_all_gather_fit(tmp_path, world, aggregation):
    states = {}
    for path in ("all_gather", "sharded"):
        strategy = HoloGradStrategy(start_method="fork", num_directions=21, aggregation=aggregation, trim_ratio=0.2,
                                    aggregation_path=path)
        states[path] = fit(ToyModule(batch_size=8), strategy, tmp_path / path, devices=world, max_steps=3)
        assert_identical_replicas(states[path])
    for name, tensor in states["all_gather"][0]["params"].items():
        assert torch.equal(states["sharded"][0]["params"][name], tensor), name
    before = ToyModule().state_dict()
    assert any(not torch.equal(before[k], v) for k, v in states["sharded"][0]["params"].items())  # it trained
