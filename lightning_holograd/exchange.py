"""One HoloGrad exchange per optimizer step, over ``torch.distributed`` (no Lightning).

Symbols: N ranks (``world_size``), K scalars per rank and step, D trainable
coordinates. Per step, on every rank, in this order (PROTOCOL.md sections 1-4):

1. all_gather of the 32-byte batch hashes (N x 32 bytes) -> chain.advance -> seeds;
2. a_i = family.project(g_i, seeds), passed through ``claim_hooks`` (fault injection);
3. all_gather of the K scalars -> A (N, K);
4. ``review_hooks`` see A before aggregation (verification may exclude ranks);
5. robust aggregation per direction, g_hat = family.reconstruct(a, seeds),
   chain.record_scalars(a).

Call contract: every rank calls ``step`` (or ``true_gradient_step``) once per optimizer
step, with its own gradient and batch hash; both block until all ranks arrive. A
rank that skips a step deadlocks the job. Excluded (slashed) ranks keep taking part
in the collectives, their rows are ignored, so all replicas stay identical.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .protocol import AggregationResult, Aggregator, CommitmentChain, DirectionFamily, hash_batch
from .traffic import TrafficMeter

__all__ = ["HoloGradExchange", "StepContext", "ReplicaDivergenceError", "parameter_digest"]

log = logging.getLogger(__name__)


class ReplicaDivergenceError(RuntimeError):
    """Ranks hold different parameters although the protocol keeps them identical."""


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
    true_gradient: bool = False  # bootstrap/refresh step: not verifiable
    extras: dict[str, Any] = field(default_factory=dict)


ClaimHook = Callable[[StepContext, torch.Tensor], torch.Tensor]
ReviewHook = Callable[[StepContext], None]


def parameter_digest(tensors: Iterable[torch.Tensor]) -> bytes:
    """SHA256 over dtype, shape and bytes of every tensor, in order (the batch hasher's encoding)."""
    return hash_batch([tensor.detach() for tensor in tensors])


class HoloGradExchange:
    """Owns the protocol objects of a run and performs the per-step collectives."""

    def __init__(
        self,
        family: DirectionFamily,
        aggregator: Aggregator,
        chain: CommitmentChain,
        traffic: TrafficMeter,
        group: Any = None,
        comm_device: torch.device | str = "cpu",
    ) -> None:
        self.family = family
        self.comm_device = torch.device(comm_device)  # CPU for gloo, the rank's GPU for NCCL
        self.aggregator = aggregator
        self.chain = chain
        self.traffic = traffic
        self.group = group
        self.excluded: set[int] = set()
        self.claim_hooks: list[ClaimHook] = []
        self.review_hooks: list[ReviewHook] = []
        self.last_context: StepContext | None = None

    # -- topology -----------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if self.distributed else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.distributed else 0

    # -- collectives (looked up on torch.distributed at call time) --------------------
    def all_gather(self, tensor: torch.Tensor, kind: str) -> torch.Tensor:
        """Stack ``tensor`` from every rank: (N, *tensor.shape), counted as ``kind``."""
        payload = tensor.numel() * tensor.element_size()
        self.traffic.record(kind, "all_gather", payload)
        if not self.distributed:
            return tensor.unsqueeze(0).clone()
        flat = tensor.contiguous().reshape(-1)
        out = torch.empty(self.world_size * flat.numel(), dtype=flat.dtype, device=flat.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, flat, group=self.group)
        return out.reshape(self.world_size, *tensor.shape)

    def broadcast(self, tensors: Iterable[torch.Tensor], kind: str, src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s values (buffers, initial state)."""
        for tensor in tensors:
            self.traffic.record(kind, "p2p", tensor.numel() * tensor.element_size())
            if self.distributed:
                staged = tensor.detach().to(self.comm_device)  # the tensor itself when already there
                dist.broadcast(staged, src=src, group=self.group)
                if staged.data_ptr() != tensor.data_ptr():
                    tensor.detach().copy_(staged)

    def _all_reduce_mean(self, tensor: torch.Tensor, kind: str, contributes: bool, contributors: int) -> torch.Tensor:
        self.traffic.record(kind, "all_reduce", tensor.numel() * tensor.element_size())
        total = tensor.clone() if contributes else torch.zeros_like(tensor)
        if self.distributed:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total / contributors

    # -- one step ------------------------------------------------------------------------
    def commit(self, batch_hash: bytes, true_gradient: bool = False) -> StepContext:
        """Exchange batch hashes, advance the chain and derive this step's seeds."""
        self.traffic.start_step()
        local = torch.frombuffer(bytearray(batch_hash), dtype=torch.uint8)
        hashes = self.all_gather(local.to(self.comm_device), "hashes").cpu()
        batch_hashes = [bytes(row.tolist()) for row in hashes]
        commitment = self.chain.advance(batch_hashes)
        seeds = self.chain.seeds(self.family.num_seeds) if self.family.num_seeds else []
        return StepContext(self.chain.step, commitment, seeds, batch_hashes, true_gradient=true_gradient)

    def step(
        self,
        batch_hash: bytes,
        project: Callable[[list[int]], torch.Tensor],
        extras: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """Exchange one step's claims and return g_hat (D,), identical on every rank.

        ``project(seeds)`` returns this rank's (K,) scalars: ``family.project`` of the
        local gradient (see ``project_gradient``) or a forward-mode equivalent.
        ``extras`` (e.g. this rank's micro-batches) are handed to the hooks via the context.
        """
        ctx = self.commit(batch_hash)
        ctx.extras.update(extras or {})
        scalars = project(ctx.seeds)
        for hook in self.claim_hooks:
            scalars = hook(ctx, scalars)
        ctx.local_scalars = scalars
        device = scalars.device
        ctx.matrix = self.all_gather(scalars.to(self.comm_device, torch.float32), "scalars").to(device)
        for review in self.review_hooks:
            review(ctx)
        ctx.result = self.aggregator(ctx.matrix, self.excluded)
        if ctx.result.nonfinite_ranks:
            log.warning("step %d: dropped non-finite scalars of ranks %s", ctx.step, list(ctx.result.nonfinite_ranks))
        estimate = self.family.reconstruct(ctx.result.scalars, ctx.seeds)
        self.chain.record_scalars(ctx.result.scalars)
        self._finish(ctx)
        return estimate

    def project_gradient(self, flat_grad: torch.Tensor) -> Callable[[list[int]], torch.Tensor]:
        """The usual ``project`` for ``step``: dot products of the local gradient."""
        return lambda seeds: self.family.project(flat_grad, seeds)

    def true_gradient_step(self, flat_grad: torch.Tensor, batch_hash: bytes) -> torch.Tensor:
        """Bootstrap/refresh: all-reduce the true mean gradient of non-excluded ranks.

        The family observes it (codebook update) and it is returned as the step's
        gradient. The chain records the digest of that gradient. Not verifiable.
        """
        ctx = self.commit(batch_hash, true_gradient=True)
        honest = self.world_size - len(self.excluded)
        grad = self._all_reduce_mean(
            flat_grad.to(self.comm_device, torch.float32), "bootstrap", self.rank not in self.excluded, max(honest, 1)
        ).to(flat_grad.device)
        energy = getattr(self.family, "captured_energy", None)
        if energy is not None:  # measured against the true gradient, before the update
            ctx.extras["captured_energy"] = energy(grad)
        self.family.observe_gradient(grad)
        self.chain.record_scalars(grad)
        self._finish(ctx)
        return grad

    def _finish(self, ctx: StepContext) -> None:
        self.traffic.end_step()
        self.last_context = ctx

    # -- replica audit -------------------------------------------------------------------
    def audit(self, tensors: Iterable[torch.Tensor], step: int) -> None:
        """Compare parameter digests across ranks; raise naming the step and the ranks."""
        digest = torch.frombuffer(bytearray(parameter_digest(tensors)), dtype=torch.uint8)
        rows = self.all_gather(digest.to(self.comm_device), "audit").cpu()
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
            "excluded": sorted(self.excluded),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.chain.load_state_dict(state["chain"])
        self.family.load_state_dict(state["family"])
        self.traffic.load_state_dict(state["traffic"])
        self.excluded = set(int(r) for r in state["excluded"])
