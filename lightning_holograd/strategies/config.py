"""Validated, flat settings of a HoloGrad run (what LightningCLI reads from YAML)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
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
from ..protocol.chain import direction_seeds, genesis_commitment

__all__ = ["HoloGradConfig", "AggregationName", "ProjectionName", "check_world_size"]

AggregationName = Literal["mean", "median", "trimmed_mean", "krum"]
ProjectionName = Literal["backward", "jvp"]


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown. HINT: choose one of {', '.join(map(repr, choices))}.")


def _int_at_least(name: str, value: Any, low: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}.{' HINT: ' + hint if hint else ''}")


@dataclass(frozen=True)
class HoloGradConfig:
    """All protocol knobs of ``HoloGradStrategy``; see README "Strategy settings"."""

    num_directions: int = 1024
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
    chunk_size: int | None = None  # coordinates materialised at once (None: sized to the device)
    projection: str = "backward"
    audit_every: int = 100
    sync_buffers: bool = True

    def __post_init__(self) -> None:
        _int_at_least("num_directions", self.num_directions, 1,
                      "the number of scalars each rank sends per step, e.g. 1024.")
        _choice("directions", self.directions, FAMILY_NAMES)
        _choice("aggregation", self.aggregation, get_args(AggregationName))
        _choice("projection", self.projection, get_args(ProjectionName))
        if not isinstance(self.trim_ratio, (int, float)) or not 0.0 <= self.trim_ratio < 0.5:
            raise ValueError(f"trim_ratio={self.trim_ratio!r} must lie in [0, 0.5). HINT: 0.25 drops a quarter of "
                             "the ranks at each end of every direction.")
        _int_at_least("krum_byzantine", self.krum_byzantine, 0,
                      "the number of ranks Krum tolerates; world_size must be >= 2 * krum_byzantine + 3.")
        if not isinstance(self.clip_row_norms, bool):
            raise ValueError(f"clip_row_norms={self.clip_row_norms!r} must be True or False.")
        if not isinstance(self.seed, str) or not self.seed:
            raise ValueError(f"seed={self.seed!r} must be a non-empty string shared by all ranks.")
        if self.codebook_rank is not None:
            _int_at_least("codebook_rank", self.codebook_rank, 1)
            if self.codebook_rank > self.num_directions:
                raise ValueError(f"codebook_rank={self.codebook_rank} exceeds num_directions={self.num_directions}. "
                                 "HINT: num_directions counts codebook columns plus exploration directions.")
        if self.directions == "momentum" and self.num_directions < 2:
            raise ValueError(f"num_directions={self.num_directions} is too small for directions='momentum'. "
                             "HINT: use >= 2 (one momentum direction plus exploration directions).")
        if self.projection == "jvp" and self.directions == "identity":
            raise ValueError("projection='jvp' with directions='identity' would need D forward passes. "
                             "HINT: use projection='backward' for the identity debug family.")
        _int_at_least("qr_every", self.qr_every, 1)
        _int_at_least("audit_every", self.audit_every, 0, "0 disables the replica audit.")
        if self.chunk_size is not None:
            _int_at_least("chunk_size", self.chunk_size, 1, "None sizes chunks to the device's working set.")
        # Remaining range checks (oja_lr, exploration_weight, momentum_beta, chunk multiple)
        # are done by the family constructors; build a tiny one now so they fail here.
        self.build_family(dim=max(self.num_directions, 1))
        self.build_aggregator()

    def build_family(self, dim: int, resumed: Mapping[str, Any] | None = None) -> DirectionFamily:
        """The direction family over ``dim`` trainable coordinates; ``resumed``, the family state
        of a checkpoint about to be loaded, decides the direction version (new runs: the current
        one; a lightning-holograd 0.1.x checkpoint: version 1, docs/PROTOCOL.md §3.8)."""
        resume = resume_settings(resumed)
        if self.directions == "identity":
            return make_family("identity", dim, dim, **resume)
        if self.codebook_rank is not None and self.directions == "codebook" and self.codebook_rank > dim:
            raise ValueError(f"codebook_rank={self.codebook_rank} exceeds the model's {dim} trainable parameters. "
                             "HINT: lower codebook_rank.")
        init_seed = direction_seeds(genesis_commitment(self.seed) + b"/basis", 1)[0]
        return make_family(
            self.directions, dim, self.num_directions, codebook_rank=self.codebook_rank, oja_lr=self.oja_lr,
            qr_every=self.qr_every, exploration_weight=self.exploration_weight, momentum_beta=self.momentum_beta,
            init_seed=init_seed, chunk_size=self.chunk_size, **resume,
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
