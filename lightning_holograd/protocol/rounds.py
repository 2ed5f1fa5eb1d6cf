"""Local steps: the round's batch hash, the outer step, and the inner optimizer state at a
round start (docs/PROTOCOL.md §9.2).

Symbols: H inner steps per round, theta_r (D,) the shared parameters at the start of
round r, theta_i^(H) rank i's parameters after its H inner steps, delta_i = theta_r -
theta_i^(H) its pseudo-gradient, delta_hat (D,) the estimate every rank rebuilds, eta the
outer learning rate, mu the outer (Nesterov) momentum, E the public statistics of the
inner optimizer state that each rank appends to its K scalars.

- Round batch hash: h_{r,i} = SHA256(enc(R)), R = [[b_{1,1}, ..., b_{1,m_1}], ...,
  [b_{H,1}, ..., b_{H,m_H}]] the list of the H inner steps' micro-batch lists, enc the
  batch encoding of docs/PROTOCOL.md §2.3 (``hash_batch``). The lists fix which
  micro-batches each inner step used.
- Outer step: theta_{r+1} = theta_r - eta * delta_hat (``outer_momentum`` = 0), or with
  Nesterov momentum u <- mu u + delta_hat, theta_{r+1} = theta_r - eta (delta_hat + mu u).
  u is public: every rank computes it from delta_hat. With ``outer_momentum_units =
  "lr_normalized"`` the velocity sums per-unit-lr pseudo-gradients instead: with lambda_r
  the round's summed inner learning rate (param group 0), g_r = delta_hat / lambda_r,
  u <- mu u + g_r, theta_{r+1} = theta_r - eta lambda_r (g_r + mu u), so the outer step
  follows the inner LR schedule as SGD momentum does (the same step at a constant lr).
- Inner state: a round starts from a state that is a function of public data only, so a
  verifier can replay any rank's round (``InnerState``); or, with ``private``, from the
  rank's own state at the end of its previous round (as local SGD keeps it), which no
  verifier can rebuild.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, get_args

import torch

from .chain import hash_batch

__all__ = [
    "INNER_STATE_NAMES",
    "InnerState",
    "InnerStateName",
    "OUTER_MOMENTUM_UNITS",
    "KeptInnerState",
    "OuterMomentumUnits",
    "OuterStep",
    "PublicSecondMoment",
    "ResetInnerState",
    "make_inner_state",
    "optimizer_trainable",
    "round_batch_hash",
]

InnerStateName = Literal["public_v", "reset", "private"]
INNER_STATE_NAMES: tuple[str, ...] = get_args(InnerStateName)
OuterMomentumUnits = Literal["pseudo_gradient", "lr_normalized"]
OUTER_MOMENTUM_UNITS: tuple[str, ...] = get_args(OuterMomentumUnits)


def round_batch_hash(steps: Sequence[Sequence[Any]]) -> bytes:
    """h_{r,i}: the hash of a round's micro-batches, one list per inner step, in order."""
    if not steps or any(not step for step in steps):
        raise ValueError("steps must hold at least one inner step, each with at least one micro-batch.")
    return hash_batch([list(step) for step in steps])


class OuterStep:
    """The outer update of the shared parameters; ``velocity`` (D,) is its public state.

    ``units``: what the velocity sums. "pseudo_gradient" (DiLoCo's): the rounds' delta_hat.
    "lr_normalized": delta_hat / lambda_r, lambda_r the round's summed inner learning rate,
    and each step is scaled back by the current round's lambda_r, so that when the inner
    LR decays the velocity's older, larger pseudo-gradients do not keep the outer step
    large (docs/PROTOCOL.md §9.2). Both give the same steps at a constant inner lr.
    """

    def __init__(self, lr: float = 1.0, momentum: float = 0.0, units: str = "pseudo_gradient") -> None:
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
            raise ValueError(f"outer_lr={lr!r} must be a number > 0. HINT: 1.0 applies the averaged pseudo-gradient.")
        if not isinstance(momentum, (int, float)) or isinstance(momentum, bool) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"outer_momentum={momentum!r} must lie in [0, 1). HINT: 0 is plain averaging; "
                             "DiLoCo uses Nesterov momentum 0.9 with outer_lr 0.7.")
        if units not in OUTER_MOMENTUM_UNITS:
            raise ValueError(f"outer_momentum_units={units!r} is unknown. HINT: choose one of "
                             f"{', '.join(map(repr, OUTER_MOMENTUM_UNITS))}.")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.units = units
        self.velocity: torch.Tensor | None = None  # (D,) float32, created at the first round

    def apply(self, theta: torch.Tensor, delta_hat: torch.Tensor, lr_sum: float | None = None) -> torch.Tensor:
        """theta_{r+1} (D,) float32 from theta_r and delta_hat; advances the velocity.
        ``lr_sum``: lambda_r, needed with units "lr_normalized" and momentum > 0."""
        step = delta_hat.to(torch.float32)
        if not self.momentum:
            return theta.to(torch.float32) - self.lr * step
        scale = 1.0
        if self.units == "lr_normalized":
            if lr_sum is None or not math.isfinite(lr_sum) or lr_sum < 0:
                raise ValueError(f"lr_sum={lr_sum!r}: outer_momentum_units='lr_normalized' needs the round's summed "
                                 "inner learning rate (a finite number >= 0).")
            if lr_sum == 0:  # no inner lr this round: nothing to normalise; the velocity waits
                return theta.to(torch.float32) - self.lr * step
            scale, step = lr_sum, step / lr_sum
        if self.velocity is None:
            self.velocity = torch.zeros_like(step)
        self.velocity.mul_(self.momentum).add_(step)
        return theta.to(torch.float32) - (self.lr * scale) * (step + self.momentum * self.velocity)

    def state_dict(self) -> dict[str, Any]:
        velocity = None if self.velocity is None else self.velocity.detach().cpu().clone()
        return {"lr": self.lr, "momentum": self.momentum, "units": self.units, "velocity": velocity}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> None:
        units = state.get("units", "pseudo_gradient")  # checkpoints before the setting: DiLoCo's units
        velocity = state.get("velocity")
        if velocity is not None and units != self.units:
            raise ValueError(f"the checkpoint's outer velocity is in outer_momentum_units={units!r}, this run uses "
                             f"{self.units!r}. HINT: resume with outer_momentum_units={units!r}.")
        self.velocity = None if velocity is None else velocity.to(device=device, dtype=torch.float32).clone()


class InnerState(abc.ABC):
    """How the user's (inner) optimizer state is set at a round start, from public data only.

    Call contract: every rank calls ``start_round`` at every round start with the same
    public values, so the state every round starts from is identical on every rank and
    a verifier can rebuild it. ``statistics`` is what this rank claims about its state
    at the end of its inner steps (E values appended to its K scalars; a verifier's
    replay recomputes them).
    """

    name: ClassVar[str]
    public: ClassVar[bool] = True  # a round's start state is a function of public data (replayable)

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise ValueError when ``optimizer`` cannot be used with this policy."""

    def num_statistics(self, optimizer: torch.optim.Optimizer) -> int:
        return 0

    def statistics(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """(E,) float32 on the CPU."""
        return torch.zeros(0, dtype=torch.float32)

    @abc.abstractmethod
    def start_round(self, optimizer: torch.optim.Optimizer, public: torch.Tensor | None, steps_done: int) -> None:
        """Set ``optimizer``'s state for a round start; ``public`` (E,) are the aggregated
        statistics of the previous round (None before the first), ``steps_done`` the
        inner steps of every finished round."""


class ResetInnerState(InnerState):
    """Every round starts from an empty state: any optimizer, nothing to transfer or claim."""

    name = "reset"

    def start_round(self, optimizer: torch.optim.Optimizer, public: torch.Tensor | None, steps_done: int) -> None:
        optimizer.state.clear()


class KeptInnerState(InnerState):
    """Every rank keeps its own optimizer state from round to round: any optimizer, nothing
    to transfer or claim, and the inner steps of local SGD. Not public: a verifier cannot
    rebuild a round's start state, so ``ProofVerifier`` refuses it."""

    name = "private"
    public = False

    def start_round(self, optimizer: torch.optim.Optimizer, public: torch.Tensor | None, steps_done: int) -> None:
        """Nothing: the state the rank's last inner step left stays."""


def optimizer_trainable(optimizer: torch.optim.Optimizer) -> list[tuple[dict[str, Any], torch.Tensor]]:
    """(param group, parameter) for every parameter of ``optimizer`` that requires grad, in
    order: the order of the public statistics (one per tensor)."""
    return [(group, p) for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


class PublicSecondMoment(InnerState):
    """Adam/AdamW: each round starts with m = 0, v = one public value per parameter tensor
    and the step count of the finished rounds.

    E = one value per trainable parameter tensor: the mean of this rank's v at the end of
    its inner steps (0 where the tensor has no state). The aggregated values (mean over
    ranks, or the run's robust aggregation) fill v at the next round start. Before the
    first round's statistics exist the state is empty, as for a fresh optimizer; a NaN
    public value (a tensor that was not trainable in the previous round) also leaves that
    tensor's state empty.
    """

    name = "public_v"

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Adam):  # AdamW is a subclass
            raise ValueError(
                f"inner_state='public_v' edits Adam's exp_avg/exp_avg_sq, but the optimizer is "
                f"{type(optimizer).__name__}. HINT: use torch.optim.Adam or AdamW, or inner_state='reset' "
                "(any optimizer, state cleared every round).")
        if any(group.get("amsgrad") for group in optimizer.param_groups):
            raise ValueError("inner_state='public_v' does not support amsgrad=True (its max_exp_avg_sq is "
                             "private). HINT: amsgrad=False, or inner_state='reset'.")

    def num_statistics(self, optimizer: torch.optim.Optimizer) -> int:
        return len(optimizer_trainable(optimizer))

    def statistics(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        values = []
        for _, p in optimizer_trainable(optimizer):
            sq = optimizer.state.get(p, {}).get("exp_avg_sq")
            values.append(sq.to(torch.float32).mean().cpu() if sq is not None else torch.zeros((), dtype=torch.float32))
        return torch.stack(values) if values else torch.zeros(0, dtype=torch.float32)

    def start_round(self, optimizer: torch.optim.Optimizer, public: torch.Tensor | None, steps_done: int) -> None:
        optimizer.state.clear()
        if public is None:
            return
        values = public.to(torch.float32).cpu().tolist()
        for (group, p), value in zip(optimizer_trainable(optimizer), values, strict=True):
            if value != value:  # NaN: no public value (the tensor was not trainable last round): fresh state
                continue
            fused, capturable = bool(group.get("fused")), bool(group.get("capturable"))
            scalar_dtype = torch.float32 if fused or torch.get_default_dtype() != torch.float64 else torch.float64
            step_device = p.device if fused or capturable else torch.device("cpu")
            optimizer.state[p] = {
                "step": torch.tensor(float(steps_done), dtype=scalar_dtype, device=step_device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.full_like(p, value, memory_format=torch.preserve_format),
            }


def make_inner_state(name: str) -> InnerState:
    if name == "public_v":
        return PublicSecondMoment()
    if name == "reset":
        return ResetInnerState()
    if name == "private":
        return KeptInnerState()
    raise ValueError(f"inner_state={name!r} is unknown. HINT: choose one of {', '.join(map(repr, INNER_STATE_NAMES))}.")
