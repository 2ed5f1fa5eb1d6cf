"""One HoloGrad exchange per optimizer step, over ``torch.distributed`` (no Lightning).

Symbols: N ranks (``world_size``), K scalars per rank and step, D trainable
coordinates. Per step, on every rank, in this order (docs/PROTOCOL.md §2-§4):

1. all_gather of the 32-byte batch hashes, each followed by one flag byte (N x 33
   bytes): bit 0 "this rank asks the job to stop" (SIGTERM; every rank raises
   ``StopRequested`` before the step, so the job ends at the same step everywhere), bit 1
   "this rank's gradient is non-finite" (true-gradient and diagnostic steps); -> chain.advance
   -> seeds;
2. a_i = ``project(seeds)`` (this rank's K scalars), passed through ``claim_hooks``
   (fault injection);
3. all_gather of the K scalars -> A (N, K);
4. ``review_hooks`` see A before aggregation (verification may slash ranks);
5. robust aggregation per direction without the slashed rows, then
   g_hat = family.reconstruct(a, seeds) (the family's synthesis followed by its state
   update), and chain.record_scalars(a).

That is the ``all_gather`` aggregation path. ``aggregation_path="sharded"`` replaces steps
3-5 by a row-commitment gather, an all_to_all of column blocks, per-block aggregation
by each block's owner and an all_gather of the aggregated blocks (bitwise the same a;
``engine/sharded.py``; without review hooks the commitment is skipped and the flag rides
in the all_to_all), ``"all_reduce"`` by one all_reduce of the rows (``mean`` only),
and ``"auto"`` picks per step (``current_path``; docs/PROTOCOL.md §4.5).

With G > 1 direction groups (docs/PROTOCOL.md §9.1) rank i projects onto the seeds of
its group i mod G, step 5 aggregates within each group and g_hat is the row-weighted
mean of the G group syntheses (``protocol.groups``); groups take the ``all_gather`` or the
``sharded`` path (sharded within each group, bitwise the same group aggregates).

With ``num_public_values`` = E > 0 (local steps, docs/PROTOCOL.md §9.2) a row holds the
K scalars followed by E public values; all K + E columns are aggregated alike, only the
first K are synthesised, and the aggregated E values are ``StepContext.public_values``.

With ``scalar_bits`` b < 32 (docs/PROTOCOL.md §9.5) step 3 gathers each rank's K scalars as
b-bit levels with a scale and a public dither (``protocol.quantize``), the E values as
float32; every rank decodes the same float matrix A, and ``StepContext.quantized`` keeps
the levels and scales for the verifier. It takes the ``all_gather`` path.

Call contract: every rank calls ``step`` (or ``true_gradient_step``) once per optimizer
step, with its own gradient and batch hash; both block until all ranks arrive. A rank
that skips a step deadlocks the job. Slashed ranks keep taking part in the collectives,
their rows are left out, so all replicas stay identical.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..protocol import AggregationResult, Aggregator, CommitmentChain, DirectionFamily
from ..protocol.groups import GroupedAggregation, aggregate_groups, group_of, synthesize_groups
from ..protocol.quantize import check_quantized_path, check_scalar_block, decode_rows, dither, encode_row
from ..protocol.sharding import sharded_wire_bytes
from .comm import Comm
from .sharded import ShardedAggregation
from .slashing import Slashing, remap_slashed
from .step_context import (AGGREGATION_PATHS, SHARDABLE_AGGREGATIONS, AggregationPath, ClaimHook, NonFiniteError,
                           ReplicaDivergenceError, ReviewHook, StepContext, StopRequested, check_aggregation_path,
                           parameter_digest)
from .traffic import TrafficMeter
from .verification import Recompute, VerificationTransport

__all__ = ["AGGREGATION_PATHS", "AggregationPath", "HoloGradExchange", "NonFiniteError", "ReplicaDivergenceError",
           "StepContext", "StopRequested", "check_aggregation_path", "parameter_digest"]

log = logging.getLogger(__name__)

FLAG_STOP, FLAG_NONFINITE = 1, 2  # bits of the flag byte that follows each batch hash in the commit


_NONFINITE_HINT = ("HINT: lower the learning rate, clip gradients (Trainer(gradient_clip_val=...)), check the data "
                   "for NaN/inf, or use bf16 instead of fp16; resume from the last checkpoint.")


class HoloGradExchange:
    """Owns the protocol objects of a run and performs the per-step collectives.

    Args:
        family, aggregator, chain: the protocol objects (``lightning_holograd.protocol``).
        comm: the collectives (process group, communication device, traffic meter).
        recompute, to_cpu: for ``verification`` (see ``VerificationTransport``).
        aggregation_path: how rows are aggregated across ranks (``AGGREGATION_PATHS``,
            docs/PROTOCOL.md §4.5): ``all_gather`` (every rank gets every row), ``sharded``,
            ``all_reduce`` (mean only, no verification) or ``auto``.
        num_groups: G, the direction groups (1: every rank shares the directions); G > 1
            takes ``all_gather`` or ``sharded`` (not ``all_reduce``; ``sharded`` needs a group
            of more than one rank, G < N).
        scalar_bits: b, bits per direction scalar on the wire (32: float32; 8, 4, 2: quantized,
            docs/PROTOCOL.md §9.5); b < 32 needs the ``all_gather`` path (or ``auto``).
    """

    def __init__(
        self,
        family: DirectionFamily,
        aggregator: Aggregator,
        chain: CommitmentChain,
        comm: Comm,
        recompute: Recompute | None = None,
        to_cpu: Callable[[Any], Any] | None = None,
        aggregation_path: AggregationPath = "all_gather",
        num_groups: int = 1,
        scalar_bits: int = 32,
        scalar_block: int = 0,
    ) -> None:
        if num_groups > 1 and not family.unbiased:
            raise ValueError(f"num_groups={num_groups} needs an unbiased seed-defined family, got {family.name!r}.")
        self.family = family
        self.aggregator = aggregator
        self.chain = chain
        self.comm = comm
        self.num_groups = num_groups
        self.num_public_values = 0  # E values after the K scalars of a row (set by local steps)
        self.slashing = Slashing(comm.world_size, aggregator, num_groups)
        self.verification = VerificationTransport(comm, recompute, to_cpu)
        self.aggregation_path = check_aggregation_path(aggregation_path, aggregator)
        if num_groups > 1 and self.aggregation_path == "all_reduce":
            raise ValueError(f"aggregation_path={aggregation_path!r} with {num_groups} direction groups: each group "
                             "has its own directions, so rows of different groups share no column to sum. "
                             "HINT: use aggregation_path='sharded', 'all_gather' or 'auto'.")
        if num_groups > 1 and num_groups >= comm.world_size and self.aggregation_path == "sharded":
            raise ValueError(f"aggregation_path='sharded' with {num_groups} direction groups on {comm.world_size} "
                             "ranks: every group has one rank, so there is no row to split (sharding sends more than "
                             "all_gather there). HINT: use aggregation_path='all_gather' or 'auto', or fewer groups.")
        self.scalar_bits = check_quantized_path(aggregation_path, scalar_bits)
        self.scalar_block = check_scalar_block(scalar_block, scalar_bits)
        self.sharding = ShardedAggregation(comm, aggregator, self.slashing, num_groups)
        self.block_review_hooks: list[ReviewHook] = []  # sharded path: after the aggregates are gathered
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
        set ``stop_requested``. ``nonfinite`` (true-gradient and diagnostic steps) tells the
        others that this rank's gradient holds NaN/inf; ``ctx.extras["nonfinite_ranks"]``
        lists them.

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
        count = self.family.num_seeds
        group_seeds = [self.chain.seeds(count, group=g) if count else [] for g in range(self.num_groups)]
        seeds = group_seeds[group_of(self.comm.rank, self.num_groups)]
        ctx = StepContext(self.chain.step, commitment, seeds, batch_hashes, true_gradient=true_gradient,
                          group_seeds=group_seeds)
        ctx.extras["nonfinite_ranks"] = [rank for rank, row in enumerate(rows.tolist()) if row[-1] & FLAG_NONFINITE]
        return ctx

    def step(
        self,
        batch_hash: bytes,
        project: Callable[[list[int]], torch.Tensor],
        extras: Mapping[str, Any] | None = None,
        diagnostic: torch.Tensor | None = None,
        optimizer_steps: int = 1,
    ) -> torch.Tensor:
        """Exchange one step's claims and return g_hat (D,), identical on every rank.

        ``project(seeds)`` returns this rank's (K + E,) row (the family's projection of the
        local gradient, or a forward-mode equivalent, then E = ``num_public_values`` values).
        ``extras`` (e.g. this rank's
        micro-batches under ``"inputs"``) are handed to the hooks via the context.
        ``diagnostic``: this rank's local gradient (D,) on a diagnostic step (every rank
        passes one, or none): see ``measure_energy``.
        ``optimizer_steps``: the optimizer steps this exchange stands for (a round's inner
        steps), for the traffic meter's per-step figures and compression.
        """
        local = diagnostic.to(torch.float32) if diagnostic is not None else None
        ctx = self.commit(batch_hash, nonfinite=local is not None and not bool(torch.isfinite(local).all()))
        ctx.extras.update(extras or {})
        if local is not None:
            ctx.extras["captured_energy"] = self.measure_energy(local, ctx)
        scalars = project(ctx.seeds)
        expected = self.family.num_directions + self.num_public_values
        if scalars.shape != (expected,):
            raise ValueError(f"project returned shape {tuple(scalars.shape)}, expected ({expected},): K = "
                             f"{self.family.num_directions} scalars and {self.num_public_values} public values.")
        for hook in self.claim_hooks:
            scalars = hook(ctx, scalars)
        ctx.local_scalars = scalars
        ctx.path = self.current_path()
        k = self.family.num_directions
        if self.num_groups == 1:
            if ctx.path == "all_gather":
                ctx.matrix = self._gather_rows(ctx, scalars)
                for review in self.review_hooks:
                    review(ctx)
                self._check_some_finite(ctx)
                ctx.result = self.aggregator(ctx.matrix, self.slashing.slashed)
            else:
                ctx.result = self._aggregate_sharded(ctx, scalars)
            estimate = self.family.reconstruct(ctx.result.scalars[:k], ctx.seeds)
            ctx.public_values = ctx.result.scalars[k:]
        else:  # groups: the all_gather or the sharded path (checked at construction, chosen by current_path)
            ctx.result = self._aggregate_grouped(ctx, scalars)
            scalars, weights = ctx.result.scalars, ctx.result.weights
            estimate = synthesize_groups(self.family, scalars[:, :k], weights, ctx.group_seeds)
            ctx.public_values = torch.tensor(weights, dtype=torch.float32, device=scalars.device) @ scalars[:, k:]
        if ctx.result.nonfinite_ranks:
            log.warning("step %d: dropped non-finite scalars of ranks %s", ctx.step, list(ctx.result.nonfinite_ranks))
        self.chain.record_scalars(ctx.result.scalars)
        self._finish(ctx, optimizer_steps)
        return estimate

    def _gather_rows(self, ctx: StepContext, scalars: torch.Tensor) -> torch.Tensor:
        """Step 3: every rank's (K + E,) row -> A (N, K + E) float32 on ``scalars``' device;
        quantized on the wire when ``scalar_bits`` < 32 (docs/PROTOCOL.md §9.5)."""
        if self.scalar_bits == 32:
            return self.comm.all_gather(scalars.to(torch.float32), "scalars").to(scalars.device)
        k = self.family.num_directions
        wire = encode_row(scalars, k, self.scalar_bits, dither(ctx.commitment, self.rank, k), self.scalar_block)
        rows = self.comm.all_gather(wire, "scalars")
        ctx.quantized = decode_rows(rows, k, self.num_public_values, self.scalar_bits, self.scalar_block)
        return ctx.quantized.matrix.to(scalars.device)

    def measure_energy(self, flat_grad: torch.Tensor, ctx: StepContext) -> float:
        """gamma of the family's basis against the mean true gradient of the contributors.

        A diagnostic, not part of the protocol: one all-reduce of 4D bytes counted as
        ``diagnostic`` traffic (outside the per-step figures and the compression), the family
        left untouched. Contributors as on a true-gradient step: neither slashed nor flagged
        non-finite in ``ctx``'s commit; NaN when none is left or the mean is non-finite.
        Call contract: a blocking collective, on every rank at the same step, after the
        commit and before the step's update (``step(diagnostic=...)`` calls it there).
        """
        honest = self._contributors(ctx)
        contribution = flat_grad if self.comm.rank in honest else torch.zeros_like(flat_grad)
        grad = self.comm.all_reduce_sum(contribution, "diagnostic") / max(len(honest), 1)
        if not honest or not bool(torch.isfinite(grad).all()):
            return float("nan")
        return float(self.family.captured_energy(grad.to(flat_grad.device)))  # type: ignore[attr-defined]

    def _contributors(self, ctx: StepContext) -> list[int]:
        """Ranks whose gradient counts in an all-reduced mean: not slashed, not flagged non-finite."""
        flagged = set(ctx.extras["nonfinite_ranks"])
        return [r for r in self.slashing.honest_ranks() if r not in flagged]

    def true_gradient_step(self, flat_grad: torch.Tensor, batch_hash: bytes) -> torch.Tensor:
        """A true-gradient step: all-reduce the mean gradient (D,) of the honest ranks.

        The family observes it (codebook update) and it is returned as the step's
        gradient. The chain records the digest of that gradient. Not verifiable.
        """
        local = flat_grad.to(torch.float32)
        ctx = self.commit(batch_hash, true_gradient=True, nonfinite=not bool(torch.isfinite(local).all()))
        dropped = [r for r in ctx.extras["nonfinite_ranks"] if not self.slashing.is_slashed(r)]
        honest = self._contributors(ctx)
        ctx.extras.update(contributors=honest, dropped=dropped)  # for the ledger's true_gradient record
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

    def current_path(self) -> str:
        """The aggregation path of this step: ``aggregation_path``, or for ``"auto"`` the
        cheapest path that computes the same thing (docs/PROTOCOL.md §4.5): ``all_gather``
        on N <= 2 ranks (it sends 4K bytes there, no path sends less) and for whole-row
        defences (Krum, row clipping); else ``all_reduce`` for ``mean`` without review hooks
        (verification); else ``sharded``. With G > 1 direction groups (no ``all_reduce``):
        ``sharded`` when ``protocol.sharding.sharded_wire_bytes`` is below the all_gather's
        (N - 1) 4W bytes (W = K + E; e.g. groups of >= 2 ranks on N >= 4 at a large K), else
        ``all_gather`` (always for ``"per_rank"``, whose groups of one rank have nothing to
        split). Quantized scalars (``scalar_bits`` < 32) always take ``all_gather``. Every
        rank decides alike: the inputs are the settings, N, W and the installed hooks."""
        if self.aggregation_path != "auto":
            return self.aggregation_path
        if self.scalar_bits < 32:
            return "all_gather"
        per_direction = self.aggregator.name in SHARDABLE_AGGREGATIONS and not self.aggregator.clip_row_norms
        if self.world_size <= 2 or not per_direction:
            return "all_gather"
        if self.num_groups > 1:
            width = self.family.num_directions + self.num_public_values
            reviewed = bool(self.review_hooks or self.block_review_hooks)
            sharded = sharded_wire_bytes(width, self.world_size, self.num_groups, reviewed)
            return "sharded" if sharded < (self.world_size - 1) * 4 * width else "all_gather"
        if self.aggregator.name == "mean" and not self.review_hooks and not self.block_review_hooks:
            return "all_reduce"
        return "sharded"

    def _aggregate_grouped(self, ctx: StepContext, row: torch.Tensor) -> GroupedAggregation:
        """Steps 3-5 of docs/PROTOCOL.md §1.1 with direction groups (§9.1), on the
        ``all_gather`` or the ``sharded`` path."""
        if ctx.path == "sharded":
            result = self._aggregate_sharded(ctx, row)
        else:
            ctx.matrix = self._gather_rows(ctx, row)
            for review in self.review_hooks:
                review(ctx)
            self._check_some_finite(ctx)
            result = aggregate_groups(self.aggregator, ctx.matrix, self.slashing.slashed, self.num_groups)
        assert isinstance(result, GroupedAggregation)
        return result

    def _aggregate_sharded(self, ctx: StepContext, row: torch.Tensor) -> AggregationResult | GroupedAggregation:
        """Steps 3-5 of §1.1 on the ``sharded`` or ``all_reduce`` path (``engine/sharded.py``)."""
        if ctx.path == "all_reduce":
            if self.review_hooks or self.block_review_hooks:
                raise RuntimeError("aggregation_path='all_reduce' leaves no row to verify. HINT: use "
                                   "aggregation_path='sharded' or 'auto' with a ProofVerifier.")
            result = self.sharding.all_reduce_mean(row)
            if not result.kept_ranks and result.nonfinite_ranks:
                self._raise_none_finite(ctx, list(result.nonfinite_ranks))
            return result
        reviewed = bool(self.review_hooks or self.block_review_hooks)  # else no commitment (engine/sharded.py)
        ctx.sharded = (self.sharding.commit_row if reviewed else self.sharding.open_row)(row.to(torch.float32))
        for review in self.review_hooks:
            review(ctx)
        self.sharding.exchange(ctx.sharded, row)
        counted = self.slashing.honest_ranks()
        if counted and all(r in ctx.sharded.nonfinite for r in counted):
            self._raise_none_finite(ctx, counted)
        ctx.result = self.sharding.aggregate(ctx.sharded, row)
        for review in self.block_review_hooks:
            review(ctx)
        return ctx.result

    def _raise_none_finite(self, ctx: StepContext, counted: list[int]) -> None:
        raise NonFiniteError(f"step {ctx.step}: the loss or gradient was non-finite on every rank that counts "
                             f"(ranks {counted}): every submitted row holds NaN or inf. {_NONFINITE_HINT}")

    def _check_some_finite(self, ctx: StepContext) -> None:
        """Stop with ``NonFiniteError`` when no row that counts is finite (the aggregator
        would have nothing to aggregate)."""
        assert ctx.matrix is not None
        counted = [r for r in range(ctx.matrix.shape[0]) if not self.slashing.is_slashed(r)]
        finite = torch.isfinite(ctx.matrix).all(dim=1).tolist()
        if counted and not any(finite[r] for r in counted):
            self._raise_none_finite(ctx, counted)

    def _finish(self, ctx: StepContext, optimizer_steps: int = 1) -> None:
        self.traffic.end_step(optimizer_steps)
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
            "direction_groups": self.num_groups,
        }

    def load_state_dict(self, state: Mapping[str, Any], rank_map: Mapping[int, int] | None = None) -> None:
        """Restore a checkpoint's state; one from another world size is remapped or refused
        (``remap_slashed``); ``resized_from`` then holds the old world size. The number of
        direction groups may change only with the world size (e.g. ``"per_rank"``)."""
        saved_world = state.get("world_size")  # absent before lightning-holograd 0.2
        saved_groups = int(state.get("direction_groups", 1))  # absent before direction groups existed
        resized = saved_world is not None and saved_world != self.world_size
        if saved_groups != self.num_groups and not resized:
            raise ValueError(f"checkpoint was trained with {saved_groups} direction group(s), this run has "
                             f"{self.num_groups} on the same world size. HINT: resume with the direction_groups "
                             "setting the checkpoint was trained with.")
        slashed = remap_slashed(state["slashed"], saved_world, self.world_size, rank_map)
        self.chain.load_state_dict(state["chain"])
        self.family.load_state_dict(state["family"])
        self.traffic.load_state_dict(state["traffic"])
        self.slashing.load_state_dict(slashed)
        self.resized_from = saved_world if saved_world is not None and saved_world != self.world_size else None
