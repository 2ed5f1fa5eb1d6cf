"""Local steps, protocol part (docs/PROTOCOL.md §9.2): the round batch hash, the outer
step and the public inner state at a round start."""

from __future__ import annotations

import pytest
import torch

from lightning_holograd.protocol import OuterStep, hash_batch, make_inner_state, round_batch_hash, step_batch_hash


def _batch(value: float) -> torch.Tensor:
    return torch.full((2,), value)


# -- round batch hash -----------------------------------------------------------------------


def test_round_hash_is_the_batch_encoding_of_the_inner_steps_lists():
    steps = [[_batch(1.0)], [_batch(2.0), _batch(3.0)]]
    assert round_batch_hash(steps) == hash_batch([[_batch(1.0)], [_batch(2.0), _batch(3.0)]])
    # what the verifier's check computes on the one (R, I) pair a claimant sends
    assert step_batch_hash([[[_batch(1.0)], [_batch(2.0), _batch(3.0)]]]) == round_batch_hash(steps)


def test_round_hash_binds_the_inner_step_boundaries_and_order():
    a, b, c = _batch(1.0), _batch(2.0), _batch(3.0)
    hashes = {round_batch_hash([[a], [b, c]]), round_batch_hash([[a, b], [c]]), round_batch_hash([[a, b, c]]),
              round_batch_hash([[b], [a, c]])}
    assert len(hashes) == 4


@pytest.mark.parametrize("steps", [[], [[]], [[_batch(1.0)], []]])
def test_round_hash_refuses_an_empty_step(steps):
    with pytest.raises(ValueError, match="at least one"):
        round_batch_hash(steps)


# -- outer step -------------------------------------------------------------------------------


def test_plain_averaging_moves_by_the_outer_lr():
    outer = OuterStep(lr=0.5)
    theta, delta = torch.tensor([1.0, 2.0]), torch.tensor([0.2, -0.4])
    assert torch.equal(outer.apply(theta, delta), torch.tensor([0.9, 2.2]))
    assert outer.velocity is None


def test_nesterov_matches_torch_sgd_on_the_pseudo_gradient():
    """theta_{r+1} = theta_r - lr (delta + mu u), u <- mu u + delta: torch's SGD(nesterov=True)
    with the pseudo-gradient as the gradient (the DiLoCo outer step)."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=gen)
    reference = theta.clone().requires_grad_(True)
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    outer = OuterStep(lr=0.7, momentum=0.9)
    for _ in range(4):
        delta = torch.randn(5, generator=gen)
        theta = outer.apply(theta, delta)
        reference.grad = delta.clone()
        sgd.step()
        assert torch.allclose(theta, reference.detach(), rtol=0, atol=1e-6)


def test_outer_state_round_trips():
    outer = OuterStep(lr=0.7, momentum=0.9)
    outer.apply(torch.zeros(3), torch.ones(3))
    again = OuterStep(lr=0.7, momentum=0.9)
    again.load_state_dict(outer.state_dict())
    assert torch.equal(again.apply(torch.zeros(3), torch.ones(3)), outer.apply(torch.zeros(3), torch.ones(3)))


@pytest.mark.parametrize("kwargs, message", [({"lr": 0.0}, "outer_lr=0.0"), ({"lr": True}, "outer_lr=True"),
                                             ({"momentum": 1.0}, "outer_momentum=1.0.*HINT")])
def test_outer_step_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OuterStep(**kwargs)


# -- inner state --------------------------------------------------------------------------------


def _adam(**kwargs) -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(3)),
              torch.nn.Parameter(torch.ones(4), requires_grad=False)]
    return torch.optim.AdamW(params, lr=0.1, **kwargs)


def _steps(optimizer: torch.optim.Optimizer, count: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(count):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()


def test_public_v_claims_the_mean_second_moment_of_each_trainable_tensor():
    optimizer, policy = _adam(), make_inner_state("public_v")
    assert policy.num_statistics(optimizer) == 2  # the frozen tensor has none
    _steps(optimizer, 3)
    trainable = [p for p in optimizer.param_groups[0]["params"] if p.requires_grad]
    expected = torch.stack([optimizer.state[p]["exp_avg_sq"].mean() for p in trainable])
    assert torch.equal(policy.statistics(optimizer), expected)


def test_public_v_round_start_is_a_function_of_public_values_only():
    """Two optimizers with different histories start the round from bitwise the same state:
    m = 0, v = the public value of the tensor, step = the inner steps of finished rounds."""
    policy, public = make_inner_state("public_v"), torch.tensor([0.25, 0.5])
    first, second = _adam(), _adam()
    _steps(first, 2)
    _steps(second, 5)
    for optimizer in (first, second):
        policy.start_round(optimizer, public, steps_done=8)
    for p, q, value in zip(first.param_groups[0]["params"][:2], second.param_groups[0]["params"][:2], (0.25, 0.5)):
        a, b = first.state[p], second.state[q]
        assert torch.equal(a["exp_avg"], torch.zeros_like(p))
        assert torch.equal(a["exp_avg_sq"], torch.full_like(p, value))
        assert all(torch.equal(a[key], b[key]) for key in ("step", "exp_avg", "exp_avg_sq"))
        assert a["step"].item() == 8.0 and a["step"].dtype == torch.float32 and a["step"].device.type == "cpu"
    assert len(first.state) == 2  # nothing for the frozen tensor


def test_public_v_first_round_starts_empty_and_the_state_keeps_working():
    optimizer, policy = _adam(), make_inner_state("public_v")
    _steps(optimizer, 2)
    policy.start_round(optimizer, None, steps_done=0)
    assert len(optimizer.state) == 0
    policy.start_round(optimizer, torch.tensor([1e-3, 1e-3]), steps_done=2)
    _steps(optimizer, 1)  # Adam continues from the edited state
    assert all(state["step"].item() == 3.0 for state in optimizer.state.values())


def test_reset_clears_any_optimizer():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    _steps(optimizer, 2)
    policy = make_inner_state("reset")
    assert policy.num_statistics(optimizer) == 0 and policy.statistics(optimizer).numel() == 0
    policy.start_round(optimizer, None, steps_done=2)
    assert len(optimizer.state) == 0


@pytest.mark.parametrize("optimizer, message", [
    (torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1), "optimizer is SGD.*HINT"),
    (torch.optim.Adam([torch.nn.Parameter(torch.ones(2))], amsgrad=True), "amsgrad=True.*HINT"),
])
def test_public_v_refuses_other_optimizers(optimizer, message):
    with pytest.raises(ValueError, match=message):
        make_inner_state("public_v").check(optimizer)


def test_private_keeps_any_optimizers_state_and_is_not_public():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    _steps(optimizer, 2)
    before = {k: v.clone() for k, v in next(iter(optimizer.state.values())).items() if torch.is_tensor(v)}
    policy = make_inner_state("private")
    policy.check(optimizer)  # any optimizer
    assert policy.num_statistics(optimizer) == 0 and policy.statistics(optimizer).numel() == 0
    policy.start_round(optimizer, None, steps_done=2)
    after = next(iter(optimizer.state.values()))
    assert before and all(torch.equal(after[k], v) for k, v in before.items())
    assert not policy.public and make_inner_state("public_v").public and make_inner_state("reset").public


def test_unknown_inner_state_is_refused():
    with pytest.raises(ValueError, match="inner_state='keep'.*HINT"):
        make_inner_state("keep")
