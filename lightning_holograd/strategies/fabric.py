"""HoloGrad for Lightning Fabric: ``Fabric(strategy="holograd")``.

The same protocol as ``HoloGradStrategy``, through the same code (``runtime.py``, the
engine, the claim helpers); only the places where Fabric hands over control differ:

- ``fabric.setup(model, optimizer)``: the module is not wrapped in DDP. The exchange is
  built for its trainable parameters (K resolved from D, logged once), rank 0's
  parameters and buffers are broadcast, and the setup checks and warnings of the Trainer
  strategy run (one optimizer; compression; SGD with an inflated estimate).
- The batch commitment: every batch that a dataloader set up with
  ``fabric.setup_dataloaders`` yields while the model is in training mode is recorded;
  ``fabric.strategy.commit_batch(batch)`` records a batch from anywhere else. The next
  exchange commits to the batches recorded since the last one (docs/PROTOCOL.md §1.3).
- ``fabric.backward(loss)``: Fabric's backward, then the exchange writes g_hat into
  ``.grad``, as DDP's all-reduce would; inside ``fabric.no_backward_sync(model)`` (gradient
  accumulation) there is no exchange.
- ``optimizer.step()``: the step, then buffer sync, the audit when due and the step's
  metrics, which ``fabric.strategy.pop_step_metrics()`` returns for ``fabric.log_dict``.
- ``fabric.save`` / ``fabric.load``: the protocol state travels under the checkpoint key
  of ``checkpoint.py``; ``fabric.load`` restores it (also before ``fabric.setup``) and
  does not return it among the remaining items. Local files are written atomically
  (``AtomicCheckpointIO`` replaces Fabric's default writer; a user's CheckpointIO is kept).
- Faults, as with the Trainer: every wait of the exchange is bounded by ``timeout``; the
  commit's flag byte carries non-finite gradients and stop requests. ``fabric.setup``
  installs a SIGTERM handler (main thread): the signal makes every rank raise
  ``StopRequested`` (a ``SystemExit``, code 143) from ``fabric.backward`` at the same step,
  and a watchdog exits a rank still blocked ``sigterm_grace`` seconds later; a handler
  the script installed before ``fabric.setup`` is still called. ``teardown()`` removes it.

- Local steps (``local_steps`` = H > 1, docs/PROTOCOL.md §9.2): ``fabric.backward`` is
  the rank's own backward and ``optimizer.step()`` an inner step; the H-th one exchanges
  the round's pseudo-gradient (committed to the round's batches) and makes the outer
  step, through the Trainer's round code (``local_steps.LocalRounds``).
  ``fabric.strategy.finish_round()`` exchanges a round cut short (the end of training);
  ``fabric.strategy.shared_parameters()`` puts the shared round-start parameters into the
  model for an evaluation mid-round; mid-round, ``fabric.save`` writes those and the
  public round-start optimizer state.

Not available with Fabric: ``projection="jvp"`` (it re-runs a ``training_step``) and the
Trainer callbacks (``ProofVerifier``, ``ADCBootstrap``, ``ByzantineSimulator``);
``request_true_gradient()`` is, without local steps.
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.strategies import DDPStrategy
from torch import nn
from torch.distributed.constants import default_pg_timeout
from typing_extensions import override

from ..engine import HoloGradExchange, StepContext
from .advice import (
    HoloGradSetupWarning,
    advise,
    check_single_optimizer,
    check_strategy_arguments,
)
from .checkpoint import (
    STATE_KEY,
    AtomicCheckpointIO,
    exchange_state,
    protocol_state,
    trainable_state,
    writes_atomically,
)
from .claims import backward_projector, trainable_parameters
from .config import HoloGradConfig
from .lightning_private import (
    BackwardSyncControl,
    process_group_backend,
    process_group_timeout,
    set_backward_sync_control,
)
from .local_steps import LocalRounds
from .registry import register_names
from .runtime import (
    TrainableSet,
    after_step,
    build_exchange,
    load_exchange_state,
    module_state,
    run_exchange,
)
from .signals import StopOnSignal, check_sigterm_grace

__all__ = ["HoloGradFabricStrategy"]

log = logging.getLogger(__name__)


class _NoExchange(BackwardSyncControl):
    """``fabric.no_backward_sync(model)``: no exchange for the backward calls inside."""

    def __init__(self, strategy: HoloGradFabricStrategy) -> None:
        self.strategy = strategy

    @override
    def no_backward_sync(self, module: nn.Module, enabled: bool) -> AbstractContextManager:
        return self.strategy.blocked() if enabled else _nothing()


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


class _RecordingLoader:
    """Yields what ``loader`` yields; records each batch in ``strategy`` while its model trains.

    Fabric's own loader wrapper copies a loader's attributes (sampler, batch_size, ...)
    and iterates it, so this proxy carries the same attributes and forwards iteration.
    """

    def __init__(self, loader: Any, strategy: HoloGradFabricStrategy) -> None:
        self.__dict__.update(loader.__dict__)
        self.holograd_loader, self.holograd_strategy = loader, strategy

    def __len__(self) -> int:
        return len(self.holograd_loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.holograd_loader:
            self.holograd_strategy._record_from_loader(batch)
            yield batch


class HoloGradFabricStrategy(DDPStrategy):
    """HoloGrad data parallelism for Fabric: K scalars per rank and step instead of a gradient all-reduce.

    Args: the protocol settings of ``HoloGradStrategy`` (``num_directions``, ``directions``,
    ``aggregation``, ... ``estimate_scale``; see README "Strategy settings"), except
    ``projection="jvp"``; ``sigterm_grace`` and ``resume_rank_map`` as in ``HoloGradStrategy``; ``process_group_backend``,
    ``timeout`` (also bounds every wait of the exchange) and ``start_method`` as in Fabric's
    ``DDPStrategy``. DistributedDataParallel arguments are refused.
    """

    def __init__(self, process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout,
                 start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen", sigterm_grace: float = 10.0,
                 resume_rank_map: dict[int, int] | None = None, **settings: Any) -> None:
        self.sigterm_grace = check_sigterm_grace(sigterm_grace)
        self.resume_rank_map = resume_rank_map
        self._stop_on_signal: StopOnSignal | None = None
        self._previous_sigterm: Any = None
        fields = HoloGradConfig.__dataclass_fields__
        self.config = HoloGradConfig(**{k: v for k, v in settings.items() if k in fields})
        if self.config.projection == "jvp":
            raise ValueError("projection='jvp' re-runs a training_step, which Fabric does not have. "
                             "HINT: use projection='backward' (the default) with Fabric.")
        lightning = check_strategy_arguments({k: v for k, v in settings.items() if k not in fields})
        super().__init__(process_group_backend=process_group_backend, timeout=timeout, start_method=start_method,
                         **lightning)
        set_backward_sync_control(self, _NoExchange(self))
        self.exchange: HoloGradExchange | None = None  # built by setup_module, on every rank
        self.resolved_config: HoloGradConfig | None = None
        self._module: nn.Module | None = None
        self._trainable: TrainableSet | None = None
        self._optimizers_set_up: list[torch.optim.Optimizer] = []
        self._batches: list[Any] = []  # this step's batches, in the order they were recorded
        self._blocked = False
        self._true_gradient_requested = False
        self._step_metrics: dict[str, float] = {}
        self._pending: tuple[dict[str, Any], dict[str, Any] | None] | None = None
        self._rounds: LocalRounds | None = None  # with local_steps > 1, built by setup_module
        self._pending_rounds: dict[str, Any] | None = None  # a checkpoint's round state, loaded at setup

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``holograd``, ``holograd_spawn`` and ``holograd_fork`` in Fabric's registry."""
        register_names(cls, strategy_registry)

    # -- setup -----------------------------------------------------------------------------
    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        """No DDP wrapper: build the exchange for ``module`` and broadcast rank 0's state."""
        if self.exchange is not None:
            raise ValueError("HoloGradFabricStrategy exchanges the gradient of one model, and fabric.setup was "
                             "called again. HINT: put all trainable modules in one nn.Module and set it up once.")
        if getattr(self.precision, "scaler", None) is not None:
            raise ValueError(f"precision={type(self.precision).__name__} with a GradScaler is not supported by "
                             "HoloGrad. HINT: use precision='bf16-mixed' (or '32-true').")
        self._module = module
        resumed = self._pending[0]["family"] if self._pending is not None else None  # sets the direction version
        self.exchange, self.resolved_config = build_exchange(self.config, module, self.world_size, self.root_device,
                                                             process_group_backend(self), resumed=resumed,
                                                             timeout=process_group_timeout(self))
        self._trainable = TrainableSet(module)
        if self.config.local_steps > 1:
            self._rounds = LocalRounds(self, module=lambda: self._module, optimizer=self._round_optimizer)
        self.exchange.comm.broadcast(module_state(module), kind="setup")
        if self._pending is not None:
            self._load_protocol_state(*self._pending)
            self._pending = None
        self._install_stop_handling()
        if self.is_global_zero:
            family = self.exchange.family
            log.info("HoloGrad (Fabric): D=%d trainable coordinates, K=%d scalars/step, family=%s, world_size=%d",
                     family.dim, family.num_directions, family.name, self.world_size)
        return module

    def _install_stop_handling(self) -> None:
        """SIGTERM stops every rank at the same step (``signals.py``); main thread only."""
        if threading.current_thread() is not threading.main_thread():
            return
        assert self.exchange is not None
        self._stop_on_signal = StopOnSignal(self.exchange, None, self.sigterm_grace)  # ranks share no launcher kill
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._stop_on_signal.install()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        assert self._stop_on_signal is not None
        self._stop_on_signal.notify(signum, frame)
        if callable(self._previous_sigterm):  # the script's own handler, if it had one
            self._previous_sigterm(signum, frame)

    @override
    def teardown(self) -> None:
        if self._rounds is not None and self._rounds.in_round:
            log.warning("%d inner steps of the last local-steps round were never exchanged, so the model holds this "
                        "rank's own parameters. HINT: call fabric.strategy.finish_round() on every rank after the "
                        "training loop.", len(self._rounds.steps))
        if self._stop_on_signal is not None:
            self._stop_on_signal.uninstall()
            signal.signal(signal.SIGTERM, self._previous_sigterm or signal.SIG_DFL)
            self._stop_on_signal = None
        super().teardown()

    @override
    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """One optimizer only; the setup warnings once the first one exists."""
        self._optimizers_set_up.append(optimizer)
        check_single_optimizer(self._optimizers_set_up)
        if self.exchange is not None and self.is_global_zero:
            assert self.resolved_config is not None
            for message in advise(self.resolved_config, self.exchange.family.dim, self.world_size, [optimizer]):
                warnings.warn(message, HoloGradSetupWarning, stacklevel=2)
        output = super().setup_optimizer(optimizer)
        if self._rounds is not None:
            if self._pending_rounds is not None:
                self._rounds.load_state_dict(self._pending_rounds)
                self._pending_rounds = None
            self._rounds.start_training()  # checks the optimizer against inner_state, starts round 1
        return output

    def _round_optimizer(self) -> torch.optim.Optimizer:
        if not self._optimizers_set_up:
            raise RuntimeError("local_steps > 1 needs the optimizer. HINT: fabric.setup(model, optimizer), or "
                               "fabric.setup_optimizers(optimizer) before the first step.")
        return self._optimizers_set_up[0]

    @override
    def process_dataloader(self, dataloader: Any) -> Any:
        return _RecordingLoader(super().process_dataloader(dataloader), self)

    # -- the batches of a step ----------------------------------------------------------------
    def commit_batch(self, batch: Any) -> None:
        """Record ``batch`` as part of this step's commitment (for batches that do not come
        from a dataloader set up with ``fabric.setup_dataloaders``). Call before ``fabric.backward``."""
        self._batches.append(batch)

    def _record_from_loader(self, batch: Any) -> None:
        if self._module is not None and self._module.training:
            self._batches.append(batch)

    @contextmanager
    def blocked(self) -> Iterator[None]:
        previous, self._blocked = self._blocked, True
        try:
            yield None
        finally:
            self._blocked = previous

    # -- the exchange ----------------------------------------------------------------------------
    @override
    def backward(self, tensor: torch.Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        """Fabric's backward, then (outside ``no_backward_sync``) the exchange."""
        super().backward(tensor, module, *args, **kwargs)
        if self.exchange is not None and not self._blocked and self._rounds is None:
            self.exchange_gradients()

    def request_true_gradient(self) -> None:
        """Make the next exchange a true-gradient step (the all-reduced mean gradient)."""
        if self._rounds is not None:
            raise ValueError(f"true-gradient steps need local_steps=1, got local_steps={self.config.local_steps}. "
                             "HINT: set local_steps=1 to request true-gradient steps.")
        self._true_gradient_requested = True

    @torch.no_grad()
    def exchange_gradients(self) -> StepContext:
        """One HoloGrad step on every rank; g_hat into ``.grad``. Call contract: every rank, once per step."""
        assert self.exchange is not None and self._module is not None and self._trainable is not None
        if not self._batches:
            raise RuntimeError("HoloGrad found no batch to commit for this step. HINT: iterate a dataloader set up "
                               "with fabric.setup_dataloaders while the model is in train mode, or call "
                               "fabric.strategy.commit_batch(batch) before fabric.backward(loss).")
        batches, self._batches = self._batches, []
        self.resolved_config = self._trainable.follow(self._module, self.exchange, self.config,
                                                      self.root_device) or self.resolved_config
        assert self.resolved_config is not None
        params = trainable_parameters(self._module)
        true_gradient, self._true_gradient_requested = self._true_gradient_requested, False
        project = None if true_gradient else backward_projector(self.exchange.family, params)
        return run_exchange(self.exchange, params, [(batch, i) for i, batch in enumerate(batches)], project,
                            true_gradient, scale=self.resolved_config.scale_factor(self.exchange.family.dim),
                            diagnostic_every=self.config.diagnostic_every)

    @override
    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        if self._rounds is not None and self.exchange is not None:
            return self._inner_step(optimizer, **kwargs)
        output = super().optimizer_step(optimizer, **kwargs)
        if self.exchange is not None and self._module is not None:
            metrics = after_step(self.exchange, self.config, self._module)
            self._step_metrics = metrics or self._step_metrics
        return output

    def _inner_step(self, optimizer: Any, **kwargs: Any) -> Any:
        """Local steps: the rank's own optimizer step; the round's last one ends the round."""
        assert self._rounds is not None
        if not self._batches:
            raise RuntimeError("HoloGrad found no batch for this inner step. HINT: iterate a dataloader set up "
                               "with fabric.setup_dataloaders while the model is in train mode, or call "
                               "fabric.strategy.commit_batch(batch) before fabric.backward(loss).")
        self._rounds.before_inner_step()
        output = super().optimizer_step(optimizer, **kwargs)
        batches, self._batches = self._batches, []
        if self._rounds.after_inner_step([(batch, i) for i, batch in enumerate(batches)]):
            self._end_round()
        return output

    def _end_round(self) -> None:
        """Exchange the round's pseudo-gradients and make the outer step (every rank), then
        buffers, audit and metrics, then a new round."""
        assert self._rounds is not None and self.exchange is not None and self._module is not None
        self._rounds.finish()
        self._step_metrics = after_step(self.exchange, self.config, self._module) or self._step_metrics
        self._rounds.begin()

    def finish_round(self) -> bool:
        """With local steps: exchange the inner steps of a round cut short (after the training
        loop, before evaluating or saving the final model). Call contract: every rank, at the
        same point. Returns whether there was a round to finish (False without local steps)."""
        if self._rounds is None or not self._rounds.in_round:
            return False
        self._end_round()
        return True

    def shared_parameters(self) -> AbstractContextManager:
        """A context in which the model holds the shared parameters of the current round's
        start (the same on every rank); this rank's own are put back on exit. Without local
        steps, or at a round boundary, it changes nothing."""
        return self._rounds.shared() if self._rounds is not None else _nothing()

    def pop_step_metrics(self) -> dict[str, float]:
        """The ``holograd/...`` metrics of the last optimizer step, once (for ``fabric.log_dict``)."""
        metrics, self._step_metrics = self._step_metrics, {}
        return metrics

    # -- checkpoints -------------------------------------------------------------------------------
    @override
    def save_checkpoint(self, path: Any, state: dict[str, Any], storage_options: Any = None,
                        filter: dict[str, Any] | None = None) -> None:
        if self.exchange is not None:
            assert self.resolved_config is not None and self._trainable is not None
            ours = protocol_state(self.resolved_config.as_dict(), self.exchange.state_dict(),
                                  self._trainable.state_dict())
            if self._rounds is not None:
                ours["rounds"] = self._rounds.state_dict()
            state = {**state, STATE_KEY: ours}
        if storage_options is None and writes_atomically(self.checkpoint_io, path):
            self.checkpoint_io = AtomicCheckpointIO()  # Fabric's default writer, with atomic local writes
        super().save_checkpoint(path, state, storage_options=storage_options, filter=filter)

    @override
    def load_checkpoint(self, path: Any, state: Any = None, strict: bool = True,
                        weights_only: bool | None = None) -> dict[str, Any]:
        remainder = super().load_checkpoint(path, state=state, strict=strict, weights_only=weights_only)
        if STATE_KEY in remainder:
            ours = {STATE_KEY: remainder.pop(STATE_KEY)}
            pending = (exchange_state(ours), trainable_state(ours))
            assert pending[0] is not None
            if self.exchange is None:
                self._pending = pending  # applied by setup_module
            else:
                self._load_protocol_state(*pending)
            rounds = ours[STATE_KEY].get("rounds")
            if rounds is not None and self._rounds is not None and self._optimizers_set_up:
                self._rounds.load_state_dict(rounds)
                self._rounds.begin()  # the loaded theta_r and public inner state start the round
            else:
                self._pending_rounds = rounds  # applied by setup_optimizer
        return remainder

    @override
    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        """Mid-round (local steps), the shared round-start parameters and buffers."""
        unwrapped = getattr(module, "_original_module", module)  # fabric.save passes it unwrapped; a user may not
        if self._rounds is None or not self._rounds.in_round or unwrapped is not self._module:
            return super().get_module_state_dict(module)
        with self._rounds.shared():
            return {name: value.clone() for name, value in super().get_module_state_dict(module).items()}

    @override
    def get_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Mid-round (local steps), the public round-start inner state."""
        if self._rounds is None or not self._rounds.in_round:
            return super().get_optimizer_state(optimizer)
        return self._rounds.shared_optimizer_state(getattr(optimizer, "optimizer", optimizer))

    def _load_protocol_state(self, state: dict[str, Any], trainable: dict[str, Any] | None) -> None:
        assert self.exchange is not None and self._trainable is not None
        self.resolved_config = load_exchange_state(self.exchange, state, self.config, self.root_device,
                                                   self.resume_rank_map) or self.resolved_config
        if trainable is not None:
            self._trainable.load_state_dict(trainable)
