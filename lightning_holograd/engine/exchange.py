"""One HoloGrad exchange per optimizer step, over ``torch.distributed`` (no Lightning).

Symbols: N ranks (``world_size``), K scalars per rank and step, D trainable
coordinates. Per step, on every rank, in this order (docs/PROTOCOL.md §2-§4):

1. all_gather of the 32-byte batch hashes, each followed by one flag byte (N x 33
   bytes): bit 0 "this rank asks the job to stop" (SIGTERM; every rank raises
   ``StopRequested`` before the step, so the job ends at the same step everywhere), bit 1
   "this rank's gradient is non-finite" (true-gradient steps); -> chain.advance -> seeds;
2. a_i = ``project(seeds)`` (this rank's K scalars), passed through ``claim_hooks``
   (fault injection);
3. all_gather of the K scalars -> A (N, K);
4. ``review_hooks`` see A before aggregation (verification may slash ranks);
5. robust aggregation per direction without the slashed rows, then
   g_hat = family.reconstruct(a, seeds) (the family's synthesis followed by its state
   update), and chain.record_scalars(a).

Call contract: every rank calls ``step`` (or ``true_gradient_step``) once per optimizer
step, with its own gradient and batch hash; both block until all ranks arrive. A rank
that skips a step deadlocks the job. Slashed ranks keep taking part in the collectives,
their rows are left out, so all replicas stay identical.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..protocol import AggregationResult, Aggregator, CommitmentChain, DirectionFamily, hash_batch
from .comm import Comm
from .slashing import Slashing, remap_slashed
from .traffic import TrafficMeter
from .verification import Recompute, VerificationTransport

__all__ = ["HoloGradExchange", "NonFiniteError", "StepContext", "StopRequested", "ReplicaDivergenceError",
           "parameter_digest"]

log = logging.getLogger(__name__)

FLAG_STOP, FLAG_NONFINITE = 1, 2  # bits of the flag byte that follows each batch hash in the commit
STOP_EXIT_CODE = 128 + 15  # as a process ended by SIGTERM


_NONFINITE_HINT = ("HINT: lower the learning rate, clip gradients (Trainer(gradient_clip_val=...)), check the data "
                   "for NaN/inf, or use bf16 instead of fp16; resume from the last checkpoint.")


class ReplicaDivergenceError(RuntimeError):
    """Ranks hold different parameters although the protocol keeps them identical."""


class NonFiniteError(FloatingPointError):
    """The loss or gradient was non-finite on every rank that still counts: no step is possible."""


class StopRequested(SystemExit):
    """A rank asked the job to stop (SIGTERM); raised on every rank at the same step, before it."""

    def __init__(self, step: int, ranks: list[int]) -> None:
        super().__init__(STOP_EXIT_CODE)
        self.step, self.ranks = step, ranks

    def __str__(self) -> str:
        return f"step {self.step}: stopping, as rank(s) {self.ranks} asked (SIGTERM)"


@dataclass
class StepContext:
    """What one step of the exchange knows; hooks read it and may add fields."""

    step: int
    commitment: bytes
    seeds: list[int]
    batch_hashes: list[bytes]
    local_scalars: torch.Tensor | None = None  # (K,) as submitted by this rank
    matrix: torch.Tensor | None = None  # (N, K) all submitted rows
    result: AggregationResult | None = None
    true_gradient: bool = False  # a true-gradient step (bootstrap/refresh): not verifiable
    extras: dict[str, Any] = field(default_factory=dict)


ClaimHook = Callable[[StepContext, torch.Tensor], torch.Tensor]
ReviewHook = Callable[[StepContext], None]


def parameter_digest(tensors: Iterable[torch.Tensor]) -> bytes:
    """SHA256 over dtype, shape and bytes of every tensor, in order (the batch hasher's encoding)."""
    return hash_batch([tensor.detach() for tensor in tensors])


class HoloGradExchange:
    """Owns the protocol objects of a run and performs the per-step collectives.

    Args:
        family, aggregator, chain: the protocol objects (``lightning_holograd.protocol``).
        comm: the collectives (process group, communication device, traffic meter).
        recompute, to_cpu: for ``verification`` (see ``VerificationTransport``).
    """

    def __init__(
        self,
        family: DirectionFamily,
        aggregator: Aggregator,
        chain: CommitmentChain,
        comm: Comm,
        recompute: Recompute | None = None,
        to_cpu: Callable[[Any], Any] | None = None,
    ) -> None:
        self.family = family
        self.aggregator = aggregator
        self.chain = chain
        self.comm = comm
        self.slashing = Slashing(comm.world_size, aggregator)
        self.verification = VerificationTransport(comm, recompute, to_cpu)
        self.claim_hooks: list[ClaimHook] = []
        self.review_hooks: list[ReviewHook] = []
        self.last_context: StepContext | None = None
        self.stop_requested = False  # set (e.g. from a signal handler) to stop every rank at the next commit
        self.resized_from: int | None = None  # world size of the checkpoint this run resumed, when different

    @property
    def traffic(self) -> TrafficMeter:
        return self.comm.traffic

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    # -- one step ------------------------------------------------------------------------
    def commit(self, batch_hash: bytes, true_gradient: bool = False, nonfinite: bool = False) -> StepContext:
        """Exchange batch hashes and flags, advance the chain and derive this step's seeds.

        Raises ``StopRequested`` on every rank, before the chain advances, when any rank
        set ``stop_requested``. ``nonfinite`` (true-gradient steps) tells the others that
        this rank's gradient holds NaN/inf; ``ctx.extras["nonfinite_ranks"]`` lists them.

        Call contract: a blocking collective, once per step on every rank (``step`` and
        ``true_gradient_step`` call it first).
        """
        self.traffic.start_step()
        self.comm.step = self.chain.step + 1
        flags = (FLAG_STOP if self.stop_requested else 0) | (FLAG_NONFINITE if nonfinite else 0)
        local = torch.frombuffer(bytearray(batch_hash + bytes([flags])), dtype=torch.uint8)
        rows = self.comm.all_gather(local, "hashes").cpu()  # (N, 33)
        stoppers = [rank for rank, row in enumerate(rows.tolist()) if row[-1] & FLAG_STOP]
        if stoppers:
            raise StopRequested(self.chain.step + 1, stoppers)
        batch_hashes = [bytes(row[:-1].tolist()) for row in rows]
        commitment = self.chain.advance(batch_hashes)
        seeds = self.chain.seeds(self.family.num_seeds) if self.family.num_seeds else []
        ctx = StepContext(self.chain.step, commitment, seeds, batch_hashes, true_gradient=true_gradient)
        ctx.extras["nonfinite_ranks"] = [rank for rank, row in enumerate(rows.tolist()) if row[-1] & FLAG_NONFINITE]
        return ctx

    def step(
        self,
        batch_hash: bytes,
        project: Callable[[list[int]], torch.Tensor],
        extras: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """Exchange one step's claims and return g_hat (D,), identical on every rank.

        ``project(seeds)`` returns this rank's (K,) scalars (the family's projection of the
        local gradient, or a forward-mode equivalent). ``extras`` (e.g. this rank's
        micro-batches under ``"inputs"``) are handed to the hooks via the context.
        """
        ctx = self.commit(batch_hash)
        ctx.extras.update(extras or {})
        scalars = project(ctx.seeds)
        for hook in self.claim_hooks:
            scalars = hook(ctx, scalars)
        ctx.local_scalars = scalars
        ctx.matrix = self.comm.all_gather(scalars.to(torch.float32), "scalars").to(scalars.device)
        for review in self.review_hooks:
            review(ctx)
        self._check_some_finite(ctx)
        ctx.result = self.aggregator(ctx.matrix, self.slashing.slashed)
        if ctx.result.nonfinite_ranks:
            log.warning("step %d: dropped non-finite scalars of ranks %s", ctx.step, list(ctx.result.nonfinite_ranks))
        estimate = self.family.reconstruct(ctx.result.scalars, ctx.seeds)
        self.chain.record_scalars(ctx.result.scalars)
        self._finish(ctx)
        return estimate

    def true_gradient_step(self, flat_grad: torch.Tensor, batch_hash: bytes) -> torch.Tensor:
        """A true-gradient step: all-reduce the mean gradient (D,) of the honest ranks.

        The family observes it (codebook update) and it is returned as the step's
        gradient. The chain records the digest of that gradient. Not verifiable.
        """
        local = flat_grad.to(torch.float32)
        ctx = self.commit(batch_hash, true_gradient=True, nonfinite=not bool(torch.isfinite(local).all()))
        dropped = [r for r in ctx.extras["nonfinite_ranks"] if not self.slashing.is_slashed(r)]
        honest = [r for r in self.slashing.honest_ranks() if r not in dropped]
        if dropped:
            log.warning("step %d: dropped the non-finite gradients of ranks %s", ctx.step, dropped)
        if not honest:
            raise NonFiniteError(f"step {ctx.step}: the loss or gradient was non-finite on every rank that counts "
                                 f"(ranks {dropped}), on a true-gradient step. {_NONFINITE_HINT}")
        contribution = local if self.comm.rank in honest else torch.zeros_like(local)
        grad = (self.comm.all_reduce_sum(contribution, "true_gradient") / len(honest)).to(flat_grad.device)
        if not bool(torch.isfinite(grad).all()):
            raise NonFiniteError(f"step {ctx.step}: the all-reduced true gradient is non-finite although ranks "
                                 f"{honest} announced finite gradients: one of them sent values it did not "
                                 "announce (true-gradient steps are not verifiable). HINT: see docs/PROTOCOL.md §1.2.")
        energy = getattr(self.family, "captured_energy", None)
        if energy is not None:  # measured against the true gradient, before the update
            ctx.extras["captured_energy"] = energy(grad)
        self.family.observe_gradient(grad)
        self.chain.record_scalars(grad)
        self._finish(ctx)
        return grad

    def _check_some_finite(self, ctx: StepContext) -> None:
        """Stop with ``NonFiniteError`` when no row that counts is finite (the aggregator
        would have nothing to aggregate)."""
        assert ctx.matrix is not None
        counted = [r for r in range(ctx.matrix.shape[0]) if not self.slashing.is_slashed(r)]
        finite = torch.isfinite(ctx.matrix).all(dim=1).tolist()
        if counted and not any(finite[r] for r in counted):
            raise NonFiniteError(f"step {ctx.step}: the loss or gradient was non-finite on every rank that counts "
                                 f"(ranks {counted}): every submitted row holds NaN or inf. {_NONFINITE_HINT}")

    def _finish(self, ctx: StepContext) -> None:
        self.traffic.end_step()
        self.last_context = ctx

    # -- replica audit -------------------------------------------------------------------
    def audit(self, tensors: Iterable[torch.Tensor], step: int) -> None:
        """Compare parameter digests across ranks; raise naming the step and the ranks.

        Call contract: a blocking collective; every rank calls it at the same step.
        """
        digest = torch.frombuffer(bytearray(parameter_digest(tensors)), dtype=torch.uint8)
        rows = self.comm.all_gather(digest, "audit").cpu()
        digests = [bytes(row.tolist()) for row in rows]
        if len(set(digests)) > 1:
            groups: dict[bytes, list[int]] = {}
            for rank, value in enumerate(digests):
                groups.setdefault(value, []).append(rank)
            majority = max(groups.values(), key=len)
            others = sorted(r for r in range(len(digests)) if r not in majority)
            raise ReplicaDivergenceError(
                f"step {step}: parameters of ranks {others} differ from ranks {majority}. HINT: ranks must "
                "run the same code, torch version, thread count and CPU instruction set; "
                "non-deterministic kernels on GPUs also break replica identity."
            )

    # -- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "chain": self.chain.state_dict(),
            "family": self.family.state_dict(),
            "traffic": self.traffic.state_dict(),
            "slashed": self.slashing.state_dict(),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Mapping[str, Any], rank_map: Mapping[int, int] | None = None) -> None:
        """Restore a checkpoint's state; one from another world size is remapped or refused
        (``remap_slashed``); ``resized_from`` then holds the old world size."""
        saved_world = state.get("world_size")  # absent before lightning-holograd 0.2
        slashed = remap_slashed(state["slashed"], saved_world, self.world_size, rank_map)
        self.chain.load_state_dict(state["chain"])
        self.family.load_state_dict(state["family"])
        self.traffic.load_state_dict(state["traffic"])
        self.slashing.load_state_dict(slashed)
        self.resized_from = saved_world if saved_world is not None and saved_world != self.world_size else None
