"""``make_family``: a direction family from flat, config-friendly settings (docs/PROTOCOL.md §3, §5, §7)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

from .directions import (
    DEFAULT_CHUNK_SIZE,
    DirectionFamily,
    GaussianDirections,
    IdentityDirections,
    RademacherDirections,
    SketchDirections,
)
from .subspace import CodebookDirections, MomentumDirections

__all__ = ["FamilyName", "FAMILY_NAMES", "make_family"]

FamilyName = Literal["gaussian", "rademacher", "sketch", "codebook", "momentum", "identity"]
FAMILY_NAMES: tuple[str, ...] = get_args(FamilyName)


def make_family(
    name: str,
    dim: int,
    num_directions: int,
    *,
    codebook_rank: int | None = None,
    oja_lr: float = 0.1,
    qr_every: int = 50,
    exploration_weight: float = 0.0,
    momentum_beta: float = 0.9,
    init_seed: int = 0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    codebook_structure: str = "dense",
    param_shapes: Sequence[Sequence[int]] | None = None,
    codebook_fit: str = "sketch",
    sketch_size: int = 16,
    sketch_decay: float = 1.0,
    tracking_lr: float = 0.0,
) -> DirectionFamily:
    """Family ``name`` over ``dim`` coordinates using ``num_directions`` scalars per step.

    codebook: ``codebook_rank`` basis columns (default: all of num_directions) and
    num_directions - codebook_rank exploration directions. momentum: one momentum
    direction and num_directions - 1 exploration directions. identity: num_directions
    must equal dim (debug family). The codebook's ``codebook_structure``, ``codebook_fit``,
    ``sketch_size``, ``sketch_decay``, ``tracking_lr`` and ``param_shapes`` are
    ``CodebookDirections``' structure, fit, sketch_size, sketch_decay, tracking_lr and
    param_shapes.
    """
    chunks = {"chunk_size": chunk_size}
    if name == "gaussian":
        return GaussianDirections(dim, num_directions, **chunks)
    if name == "rademacher":
        return RademacherDirections(dim, num_directions, **chunks)
    if name == "sketch":
        return SketchDirections(dim, num_directions, **chunks)
    if name == "identity":
        return IdentityDirections(dim, num_directions)
    if name == "codebook":
        rank = num_directions if codebook_rank is None else codebook_rank
        if not 1 <= rank <= num_directions:
            raise ValueError(
                f"codebook_rank={rank} must lie in [1, num_directions={num_directions}]. HINT: "
                "num_directions counts the codebook columns plus the exploration directions."
            )
        return CodebookDirections(dim, rank, num_directions - rank, oja_lr=oja_lr, qr_every=qr_every,
                                  exploration_weight=exploration_weight, init_seed=init_seed, **chunks,
                                  structure=codebook_structure, param_shapes=param_shapes, fit=codebook_fit,
                                  sketch_size=sketch_size, sketch_decay=sketch_decay, tracking_lr=tracking_lr)
    if name == "momentum":
        return MomentumDirections(dim, num_directions - 1, beta=momentum_beta,
                                  exploration_weight=exploration_weight, init_seed=init_seed, **chunks)
    raise ValueError(f"directions={name!r} is unknown. HINT: choose one of {', '.join(FAMILY_NAMES)}.")
