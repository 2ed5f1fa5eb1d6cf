"""Verification sampling and slashing: proof of gradient projection (docs/PROTOCOL.md §4 and §6).

Roles: ``verifier_ranks`` play HoloGrad's trusted coordinator/verifier; every other rank
is an untrusted worker whose claims (its (K,) row of scalars for a step) are sampled.

Per HoloGrad step, inside the exchange (after all rows are gathered, before they are
aggregated, so before the update of step t), on every rank:
1. a worker row with NaN/inf is always checked (every rank sees the matrix): the row is
   dropped for the step in any case, and the rank is slashed only if the recomputation
   is finite (it lied); an honest non-finite loss is a fault, not a lie;
2. the draw ``draw_claims(c_t, A, p_verify, workers)`` picks the finite claims to check,
   from randomness no rank can know when submitting, identical on every rank;
3. the engine's ``VerificationTransport`` moves each checked claimant's micro-batches to
   its verifier (a bundle, never a pickle; a claimant silent for ``transfer_timeout``
   seconds counts as ``missing``), which checks their hash against the commitment,
   recomputes the scalars at theta_t and judges |a - a*| <= atol + rtol |a*| (quantized
   rows, ``scalar_bits`` < 32: the levels a row within that tolerance could round to,
   docs/PROTOCOL.md §9.5); verdicts come back, and only verifier ranks' verdicts count;
4. a rejected claim, a batch that does not match its hash, or a missing batch slashes
   the claimant (``Slashing.slash``): its row is left out of this step's aggregation on
   every rank, and of every later step. More than ``max_slashed_fraction`` of the workers
   slashed stops training (``TooManySlashedError``).
Every verification and slash, and every true-gradient step (bootstrap/refresh, which
cannot be verified), is appended to a hash-chained ledger (JSONL written by global rank 0,
identical in memory on all ranks, saved in checkpoints). Its length and head are logged
every step as an anchor (``holograd/ledger_records``, ``holograd/ledger_head_0`` and
``_1``: 96 bits of the head). At the end of fit, rank zero reports the slashed ranks and why.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from ..engine import HoloGradExchange, StepContext
from ..engine.torch_private import DropoutNd
from ..protocol import Ledger, Reason, draw_claims, make_inner_state
from ..engine.audit import audit_block
from ..protocol.sharding import draw_audit_block, draw_sharded_claims

__all__ = ["ProofVerifier", "ledger_anchor_metrics", "stochastic_modules"]

log = logging.getLogger(__name__)


def ledger_anchor_metrics(ledger: Ledger) -> dict[str, float]:
    """The ledger's anchor as exact float64 metrics: its record count and the first 96 bits
    of its head hash, in two 48-bit integers (``Ledger.load(path, anchor=...)`` checks a file)."""
    return {"holograd/ledger_records": float(len(ledger)),
            "holograd/ledger_head_0": float(int(ledger.head[:12], 16)),
            "holograd/ledger_head_1": float(int(ledger.head[12:24], 16))}


def stochastic_modules(module: nn.Module) -> list[str]:
    """Names of the dropout layers that are active in training mode (p > 0)."""
    return [name or type(sub).__name__ for name, sub in module.named_modules()
            if isinstance(sub, DropoutNd) and sub.p > 0]


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
        rtol, atol: acceptance |a - a*| <= atol + rtol |a*| (with quantized scalars, the
            same tolerance on the float row before rounding, docs/PROTOCOL.md §9.5). On
            CPU in float32 an honest recomputation is bitwise exact, so the defaults never
            slash an honest CPU run.
            On GPUs, calibrate (README "Verification"): non-deterministic kernels make
            honest scalars differ slightly.
        verifier_ranks: trusted ranks that recompute claims (their own claims are not checked).
        ledger_path: JSONL file for the hash-chained ledger (written by global rank 0).
            Earlier contents that the resumed run does not continue are kept beside it
            as ``<ledger_path>.previous.<n>``, never overwritten.
        slash: slash ranks whose claim is rejected (False: record verdicts only, for
            detection-rate experiments).
        transfer_timeout: seconds a verifier waits for a drawn claimant's batches; a
            claimant that is not on time is slashed ``missing``. Set it above the batch
            size divided by the link's bandwidth.
        max_transfer_bytes: largest bundle of batches a verifier accepts (a larger one
            counts as missing).
        max_slashed_fraction: training stops once more than this fraction of the workers
            (ranks outside ``verifier_ranks``) is slashed (1.0: never).
    """

    def __init__(
        self,
        p_verify: float = 0.05,
        rtol: float = 1e-5,
        atol: float = 1e-6,
        verifier_ranks: Sequence[int] = (0,),
        ledger_path: str | None = None,
        slash: bool = True,
        transfer_timeout: float = 60.0,
        max_transfer_bytes: int = 1 << 30,
        max_slashed_fraction: float = 0.5,
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
        if not isinstance(transfer_timeout, (int, float)) or not transfer_timeout > 0:
            raise ValueError(f"transfer_timeout={transfer_timeout!r} must be a number of seconds > 0. HINT: 60.")
        if isinstance(max_transfer_bytes, bool) or not isinstance(max_transfer_bytes, int) or max_transfer_bytes < 1:
            raise ValueError(f"max_transfer_bytes={max_transfer_bytes!r} must be an integer >= 1. HINT: 1 << 30.")
        if not isinstance(max_slashed_fraction, (int, float)) or not 0.0 <= max_slashed_fraction <= 1.0:
            raise ValueError(f"max_slashed_fraction={max_slashed_fraction!r} must lie in [0, 1]. HINT: 0.5 stops "
                             "once more than half of the workers are slashed; 1.0 never stops.")
        self.transfer_timeout = float(transfer_timeout)
        self.max_transfer_bytes = max_transfer_bytes
        self.max_slashed_fraction = float(max_slashed_fraction)
        self.p_verify = float(p_verify)
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.verifier_ranks = verifier_ranks
        self.ledger_path = ledger_path
        self.slash = slash
        self.ledger = Ledger()
        self.verified = 0  # claims checked so far
        self.audited = 0  # block aggregates checked so far (sharded path)
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
        self._check_deterministic(pl_module)
        config = trainer.strategy.config
        if config.local_steps > 1 and not make_inner_state(config.inner_state).public:
            raise ValueError("ProofVerifier with inner_state='private': each rank's optimizer state is its own, so a "
                             "verifier cannot replay a claimant's round and every honest claim would fail. HINT: "
                             "inner_state='public_v' (Adam/AdamW) or 'reset' for verified training; 'private' is "
                             "for workers you trust.")
        if exchange.aggregation_path == "all_reduce":
            raise ValueError("ProofVerifier with aggregation_path='all_reduce': no rank sees a row it could check. "
                             "HINT: use aggregation_path='sharded' or 'auto' (sharded from 3 ranks on).")
        self._exchange = exchange
        exchange.verification.open(self.transfer_timeout, self.max_transfer_bytes)
        workers = world - len(self.verifier_ranks)
        if self.max_slashed_fraction < 1.0:
            exchange.slashing.max_slashed = math.floor(self.max_slashed_fraction * workers)
        exchange.review_hooks.append(self.review)
        exchange.block_review_hooks.append(self.audit)
        exchange.slashing.hooks.append(self._record_slash)
        self._open_ledger_file(trainer.is_global_zero)
        if exchange.resized_from is not None:  # resumed with another world size: on the record
            self.ledger.append(exchange.chain.step, -1, "resize", world_size_before=exchange.resized_from,
                               world_size=world, slashed=sorted(exchange.slashing.slashed))

    def _check_deterministic(self, pl_module: Any) -> None:
        """Dropout draws masks the verifier cannot reproduce: every honest claim would fail."""
        active = stochastic_modules(pl_module)
        if not active:
            return
        message = (f"ProofVerifier: the module has active dropout layers ({', '.join(active[:5])}"
                   f"{', ...' if len(active) > 5 else ''}); a verifier cannot reproduce a claimant's dropout masks, "
                   "so honest claims fail verification. HINT: set the dropout probabilities to 0 for verified "
                   "training (e.g. GPT2Module(dropout=0.0)), or use ProofVerifier(slash=False) with a tolerance "
                   "calibrated as in README 'Verification and slashing'.")
        if self.slash:
            raise ValueError(message)
        log.warning(message)

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        exchange = self._exchange
        if exchange is not None:
            if self.review in exchange.review_hooks:
                exchange.review_hooks.remove(self.review)
            if self.audit in exchange.block_review_hooks:
                exchange.block_review_hooks.remove(self.audit)
            if self._record_slash in exchange.slashing.hooks:
                exchange.slashing.hooks.remove(self._record_slash)

    def _open_ledger_file(self, writer: bool) -> None:
        """Rank 0 writes the ledger file: it continues the checkpoint's records, keeping any
        earlier file that does not end exactly there under a new name (``Ledger.open_file``)."""
        if not writer or self.ledger_path is None:
            return
        self.ledger = Ledger.open_file(self.ledger_path, self.ledger.records)

    # -- the review hook (every rank, inside the exchange) --------------------------------------
    def review(self, ctx: StepContext) -> None:
        exchange = self._exchange
        assert exchange is not None and (ctx.matrix is not None or ctx.sharded is not None)
        slashing = exchange.slashing
        workers = [r for r in slashing.honest_ranks() if r not in self.verifier_ranks]
        if ctx.sharded is None:
            finite = torch.isfinite(ctx.matrix).all(dim=1).tolist()
        else:  # the sharded path: rows are known by their commitments and flags (§4.5)
            finite = [r not in ctx.sharded.nonfinite for r in range(exchange.world_size)]
        nonfinite = [r for r in workers if not finite[r]]  # always checked: a fault, or a lie
        candidates = [r for r in workers if finite[r]]
        if ctx.sharded is None:
            drawn = draw_claims(ctx.commitment, ctx.matrix, self.p_verify, candidates)
        else:
            drawn = draw_sharded_claims(ctx.commitment, ctx.sharded.commitments, self.p_verify, candidates)
        drawn = sorted(set(drawn) | set(nonfinite))
        if drawn:
            reports = exchange.verification.verify(ctx, drawn, self.verifier_ranks, self.rtol, self.atol)
            for claimant, report in sorted(reports.items()):
                self._record_verdict(ctx, claimant, report)

    def audit(self, ctx: StepContext) -> None:
        """Sharded path: with probability p_verify, a verifier recomputes one drawn block's
        aggregate from its owner's received rows, checked against the row commitments (§6.12)."""
        exchange = self._exchange
        assert exchange is not None and ctx.sharded is not None and ctx.result is not None
        bounds = ctx.sharded.bounds
        block = draw_audit_block(ctx.commitment, ctx.sharded.commitments, ctx.result.scalars, self.p_verify,
                                 len(bounds))
        owner = None if block is None else ctx.sharded.owners[block]  # None: a group with every rank slashed
        if owner is None or bounds[block][0] == bounds[block][1] or owner in self.verifier_ranks:
            return
        findings = audit_block(exchange.verification, ctx, block, self.verifier_ranks,
                               exchange.sharding.aggregate_block)
        self.audited += 1
        for rank, reason in findings:
            if self.slash:
                exchange.slashing.slash(rank, reason, ctx.step, block=block)

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
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Rank zero says how many workers were slashed, which and why (console and loggers)."""
        summary = self.summary()
        if not trainer.is_global_zero:
            return
        if summary["slashed"]:
            log.warning("HoloGrad: %s", summary["text"])
        else:
            log.info("HoloGrad: %s", summary["text"])
        for logger in trainer.loggers:
            logger.log_hyperparams({"holograd/slashed_ranks": summary["slashed"],
                                    "holograd/slash_reasons": summary["reasons"]})
            logger.log_metrics({"holograd/slashed_total": float(len(summary["slashed"]))}, step=trainer.global_step)

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if trainer.is_global_zero and self.slashed:
            log.warning("HoloGrad: training stopped (%s); %s", type(exception).__name__, self.summary()["text"])

    def summary(self) -> dict[str, Any]:
        """The slashes of the run from the ledger: ranks, reasons (rank -> "reason at step t") and a sentence."""
        slashes = [r for r in self.ledger if r.event == "slash"]
        reasons = {r.rank: f"{r.data.get('reason')} at step {r.step}" for r in slashes}
        if not slashes:
            text = f"no rank was slashed ({self.verified} claims verified)."
        else:
            listed = "; ".join(f"rank {rank}: {why}" for rank, why in sorted(reasons.items()))
            text = (f"{len(slashes)} rank{'s' if len(slashes) > 1 else ''} slashed during the run ({listed}); "
                    f"{self.verified} claims verified. The ledger lists every verdict.")
        return {"slashed": sorted(reasons), "reasons": reasons, "text": text}

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        exchange = trainer.strategy.exchange
        ctx = exchange.last_context
        if ctx is not None and ctx.step != self._last_counted_step:  # once per optimizer step
            self._last_counted_step = ctx.step
            if ctx.result is not None:
                served = list(ctx.result.kept_ranks)
            else:  # a true-gradient step: the ranks whose gradients were averaged
                served = list(ctx.extras.get("contributors", exchange.slashing.honest_ranks()))
            for rank in served:
                self.steps_served[rank] += 1
            if ctx.true_gradient:  # not verifiable, but on the record (docs/PROTOCOL.md §6.9)
                self.ledger.append(ctx.step, -1, "true_gradient", ranks=served,
                                   nonfinite=list(ctx.extras.get("dropped", [])),
                                   gradient_digest=exchange.chain.last_scalars_digest.hex())
        pl_module.log_dict({
            "holograd/verified": float(self.verified),
            "holograd/slashed": float(len(self.slashed)),
            "holograd/honest_ranks": float(len(exchange.slashing.honest_ranks())),
        }, on_step=True, on_epoch=False, batch_size=1)
        if trainer.is_global_zero:  # straight to the loggers: self.log would round to float32
            for logger in trainer.loggers:
                logger.log_metrics(ledger_anchor_metrics(self.ledger), step=trainer.global_step - 1)

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
