"""Local steps under Lightning Fabric: real 2-process loops (fork, gloo, CPU).

The loop of test_fabric.py without accumulation: the toy task's MLP (D = 178), AdamW with
``inner_state="public_v"``, one optimizer step per batch, 8 steps per epoch per rank
(256 samples, 2 ranks, batch 16). Rounds of H inner steps exchange the pseudo-gradient
once (docs/PROTOCOL.md §9.2); the ranks' parameters agree at round boundaries only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.accelerators import CPUAccelerator
from lightning.fabric.plugins.environments import LightningEnvironment
from test_fabric import identical, launch, ranks, toy_loop
from torch.utils.data import DataLoader

from lightning_holograd import HoloGradFabricStrategy
from lightning_holograd.demos import ToyModule, make_dataset
from lightning_holograd.strategies.checkpoint import STATE_KEY

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]


def strategy(local_steps: int = 4, **settings: Any) -> HoloGradFabricStrategy:
    return HoloGradFabricStrategy(start_method="fork", local_steps=local_steps, direction_groups="per_rank",
                                  **settings)


def round_loop(fabric: Fabric, out: Path, steps: int, load: Path | None = None, save_at: int | None = None,
               finish: bool = True) -> None:
    """``steps`` optimizer steps in total (counting those of a loaded checkpoint); saves a
    checkpoint after step ``save_at``; then ``finish_round`` (or not) and each rank's state."""
    model = ToyModule().net
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.03)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(DataLoader(make_dataset(), batch_size=16))
    done = fabric.load(load, {"model": model, "optimizer": optimizer})["step"] if load is not None else 0
    losses, metrics, saved_model = [], {}, None
    while done < steps:
        for x, y in loader:
            loss = torch.nn.functional.mse_loss(model(x), y)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
            metrics = fabric.strategy.pop_step_metrics() or metrics
            done += 1
            if done == save_at:
                fabric.save(out / "ckpt.pt", {"model": model, "optimizer": optimizer, "step": done})
                saved_model = {k: v.clone() for k, v in fabric.strategy.get_module_state_dict(model).items()}
            if done == steps:
                break
    with fabric.strategy.shared_parameters():
        shared = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finished = fabric.strategy.finish_round() if finish else None
    torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "shared": shared,
                "losses": losses, "metrics": metrics, "finished": finished, "saved_model": saved_model,
                "exchange": fabric.strategy.exchange.state_dict()}, out / f"rank{fabric.global_rank}.pt")


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_rounds_train_agree_at_boundaries_and_resume_bitwise(tmp_path):
    """H = 4, 32 inner steps: 8 exchanges (the chain counts rounds), identical replicas,
    the loss falls; 16 steps + fabric.save/fabric.load + 16 steps is bitwise the straight
    run (a save at a round boundary holds the outer momentum-free state and the public
    inner state of the next round)."""
    for name in ("straight", "first", "resumed"):
        (tmp_path / name).mkdir()
    launch(strategy(), round_loop, tmp_path / "straight", 32)
    straight = ranks(tmp_path / "straight")
    assert same(straight[0]["params"], straight[1]["params"])
    assert straight[0]["exchange"]["chain"]["step"] == 8
    assert straight[0]["finished"] is False  # 32 = 8 x 4: no round left open
    losses = straight[0]["losses"]
    assert sum(losses[-8:]) < 0.6 * sum(losses[:8]), losses
    assert straight[0]["metrics"]["holograd/bytes_per_round"] > 0
    launch(strategy(), round_loop, tmp_path / "first", 16, None, 16)
    saved = torch.load(tmp_path / "first" / "ckpt.pt", weights_only=True)
    assert saved[STATE_KEY]["rounds"]["steps_done"] == 16 and saved[STATE_KEY]["exchange"]["chain"]["step"] == 4
    launch(strategy(), round_loop, tmp_path / "resumed", 32, tmp_path / "first" / "ckpt.pt")
    resumed = ranks(tmp_path / "resumed")
    assert same(resumed[0]["params"], straight[0]["params"]) and same(resumed[1]["params"], straight[1]["params"])
    assert resumed[0]["exchange"]["chain"] == straight[0]["exchange"]["chain"]


def test_a_round_cut_short_is_finished_and_mid_round_state_is_shared(tmp_path):
    """H = 3, 10 inner steps: 3 full rounds and 1 step open. Mid-round the ranks' own
    parameters differ, while shared_parameters() and a checkpoint written after step 8
    (2 steps into round 3) hold the same round-start state on both ranks;
    finish_round() exchanges the open step, after which the replicas agree."""
    (tmp_path / "run").mkdir()
    launch(strategy(local_steps=3), round_loop, tmp_path / "run", 10, None, 8)
    states = ranks(tmp_path / "run")
    assert all(s["finished"] is True for s in states)
    assert states[0]["exchange"]["chain"]["step"] == 4  # 3 full rounds + the cut one
    assert same(states[0]["params"], states[1]["params"])
    assert same(states[0]["shared"], states[1]["shared"])  # theta_r of the open round
    assert not same(states[0]["shared"], states[0]["params"])  # ...which finish_round moved on from
    assert same(states[0]["saved_model"], states[1]["saved_model"])
    saved = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert same(saved["model"], states[0]["saved_model"])
    assert saved[STATE_KEY]["rounds"]["steps_done"] == 6  # the finished rounds only


def test_an_open_round_is_left_open_without_finish_round(tmp_path):
    """H = 3, 4 inner steps and no finish_round(): one round exchanged, the second's step
    is not, so each rank holds its own parameters."""
    (tmp_path / "run").mkdir()
    launch(strategy(local_steps=3), round_loop, tmp_path / "run", 4, None, None, False)
    states = ranks(tmp_path / "run")
    assert not same(states[0]["params"], states[1]["params"])
    assert states[0]["exchange"]["chain"]["step"] == 1


def test_teardown_names_an_open_round(caplog):
    fabric_strategy = strategy(local_steps=3)
    fabric_strategy._rounds = SimpleNamespace(in_round=True, steps=[[], []])  # 2 inner steps not exchanged
    fabric_strategy.cluster_environment = LightningEnvironment()  # as Fabric sets them before any teardown
    fabric_strategy.accelerator = CPUAccelerator()
    with caplog.at_level(logging.WARNING, logger="lightning_holograd.strategies.fabric"):
        fabric_strategy.teardown()
    assert "2 inner steps of the last local-steps round were never exchanged" in caplog.text
    assert "fabric.strategy.finish_round()" in caplog.text


@pytest.mark.parametrize("inner_state", ["reset", "private"])
def test_accumulation_and_any_optimizer_with_reset_or_private_inner_state(tmp_path, inner_state):
    """The loop of test_fabric.py (SGD, 2 micro-batches per
    step under no_backward_sync) with H = 2 and inner_state='reset' or 'private' (no
    verifier under Fabric): both micro-batches of each inner step are committed, 16 inner
    steps make 8 exchanges, the replicas agree and the loss falls."""
    launch(strategy(local_steps=2, inner_state=inner_state), toy_loop, tmp_path)
    states = ranks(tmp_path)
    assert identical(states)
    assert states[0]["exchange"]["chain"]["step"] == 8
    losses = states[0]["losses"]
    assert sum(losses[-4:]) < 0.6 * sum(losses[:4]), losses


def test_true_gradient_requests_need_one_step_rounds():
    fabric_strategy = strategy()
    fabric_strategy._rounds = object()  # what setup_module builds with local_steps > 1
    with pytest.raises(ValueError, match="true-gradient steps need local_steps=1, got local_steps=4.*HINT"):
        fabric_strategy.request_true_gradient()


def test_public_v_refuses_sgd_at_setup(tmp_path):
    with pytest.raises(Exception, match="inner_state='public_v' edits Adam.*HINT"):
        launch(strategy(), toy_loop, tmp_path)
