"""Verification sampling and slashing: proof of gradient projection (PROTOCOL.md 4 and 6).

Roles: ``verifier_ranks`` play HoloGrad's trusted coordinator/verifier; every other rank
is an untrusted worker whose claims (its (K,) row of scalars for a step) are sampled.

Per HoloGrad step, inside the exchange (after all rows are gathered, before they are
aggregated, so before the update of step t), on every rank:
1. rows with NaN/inf slash their rank (every rank sees the matrix: no messages);
2. the draw ``draw_claims(c_t, A, p_verify, workers)`` picks the claims to check, from
   randomness no rank can know when submitting, identical on every rank;
3. each drawn claimant sends its micro-batches to its verifier (point-to-point); the
   verifier checks their hash against the commitment, recomputes the scalars at theta_t
   with the same LightningModule code and judges |a - a*| <= atol + rtol |a*|;
4. verdicts are all-gathered; only verifier ranks' verdicts count. A rejected claim, a
   batch that does not match its hash, or a missing batch slashes the claimant: its row
   is excluded from this step's aggregation on every rank, and from every later step.
Every verification and slash is appended to a hash-chained ledger (JSONL written by
global rank 0, identical in memory on all ranks, saved in checkpoints).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback

from ..exchange import StepContext
from ..protocol import Ledger, NotEnoughRanksError, Reason, claim_digest, draw_claims, hash_batch, judge_claim

__all__ = ["ProofVerifier"]

log = logging.getLogger(__name__)


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
        slash: exclude ranks whose claim is rejected or whose scalars are not finite
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
        self._strategy: Any = None
        self._last_counted_step = 0

    # -- wiring ------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        exchange = getattr(trainer.strategy, "exchange", None)
        if exchange is None or not hasattr(trainer.strategy, "recompute_claim"):
            raise TypeError(f"ProofVerifier needs strategy='holograd', got {type(trainer.strategy).__name__}.")
        world = exchange.world_size
        bad = [r for r in self.verifier_ranks if r >= world]
        if bad:
            raise ValueError(f"verifier_ranks={list(self.verifier_ranks)} names ranks {bad} outside world_size={world}.")
        self._strategy = trainer.strategy
        exchange.review_hooks.append(self.review)
        self._open_ledger_file(trainer.is_global_zero)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        exchange = getattr(trainer.strategy, "exchange", None)
        if exchange is not None and self.review in exchange.review_hooks:
            exchange.review_hooks.remove(self.review)

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
        exchange = self._strategy.exchange
        assert ctx.matrix is not None
        workers = [r for r in range(exchange.world_size) if r not in self.verifier_ranks and r not in exchange.excluded]
        for rank in workers:  # (the aggregator drops non-finite rows for this step in any case)
            if self.slash and not bool(torch.isfinite(ctx.matrix[rank]).all()):
                self._slash(ctx, rank, Reason.NONFINITE, {"claim_digest": claim_digest(ctx.matrix[rank])})
        candidates = [r for r in workers if r not in exchange.excluded]
        drawn = draw_claims(ctx.commitment, ctx.matrix, self.p_verify, candidates)
        if drawn:
            for claimant, report in sorted(self._verify(ctx, drawn).items()):
                self._record(ctx, claimant, report)
        self._check_enough_ranks(ctx)

    def _verifier_of(self, claimant: int) -> int:
        return self.verifier_ranks[claimant % len(self.verifier_ranks)]

    def _verify(self, ctx: StepContext, drawn: list[int]) -> dict[int, dict[str, Any]]:
        """Move drawn claimants' batches to their verifiers, recompute, share the verdicts."""
        exchange, me = self._strategy.exchange, self._strategy.exchange.rank
        reports: dict[int, dict[str, Any]] = {}
        for claimant in drawn:
            verifier = self._verifier_of(claimant)
            if me == claimant:
                payload = [move_data_to_device(ctx.extras.get("inputs"), "cpu")]
                exchange.traffic.record("verification", "p2p", len(pickle.dumps(payload)))
                dist.send_object_list(payload, dst=verifier)
            elif me == verifier:
                payload = [None]
                dist.recv_object_list(payload, src=claimant)
                reports[claimant] = self._check(ctx, claimant, payload[0])
        gathered: list[Any] = [None] * exchange.world_size
        exchange.traffic.record("verification", "all_gather", len(pickle.dumps(reports)))
        dist.all_gather_object(gathered, reports)
        merged: dict[int, dict[str, Any]] = {}
        for rank in self.verifier_ranks:  # only trusted verdicts count
            merged.update({int(c): r for c, r in (gathered[rank] or {}).items() if self._verifier_of(int(c)) == rank})
        return merged

    def _check(self, ctx: StepContext, claimant: int, inputs: Any) -> dict[str, Any]:
        claimed = ctx.matrix[claimant]
        base = {"claim_digest": claim_digest(claimed), "recomputed_digest": None,
                "max_abs_error": None, "max_rel_error": None}
        if not inputs:
            return {**base, "accepted": False, "reason": Reason.MISSING.value}
        batches = [batch for batch, _ in inputs]
        if hash_batch(batches[0] if len(batches) == 1 else batches) != ctx.batch_hashes[claimant]:
            return {**base, "accepted": False, "reason": Reason.BATCH_HASH.value}
        device = self._strategy.root_device
        recomputed = self._strategy.recompute_claim(move_data_to_device(list(inputs), device), ctx.seeds)
        verdict = judge_claim(claimed, recomputed, self.rtol, self.atol)
        return {**base, "accepted": verdict.accepted, "reason": verdict.reason.value,
                "recomputed_digest": claim_digest(recomputed), "max_abs_error": verdict.max_abs_error,
                "max_rel_error": verdict.max_rel_error}

    def _record(self, ctx: StepContext, claimant: int, report: dict[str, Any]) -> None:
        self.verified += 1
        verdict = "accept" if report["accepted"] else "reject"
        fields = {k: v for k, v in report.items() if k != "accepted"}
        self.ledger.append(ctx.step, claimant, "verify", verdict=verdict, **fields)
        if report["accepted"]:
            self.claims_accepted[claimant] += 1
        elif self.slash:
            self._slash(ctx, claimant, Reason(report["reason"]), {"claim_digest": report["claim_digest"]})

    def _slash(self, ctx: StepContext, rank: int, reason: Reason, fields: dict[str, Any]) -> None:
        exchange = self._strategy.exchange
        if rank in exchange.excluded:
            return
        exchange.excluded.add(rank)
        self.slashed.append(rank)
        self.ledger.append(ctx.step, rank, "slash", reason=reason.value, **fields)
        log.warning("step %d: rank %d slashed (%s)", ctx.step, rank, reason.value)

    def _check_enough_ranks(self, ctx: StepContext) -> None:
        exchange = self._strategy.exchange
        honest = exchange.world_size - len(exchange.excluded)
        needed = exchange.aggregator.min_rows()
        if honest < needed:
            raise NotEnoughRanksError(
                f"step {ctx.step}: {honest} honest ranks remain (slashed: {sorted(exchange.excluded)}), but "
                f"{exchange.aggregator.name} aggregation needs {needed}; training cannot continue. HINT: the "
                f"ledger{' at ' + self.ledger_path if self.ledger_path else ''} lists every slash and its reason."
            )

    # -- accounting and logging ------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        exchange = trainer.strategy.exchange
        ctx = exchange.last_context
        if ctx is not None and ctx.step != self._last_counted_step:  # once per optimizer step
            self._last_counted_step = ctx.step
            served = ctx.result.kept_ranks if ctx.result is not None else [
                r for r in range(exchange.world_size) if r not in exchange.excluded]
            for rank in served:
                self.steps_served[rank] += 1
        pl_module.log_dict({
            "holograd/verified": float(self.verified),
            "holograd/slashed": float(len(self.slashed)),
            "holograd/honest_ranks": float(exchange.world_size - len(exchange.excluded)),
        }, on_step=True, on_epoch=False, batch_size=1)

    def credit(self) -> dict[int, dict[str, int]]:
        """Per-rank accounting: optimizer steps whose aggregate used the rank's row, accepted claims."""
        ranks = sorted(set(self.steps_served) | set(self.claims_accepted))
        return {r: {"steps_served": self.steps_served[r], "claims_accepted": self.claims_accepted[r]} for r in ranks}

    # -- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger.state_dict(),
            "ledger_head": self.ledger.head,
            "verified": self.verified,
            "slashed": list(self.slashed),
            "steps_served": dict(self.steps_served),
            "claims_accepted": dict(self.claims_accepted),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ledger = Ledger()
        ledger.load_state_dict(state["ledger"])
        if ledger.head != state["ledger_head"]:
            raise ValueError("checkpoint ledger does not end at its recorded head: records were removed.")
        self.ledger = ledger
        self.verified = int(state["verified"])
        self.slashed = [int(r) for r in state["slashed"]]
        self.steps_served = defaultdict(int, {int(k): int(v) for k, v in state["steps_served"].items()})
        self.claims_accepted = defaultdict(int, {int(k): int(v) for k, v in state["claims_accepted"].items()})
