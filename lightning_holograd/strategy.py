"""HoloGradStrategy: Lightning's DDP machinery with the gradient all-reduce replaced.

Launchers, cluster environments, process-group setup, the distributed sampler and
``reduce``/``broadcast``/``barrier`` come from Lightning's ``DDPStrategy``. What changes:
the module is not wrapped in ``DistributedDataParallel``; instead, after the backward
of the last micro-batch of an optimizer step, ``HoloGradExchange.step`` turns the local
gradient into K scalars, exchanges them and writes the same estimate g_hat into every
rank's ``.grad``. ``on_after_backward``, gradient clipping and the optimizer then see
g_hat, as they would see the all-reduced gradient under DDP.

This module holds the package-independent logic (``HoloGradStrategyMixin``); the
concrete classes for ``lightning.pytorch`` and ``pytorch_lightning`` are built in
``registration.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Literal

import torch
from torch.distributed.constants import default_pg_timeout

from .config import AggregationName, HoloGradConfig, ProjectionName
from .exchange import HoloGradExchange, StepContext
from .jvp import _logging_disabled, jvp_scalars
from .protocol import CommitmentChain, FamilyName, hash_batch
from .traffic import TrafficMeter

__all__ = ["HoloGradStrategyMixin", "CHECKPOINT_KEY"]

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "holograd"


class HoloGradStrategyMixin:
    """Package-independent HoloGrad behaviour; placed before ``DDPStrategy`` in the MRO.

    Args (protocol; see README "Strategy settings"):
        num_directions: K, scalars each rank sends per optimizer step.
        directions: direction family (``sketch`` is O(D) for any K; ``gaussian`` and
            ``rademacher`` are paper-faithful dense families; ``codebook`` is ADC;
            ``momentum`` is HoloGrad's momentum-centric mode; ``identity`` is an exact
            K = D debug family that reproduces DDP).
        aggregation / trim_ratio: robust aggregation across ranks (per direction; ``krum``
            picks whole rows).
        krum_byzantine: f for aggregation="krum" (needs world_size >= 2f + 3).
        clip_row_norms: scale rows above the median row norm down to it before aggregating.
        seed: the run's global seed string S_0 (all ranks must agree).
        codebook_rank, oja_lr, qr_every, exploration_weight, momentum_beta: family knobs.
        block_size, chunk_size: direction generation (block_size defines the directions).
        projection: ``backward`` (local backward + dot products) or ``jvp`` (forward-mode).
        audit_every: compare a parameter digest across ranks every N steps (0: never).
        sync_buffers: broadcast module buffers from rank 0 after every optimizer step.
    Args (process group; as in ``DDPStrategy``): process_group_backend, timeout, start_method.
    """

    def __init__(
        self,
        num_directions: int = 1024,
        directions: FamilyName = "sketch",
        aggregation: AggregationName = "mean",
        trim_ratio: float = 0.1,
        krum_byzantine: int = 1,
        clip_row_norms: bool = False,
        seed: str = "holograd",
        codebook_rank: int | None = None,
        oja_lr: float = 0.1,
        qr_every: int = 50,
        exploration_weight: float = 0.0,
        momentum_beta: float = 0.9,
        block_size: int = 8192,
        chunk_size: int = 32768,
        projection: ProjectionName = "backward",
        audit_every: int = 100,
        sync_buffers: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        self.config = HoloGradConfig(
            num_directions=num_directions, directions=directions, aggregation=aggregation, trim_ratio=trim_ratio,
            krum_byzantine=krum_byzantine, clip_row_norms=clip_row_norms,
            seed=seed, codebook_rank=codebook_rank, oja_lr=oja_lr, qr_every=qr_every,
            exploration_weight=exploration_weight, momentum_beta=momentum_beta, block_size=block_size,
            chunk_size=chunk_size, projection=projection, audit_every=audit_every, sync_buffers=sync_buffers,
        )
        super().__init__(process_group_backend=process_group_backend, timeout=timeout, start_method=start_method,
                         **kwargs)
        self.exchange: HoloGradExchange | None = None
        self._pending_state: dict[str, Any] | None = None
        self._sync_blocked = False
        self._step_inputs: list[tuple[Any, int]] = []  # (batch, batch_idx) of this step's micro-batches
        self._true_gradient_requested = False
        self.fresh_metrics: dict[str, float] = {}  # set after each optimizer step, logged by a callback

    # -- setup -----------------------------------------------------------------------------
    def configure_ddp(self) -> None:
        """Called by ``DDPStrategy.setup`` when fitting: build the exchange instead of DDP."""
        self._check_supported()
        module = self.lightning_module
        params = self.trainable_parameters()
        if not params:
            raise ValueError("the LightningModule has no parameter with requires_grad=True: nothing to train.")
        dim = sum(p.numel() for p in params)
        chain = CommitmentChain(self.config.seed)
        family = self.config.build_family(dim)
        if hasattr(family, "to"):
            family.to(self.root_device)
        comm_device = self.root_device if self._get_process_group_backend() == "nccl" else torch.device("cpu")
        self.exchange = HoloGradExchange(family, self.config.build_aggregator(), chain,
                                         TrafficMeter(self.world_size, dim), comm_device=comm_device)
        self.exchange.broadcast(self._module_state(module), kind="setup")  # rank 0's init everywhere
        if self._pending_state is not None:
            self.exchange.load_state_dict(self._pending_state)
            self._pending_state = None
        self._install_logging_callback()
        log.info("HoloGrad: D=%d trainable coordinates, K=%d scalars/step, family=%s, world_size=%d",
                 dim, family.num_directions, family.name, self.world_size)

    def _register_ddp_hooks(self) -> None:
        """No DistributedDataParallel wrapper, so no DDP comm hooks."""

    def _check_supported(self) -> None:
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is not None:
            raise ValueError(
                f"precision={type(self.precision_plugin).__name__} with a GradScaler is not supported by HoloGrad: "
                "scaled gradients make scalars incomparable across steps and an overflow step looks like a "
                "fault. HINT: use precision='bf16-mixed' (or '32-true')."
            )
        if self.config.projection == "jvp" and not self.lightning_module.automatic_optimization:
            raise ValueError("projection='jvp' re-runs training_step and needs automatic optimization. "
                             "HINT: use projection='backward' with manual optimization.")
        if len(self.optimizers) > 1:
            raise ValueError(
                f"HoloGrad exchanges one gradient per step but the module configures {len(self.optimizers)} "
                "optimizers. HINT: use a single optimizer (parameter groups are fine)."
            )

    # Set per Lightning package by registration.py: the Callback class logging our metrics.
    metrics_callback_cls: type | None = None

    def _install_logging_callback(self) -> None:
        trainer = self.lightning_module.trainer
        cls = self.metrics_callback_cls
        if cls is not None and not any(isinstance(cb, cls) for cb in trainer.callbacks):
            trainer.callbacks.append(cls())

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters whose gradients are exchanged, in a fixed order (module order)."""
        return [p for p in self.lightning_module.parameters() if p.requires_grad]

    def _module_state(self, module: torch.nn.Module) -> Iterator[torch.Tensor]:
        yield from (p.data for p in module.parameters())
        yield from module.buffers()

    # -- which micro-batch is the last one -------------------------------------------------
    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Lightning enters this around every non-final micro-batch: no exchange there."""
        previous, self._sync_blocked = self._sync_blocked, True
        try:
            yield None
        finally:
            self._sync_blocked = previous

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if args:  # (batch, batch_idx): kept for the batch hash and for JVP projection
            self._step_inputs.append((args[0], int(args[1]) if len(args) > 1 else 0))
        return super().training_step(*args, **kwargs)

    # -- the exchange ------------------------------------------------------------------------
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``Strategy.backward`` with the exchange between the backward and ``on_after_backward``."""
        module = self.lightning_module
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        automatic = module.automatic_optimization
        if self.config.projection == "backward" or not automatic:
            self.precision_plugin.backward(closure_loss, module, optimizer, *args, **kwargs)
        if automatic and not self._sync_blocked and self.exchange is not None:
            self.exchange_gradients()
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        module = self.lightning_module
        if self.exchange is not None and not module.automatic_optimization:
            self.exchange_gradients()  # manual optimization: exchange what manual_backward accumulated
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.exchange is not None:
            self._after_optimizer_step()
        return output

    def request_true_gradient(self) -> None:
        """Make the next exchange a bootstrap/refresh step (true all-reduced gradient)."""
        self._true_gradient_requested = True

    @torch.no_grad()
    def exchange_gradients(self) -> StepContext:
        """Run one HoloGrad step on every rank and write g_hat into ``.grad``."""
        assert self.exchange is not None
        if not self._step_inputs:
            raise RuntimeError("HoloGrad found no training batch for this step. HINT: training_step must run "
                               "(and return a loss) on every rank for every optimizer step.")
        inputs, self._step_inputs = self._step_inputs, []
        batches = [batch for batch, _ in inputs]
        batch_hash = hash_batch(batches[0] if len(batches) == 1 else batches)
        params = self.trainable_parameters()
        if self._true_gradient_requested:
            self._true_gradient_requested = False
            estimate = self.exchange.true_gradient_step(self._flat_grad(params), batch_hash)
        else:
            project = (self._jvp_projector(inputs) if self.config.projection == "jvp"
                       else self.exchange.project_gradient(self._flat_grad(params)))
            estimate = self.exchange.step(batch_hash, project, extras={"inputs": inputs})
        self._write_grad(params, estimate)
        ctx = self.exchange.last_context
        assert ctx is not None
        return ctx

    @torch.no_grad()
    def recompute_claim(self, inputs: list[tuple[Any, int]], seeds: list[int]) -> torch.Tensor:
        """Recompute the (K,) scalars an honest rank would submit for ``inputs`` at the
        current parameters (theta_t): the same training_step, loss scaling and projection.

        Used by verifier ranks inside the exchange, before the update. It overwrites this
        rank's ``.grad``, which the exchange replaces with g_hat right after.
        """
        assert self.exchange is not None
        module, params = self.lightning_module, self.trainable_parameters()
        if self.config.projection == "jvp":
            return jvp_scalars(module, params, inputs, module.trainer.accumulate_grad_batches,
                               self.exchange.family, seeds)
        for param in params:
            param.grad = None
        scale = module.trainer.accumulate_grad_batches if module.automatic_optimization else 1
        # Leave no trace: buffers (BatchNorm statistics) and the RNG stream stay as they were.
        buffers = [buffer.detach().clone() for buffer in module.buffers()]
        with torch.enable_grad(), _logging_disabled(module), torch.random.fork_rng(devices=self._rng_devices()):
            for batch, batch_idx in inputs:
                with self.precision_plugin.train_step_context():
                    output = module.training_step(batch, batch_idx)
                loss = output["loss"] if isinstance(output, dict) else output
                if loss is None:
                    raise RuntimeError("verification needs training_step to return the loss; with manual "
                                       "optimization return the loss passed to manual_backward.")
                (loss / scale).backward()
        for buffer, saved in zip(module.buffers(), buffers):
            buffer.copy_(saved)
        return self.exchange.family.project(self._flat_grad(params), seeds)

    def _rng_devices(self) -> list[int]:
        return [self.root_device.index or 0] if self.root_device.type == "cuda" else []

    def _jvp_projector(self, inputs: list[tuple[Any, int]]) -> Callable[[list[int]], torch.Tensor]:
        assert self.exchange is not None
        family, module, params = self.exchange.family, self.lightning_module, self.trainable_parameters()
        accumulate = module.trainer.accumulate_grad_batches
        return lambda seeds: jvp_scalars(module, params, inputs, accumulate, family, seeds)

    @staticmethod
    def _flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
        grads = [p.grad.reshape(-1).to(torch.float32) if p.grad is not None
                 else torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for p in params]
        return torch.cat(grads)

    @staticmethod
    def _write_grad(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
        offset = 0
        for param in params:
            piece = flat[offset : offset + param.numel()].view_as(param)
            if param.grad is None:
                param.grad = piece.to(param.dtype).clone()
            else:
                param.grad.copy_(piece)
            offset += param.numel()

    def _after_optimizer_step(self) -> None:
        assert self.exchange is not None
        module = self.lightning_module
        if self.config.sync_buffers:
            buffers = list(module.buffers())
            if buffers:
                self.exchange.broadcast(buffers, kind="buffers")
        step = self.exchange.chain.step
        if self.config.audit_every and step % self.config.audit_every == 0:
            self.exchange.audit(self._module_state(module), step)
        if self.exchange.last_context is not None:  # metrics of the whole step, logged at batch end
            self.fresh_metrics = self._step_metrics(self.exchange.last_context)

    def _step_metrics(self, ctx: StepContext) -> dict[str, float]:
        assert self.exchange is not None
        metrics = self.exchange.traffic.metrics()
        metrics["holograd/true_gradient_step"] = float(ctx.true_gradient)
        metrics["holograd/excluded_ranks"] = float(len(self.exchange.excluded))
        if "captured_energy" in ctx.extras:
            metrics["holograd/captured_energy"] = float(ctx.extras["captured_energy"])
        return metrics

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self.exchange is not None:
            checkpoint[CHECKPOINT_KEY] = {"config": self.config.as_dict(), "exchange": self.exchange.state_dict()}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Runs before ``setup``: stash the protocol state, applied in ``configure_ddp``."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is not None:
            self._pending_state = state["exchange"]
            if self.exchange is not None:  # already set up (e.g. restore after setup)
                self.exchange.load_state_dict(self._pending_state)
                self._pending_state = None
        return checkpoint
