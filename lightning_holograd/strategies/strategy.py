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
import warnings
from collections.abc import Generator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, ClassVar, Literal

import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.constants import default_pg_timeout
from typing_extensions import override

from ..engine import HoloGradExchange, StepContext
from ..engine.exchange import AggregationPath
from ..protocol import CodebookFit, CodebookStructure, FamilyName
from ..protocol.defaults import DEFAULT_TARGET_COMPRESSION, EstimateScale
from ..protocol.rounds import InnerStateName, OuterMomentumUnits
from .advice import (
    HoloGradSetupWarning,
    advise,
    check_single_optimizer,
    check_strategy_arguments,
)
from .checkpoint import (
    STATE_KEY,
    atomic_save,
    config_changes,
    exchange_state,
    protocol_state,
    trainable_state,
    writes_atomically,
)
from .claims import Claims
from .config import AggregationName, HoloGradConfig, ProjectionName, check_world_size
from .launcher import HoloGradLauncher, die_with_parent
from .lightning_private import (
    process_group_backend,
    process_group_timeout,
    replace_sigterm_collectives,
    set_launcher,
    start_method,
)
from .local_steps import LocalRounds, LocalStepsMixin, is_last_optimizer_step
from .metrics import HoloGradMetrics
from .registry import STRATEGY_NAMES, register_names
from .runtime import (
    TrainableSet,
    after_step,
    build_exchange,
    load_exchange_state,
    module_state,
    run_exchange,
)
from .signals import StopOnSignal, check_sigterm_grace

__all__ = ["HoloGradStrategy", "HoloGradStrategyMixin", "STRATEGY_NAMES"]

log = logging.getLogger(__name__)



class HoloGradStrategyMixin(LocalStepsMixin):
    """HoloGrad data parallelism: K scalars per rank and step instead of a gradient all-reduce.

    Args (protocol; see README "Strategy settings"):
        num_directions: K, scalars each rank sends per optimizer step (None: about
            D / ``target_compression``, resolved at setup from the model's D).
        directions: direction family (``sketch`` is O(D) for any K; ``subsample`` sends one
            coordinate per stratum of D/K, less noise than the sketch when K/D > ~1/2; ``gaussian``
            and ``rademacher`` are paper-faithful dense families; ``codebook`` is ADC;
            ``momentum`` is HoloGrad's momentum-centric mode; ``identity`` is an exact
            K = D debug family that reproduces DDP).
        aggregation / trim_ratio: robust aggregation across ranks (per direction; ``krum``
            picks whole rows).
        krum_byzantine: f for aggregation="krum" (needs world_size >= 2f + 3).
        clip_row_norms: scale rows above the median row norm down to it before aggregating.
        seed: the run's global seed string S_0 (all ranks must agree).
        codebook_rank, oja_lr, qr_every, exploration_weight, momentum_beta: family knobs.
        codebook_structure, codebook_fit, sketch_size, sketch_decay, tracking_lr: the codebook's
            basis structure (``factor``, ``block``, ``dense``), fit (``sketch`` or the old ``oja``),
            true-gradient sketch and tracking step (docs/PROTOCOL.md §5).
        diagnostic_every: every M optimizer steps, all-reduce the true gradient to log the captured
            energy ``holograd/captured_energy`` (``diagnostic`` traffic, outside the ratio; 0: off).
        chunk_size: coordinates of a direction materialised at once (None: sized to the device;
            speed and memory only, never the values).
        projection: ``backward`` (local backward + dot products) or ``jvp`` (forward-mode).
        audit_every: compare a parameter digest across ranks every N steps (0: never).
        sync_buffers: broadcast module buffers from rank 0 after every optimizer step.
        aggregation_path: how rows cross the wire (README "Bytes per rank"): ``all_gather``
            (every rank receives all N rows), ``sharded`` (all_to_all of column blocks, each
            rank aggregates one, all_gather of the aggregates: bytes per rank independent of
            N), ``all_reduce`` (``mean`` only, no verification), ``auto`` (the default: the
            cheapest of them that computes the same thing, decided at each step; ``all_gather``
            on N <= 2 ranks, so two-rank runs are bitwise those of ``all_gather``).
        target_compression: sets the default K (num_directions=None) to about D / target_compression.
        estimate_scale: factor on g_hat: ``unbiased`` (1), ``min_variance`` (1/(1 + v), the
            least mean-squared error; biased toward 0) or ``norm`` (1/sqrt(1 + v)).
        direction_groups: G groups of ranks (rank i in group i mod G) with independent
            directions, or ``"per_rank"`` (G = world size); 1 shares the directions. With
            G > 1, ``sharded`` shards within each group (not with ``"per_rank"``) and ``auto``
            takes it when its bytes formula is below the all_gather's; ``all_reduce`` is refused.
        local_steps: H, inner optimizer steps per round; each round exchanges the
            projected pseudo-gradient once (1: the gradient, every step).
        inner_state: the inner optimizer state at a round start: from public data, so a
            verifier can replay a round (``public_v``: Adam with m = 0 and the ranks' mean v
            per tensor; ``reset``), or each rank's own state kept (``private``, as local SGD;
            refused by ``ProofVerifier``).
        outer_lr, outer_momentum: the outer step theta -= outer_lr * delta_hat, with
            Nesterov momentum when outer_momentum > 0.
        outer_momentum_units: what the outer velocity sums: ``pseudo_gradient`` (DiLoCo's),
            or ``lr_normalized`` (each round's delta_hat over its summed inner lr, the step
            scaled back by the current round's: the outer step follows the LR schedule).
        scalar_bits: bits per direction scalar on the wire: 32 (float32, the default), or 8, 4,
            2 (unbiased stochastic rounding against a per-row scale, docs/PROTOCOL.md §9.5;
            ceil(K b / 8) + 4 bytes per row; needs ``aggregation_path`` ``all_gather`` or ``auto``).
        scalar_block: with ``scalar_bits`` < 32, scalars per float32 scale (0, the default: one
            scale per row). One scale per block of B keeps an outlier from flattening the rest
            of the row (4 ceil(K / B) scale bytes per row).
    Args (faults; README "Failure and recovery"):
        sigterm_grace: seconds a rank may take to stop after SIGTERM before it exits hard
            (a rank blocked in a collective cannot stop cleanly).
        resume_rank_map: {old rank: new rank} for resuming a checkpoint of another world
            size that slashed ranks (None: such a resume is refused, with the reason).
    Args (process group; as in ``DDPStrategy``): process_group_backend, timeout (also bounds
        every wait of the exchange and of verification), start_method.
    DistributedDataParallel arguments (``find_unused_parameters``, comm hooks, ...) are refused:
    the module is never wrapped in DDP, so they would do nothing.
    """

    # Set by each concrete class: the package's metrics callback and spawn/fork launcher.
    metrics_callback_cls: ClassVar[type]
    launcher_cls: ClassVar[type]

    def __init__(
        self,
        num_directions: int | None = None,
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
        codebook_structure: CodebookStructure = "factor",
        codebook_fit: CodebookFit = "sketch",
        sketch_size: int = 16,
        sketch_decay: float = 1.0,
        tracking_lr: float = 0.0,
        diagnostic_every: int = 0,
        chunk_size: int | None = None,
        projection: ProjectionName = "backward",
        audit_every: int = 100,
        sync_buffers: bool = True,
        aggregation_path: AggregationPath = "auto",
        direction_groups: int | Literal["per_rank"] = 1,
        local_steps: int = 1,
        inner_state: InnerStateName = "public_v",
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        outer_momentum_units: OuterMomentumUnits = "pseudo_gradient",
        scalar_bits: int = 32,
        scalar_block: int = 0,
        sigterm_grace: float = 10.0,
        resume_rank_map: dict[int, int] | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        target_compression: float = DEFAULT_TARGET_COMPRESSION,
        estimate_scale: EstimateScale = "unbiased",
        **kwargs: Any,
    ) -> None:
        self.config = HoloGradConfig(
            num_directions=num_directions, directions=directions, aggregation=aggregation, trim_ratio=trim_ratio,
            krum_byzantine=krum_byzantine, clip_row_norms=clip_row_norms,
            seed=seed, codebook_rank=codebook_rank, oja_lr=oja_lr, qr_every=qr_every,
            exploration_weight=exploration_weight, momentum_beta=momentum_beta,
            codebook_structure=codebook_structure, codebook_fit=codebook_fit, sketch_size=sketch_size,
            sketch_decay=sketch_decay, tracking_lr=tracking_lr, diagnostic_every=diagnostic_every,
            chunk_size=chunk_size, projection=projection, audit_every=audit_every, sync_buffers=sync_buffers,
            aggregation_path=aggregation_path,
            target_compression=target_compression, estimate_scale=estimate_scale,
            direction_groups=direction_groups, local_steps=local_steps, inner_state=inner_state, outer_lr=outer_lr,
            outer_momentum=outer_momentum, outer_momentum_units=outer_momentum_units, scalar_bits=scalar_bits,
            scalar_block=scalar_block,
        )
        lightning_arguments = check_strategy_arguments(kwargs)  # DDP-only arguments are refused
        super().__init__(process_group_backend=process_group_backend, timeout=timeout, start_method=start_method,
                         **lightning_arguments)
        self.exchange: HoloGradExchange | None = None  # built at setup, on every rank
        self.resolved_config: HoloGradConfig | None = None  # config with K resolved for the model, at setup
        self._trainable: TrainableSet | None = None  # the trainable set the family follows
        self._pending_trainable: dict[str, Any] | None = None
        # Rank 0's exchange state after a spawn/fork fit, in the process that called fit.
        self.final_protocol_state: dict[str, Any] | None = None
        self._claims: Claims | None = None
        self._rounds: LocalRounds | None = None  # with local_steps > 1, built at setup
        self._pending_state: dict[str, Any] | None = None  # from a checkpoint loaded before setup
        self._pending_rounds: dict[str, Any] | None = None
        self._sync_blocked = False
        self._step_inputs: list[tuple[Any, int]] = []  # (batch, batch_idx) of this step's micro-batches
        self._true_gradient_requested = False
        self._step_metrics: dict[str, float] = {}  # of the last optimizer step, until logged
        self.sigterm_grace = check_sigterm_grace(sigterm_grace)
        self.resume_rank_map = resume_rank_map
        self._stop_on_signal: StopOnSignal | None = None

    # -- registration and launching -----------------------------------------------------------
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``holograd`` (script launcher), ``holograd_spawn`` and ``holograd_fork``
        (``registry.register_names``: a name another package registered is refused)."""
        register_names(cls, strategy_registry)

    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()  # type: ignore[misc]
        if start_method(self) != "popen":
            set_launcher(self, self.launcher_cls(self, start_method=start_method(self)))

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
            self._load_protocol_state(self._pending_state, self._pending_trainable)
            self._pending_state = self._pending_trainable = None
        if self._rounds is not None and self._pending_rounds is not None:
            self._rounds.load_state_dict(self._pending_rounds)
            self._pending_rounds = None
        self._install_stop_handling()
        trainer = self.lightning_module.trainer
        if not any(isinstance(cb, self.metrics_callback_cls) for cb in trainer.callbacks):
            trainer.callbacks.append(self.metrics_callback_cls())
        family = self.exchange.family
        if self.is_global_zero:
            log.info("HoloGrad: D=%d trainable coordinates, K=%d scalars/step%s, family=%s, world_size=%d, groups=%d",
                     family.dim, family.num_directions,
                     " (num_directions=None: D / target_compression)" if self.config.num_directions is None else "",
                     family.name, self.world_size, self.exchange.num_groups)

    @override
    def setup(self, trainer: Any) -> None:
        """``DDPStrategy.setup``, then the checks that need the optimizers (which exist only now)."""
        super().setup(trainer)  # type: ignore[misc]
        if self.exchange is None or trainer.state.fn != "fit":  # TrainerFn.FITTING, in either namespace
            return
        check_single_optimizer(self.optimizers)
        assert self.resolved_config is not None
        if self.is_global_zero:
            for message in advise(self.resolved_config, self.exchange.family.dim, self.world_size, self.optimizers):
                warnings.warn(message, HoloGradSetupWarning, stacklevel=2)

    def _build_exchange(self) -> HoloGradExchange:
        self._claims = Claims(self)
        # A checkpoint loaded before setup decides the direction version (0.1.x checkpoints: 1).
        self._rounds = LocalRounds(self) if self.config.local_steps > 1 else None
        recompute = self._claims.recompute if self._rounds is None else self._rounds.replay
        exchange, self.resolved_config = build_exchange(self.config, self.lightning_module, self.world_size,
                                                        self.root_device, process_group_backend(self),
                                                        recompute=recompute, timeout=process_group_timeout(self),
                                                        resumed=(self._pending_state or {}).get("family"))
        self._trainable = TrainableSet(self.lightning_module)
        return exchange

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
        if self.config.local_steps > 1 and not self.lightning_module.automatic_optimization:
            raise ValueError(f"local_steps={self.config.local_steps} needs automatic optimization: a verifier "
                             "replays the inner steps, which manual optimization keeps inside training_step. "
                             "HINT: use automatic optimization, or local_steps=1.")

    def _module_state(self) -> list[torch.Tensor]:
        return module_state(self.lightning_module)

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
        ``projection="jvp"`` there is no local backward. tests/test_private_names.py pins the copied body."""
        module = self.lightning_module
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        automatic = module.automatic_optimization
        if self.config.projection == "backward" or not automatic:
            self.precision_plugin.backward(closure_loss, module, optimizer, *args, **kwargs)
        if automatic and not self._sync_blocked and self.exchange is not None and self._rounds is None:
            self.exchange_gradients()
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        rounds = self._rounds if self.exchange is not None else None
        if rounds is not None:
            rounds.before_inner_step()
        elif self.exchange is not None and not self.lightning_module.automatic_optimization:
            self.exchange_gradients()  # manual optimization: exchange what manual_backward accumulated
        output = super().optimizer_step(optimizer, closure, model, **kwargs)  # type: ignore[misc]
        if rounds is not None:
            inputs, self._step_inputs = self._step_inputs, []
            if rounds.after_inner_step(inputs) or is_last_optimizer_step(self.lightning_module.trainer):
                self._end_round()
        elif self.exchange is not None:
            self._after_optimizer_step()
        return output

    def request_true_gradient(self) -> None:
        """Make the next exchange a true-gradient step (the all-reduced mean gradient)."""
        if self._rounds is not None:
            raise ValueError(f"true-gradient steps (ADCBootstrap) need local_steps=1, got local_steps="
                             f"{self.config.local_steps}. HINT: remove ADCBootstrap, or set local_steps=1.")
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
        assert self._trainable is not None and self.resolved_config is not None
        self.resolved_config = self._trainable.follow(self.lightning_module, self.exchange, self.config,
                                                      self.root_device) or self.resolved_config
        true_gradient, self._true_gradient_requested = self._true_gradient_requested, False
        project = None if true_gradient else self._claims.projector(inputs)
        return run_exchange(self.exchange, self._claims.parameters(), inputs, project, true_gradient,
                            scale=self.resolved_config.scale_factor(self.exchange.family.dim),
                            diagnostic_every=self.config.diagnostic_every)

    def _after_optimizer_step(self) -> None:
        assert self.exchange is not None
        metrics = after_step(self.exchange, self.config, self.lightning_module)
        if metrics:  # metrics of the whole step, logged at batch end
            self._step_metrics = metrics

    def pop_step_metrics(self) -> dict[str, float]:
        """The metrics of the last optimizer step, once (empty until the next step ends)."""
        metrics, self._step_metrics = self._step_metrics, {}
        return metrics

    # -- checkpoints ---------------------------------------------------------------------------
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self.exchange is not None:
            assert self.resolved_config is not None and self._trainable is not None
            checkpoint[STATE_KEY] = protocol_state(self.resolved_config.as_dict(), self.exchange.state_dict(),
                                                   self._trainable.state_dict())
            if self._rounds is not None:
                checkpoint[STATE_KEY]["rounds"] = self._rounds.state_dict()
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
            self._pending_state, self._pending_trainable = state, trainable_state(checkpoint)
            if self.exchange is not None:  # already set up (e.g. restore after setup)
                self._load_protocol_state(state, self._pending_trainable)
                self._pending_state = self._pending_trainable = None
        self._pending_rounds = checkpoint.get(STATE_KEY, {}).get("rounds")
        if self._rounds is not None and self._pending_rounds is not None:
            self._rounds.load_state_dict(self._pending_rounds)
            self._pending_rounds = None
        return checkpoint

    def _load_protocol_state(self, state: dict[str, Any], trainable: dict[str, Any] | None) -> None:
        assert self.exchange is not None and self._trainable is not None
        rebuilt = load_exchange_state(self.exchange, state, self.config, self.root_device, self.resume_rank_map)
        self.resolved_config = rebuilt or self.resolved_config
        if trainable is not None:  # the set the saved family followed; the next step follows the current one
            self._trainable.load_state_dict(trainable)


class HoloGradStrategy(HoloGradStrategyMixin, DDPStrategy):
    __doc__ = HoloGradStrategyMixin.__doc__
    metrics_callback_cls = HoloGradMetrics
    launcher_cls = HoloGradLauncher
