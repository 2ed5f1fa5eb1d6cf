"""Validated, flat settings of a HoloGrad run (what LightningCLI reads from YAML).

Validation never builds a direction family (a codebook would allocate K x K floats):
settings that depend on the model (the default K, ``codebook_rank`` against D) are
resolved and checked at setup, by ``resolve(dim)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args

from lightning.fabric.utilities.rank_zero import rank_zero_warn

from ..protocol import (
    FAMILY_NAMES,
    Aggregator,
    DirectionFamily,
    NotEnoughRanksError,
    make_aggregator,
    make_family,
    resume_settings,
)
from ..engine.exchange import check_aggregation_path
from ..protocol.chain import direction_seeds, genesis_commitment
from ..protocol.codebook_fit import CODEBOOK_FITS, CODEBOOK_STRUCTURES, check_codebook_settings
from ..protocol.defaults import (
    DEFAULT_TARGET_COMPRESSION,
    ESTIMATE_SCALES,
    default_num_directions,
    estimate_scale_factor,
    variance_ratio,
)
from ..protocol.groups import PER_RANK, check_direction_groups, resolve_direction_groups
from ..protocol.quantize import check_quantized_path, check_scalar_block
from ..protocol.rounds import INNER_STATE_NAMES, OuterStep

__all__ = ["HoloGradConfig", "AggregationName", "ProjectionName", "check_world_size"]

AggregationName = Literal["mean", "median", "trimmed_mean", "krum"]
ProjectionName = Literal["backward", "jvp"]
# Families whose directions are a pure function of the seeds and unbiased: the ones that
# direction groups give independent directions (docs/PROTOCOL.md §9.1).
GROUPABLE_FAMILIES = ("sketch", "subsample", "gaussian", "rademacher")
# Families that can carry a pseudo-gradient (docs/PROTOCOL.md §9.2): the stateless ones.
LOCAL_STEP_FAMILIES = GROUPABLE_FAMILIES + ("identity",)
_ROUND_DEFAULTS = {"inner_state": "public_v", "outer_lr": 1.0, "outer_momentum": 0.0,
                   "outer_momentum_units": "pseudo_gradient"}


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown. HINT: choose one of {', '.join(map(repr, choices))}.")


def _int_at_least(name: str, value: Any, low: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}.{' HINT: ' + hint if hint else ''}")


@dataclass(frozen=True)
class HoloGradConfig:
    """All protocol knobs of ``HoloGradStrategy``; see README "Strategy settings"."""

    num_directions: int | None = None  # K; None: from D at setup (``default_num_directions``)
    directions: str = "sketch"
    aggregation: str = "mean"
    trim_ratio: float = 0.1
    krum_byzantine: int = 1  # f for aggregation="krum": needs world_size >= 2f + 3
    clip_row_norms: bool = False  # scale rows above the median row norm down to it, then aggregate
    seed: str = "holograd"
    codebook_rank: int | None = None
    oja_lr: float = 0.1
    qr_every: int = 50
    exploration_weight: float = 0.0
    momentum_beta: float = 0.9
    # codebook (docs/PROTOCOL.md §5): basis structure, how it is fitted, the true-gradient sketch,
    # tracking from public estimates, and the diagnostic gamma measurement every M steps (0: off)
    codebook_structure: str = "factor"
    codebook_fit: str = "sketch"
    sketch_size: int = 16
    sketch_decay: float = 1.0
    tracking_lr: float = 0.0
    diagnostic_every: int = 0
    chunk_size: int | None = None  # coordinates materialised at once (None: sized to the device)
    projection: str = "backward"
    audit_every: int = 100
    sync_buffers: bool = True
    aggregation_path: str = "auto"  # docs/PROTOCOL.md §4.5: auto, all_gather, sharded, all_reduce
    target_compression: float = DEFAULT_TARGET_COMPRESSION  # sets the default K: about D / target_compression
    estimate_scale: str = "unbiased"  # factor on g_hat: "unbiased" (1), "min_variance", "norm"
    direction_groups: int | str = 1  # G, or "per_rank" (G = world size); docs/PROTOCOL.md §9.1
    local_steps: int = 1  # H inner optimizer steps per exchange (round); docs/PROTOCOL.md §9.2
    inner_state: str = "public_v"  # the inner optimizer state at a round start: "public_v", "reset" or "private"
    outer_lr: float = 1.0  # theta_{r+1} = theta_r - outer_lr * delta_hat (with outer_momentum = 0)
    outer_momentum: float = 0.0  # Nesterov momentum of the outer step (0: plain averaging)
    outer_momentum_units: str = "pseudo_gradient"  # or "lr_normalized": the velocity per unit of inner lr
    scalar_bits: int = 32  # bits per direction scalar on the wire: 32 (float32), 8, 4, 2; docs/PROTOCOL.md §9.5
    scalar_block: int = 0  # scalars per float32 scale of a quantized row (0: one scale per row); §9.5

    def __post_init__(self) -> None:
        if self.num_directions is not None:
            _int_at_least("num_directions", self.num_directions, 1,
                          "the number of scalars each rank sends per step; None picks it from the model size.")
        _choice("directions", self.directions, FAMILY_NAMES)
        _choice("aggregation", self.aggregation, get_args(AggregationName))
        _choice("projection", self.projection, get_args(ProjectionName))
        _choice("estimate_scale", self.estimate_scale, ESTIMATE_SCALES)
        if not isinstance(self.trim_ratio, (int, float)) or not 0.0 <= self.trim_ratio < 0.5:
            raise ValueError(f"trim_ratio={self.trim_ratio!r} must lie in [0, 0.5). HINT: 0.25 drops a quarter of "
                             "the ranks at each end of every direction.")
        _int_at_least("krum_byzantine", self.krum_byzantine, 0,
                      "the number of ranks Krum tolerates; world_size must be >= 2 * krum_byzantine + 3.")
        if not isinstance(self.clip_row_norms, bool):
            raise ValueError(f"clip_row_norms={self.clip_row_norms!r} must be True or False.")
        if not isinstance(self.seed, str) or not self.seed:
            raise ValueError(f"seed={self.seed!r} must be a non-empty string shared by all ranks.")
        if (isinstance(self.target_compression, bool) or not isinstance(self.target_compression, (int, float))
                or not math.isfinite(self.target_compression) or self.target_compression < 1):
            raise ValueError(f"target_compression={self.target_compression!r} must be a finite number >= 1. HINT: "
                             "the default K is about D / target_compression; 100 sends 1 % of DDP's bytes at 2 ranks.")
        if self.estimate_scale != "unbiased" and self.directions in ("codebook", "momentum"):
            raise ValueError(f"estimate_scale={self.estimate_scale!r} needs an unbiased family, got "
                             f"directions={self.directions!r}. HINT: use estimate_scale='unbiased' with this family.")
        if self.codebook_rank is not None:
            _int_at_least("codebook_rank", self.codebook_rank, 1)
            if self.num_directions is not None and self.codebook_rank > self.num_directions:
                raise ValueError(f"codebook_rank={self.codebook_rank} exceeds num_directions={self.num_directions}. "
                                 "HINT: num_directions counts codebook columns plus exploration directions.")
        if self.directions == "momentum" and self.num_directions is not None and self.num_directions < 2:
            raise ValueError(f"num_directions={self.num_directions} is too small for directions='momentum'. "
                             "HINT: use >= 2 (one momentum direction plus exploration directions).")
        if self.projection == "jvp" and self.directions == "identity":
            raise ValueError("projection='jvp' with directions='identity' would need D forward passes. "
                             "HINT: use projection='backward' for the identity debug family.")
        _int_at_least("qr_every", self.qr_every, 1)
        self._check_codebook()
        _int_at_least("audit_every", self.audit_every, 0, "0 disables the replica audit.")
        if self.chunk_size is not None:
            _int_at_least("chunk_size", self.chunk_size, 1, "None sizes chunks to the device's working set.")
        self._check_family_knobs()
        self._check_direction_groups()
        self._check_local_steps()
        check_aggregation_path(self.aggregation_path, self.build_aggregator())
        if self.direction_groups != 1 and self.aggregation_path == "all_reduce":
            raise ValueError(
                f"aggregation_path='all_reduce' with direction_groups={self.direction_groups!r}: each group has its "
                "own directions, so rows of different groups share no column to sum. "
                "HINT: use aggregation_path='sharded' (sharded within each group), 'all_gather' or 'auto'.")
        if self.direction_groups == PER_RANK and self.aggregation_path == "sharded":
            raise ValueError(
                "aggregation_path='sharded' with direction_groups='per_rank': every group has one rank, so there is "
                "no row to split (sharding would send more than all_gather). HINT: use aggregation_path='all_gather' "
                "or 'auto' (which takes it), or groups of >= 2 ranks.")
        check_quantized_path(self.aggregation_path, self.scalar_bits)
        check_scalar_block(self.scalar_block, self.scalar_bits)

    def _check_family_knobs(self) -> None:
        """The family constructors' range checks, without building a family (no allocation)."""
        for name, value, high_open in (("exploration_weight", self.exploration_weight, False),
                                       ("momentum_beta", self.momentum_beta, True)):
            ok = isinstance(value, (int, float)) and (0.0 <= value < 1.0 if high_open else 0.0 <= value <= 1.0)
            if not ok:
                raise ValueError(f"{name}={value!r} must lie in [0, 1{')' if high_open else ']'}.")

    def _check_codebook(self) -> None:
        """The codebook settings and the diagnostic schedule, checked without building a family."""
        _choice("codebook_structure", self.codebook_structure, CODEBOOK_STRUCTURES)
        _choice("codebook_fit", self.codebook_fit, CODEBOOK_FITS)
        if self.codebook_fit == "oja" and self.codebook_structure != "dense":
            raise ValueError(f"codebook_fit='oja' works on codebook_structure='dense' only, got "
                             f"codebook_structure={self.codebook_structure!r}. HINT: set codebook_structure='dense' "
                             "for the old Oja rule, or keep codebook_fit='sketch'.")
        check_codebook_settings(self.codebook_structure, self.codebook_fit, self.oja_lr, self.qr_every,
                                self.sketch_size, self.sketch_decay, self.tracking_lr)
        _int_at_least("diagnostic_every", self.diagnostic_every, 0, "0 disables the diagnostic measurement.")
        if self.diagnostic_every and self.directions not in ("codebook", "momentum"):
            raise ValueError(f"diagnostic_every={self.diagnostic_every} measures the captured energy of a shared "
                             f"basis, which directions={self.directions!r} has not. HINT: use it with "
                             "directions='codebook' or 'momentum', or set diagnostic_every=0.")
        if self.diagnostic_every and self.projection != "backward":
            raise ValueError(f"diagnostic_every={self.diagnostic_every} needs the local gradient, which "
                             f"projection={self.projection!r} never computes. HINT: use projection='backward'.")

    def _check_direction_groups(self) -> None:
        """What can be checked without the world size; ``num_groups`` checks the rest at setup."""
        groups = self.direction_groups
        if groups != PER_RANK:
            resolve_direction_groups(groups, 1)  # type and range
        if groups == 1:
            return
        if self.directions not in GROUPABLE_FAMILIES:
            raise ValueError(
                f"direction_groups={groups!r} needs a family whose directions are a pure function of the seeds and "
                f"unbiased ({', '.join(GROUPABLE_FAMILIES)}), got directions={self.directions!r}: its basis (or the "
                "identity) is the same for every rank, so groups would add nothing. HINT: use direction_groups=1, "
                "or directions='sketch'."
            )
        if groups == PER_RANK and self.aggregation != "mean":
            raise ValueError(
                f"direction_groups='per_rank' with aggregation={self.aggregation!r}: every rank is alone in its "
                "group, so there is nothing to take a median, trimmed mean or Krum score of. HINT: use "
                "aggregation='mean' (clip_row_norms=True bounds each rank's influence), or fewer groups of >= 3 ranks."
            )

    def _check_local_steps(self) -> None:
        _int_at_least("local_steps", self.local_steps, 1, "1 exchanges every optimizer step; H > 1 runs H inner "
                      "steps per exchange.")
        _choice("inner_state", self.inner_state, INNER_STATE_NAMES)
        OuterStep(self.outer_lr, self.outer_momentum, self.outer_momentum_units)  # range checks
        if self.local_steps == 1:
            changed = [name for name, default in _ROUND_DEFAULTS.items() if getattr(self, name) != default]
            if changed:
                raise ValueError(f"{changed[0]}={getattr(self, changed[0])!r} only applies with local_steps > 1. "
                                 f"HINT: set local_steps (e.g. 16), or leave {changed[0]} at its default.")
            return
        if self.directions not in LOCAL_STEP_FAMILIES:
            raise ValueError(
                f"local_steps={self.local_steps} with directions={self.directions!r}: the codebook and momentum bases "
                "track gradients, and a round exchanges a pseudo-gradient. HINT: use directions='sketch' (or "
                "'subsample', 'gaussian', 'rademacher'; 'identity' gives exact local SGD).")
        if self.projection == "jvp":
            raise ValueError(f"local_steps={self.local_steps} with projection='jvp': a pseudo-gradient is not the "
                             "derivative of a loss. HINT: use projection='backward'.")
        if self.estimate_scale != "unbiased":
            raise ValueError(f"local_steps={self.local_steps} with estimate_scale={self.estimate_scale!r}: the outer "
                             "step applies the unbiased pseudo-gradient estimate (its step size is outer_lr). "
                             "HINT: use estimate_scale='unbiased' and tune outer_lr.")

    def num_groups(self, world_size: int) -> int:
        """G on ``world_size`` ranks; ValueError when a group is too small for the aggregation."""
        return check_direction_groups(self.direction_groups, self.build_aggregator(), world_size)

    # -- settings that depend on the model -----------------------------------------------------
    def resolve(self, dim: int) -> HoloGradConfig:
        """This config for a model with ``dim`` trainable coordinates: K filled in and checked
        against D. Raises when a setting cannot work for this model, naming the user's argument."""
        num_directions = self.num_directions
        if self.directions == "identity":
            num_directions = dim
        elif num_directions is None:
            num_directions = default_num_directions(dim, self.target_compression)
            if self.codebook_rank is not None:
                num_directions = max(num_directions, self.codebook_rank)
        if self.directions == "codebook":
            rank = self.codebook_rank if self.codebook_rank is not None else num_directions
            if rank > dim:
                argument = (f"codebook_rank={self.codebook_rank}" if self.codebook_rank is not None
                            else f"num_directions={num_directions} (codebook_rank=None uses all of them as columns)")
                raise ValueError(f"{argument} exceeds the model's {dim} trainable parameters. HINT: set "
                                 f"codebook_rank <= {dim}, e.g. codebook_rank={max(1, dim // 4)}.")
        return replace(self, num_directions=num_directions)

    def scale_factor(self, dim: int) -> float:
        """The factor ``estimate_scale`` applies to g_hat for D = ``dim`` (resolved K)."""
        assert self.num_directions is not None, "resolve(dim) first"
        return estimate_scale_factor(self.estimate_scale, self.directions, dim, self.num_directions)

    def norm_inflation(self, dim: int) -> float | None:
        """sqrt(E||g_hat||^2 / ||g||^2) of the unscaled estimate (None for a biased family)."""
        assert self.num_directions is not None, "resolve(dim) first"
        ratio = variance_ratio(self.directions, dim, self.num_directions)
        return None if ratio is None else math.sqrt(1.0 + ratio)

    def build_family(self, dim: int, resumed: Mapping[str, Any] | None = None,
                     param_shapes: Sequence[Sequence[int]] | None = None) -> DirectionFamily:
        """The direction family over ``dim`` trainable coordinates (K resolved for ``dim`` if unset);
        ``resumed``, the family state of a checkpoint about to be loaded, decides the direction
        version (new runs: the current one; a lightning-holograd 0.1.x checkpoint: version 1,
        docs/PROTOCOL.md §3.8); ``param_shapes``: the trainable parameters' shapes in
        flat-gradient order (the codebook's blocks and factors)."""
        config = self.resolve(dim)
        resume = resume_settings(resumed)
        if config.directions == "identity":
            return make_family("identity", dim, dim, **resume)
        init_seed = direction_seeds(genesis_commitment(config.seed) + b"/basis", 1)[0]
        return make_family(
            config.directions, dim, config.num_directions, codebook_rank=config.codebook_rank,
            oja_lr=config.oja_lr, qr_every=config.qr_every, exploration_weight=config.exploration_weight,
            momentum_beta=config.momentum_beta, init_seed=init_seed, chunk_size=config.chunk_size, **resume,
            codebook_structure=config.codebook_structure, param_shapes=param_shapes,
            codebook_fit=config.codebook_fit, sketch_size=config.sketch_size, sketch_decay=config.sketch_decay,
            tracking_lr=config.tracking_lr,
        )

    def build_aggregator(self) -> Aggregator:
        return make_aggregator(self.aggregation, self.trim_ratio, num_byzantine=self.krum_byzantine,
                               clip_row_norms=self.clip_row_norms)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_world_size(aggregator: Aggregator, world_size: int) -> None:
    """At setup: fail when the aggregator cannot run at all with ``world_size`` ranks (Krum
    below 2f + 3), warn when it would be no more robust than the mean."""
    if world_size < aggregator.min_rows():
        raise NotEnoughRanksError(f"{aggregator.name} aggregation needs at least {aggregator.min_rows()} ranks, and "
                                  f"the job has world_size={world_size}.{aggregator._min_rows_hint()}")
    warning = aggregator.robustness_warning(world_size)
    if warning:
        rank_zero_warn(warning)
