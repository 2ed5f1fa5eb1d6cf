"""HoloGradStrategy: Lightning's DDP machinery with the gradient all-reduce replaced.

Launchers, cluster environments, process-group setup, the distributed sampler and
``reduce``/``broadcast``/``barrier`` come from Lightning's ``DDPStrategy``. What changes:
the module is not wrapped in ``DistributedDataParallel``; instead, after the backward
of the last micro-batch of an optimizer step, ``HoloGradExchange.step`` turns the local
gradient into K scalars, exchanges them and writes the same estimate g_hat into every
rank's ``.grad``. ``on_after_backward``, gradient clipping and the optimizer then see
g_hat, as they would see the all-reduced gradient under DDP.

``HoloGradStrategyMixin`` holds the Lightning lifecycle overrides, shared by the
``lightning.pytorch`` class here and the ``pytorch_lightning`` twin (``pl.py``). What a
claim is lives in ``claims.py``, the checkpoint format in ``checkpoint.py``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, ClassVar, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.constants import default_pg_timeout
from typing_extensions import override

from ..engine import Comm, HoloGradExchange, StepContext, TrafficMeter
from ..protocol import CommitmentChain, FamilyName, step_batch_hash
from .checkpoint import STATE_KEY, atomic_save, config_changes, exchange_state, protocol_state, writes_atomically
from .claims import Claims, flat_grad, write_grad
from .config import AggregationName, HoloGradConfig, ProjectionName, check_world_size
from .launcher import HoloGradLauncher, die_with_parent
from .lightning_private import replace_sigterm_collectives
from .metrics import HoloGradMetrics
from .signals import StopOnSignal

__all__ = ["HoloGradStrategy", "HoloGradStrategyMixin", "STRATEGY_NAMES"]

log = logging.getLogger(__name__)

STRATEGY_NAMES = {"holograd": "popen", "holograd_spawn": "spawn", "holograd_fork": "fork"}


class HoloGradStrategyMixin:
    """HoloGrad data parallelism: K scalars per rank and step instead of a gradient all-reduce.

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
        chunk_size: coordinates of a direction materialised at once (None: sized to the device;
            speed and memory only, never the values).
        projection: ``backward`` (local backward + dot products) or ``jvp`` (forward-mode).
        audit_every: compare a parameter digest across ranks every N steps (0: never).
        sync_buffers: broadcast module buffers from rank 0 after every optimizer step.
    Args (faults; README "Failure and recovery"):
        sigterm_grace: seconds a rank may take to stop after SIGTERM before it exits hard
            (a rank blocked in a collective cannot stop cleanly).
        resume_rank_map: {old rank: new rank} for resuming a checkpoint of another world
            size that slashed ranks (None: such a resume is refused, with the reason).
    Args (process group; as in ``DDPStrategy``): process_group_backend, timeout (also bounds
        every wait of the exchange and of verification), start_method.
    """

    # Set by each concrete class: the package's metrics callback and spawn/fork launcher.
    metrics_callback_cls: ClassVar[type]
    launcher_cls: ClassVar[type]

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
        chunk_size: int | None = None,
        projection: ProjectionName = "backward",
        audit_every: int = 100,
        sync_buffers: bool = True,
        sigterm_grace: float = 10.0,
        resume_rank_map: dict[int, int] | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        self.config = HoloGradConfig(
            num_directions=num_directions, directions=directions, aggregation=aggregation, trim_ratio=trim_ratio,
            krum_byzantine=krum_byzantine, clip_row_norms=clip_row_norms,
            seed=seed, codebook_rank=codebook_rank, oja_lr=oja_lr, qr_every=qr_every,
            exploration_weight=exploration_weight, momentum_beta=momentum_beta,
            chunk_size=chunk_size, projection=projection, audit_every=audit_every, sync_buffers=sync_buffers,
        )
        super().__init__(process_group_backend=process_group_backend, timeout=timeout, start_method=start_method,
                         **kwargs)
        self.exchange: HoloGradExchange | None = None  # built at setup, on every rank
        # Rank 0's exchange state after a spawn/fork fit, in the process that called fit.
        self.final_protocol_state: dict[str, Any] | None = None
        self._claims: Claims | None = None
        self._pending_state: dict[str, Any] | None = None  # from a checkpoint loaded before setup
        self._sync_blocked = False
        self._step_inputs: list[tuple[Any, int]] = []  # (batch, batch_idx) of this step's micro-batches
        self._true_gradient_requested = False
        self._step_metrics: dict[str, float] = {}  # of the last optimizer step, until logged
        self.sigterm_grace = float(sigterm_grace)
        self.resume_rank_map = resume_rank_map
        self._stop_on_signal: StopOnSignal | None = None

    # -- registration and launching -----------------------------------------------------------
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``holograd`` (script launcher), ``holograd_spawn`` and ``holograd_fork``.

        Registering again replaces only this package's own entries (a re-import, a module
        reload); a name that another package registered is refused.
        """
        for name, start_method in STRATEGY_NAMES.items():
            existing = strategy_registry[name]["strategy"] if name in strategy_registry else None
            if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__,
                                                                                          cls.__qualname__):
                raise ValueError(f"strategy name {name!r} is already registered to {existing.__module__}."
                                 f"{existing.__qualname__}. HINT: pass HoloGradStrategy(...) as an instance.")
            strategy_registry.register(name, cls, description=f"HoloGrad scalar exchange ({start_method} launcher)",
                                       override=True, start_method=start_method)

    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()  # type: ignore[misc]
        if self._start_method != "popen":  # type: ignore[attr-defined]
            self._launcher = self.launcher_cls(self, start_method=self._start_method)  # type: ignore[attr-defined]

    # -- setup -----------------------------------------------------------------------------
    @override
    def setup_environment(self) -> None:
        parent = getattr(self.launcher, "parent_pid", None)  # spawn/fork: ranks die with the parent
        if parent is not None and parent != os.getpid():
            die_with_parent(parent)
        super().setup_environment()  # type: ignore[misc]

    @override
    def configure_ddp(self) -> None:
        """Called by ``DDPStrategy.setup`` when fitting: build the exchange instead of wrapping
        the module in ``DistributedDataParallel`` (so ``DDPStrategy.configure_ddp`` is not called)."""
        self._check_supported()
        self.exchange = self._build_exchange()
        check_world_size(self.exchange.aggregator, self.world_size)
        self.exchange.comm.broadcast(self._module_state(), kind="setup")  # rank 0's init everywhere
        if self._pending_state is not None:
            self.exchange.load_state_dict(self._pending_state, self.resume_rank_map)
            self._pending_state = None
        self._install_stop_handling()
        trainer = self.lightning_module.trainer
        if not any(isinstance(cb, self.metrics_callback_cls) for cb in trainer.callbacks):
            trainer.callbacks.append(self.metrics_callback_cls())
        family = self.exchange.family
        log.info("HoloGrad: D=%d trainable coordinates, K=%d scalars/step, family=%s, world_size=%d",
                 family.dim, family.num_directions, family.name, self.world_size)

    def _build_exchange(self) -> HoloGradExchange:
        params = [p for p in self.lightning_module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the LightningModule has no parameter with requires_grad=True: nothing to train.")
        dim = sum(p.numel() for p in params)
        # A checkpoint loaded before setup decides the direction version (0.1.x checkpoints: 1).
        family = self.config.build_family(dim, (self._pending_state or {}).get("family"))
        if hasattr(family, "to"):
            family.to(self.root_device)
        comm_device = self.root_device if self._get_process_group_backend() == "nccl" else torch.device("cpu")
        comm = Comm(TrafficMeter(self.world_size, dim), device=comm_device, timeout=self._timeout)
        self._claims = Claims(self, family)
        chain = CommitmentChain(self.config.seed, direction_version=family.direction_version)
        return HoloGradExchange(family, self.config.build_aggregator(), chain, comm,
                                recompute=self._claims.recompute,
                                to_cpu=lambda inputs: move_data_to_device(inputs, "cpu"))

    def _install_stop_handling(self) -> None:
        """SIGTERM on any rank stops every rank at the same step (``signals.py``)."""
        trainer = self.lightning_module.trainer
        self._stop_on_signal = StopOnSignal(self.exchange, self.launcher, self.sigterm_grace)
        replace_sigterm_collectives(trainer, self._stop_on_signal.notify)
        self._stop_on_signal.install()

    @override
    def teardown(self) -> None:
        if self._stop_on_signal is not None:
            self._stop_on_signal.uninstall()
            self._stop_on_signal = None
        super().teardown()  # type: ignore[misc]

    @override
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

    def _module_state(self) -> Iterator[torch.Tensor]:
        module = self.lightning_module
        yield from (p.data for p in module.parameters())
        yield from module.buffers()

    # -- which micro-batch is the last one -------------------------------------------------
    @contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Lightning enters this around every non-final micro-batch: no exchange there."""
        previous, self._sync_blocked = self._sync_blocked, True
        try:
            yield None
        finally:
            self._sync_blocked = previous

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if args:  # (batch, batch_idx): kept for the batch hash and for JVP projection
            self._step_inputs.append((args[0], int(args[1]) if len(args) > 1 else 0))
        return super().training_step(*args, **kwargs)  # type: ignore[misc]

    # -- the exchange ------------------------------------------------------------------------
    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``Strategy.backward`` with the exchange between the local backward and
        ``precision_plugin.post_backward`` (which calls ``on_after_backward``); with
        ``projection="jvp"`` there is no local backward. ``test_hook_order`` pins the order."""
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

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        if self.exchange is not None and not self.lightning_module.automatic_optimization:
            self.exchange_gradients()  # manual optimization: exchange what manual_backward accumulated
        output = super().optimizer_step(optimizer, closure, model, **kwargs)  # type: ignore[misc]
        if self.exchange is not None:
            self._after_optimizer_step()
        return output

    def request_true_gradient(self) -> None:
        """Make the next exchange a true-gradient step (the all-reduced mean gradient)."""
        self._true_gradient_requested = True

    @torch.no_grad()
    def exchange_gradients(self) -> StepContext:
        """Run one HoloGrad step on every rank and write g_hat into ``.grad``.

        Call contract: every rank calls it once per optimizer step (blocking collectives).
        """
        assert self.exchange is not None and self._claims is not None
        if not self._step_inputs:
            raise RuntimeError("HoloGrad found no training batch for this step. HINT: training_step must run "
                               "(and return a loss) on every rank for every optimizer step.")
        inputs, self._step_inputs = self._step_inputs, []
        batch_hash = step_batch_hash([batch for batch, _ in inputs])
        params = self._claims.parameters()
        if self._true_gradient_requested:
            self._true_gradient_requested = False
            estimate = self.exchange.true_gradient_step(flat_grad(params), batch_hash)
        else:
            estimate = self.exchange.step(batch_hash, self._claims.projector(inputs), extras={"inputs": inputs})
        write_grad(params, estimate)
        assert self.exchange.last_context is not None
        return self.exchange.last_context

    def _after_optimizer_step(self) -> None:
        assert self.exchange is not None
        if self.config.sync_buffers:
            buffers = list(self.lightning_module.buffers())
            if buffers:
                self.exchange.comm.broadcast(buffers, kind="buffers")
        step = self.exchange.chain.step
        if self.config.audit_every and step % self.config.audit_every == 0:
            self.exchange.audit(self._module_state(), step)
        ctx = self.exchange.last_context
        if ctx is not None:  # metrics of the whole step, logged at batch end
            self._step_metrics = self.exchange.traffic.metrics()
            self._step_metrics["holograd/true_gradient_step"] = float(ctx.true_gradient)
            self._step_metrics["holograd/slashed_ranks"] = float(len(self.exchange.slashing.slashed))
            if "captured_energy" in ctx.extras:
                self._step_metrics["holograd/captured_energy"] = float(ctx.extras["captured_energy"])

    def pop_step_metrics(self) -> dict[str, float]:
        """The metrics of the last optimizer step, once (empty until the next step ends)."""
        metrics, self._step_metrics = self._step_metrics, {}
        return metrics

    # -- checkpoints ---------------------------------------------------------------------------
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self.exchange is not None:
            checkpoint[STATE_KEY] = protocol_state(self.config.as_dict(), self.exchange.state_dict())
        if storage_options is None and writes_atomically(self.checkpoint_io, filepath):  # type: ignore[attr-defined]
            if self.is_global_zero:  # type: ignore[attr-defined]
                atomic_save(checkpoint, filepath)
            return
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # type: ignore[misc]

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Runs before ``setup``: stash the protocol state, applied in ``configure_ddp``."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)  # type: ignore[misc]
        state = exchange_state(checkpoint)
        for change in config_changes(checkpoint, self.config.as_dict()):
            log.warning("resuming with a changed setting: %s", change)
        if state is not None:
            self._pending_state = state
            if self.exchange is not None:  # already set up (e.g. restore after setup)
                self.exchange.load_state_dict(state, self.resume_rank_map)
                self._pending_state = None
        return checkpoint


class HoloGradStrategy(HoloGradStrategyMixin, DDPStrategy):
    __doc__ = HoloGradStrategyMixin.__doc__
    metrics_callback_cls = HoloGradMetrics
    launcher_cls = HoloGradLauncher
