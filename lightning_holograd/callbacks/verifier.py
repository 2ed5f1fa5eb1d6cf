"""Verification sampling and slashing: proof of gradient projection (docs/PROTOCOL.md §4 and §6).

Roles: ``verifier_ranks`` play HoloGrad's trusted coordinator/verifier; every other rank
is an untrusted worker whose claims (its (K,) row of scalars for a step) are sampled.

Per HoloGrad step, inside the exchange (after all rows are gathered, before they are
aggregated, so before the update of step t), on every rank:
1. rows with NaN/inf slash their rank (every rank sees the matrix: no messages);
2. the draw ``draw_claims(c_t, A, p_verify, workers)`` picks the claims to check, from
   randomness no rank can know when submitting, identical on every rank;
3. the engine's ``VerificationTransport`` moves each drawn claimant's micro-batches to its
   verifier, which checks their hash against the commitment, recomputes the scalars at
   theta_t and judges |a - a*| <= atol + rtol |a*|; verdicts are shared, and only verifier
   ranks' verdicts count;
4. a rejected claim, a batch that does not match its hash, or a missing batch slashes
   the claimant (``Slashing.slash``): its row is left out of this step's aggregation on
   every rank, and of every later step.
Every verification and slash is appended to a hash-chained ledger (JSONL written by
global rank 0, identical in memory on all ranks, saved in checkpoints).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from ..engine import HoloGradExchange, StepContext
from ..protocol import Ledger, Reason, claim_digest, draw_claims

__all__ = ["ProofVerifier"]


def _check_ledger_path(ledger_path: str | os.PathLike[str] | None) -> None:
    """Fail at construction, on every rank, for a path rank 0 could not create or write later."""
    if ledger_path is None:
        return
    path = Path(ledger_path).absolute()
    if path.is_dir():
        raise ValueError(f"ledger_path={str(ledger_path)!r} is a directory. HINT: name a file in it, e.g. "
                         f"ledger_path={str(Path(ledger_path) / 'ledger.jsonl')!r}.")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"ledger_path={str(ledger_path)!r} cannot be created: {str(ancestor)!r} is a file, not a "
                         "directory. HINT: choose a path whose parent folders are folders (or do not exist yet).")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"ledger_path={str(ledger_path)!r} cannot be created: {str(ancestor)!r} is not writable. "
                         "HINT: choose a writable folder.")


class ProofVerifier(Callback):
    """Sample worker claims with probability ``p_verify``, recompute them on a verifier
    rank, and slash ranks whose claims do not hold.

    Args:
        p_verify: probability that each worker claim of a step is checked; a rank cheating
            on m claims goes undetected with probability (1 - p_verify)^m.
        rtol, atol: acceptance |a - a*| <= atol + rtol |a*|. On CPU in float32 an honest
            recomputation is bitwise exact, so the defaults never slash an honest CPU run.
            On GPUs, calibrate (README "Verification"): non-deterministic kernels make
            honest scalars differ slightly.
        verifier_ranks: trusted ranks that recompute claims (their own claims are not checked).
        ledger_path: JSONL file for the hash-chained ledger (written by global rank 0).
        slash: slash ranks whose claim is rejected or whose scalars are not finite
            (False: record verdicts only, for detection-rate experiments).
    """

    def __init__(
        self,
        p_verify: float = 0.05,
        rtol: float = 1e-5,
        atol: float = 1e-6,
        verifier_ranks: Sequence[int] = (0,),
        ledger_path: str | None = None,
        slash: bool = True,
    ) -> None:
        if not isinstance(p_verify, (int, float)) or not 0.0 <= p_verify <= 1.0:
            raise ValueError(f"p_verify={p_verify!r} must lie in [0, 1]. HINT: 0.05 checks one claim in 20.")
        for name, value in (("rtol", rtol), ("atol", atol)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name}={value!r} must be a number >= 0.")
        verifier_ranks = tuple(int(r) for r in verifier_ranks)
        if not verifier_ranks or any(r < 0 for r in verifier_ranks) or len(set(verifier_ranks)) != len(verifier_ranks):
            raise ValueError(f"verifier_ranks={verifier_ranks!r} must be distinct ranks >= 0, at least one.")
        _check_ledger_path(ledger_path)
        self.p_verify = float(p_verify)
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.verifier_ranks = verifier_ranks
        self.ledger_path = ledger_path
        self.slash = slash
        self.ledger = Ledger()
        self.verified = 0  # claims checked so far
        self.slashed: list[int] = []  # ranks slashed so far, in order
        self.steps_served: dict[int, int] = defaultdict(int)
        self.claims_accepted: dict[int, int] = defaultdict(int)
        self._exchange: HoloGradExchange | None = None
        self._last_counted_step = 0

    # -- wiring ------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        exchange = getattr(trainer.strategy, "exchange", None)
        if not isinstance(exchange, HoloGradExchange):
            raise TypeError(f"ProofVerifier needs strategy='holograd', got {type(trainer.strategy).__name__}.")
        world = exchange.world_size
        bad = [r for r in self.verifier_ranks if r >= world]
        if bad:
            raise ValueError(f"verifier_ranks={list(self.verifier_ranks)} names ranks {bad} outside world_size={world}.")
        self._exchange = exchange
        exchange.review_hooks.append(self.review)
        exchange.slashing.hooks.append(self._record_slash)
        self._open_ledger_file(trainer.is_global_zero)

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        exchange = self._exchange
        if exchange is not None:
            if self.review in exchange.review_hooks:
                exchange.review_hooks.remove(self.review)
            if self._record_slash in exchange.slashing.hooks:
                exchange.slashing.hooks.remove(self._record_slash)

    def _open_ledger_file(self, writer: bool) -> None:
        """Rank 0 writes the ledger file; on resume it is rewritten from the checkpoint."""
        if not writer or self.ledger_path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.ledger_path)), exist_ok=True)
        if os.path.exists(self.ledger_path):
            os.replace(self.ledger_path, self.ledger_path + ".previous")  # never lose what was there
        records, self.ledger = self.ledger.records, Ledger(self.ledger_path)
        with open(self.ledger_path, "w", encoding="utf-8") as handle:
            handle.writelines(record.to_json() + "\n" for record in records)
        self.ledger.records = list(records)

    # -- the review hook (every rank, inside the exchange) --------------------------------------
    def review(self, ctx: StepContext) -> None:
        exchange = self._exchange
        assert exchange is not None and ctx.matrix is not None
        slashing = exchange.slashing
        workers = [r for r in slashing.honest_ranks() if r not in self.verifier_ranks]
        for rank in workers:  # (the aggregator drops non-finite rows for this step in any case)
            if self.slash and not bool(torch.isfinite(ctx.matrix[rank]).all()):
                slashing.slash(rank, Reason.NONFINITE, ctx.step, claim_digest=claim_digest(ctx.matrix[rank]))
        candidates = [r for r in workers if not slashing.is_slashed(r)]
        drawn = draw_claims(ctx.commitment, ctx.matrix, self.p_verify, candidates)
        if drawn:
            reports = exchange.verification.verify(ctx, drawn, self.verifier_ranks, self.rtol, self.atol)
            for claimant, report in sorted(reports.items()):
                self._record_verdict(ctx, claimant, report)

    def _record_verdict(self, ctx: StepContext, claimant: int, report: dict[str, Any]) -> None:
        self.verified += 1
        fields = {k: v for k, v in report.items() if k != "accepted"}
        self.ledger.append(ctx.step, claimant, "verify", verdict="accept" if report["accepted"] else "reject", **fields)
        if report["accepted"]:
            self.claims_accepted[claimant] += 1
        elif self.slash:
            assert self._exchange is not None
            self._exchange.slashing.slash(claimant, Reason(report["reason"]), ctx.step,
                                          claim_digest=report["claim_digest"])

    def _record_slash(self, rank: int, step: int, reason: Reason, fields: dict[str, Any]) -> None:
        """Slashing hook: every slash of the run goes into the ledger, on every rank."""
        self.slashed.append(rank)
        self.ledger.append(step, rank, "slash", reason=reason.value, **fields)

    # -- accounting and logging ------------------------------------------------------------------
    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        exchange = trainer.strategy.exchange
        ctx = exchange.last_context
        if ctx is not None and ctx.step != self._last_counted_step:  # once per optimizer step
            self._last_counted_step = ctx.step
            served = ctx.result.kept_ranks if ctx.result is not None else exchange.slashing.honest_ranks()
            for rank in served:
                self.steps_served[rank] += 1
        pl_module.log_dict({
            "holograd/verified": float(self.verified),
            "holograd/slashed": float(len(self.slashed)),
            "holograd/honest_ranks": float(len(exchange.slashing.honest_ranks())),
        }, on_step=True, on_epoch=False, batch_size=1)

    def credit(self) -> dict[int, dict[str, int]]:
        """Per-rank accounting: optimizer steps whose aggregate used the rank's row, accepted claims."""
        ranks = sorted(set(self.steps_served) | set(self.claims_accepted))
        return {r: {"steps_served": self.steps_served[r], "claims_accepted": self.claims_accepted[r]} for r in ranks}

    # -- checkpoint state ------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger.state_dict(),
            "ledger_head": self.ledger.head,
            "verified": self.verified,
            "slashed": list(self.slashed),
            "steps_served": dict(self.steps_served),
            "claims_accepted": dict(self.claims_accepted),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ledger = Ledger()
        ledger.load_state_dict(state_dict["ledger"])
        if ledger.head != state_dict["ledger_head"]:
            raise ValueError("checkpoint ledger does not end at its recorded head: records were removed.")
        self.ledger = ledger
        self.verified = int(state_dict["verified"])
        self.slashed = [int(r) for r in state_dict["slashed"]]
        self.steps_served = defaultdict(int, {int(k): int(v) for k, v in state_dict["steps_served"].items()})
        self.claims_accepted = defaultdict(int, {int(k): int(v) for k, v in state_dict["claims_accepted"].items()})
