"""Byzantine ranks for experiments and tests: lying claims through the claim-hook path.

The lies themselves are the pure functions of ``lightning_holograd.protocol.attacks``
(``random``, ``scale``, ``sign_flip``, ``alie``, ``ipm``; docs/PROTOCOL.md §4). This
callback decides who lies when, and installs the lie where an attacker controlling a
rank would: as a claim hook of the exchange.

``alie`` and ``ipm`` need an omniscient view of the honest rows, as does
``only_unverified``. The simulator provides it with one extra all_gather of every rank's
honest row per step, on every rank (all ranks install the hook so the collective is
matched; honest ranks submit their row unchanged). This side channel simulates the
standard omniscient-colluder threat model: it is not part of the protocol and is not
counted in the traffic meter. With direction groups (docs/PROTOCOL.md §9.1) rows of
different groups measure different directions, so ``alie`` and ``ipm`` use the honest
rows of the liar's own group, and need one there.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from ..engine import HoloGradExchange, StepContext
from ..protocol import ATTACK_NAMES, AttackName, attack_generator, attack_row, evasive_liars
from ..protocol.attacks import OMNISCIENT_ATTACKS
from ..protocol.quantize import requantize_row, requantize_rows
from ..protocol.sharding import draw_sharded_claims, row_commitments

__all__ = ["ByzantineSimulator"]

log = logging.getLogger(__name__)


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
        attack: one of ``protocol.ATTACK_NAMES`` (see ``lightning_holograd.protocol.attacks``).
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
        if attack not in ATTACK_NAMES:
            raise ValueError(f"attack={attack!r} is unknown. HINT: choose one of {', '.join(map(repr, ATTACK_NAMES))}.")
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
        return self.attack in OMNISCIENT_ATTACKS or self.only_unverified

    # -- installation ----------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        exchange = getattr(trainer.strategy, "exchange", None)
        if not isinstance(exchange, HoloGradExchange):
            raise TypeError(f"ByzantineSimulator needs strategy='holograd', got {type(trainer.strategy).__name__}.")
        world_size = exchange.comm.world_size
        outside = [r for r in self.ranks if r >= world_size]
        if outside:
            raise ValueError(f"ranks={list(self.ranks)} names ranks {outside} outside world_size={world_size}.")
        if len(self.ranks) >= world_size and self.attack in OMNISCIENT_ATTACKS:
            raise ValueError(f"attack={self.attack!r} needs at least one honest rank; ranks={list(self.ranks)} "
                             f"covers world_size={world_size}.")
        alone = [r for r in self.ranks if not self._honest_peers(r, world_size, exchange.num_groups)]
        if alone and self.attack in OMNISCIENT_ATTACKS:
            raise ValueError(
                f"attack={self.attack!r} forges a lie from the honest rows of the liar's direction group, but "
                f"ranks {alone} have no honest rank in their group ({exchange.num_groups} groups, rank i in group "
                "i mod G). HINT: use fewer direction_groups (each group with an honest rank), or the attacks "
                "'random', 'scale' or 'sign_flip'.")
        self._exchange = exchange
        exchange.claim_hooks.append(self.claim_hook)
        if exchange.comm.rank in self.ranks:
            log.info("ByzantineSimulator: rank %d submits %s claims from optimizer step %d%s", exchange.comm.rank,
                     self.attack, self.start_step, " when undrawn" if self.only_unverified else "")

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._uninstall()

    @override
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
        rank = exchange.comm.rank
        if not self.omniscient:
            if rank not in self.ranks:
                return scalars
            self.lies += 1
            return self.lie_for(ctx, rank, scalars, None).to(scalars.device, scalars.dtype)
        # The omniscient side channel: blocking, on every rank, not counted (kind=None).
        rows = exchange.comm.all_gather(scalars.to(torch.float32), kind=None).cpu()  # (N, K)
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
            honest = rows[self._honest_peers(rank, rows.shape[0], ctx.num_groups)]
        generator = attack_generator(ctx.commitment, rank) if self.attack == "random" else None
        return attack_row(self.attack, row, honest, scale=self.scale, alie_z=self.alie_z,
                          ipm_epsilon=self.ipm_epsilon, generator=generator)

    def _honest_peers(self, rank: int, world_size: int, num_groups: int) -> list[int]:
        """Ranks that do not lie in ``rank``'s direction group (rank i in group i mod G)."""
        return [r for r in range(rank % num_groups, world_size, num_groups) if r not in self.ranks]

    def liars(self, ctx: StepContext, rows: torch.Tensor) -> set[int]:
        """Attackers that lie this step without being drawn, identical on every rank
        (``protocol.evasive_liars`` on the honest rows ``rows`` (N, K), as decoded when
        quantized), under the draw of the path the step takes: on the ``sharded`` path the
        draw hashes the rows' commitments instead of the matrix (docs/PROTOCOL.md §4.5)."""
        exchange = self._exchange
        bits = 32 if exchange is None else exchange.scalar_bits
        if bits == 32:
            draw = None
            if exchange is not None and exchange.current_path() == "sharded":
                def draw(matrix: torch.Tensor, candidates: set[int]) -> list[int]:
                    return draw_sharded_claims(ctx.commitment, row_commitments(matrix, exchange.num_groups),
                                               self.p_verify, candidates)
            return evasive_liars(ctx.commitment, rows, self.ranks, lambda r: self.lie_for(ctx, r, rows[r], rows),
                                 self.p_verify, draw)
        # quantized scalars (docs/PROTOCOL.md §9.5): the draw sees the decoded rows
        k, block = exchange.family.num_directions, exchange.scalar_block
        submitted = requantize_rows(rows, ctx.commitment, k, bits, block)
        return evasive_liars(ctx.commitment, submitted, self.ranks, lambda r: requantize_row(
            self.lie_for(ctx, r, rows[r], rows), ctx.commitment, r, k, bits, block), self.p_verify)

    # -- checkpoint state ----------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"lies": self.lies, "held_back": self.held_back}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.lies = int(state_dict["lies"])
        self.held_back = int(state_dict["held_back"])
