"""Assertions on the per-rank states that ``lightning_holograd.demos.fit`` returns."""

from __future__ import annotations

from typing import Any

import torch


def assert_identical_replicas(states: list[dict[str, Any]]) -> None:
    reference = states[0]["params"]
    for rank, state in enumerate(states[1:], start=1):
        for name, tensor in state["params"].items():
            assert torch.equal(tensor, reference[name]), f"rank {rank} differs from rank 0 in {name}"


def max_param_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(float((a["params"][k].float() - b["params"][k].float()).abs().max()) for k in a["params"])
