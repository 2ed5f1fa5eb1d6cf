"""Byzantine ranks for experiments and tests: lying claims through the claim-hook path.

Symbols: N ranks, K scalars per claim, a (K,) the claim an honest rank would submit,
H (h, K) the honest rows of a step (ranks not in ``ranks``), mu and sigma their per-direction
mean and standard deviation.

Attacks on the row a of a Byzantine rank (``attack_row``):

- ``random``: Gaussian noise with the RMS of a, drawn from a generator seeded from the
  step commitment and the rank (reproducible, never the global RNG);
- ``scale``: c a (c = ``scale``, default -4: pushes a mean past zero for N = 4);
- ``sign_flip``: -a;
- ``alie`` ("a little is enough", Baruch et al., 2019): mu - z sigma per direction;
- ``ipm`` (inner-product manipulation, Xie et al., 2020): -epsilon mu.

``alie`` and ``ipm`` need an omniscient view of the honest rows, as does
``only_unverified``. The simulator provides it with one extra ``torch.distributed.all_gather``
of every rank's honest row per step, on every rank (all ranks install the hook so the
collective is matched; honest ranks submit their row unchanged). This side channel
simulates the standard omniscient-colluder threat model: it is not part of the protocol
and is not counted in the traffic meter.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from ..exchange import HoloGradExchange, StepContext
from ..protocol import draw_claims

__all__ = ["AttackName", "ByzantineSimulator", "attack_row", "attack_generator"]

log = logging.getLogger(__name__)

AttackName = Literal["random", "scale", "sign_flip", "alie", "ipm"]
_OMNISCIENT = ("alie", "ipm")
_SEED_TAG = b"holograd/byzantine"


def attack_generator(commitment: bytes, rank: int) -> torch.Generator:
    """Private CPU generator seeded from SHA256(tag || c_t || rank): same lie on every replay."""
    digest = hashlib.sha256(_SEED_TAG + commitment + rank.to_bytes(8, "little")).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def attack_row(
    attack: AttackName,
    row: torch.Tensor,
    honest_rows: torch.Tensor | None = None,
    *,
    scale: float = -4.0,
    alie_z: float = 1.5,
    ipm_epsilon: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The lie that replaces ``row`` (K,); ``honest_rows`` (h, K) for ``alie``/``ipm``,
    ``generator`` (CPU) for ``random``. Returns float32 (K,) on ``row``'s device.

    sigma is the unbiased standard deviation over the honest rows (0 when h = 1).
    """
    row = row.to(torch.float32)
    if attack == "scale":
        return row * scale
    if attack == "sign_flip":
        return -row
    if attack == "random":
        if generator is None:
            raise ValueError("attack='random' needs a generator. HINT: attack_generator(commitment, rank).")
        rms = row.pow(2).mean().sqrt()
        noise = torch.randn(row.shape, generator=generator, dtype=torch.float32)
        return (noise.to(row.device) * rms).to(torch.float32)
    if attack in _OMNISCIENT:
        if honest_rows is None or honest_rows.dim() != 2 or honest_rows.shape[0] == 0:
            raise ValueError(f"attack={attack!r} needs honest_rows of shape (h >= 1, K).")
        honest = honest_rows.to(device=row.device, dtype=torch.float32)
        mu = honest.mean(dim=0)  # (K,)
        if attack == "ipm":
            return -ipm_epsilon * mu
        sigma = honest.std(dim=0) if honest.shape[0] > 1 else torch.zeros_like(mu)  # (K,)
        return mu - alie_z * sigma
    raise ValueError(f"attack={attack!r} is unknown. HINT: choose one of {', '.join(map(repr, get_args(AttackName)))}.")


def _finite_number(name: str, value: Any, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise ValueError(f"{name}={value!r} must be a finite{' positive' if positive else ''} number.")
    return float(value)


class ByzantineSimulator(Callback):
    """Make ``ranks`` submit lying claims from optimizer step ``start_step`` (0-based) on.

    It changes only what those ranks submit, through ``exchange.claim_hooks`` (the path an
    attacker controlling a rank would use); aggregation, verification and the update are
    untouched. Installed on every rank in ``on_train_start``, removed in ``on_train_end``.

    Args:
        ranks: Byzantine ranks (colluding when several).
        attack: see the module docstring.
        start_step: first optimizer step (0-based) with lies; earlier steps are honest.
        scale, alie_z, ipm_epsilon: attack strengths (c, z, epsilon).
        only_unverified: lie only when the lie would not be drawn for verification at
            rate ``p_verify`` (evaluated with ``draw_claims`` on the matrix that would be
            submitted); otherwise submit honestly. Needs the omniscient side channel.
        p_verify: the verifier's rate, required (> 0) with ``only_unverified``.

    Call contract: the hook runs inside ``HoloGradExchange.step`` on every rank; when the
    side channel is needed it performs one blocking all_gather on every rank, so every
    rank must run this callback with the same arguments.
    """

    def __init__(
        self,
        ranks: list[int],
        attack: AttackName,
        start_step: int = 0,
        scale: float = -4.0,
        alie_z: float = 1.5,
        ipm_epsilon: float = 0.5,
        only_unverified: bool = False,
        p_verify: float = 0.0,
    ) -> None:
        if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence) or not ranks:
            raise ValueError(f"ranks={ranks!r} must be a non-empty list of ranks.")
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in ranks) or len(set(ranks)) != len(ranks):
            raise ValueError(f"ranks={list(ranks)!r} must be distinct integers >= 0.")
        if attack not in get_args(AttackName):
            raise ValueError(f"attack={attack!r} is unknown. HINT: choose one of "
                             f"{', '.join(map(repr, get_args(AttackName)))}.")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step={start_step!r} must be an integer >= 0 (an optimizer step index).")
        if not isinstance(only_unverified, bool):
            raise ValueError(f"only_unverified={only_unverified!r} must be True or False.")
        p_verify = _finite_number("p_verify", p_verify)
        if not 0.0 <= p_verify <= 1.0:
            raise ValueError(f"p_verify={p_verify!r} must lie in [0, 1].")
        if only_unverified and p_verify == 0.0:
            raise ValueError("only_unverified=True needs p_verify > 0. HINT: pass the verifier's p_verify.")
        if not only_unverified and p_verify != 0.0:
            raise ValueError(f"p_verify={p_verify!r} is only used with only_unverified=True. HINT: set "
                             "only_unverified=True, or leave p_verify at 0.")
        self.ranks = tuple(sorted(ranks))
        self.attack = attack
        self.start_step = start_step
        self.scale = _finite_number("scale", scale)
        self.alie_z = _finite_number("alie_z", alie_z, positive=True)
        self.ipm_epsilon = _finite_number("ipm_epsilon", ipm_epsilon, positive=True)
        self.only_unverified = only_unverified
        self.p_verify = p_verify
        self.lies = 0  # claims this rank replaced by a lie
        self.held_back = 0  # steps this rank submitted honestly to dodge the draw
        self._exchange: HoloGradExchange | None = None

    @property
    def omniscient(self) -> bool:
        return self.attack in _OMNISCIENT or self.only_unverified

    # -- installation ----------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        exchange = getattr(trainer.strategy, "exchange", None)
        if not isinstance(exchange, HoloGradExchange):
            raise TypeError(f"ByzantineSimulator needs strategy='holograd', got {type(trainer.strategy).__name__}.")
        outside = [r for r in self.ranks if r >= exchange.world_size]
        if outside:
            raise ValueError(f"ranks={list(self.ranks)} names ranks {outside} outside "
                             f"world_size={exchange.world_size}.")
        if len(self.ranks) >= exchange.world_size and self.attack in _OMNISCIENT:
            raise ValueError(f"attack={self.attack!r} needs at least one honest rank; ranks={list(self.ranks)} "
                             f"covers world_size={exchange.world_size}.")
        self._exchange = exchange
        exchange.claim_hooks.append(self.claim_hook)
        if exchange.rank in self.ranks:
            log.info("ByzantineSimulator: rank %d submits %s claims from optimizer step %d%s", exchange.rank,
                     self.attack, self.start_step, " when undrawn" if self.only_unverified else "")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._uninstall()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._uninstall()

    def _uninstall(self) -> None:
        if self._exchange is not None and self.claim_hook in self._exchange.claim_hooks:
            self._exchange.claim_hooks.remove(self.claim_hook)
        self._exchange = None

    # -- the hook ------------------------------------------------------------------------
    def claim_hook(self, ctx: StepContext, scalars: torch.Tensor) -> torch.Tensor:
        """Return this rank's claim for step ``ctx.step`` (1-based chain step)."""
        exchange = self._exchange
        assert exchange is not None
        if ctx.step - 1 < self.start_step:
            return scalars
        rank = exchange.rank
        if not self.omniscient:
            if rank not in self.ranks:
                return scalars
            self.lies += 1
            return self.lie_for(ctx, rank, scalars, None).to(scalars.device, scalars.dtype)
        rows = self._gather_honest_rows(exchange, scalars)  # (N, K) float32, CPU
        liars = self.liars(ctx, rows) if self.only_unverified else set(self.ranks)
        if rank not in self.ranks:
            return scalars
        if rank not in liars:
            self.held_back += 1
            return scalars
        self.lies += 1  # computed from the gathered CPU row: bitwise the lie liars() evaluated
        return self.lie_for(ctx, rank, rows[rank], rows).to(scalars.device, scalars.dtype)

    def lie_for(self, ctx: StepContext, rank: int, row: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """The lie of ``rank``; deterministic, so every rank can compute every attacker's lie."""
        honest = None
        if rows is not None:
            honest = rows[[r for r in range(rows.shape[0]) if r not in self.ranks]]
        generator = attack_generator(ctx.commitment, rank) if self.attack == "random" else None
        return attack_row(self.attack, row, honest, scale=self.scale, alie_z=self.alie_z,
                          ipm_epsilon=self.ipm_epsilon, generator=generator)

    def liars(self, ctx: StepContext, rows: torch.Tensor) -> set[int]:
        """Attackers that lie this step without being drawn, identical on every rank.

        Start from all attackers lying; drop those the draw would pick on the resulting
        matrix and redraw, until no liar is drawn (at most len(ranks) rounds). The final
        matrix is exactly the one submitted, so no liar in it is drawn.
        """
        liars = set(self.ranks)
        lies = {r: self.lie_for(ctx, r, rows[r], rows) for r in self.ranks}
        while liars:
            matrix = rows.clone()
            for r in liars:
                matrix[r] = lies[r]
            drawn = set(draw_claims(ctx.commitment, matrix, self.p_verify, candidates=liars))
            if not drawn:
                break
            liars -= drawn
        return liars

    @staticmethod
    def _gather_honest_rows(exchange: HoloGradExchange, scalars: torch.Tensor) -> torch.Tensor:
        """The omniscient side channel: every rank's honest row, (N, K) float32 on CPU.

        Blocking all_gather on every rank; simulation only, deliberately not recorded in
        ``exchange.traffic``.
        """
        local = scalars.detach().to(exchange.comm_device, torch.float32).contiguous()
        if not exchange.distributed:
            return local.unsqueeze(0).cpu()
        parts = [torch.empty_like(local) for _ in range(exchange.world_size)]
        dist.all_gather(parts, local, group=exchange.group)
        return torch.stack(parts).cpu()

    # -- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"lies": self.lies, "held_back": self.held_back}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.lies = int(state_dict["lies"])
        self.held_back = int(state_dict["held_back"])
