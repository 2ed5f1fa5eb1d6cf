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


@pytest.mark.parametrize(("lr", "expected"), [(0.5, [0.9, 2.2]), (1.25, [0.75, 2.5])])
def test_plain_averaging_moves_by_the_outer_lr(lr, expected):
    """Below 1 the step shrinks the averaged pseudo-gradient; above 1 it extrapolates past the
    average of the ranks' inner trajectories (the 1.25 of the README's best >= 1000x run)."""
    outer = OuterStep(lr=lr)
    theta, delta = torch.tensor([1.0, 2.0]), torch.tensor([0.2, -0.4])
    assert torch.equal(outer.apply(theta, delta), torch.tensor(expected))
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


def test_lr_normalized_velocity_is_torch_sgd_on_the_pseudo_gradient_per_unit_lr():
    """outer_momentum_units="lr_normalized": g_r = delta_r / lambda_r, u <- mu u + g_r,
    theta -= eta lambda_r (g_r + mu u), i.e. torch's SGD(nesterov=True) on g_r with the lr
    eta lambda_r of each round; here lambda_r decays 4x per round, as at a schedule's end."""
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(5, generator=gen)
    reference = theta.clone().requires_grad_(True)
    sgd = torch.optim.SGD([reference], lr=1.0, momentum=0.8, nesterov=True)
    outer = OuterStep(lr=0.2, momentum=0.8, units="lr_normalized")
    for lam in (0.5, 0.125, 0.03125, 0.0078125):
        delta = lam * torch.randn(5, generator=gen)
        theta = outer.apply(theta, delta, lr_sum=lam)
        reference.grad = delta / lam
        sgd.param_groups[0]["lr"] = 0.2 * lam
        sgd.step()
        assert torch.allclose(theta, reference.detach(), rtol=0, atol=1e-6)


def test_both_units_step_alike_at_a_constant_lr_and_differ_when_it_decays():
    """The same pseudo-gradients: at a constant lambda the two velocities give the same
    steps (to rounding); when lambda falls, the per-unit-lr velocity's step shrinks with it
    while DiLoCo's keeps the older, larger pseudo-gradients at full weight."""
    plain, normal = OuterStep(0.2, 0.8), OuterStep(0.2, 0.8, units="lr_normalized")
    theta = torch.zeros(3)
    for _ in range(5):
        a, b = plain.apply(theta, torch.ones(3)), normal.apply(theta, torch.ones(3), lr_sum=0.3)
        assert torch.allclose(a, b, rtol=1e-6, atol=0)
    small = torch.full((3,), 0.01)  # lambda 100x smaller, the same per-unit-lr pseudo-gradient
    a, b = plain.apply(theta, small), normal.apply(theta, small, lr_sum=0.003)
    assert (a.abs() > 10 * b.abs()).all()


def test_lr_normalized_needs_the_rounds_lr_sum():
    outer = OuterStep(0.2, 0.8, units="lr_normalized")
    for bad in (None, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lr_sum"):
            outer.apply(torch.zeros(2), torch.ones(2), lr_sum=bad)
    assert torch.equal(outer.apply(torch.zeros(2), torch.ones(2), lr_sum=0.0), torch.full((2,), -0.2))
    assert outer.velocity is None  # a round with no inner lr leaves the velocity alone


@pytest.mark.parametrize("units", ["pseudo_gradient", "lr_normalized"])
def test_outer_state_round_trips(units):
    outer = OuterStep(lr=0.7, momentum=0.9, units=units)
    outer.apply(torch.zeros(3), torch.ones(3), lr_sum=0.5)
    again = OuterStep(lr=0.7, momentum=0.9, units=units)
    again.load_state_dict(outer.state_dict())
    assert torch.equal(again.apply(torch.zeros(3), torch.ones(3), lr_sum=0.5),
                       outer.apply(torch.zeros(3), torch.ones(3), lr_sum=0.5))


def test_a_velocity_in_other_units_is_refused_and_an_old_one_is_displacement():
    saved = OuterStep(0.7, 0.9)
    saved.apply(torch.zeros(3), torch.ones(3))
    state = saved.state_dict()
    with pytest.raises(ValueError, match="outer_momentum_units='pseudo_gradient'.*HINT"):
        OuterStep(0.7, 0.9, units="lr_normalized").load_state_dict(state)
    del state["units"]  # a checkpoint from before the setting
    again = OuterStep(0.7, 0.9)
    again.load_state_dict(state)
    assert torch.equal(again.velocity, saved.velocity)


@pytest.mark.parametrize("kwargs, message", [({"lr": 0.0}, "outer_lr=0.0"), ({"lr": True}, "outer_lr=True"),
                                             ({"momentum": 1.0}, "outer_momentum=1.0.*HINT"),
                                             ({"units": "displacement"}, "outer_momentum_units='displacement'.*HINT")])
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
