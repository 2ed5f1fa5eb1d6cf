"""Local steps in Lightning: rounds of H inner optimizer steps, one exchange of the
pseudo-gradient per round (docs/PROTOCOL.md §9.2).

Symbols: H = ``local_steps``, theta_r (D,) the shared trainable parameters at the start
of round r (float32, module order), delta_i = theta_r - theta_i the pseudo-gradient of
rank i after its inner steps, E the inner-state statistics appended to a row.

Inner steps are Lightning's own optimizer steps on the rank's own batches: the user's
``training_step``, backward, gradient accumulation and clipping, optimizer and LR
scheduler, unchanged and without any exchange. The strategy records each inner step's
micro-batches and the optimizer's hyperparameters. After the H-th inner step (or the
fit's last one), every rank, in this order:

1. ``finish``: delta_i and the statistics; one ``HoloGradExchange.step`` (commit of the
   round batch hash, projection of delta_i onto its group's directions, all_gather,
   review, aggregation) gives delta_hat and the public statistics; the outer step
   writes theta_{r+1} into the parameters;
2. the strategy syncs buffers and audits (``_after_optimizer_step``);
3. ``begin``: the inner state is set from public data, theta_{r+1} and the buffers are kept.

A verifier checks a drawn claim with ``replay``: the claimant's inner steps from theta_r
and the public start state, on its committed batches (H forward and backward passes).
Between round boundaries the ranks' parameters differ; ``shared`` swaps theta_r and the
round-start buffers in (validation, checkpoints).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn
from typing_extensions import override

from ..engine import MalformedInputs
from ..protocol import round_batch_hash
from ..protocol.rounds import OuterStep, make_inner_state, optimizer_trainable
from .claims import logging_disabled, training_loss

__all__ = ["LocalRounds", "LocalStepsMixin", "is_last_optimizer_step"]

Step = list[tuple[Any, int]]  # one inner step's micro-batches: [(batch, batch_idx), ...]


def is_last_optimizer_step(trainer: Any) -> bool:
    """Whether the optimizer step now running is the fit's last (``max_steps`` or ``max_epochs``)."""
    if trainer.max_steps != -1 and trainer.global_step + 1 >= trainer.max_steps:  # global_step: steps done
        return True
    max_epochs = trainer.max_epochs
    return (max_epochs is not None and max_epochs != -1 and trainer.current_epoch + 1 >= max_epochs
            and bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch))


def _flat(params: Sequence[nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params])


def _write(params: Sequence[nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        p.data.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def _settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The param groups' hyperparameters (lr, betas, ...) without the parameters."""
    return [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params"}
            for g in optimizer.param_groups]


def _apply_settings(optimizer: torch.optim.Optimizer, settings: list[dict[str, Any]]) -> None:
    for group, values in zip(optimizer.param_groups, settings, strict=True):
        group.update(values)


class LocalRounds:
    """One rank's round bookkeeping; the strategy owns one when ``local_steps > 1``.

    ``module`` and ``optimizer`` return the model and the (unwrapped) optimizer the rounds
    act on; by default the Trainer strategy's ``lightning_module`` and single optimizer
    (the Fabric strategy passes its own). ``replay`` (verification) needs the Trainer.
    """

    def __init__(self, strategy: Any, module: Callable[[], nn.Module] | None = None,
                 optimizer: Callable[[], torch.optim.Optimizer] | None = None) -> None:
        config = strategy.config
        self.strategy = strategy  # a HoloGradStrategy (or the Fabric one): config, exchange, trainable set
        self._get_module = module
        self._get_optimizer = optimizer
        self.local_steps = config.local_steps
        self.inner_state = make_inner_state(config.inner_state)
        self.outer = OuterStep(config.outer_lr, config.outer_momentum, config.outer_momentum_units)
        self.public: torch.Tensor | None = None  # (E,) aggregated statistics of the last round
        self.steps_done = 0  # inner steps of every finished round
        self.theta: torch.Tensor | None = None  # theta_r (D,) float32
        self.buffers: list[torch.Tensor] = []  # module buffers at the round start
        self.steps: list[Step] = []  # this round's inner steps
        self.settings: list[list[dict[str, Any]]] = []  # optimizer hyperparameters of each inner step
        self._swapped: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        # positions in module.parameters() of the trainable tensors: of theta_r and the outer
        # velocity (module order), and of the public statistics (optimizer order)
        self.layout: list[int] | None = None
        self.public_layout: list[int] | None = None

    # -- what the rounds act on --------------------------------------------------------------
    @property
    def module(self) -> Any:
        return self._get_module() if self._get_module is not None else self.strategy.lightning_module

    def params(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._get_optimizer is not None:
            return self._get_optimizer()
        (optimizer,) = self.strategy.optimizers
        return getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps it

    @property
    def in_round(self) -> bool:
        """Whether some inner steps of the current round are done (the ranks' parameters differ)."""
        return bool(self.steps)

    # -- the round -----------------------------------------------------------------------------
    def start_training(self) -> None:
        """At the start of fit, on every rank: check the optimizer, size the rows, start a round."""
        self.inner_state.check(self.optimizer)
        self.begin()  # sizes the rows: E = the inner state's statistics

    def begin(self) -> None:
        """Start a round: the public inner state, theta_r and the buffers (for the trainable
        set of now: public state over another set is carried over tensor by tensor)."""
        self._relayout()
        self.inner_state.start_round(self.optimizer, self.public, self.steps_done)
        self.theta = _flat(self.params())
        self.buffers = [b.detach().clone() for b in self.module.buffers()]
        self.steps, self.settings = [], []

    def before_inner_step(self) -> None:
        """Record the step's hyperparameters. A change of the trainable set is followed at a
        round's first inner step (docs/PROTOCOL.md §9.2) and refused mid-round."""
        if self._positions(self.params()) != self.layout:
            if self.steps:
                step = self.steps_done + len(self.steps) + 1
                raise RuntimeError(
                    f"step {step}: the trainable parameters changed in the middle of a local-steps round "
                    f"({len(self.steps)} of local_steps={self.local_steps} inner steps done), so the round's "
                    "pseudo-gradient has no single set of coordinates. HINT: freeze or unfreeze when "
                    f"trainer.global_step is a multiple of {self.local_steps} (a round boundary), e.g. in "
                    "on_train_epoch_start with epochs of a multiple of local_steps steps.")
            strategy = self.strategy
            strategy.resolved_config = strategy._trainable.follow(
                self.module, strategy.exchange, strategy.config, strategy.root_device) or strategy.resolved_config
            self.begin()
        self.settings.append(_settings(self.optimizer))

    def _positions(self, tensors: Any) -> list[int]:
        index = {id(p): i for i, p in enumerate(self.module.parameters())}
        return [index[id(p)] for p in tensors]

    def _relayout(self) -> None:
        """Carry the outer velocity (module order) and the public statistics (optimizer
        order) over to the current trainable set: a tensor that stays trainable keeps its
        values, a newly trainable one starts at zero velocity and no public value (NaN)."""
        layout = self._positions(self.params())
        if self.layout is not None and layout != self.layout and self.outer.velocity is not None:
            sizes = [p.numel() for p in self.module.parameters()]
            old = dict(zip(self.layout, torch.split(self.outer.velocity, [sizes[i] for i in self.layout])))
            self.outer.velocity = torch.cat([old[i] if i in old else self.outer.velocity.new_zeros(sizes[i])
                                             for i in layout])
        self.layout = layout
        public_layout = self._positions(p for _, p in optimizer_trainable(self.optimizer))
        if self.public is not None and self.public_layout is not None and public_layout != self.public_layout:
            old_public = dict(zip(self.public_layout, self.public.tolist()))
            self.public = torch.tensor([old_public.get(i, float("nan")) for i in public_layout], dtype=torch.float32)
        self.public_layout = public_layout
        self.strategy.exchange.num_public_values = self.inner_state.num_statistics(self.optimizer)

    def after_inner_step(self, inputs: Step) -> bool:
        """Record an inner step's micro-batches; True when the round is complete."""
        self.steps.append(list(inputs))
        return len(self.steps) >= self.local_steps

    @torch.no_grad()
    def finish(self) -> None:
        """End the round on every rank (a blocking collective): exchange delta_i, outer step."""
        exchange = self.strategy.exchange
        assert self.theta is not None and exchange is not None
        params = self.params()
        delta = self.theta - _flat(params)
        statistics = self.inner_state.statistics(self.optimizer).to(delta.device)
        family = exchange.family
        batches = [[batch for batch, _ in step] for step in self.steps]  # R
        inputs = [(batches, [[batch_idx for _, batch_idx in step] for step in self.steps])]  # [(R, I)]
        def row(seeds: list[int]) -> torch.Tensor:  # (K + E,)
            return torch.cat([family.project(delta, seeds), statistics])

        estimate = exchange.step(round_batch_hash(batches), row, extras={"inputs": inputs},
                                 optimizer_steps=len(self.steps))
        _write(params, self.outer.apply(self.theta, estimate, lr_sum=self.lr_sum()))
        public = exchange.last_context.public_values
        self.public = None if public is None or public.numel() == 0 else public.detach().cpu().clone()
        self.steps_done += len(self.steps)

    def lr_sum(self) -> float:
        """lambda_r: the learning rate of param group 0 summed over this round's inner steps
        (as recorded before each step, so the LR scheduler's values; public on every rank)."""
        return float(sum(float(settings[0]["lr"]) for settings in self.settings))

    # -- verification ----------------------------------------------------------------------
    @torch.no_grad()
    def replay(self, inputs: Any, seeds: list[int]) -> torch.Tensor:
        """The (K + E,) row an honest rank submits for the round ``inputs`` = [(R, I)] (R the
        inner steps' micro-batch lists, I their batch indices): its inner steps replayed from
        theta_r and the public start state. Called on verifier ranks inside the exchange;
        this rank's parameters, buffers and optimizer state are restored afterwards.
        A malformed round (shape, or not this round's number of inner steps) raises
        ``MalformedInputs`` (verdict ``batch_hash``; a NaN row would pass as an honest fault)."""
        family, optimizer = self.strategy.exchange.family, self.optimizer
        steps = self._unpack(inputs)
        if steps is None:
            raise MalformedInputs(f"a round of {len(self.settings)} inner steps, each a list of (batch, batch_idx) "
                                  "pairs, was expected")
        params = self.params()
        with self._own_state_kept(params, optimizer):
            assert self.theta is not None
            _write(params, self.theta)
            for buffer, saved in zip(self.module.buffers(), self.buffers):
                buffer.copy_(saved)
            self.inner_state.start_round(optimizer, self.public, self.steps_done)
            for step, settings in zip(steps, self.settings):
                self._inner_step(move_data_to_device(step, self.strategy.root_device), settings)
            delta = self.theta - _flat(params)
            statistics = self.inner_state.statistics(optimizer).to(delta.device)
        return torch.cat([family.project(delta, seeds), statistics])

    def _unpack(self, inputs: Any) -> list[Step] | None:
        try:
            ((batches, indices),) = inputs
            steps = [list(zip(step_batches, step_indices, strict=True)) for step_batches, step_indices
                     in zip(batches, indices, strict=True)]
        except (TypeError, ValueError):
            return None
        if len(steps) != len(self.settings) or not all(steps):
            return None
        return steps

    @contextmanager
    def _own_state_kept(self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> Iterator[None]:
        own_params, own_buffers = _flat(params), [b.detach().clone() for b in self.module.buffers()]
        own_state, own_settings = optimizer.state, _settings(optimizer)
        optimizer.state = defaultdict(dict)
        devices = [self.strategy.root_device.index or 0] if self.strategy.root_device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                yield
        finally:
            optimizer.state = own_state
            _apply_settings(optimizer, own_settings)
            _write(params, own_params)
            for buffer, saved in zip(self.module.buffers(), own_buffers):
                buffer.copy_(saved)

    def _inner_step(self, step: Step, settings: list[dict[str, Any]]) -> None:
        """One inner step as Lightning runs it: loss / accumulate_grad_batches per
        micro-batch, backward, gradient clipping, optimizer step (hooks that change
        gradients in between, such as on_after_backward, are not replayed)."""
        module, optimizer, trainer = self.module, self.optimizer, self.module.trainer
        for param in self.params():
            param.grad = None
        with torch.enable_grad(), logging_disabled(module):
            for batch, batch_idx in step:
                with self.strategy.precision_plugin.train_step_context():
                    output = module.training_step(batch, batch_idx)
                (training_loss(output, "verification") / trainer.accumulate_grad_batches).backward()
        _apply_settings(optimizer, settings)
        module.configure_gradient_clipping(optimizer, gradient_clip_val=trainer.gradient_clip_val,
                                           gradient_clip_algorithm=trainer.gradient_clip_algorithm)
        optimizer.step()

    # -- the shared state between round boundaries -------------------------------------------
    @contextmanager
    def shared(self) -> Iterator[None]:
        """theta_r and the round-start buffers in the module while inside (no-op at a boundary)."""
        entered = self.enter_shared()
        try:
            yield
        finally:
            if entered:
                self.exit_shared()

    @torch.no_grad()
    def enter_shared(self) -> bool:
        """Put theta_r and the round-start buffers into the module, keeping this rank's own;
        False (and nothing done) at a round boundary or when already entered."""
        if not self.in_round or self._swapped is not None or self.theta is None:
            return False
        params = self.params()
        self._swapped = (_flat(params), [b.detach().clone() for b in self.module.buffers()])
        _write(params, self.theta)
        for buffer, saved in zip(self.module.buffers(), self.buffers):
            buffer.copy_(saved)
        return True

    @torch.no_grad()
    def exit_shared(self) -> None:
        """Put this rank's own parameters and buffers back (after ``enter_shared``)."""
        if self._swapped is None:
            return
        own_params, own_buffers = self._swapped
        self._swapped = None
        _write(self.params(), own_params)
        for buffer, saved in zip(self.module.buffers(), own_buffers):
            buffer.copy_(saved)

    def shared_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` as at the round start (public data only); with the
        ``private`` inner state, this rank's own state as it is now (there is no public one)."""
        if not self.inner_state.public:
            return optimizer.state_dict()
        own = optimizer.state
        optimizer.state = defaultdict(dict)
        try:
            self.inner_state.start_round(optimizer, self.public, self.steps_done)
            return optimizer.state_dict()
        finally:
            optimizer.state = own

    # -- checkpoint state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"public": None if self.public is None else self.public.clone(), "steps_done": self.steps_done,
                "outer": self.outer.state_dict(), "layout": self.layout, "public_layout": self.public_layout}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        public = state.get("public")
        self.public = None if public is None else public.to(torch.float32).cpu().clone()
        self.steps_done = int(state["steps_done"])
        self.outer.load_state_dict(state["outer"], device=self.strategy.root_device)
        self.layout, self.public_layout = state.get("layout"), state.get("public_layout")  # None: a checkpoint from before layouts were saved


class LocalStepsMixin:
    """The strategy's Lightning hooks for local steps: a mixin of ``HoloGradStrategyMixin``,
    ahead of Lightning's strategy in the MRO. Each is a no-op without a ``LocalRounds``;
    mid-round, validation and checkpoints see the shared theta_r."""

    _rounds: LocalRounds | None

    def _end_round(self) -> None:
        """Exchange the round's pseudo-gradients, then buffers, audit and metrics, then a new round."""
        assert self._rounds is not None
        self._rounds.finish()
        self._after_optimizer_step()  # type: ignore[attr-defined]
        self._rounds.begin()

    @override
    def on_train_start(self) -> None:
        super().on_train_start()  # type: ignore[misc]
        if self._rounds is not None:
            self._rounds.start_training()

    @override
    def on_train_end(self) -> None:
        """A round cut short by a stop that ``is_last_optimizer_step`` cannot see is exchanged here."""
        if self._rounds is not None and self._rounds.in_round:
            self._end_round()
        super().on_train_end()  # type: ignore[misc]

    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()  # type: ignore[misc]
        if self._rounds is not None:
            self._rounds.enter_shared()  # validation sees theta_r, not this rank's local parameters

    @override
    def on_validation_end(self) -> None:
        if self._rounds is not None:
            self._rounds.exit_shared()
        super().on_validation_end()  # type: ignore[misc]

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Mid-round, checkpoints hold theta_r and the round-start buffers (identical on every rank)."""
        if self._rounds is None or not self._rounds.in_round:
            return super().lightning_module_state_dict()  # type: ignore[misc]
        with self._rounds.shared():
            state = super().lightning_module_state_dict()  # type: ignore[misc]
            return {name: value.clone() for name, value in state.items()}

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """Mid-round, checkpoints hold the round-start (public) inner state."""
        if self._rounds is None or not self._rounds.in_round:
            return super().optimizer_state(optimizer)  # type: ignore[misc]
        return self._rounds.shared_optimizer_state(getattr(optimizer, "_optimizer", optimizer))
