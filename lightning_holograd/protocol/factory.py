"""``make_family``: a direction family from flat, config-friendly settings (docs/PROTOCOL.md §3, §5, §7)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

from .direction_hash import DIRECTION_VERSION
from .direction_versions import check_resumable, stored_direction_version
from .directions import (
    DEFAULT_CHUNK_SIZE,
    DirectionFamily,
    GaussianDirections,
    IdentityDirections,
    RademacherDirections,
)
from .directions_v1 import make_family_v1
from .sketch import SketchDirections
from .subsample import SubsampleDirections
from .subspace import CodebookDirections, MomentumDirections

__all__ = ["FamilyName", "FAMILY_NAMES", "make_family", "resume_settings"]

FamilyName = Literal["gaussian", "rademacher", "sketch", "subsample", "codebook", "momentum", "identity"]
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
    direction_version: int = DIRECTION_VERSION,
    block_size: int | None = None,
    direction_kernel: str | None = None,
) -> DirectionFamily:
    """Family ``name`` over ``dim`` coordinates using ``num_directions`` scalars per step.

    codebook: ``codebook_rank`` basis columns (default: all of num_directions) and
    num_directions - codebook_rank exploration directions. momentum: one momentum
    direction and num_directions - 1 exploration directions. identity: num_directions
    must equal dim (debug family). subsample: num_directions <= dim. The codebook's ``codebook_structure``, ``codebook_fit``,
    ``sketch_size``, ``sketch_decay``, ``tracking_lr`` and ``param_shapes`` are
    ``CodebookDirections``' structure, fit, sketch_size, sketch_decay, tracking_lr and
    param_shapes. ``chunk_size`` caps the coordinates materialised at once (None: sized to
    the device); it never changes a direction. ``direction_version`` and ``block_size`` are
    for resuming checkpoints only (``resume_settings``; docs/PROTOCOL.md §3.8).
    ``direction_kernel`` ("auto", "eager", "compiled"; None: the HOLOGRAD_DIRECTION_KERNEL
    environment variable, default auto) picks how gaussian, rademacher and sketch values
    are computed (``direction_kernels``); it never changes a value (docs/PROTOCOL.md §3.7).
    """
    if direction_version != DIRECTION_VERSION or block_size is not None:
        return _other_version(name, dim, num_directions, direction_version, block_size, chunk_size)
    chunks = {"chunk_size": chunk_size}
    hashed = {"chunk_size": chunk_size, "kernel": direction_kernel}
    if name == "gaussian":
        return GaussianDirections(dim, num_directions, **hashed)
    if name == "rademacher":
        return RademacherDirections(dim, num_directions, **hashed)
    if name == "sketch":
        return SketchDirections(dim, num_directions, **hashed)
    if name == "subsample":
        return SubsampleDirections(dim, num_directions)
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


def _other_version(name: str, dim: int, num_directions: int, direction_version: int, block_size: int | None,
                   chunk_size: int | None) -> DirectionFamily:
    """A family of an earlier direction version: version 1 (lightning-holograd 0.1.x) builds
    the gaussian, rademacher, sketch or identity family of ``directions_v1``, with that
    version's ``block_size`` (default 8192); every other combination is refused."""
    if name not in FAMILY_NAMES:
        raise ValueError(f"directions={name!r} is unknown. HINT: choose one of {', '.join(FAMILY_NAMES)}.")
    check_resumable(name, direction_version)
    if direction_version != 1:
        raise ValueError(f"block_size={block_size!r} applies to direction_version=1 only. HINT: leave it "
                         f"unset: direction_version={direction_version} has no blocks.")
    return make_family_v1(name, dim, num_directions, block_size=block_size, chunk_size=chunk_size)


def resume_settings(family_state: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``make_family`` arguments a checkpointed family state fixes: its direction version
    and, for version 1, its block size. None (no checkpoint) gives {}: a new run."""
    if family_state is None:
        return {}
    version = stored_direction_version(family_state)
    if version == 1 and "block_size" in family_state:
        return {"direction_version": 1, "block_size": family_state["block_size"]}
    return {"direction_version": version}
