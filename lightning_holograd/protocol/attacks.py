"""Byzantine claims for experiments and tests: the lies, as pure functions (docs/PROTOCOL.md §4, §6).

Symbols: N ranks, K scalars per claim, a (K,) the claim an honest rank would submit,
H (h, K) the honest rows of a step (ranks that do not lie), mu and sigma their
per-direction mean and unbiased standard deviation.

- ``random``: Gaussian noise with the RMS of a, drawn from a generator seeded from the
  step commitment and the rank (``attack_generator``: reproducible, never the global RNG);
- ``scale``: c a (c = ``scale``, default -4: pushes a mean past zero for N = 4);
- ``sign_flip``: -a;
- ``alie`` ("a little is enough", Baruch et al., 2019): mu - z sigma per direction;
- ``ipm`` (inner-product manipulation, Xie et al., 2020): -epsilon mu.

``alie`` and ``ipm`` need the honest rows (an omniscient colluder), as does the evasive
plan of ``evasive_liars`` (lie only where the verification draw would not look).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable
from typing import Literal, get_args

import torch

from .verification import draw_claims

__all__ = ["ATTACK_NAMES", "OMNISCIENT_ATTACKS", "AttackName", "attack_generator", "attack_row", "evasive_liars"]

AttackName = Literal["random", "scale", "sign_flip", "alie", "ipm"]
ATTACK_NAMES: tuple[str, ...] = get_args(AttackName)
OMNISCIENT_ATTACKS = ("alie", "ipm")  # need every honest row of the step
_SEED_TAG = b"holograd/byzantine"


def attack_generator(commitment: bytes, rank: int) -> torch.Generator:
    """Private CPU generator seeded from SHA256(tag || c_t || rank): same lie on every replay."""
    digest = hashlib.sha256(_SEED_TAG + commitment + rank.to_bytes(8, "little")).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def attack_row(
    attack: AttackName,
    row: torch.Tensor,
    honest_rows: torch.Tensor | None = None,
    *,
    scale: float = -4.0,
    alie_z: float = 1.5,
    ipm_epsilon: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The lie that replaces ``row`` (K,); ``honest_rows`` (h, K) for ``alie``/``ipm``,
    ``generator`` (CPU) for ``random``. Returns float32 (K,) on ``row``'s device.

    sigma is the unbiased standard deviation over the honest rows (0 when h = 1).
    """
    row = row.to(torch.float32)
    if attack == "scale":
        return row * scale
    if attack == "sign_flip":
        return -row
    if attack == "random":
        if generator is None:
            raise ValueError("attack='random' needs a generator. HINT: attack_generator(commitment, rank).")
        rms = row.pow(2).mean().sqrt()
        noise = torch.randn(row.shape, generator=generator, dtype=torch.float32)
        return (noise.to(row.device) * rms).to(torch.float32)
    if attack in OMNISCIENT_ATTACKS:
        if honest_rows is None or honest_rows.dim() != 2 or honest_rows.shape[0] == 0:
            raise ValueError(f"attack={attack!r} needs honest_rows of shape (h >= 1, K).")
        honest = honest_rows.to(device=row.device, dtype=torch.float32)
        mu = honest.mean(dim=0)  # (K,)
        if attack == "ipm":
            return -ipm_epsilon * mu
        sigma = honest.std(dim=0) if honest.shape[0] > 1 else torch.zeros_like(mu)  # (K,)
        return mu - alie_z * sigma
    raise ValueError(f"attack={attack!r} is unknown. HINT: choose one of {', '.join(map(repr, ATTACK_NAMES))}.")


def evasive_liars(
    commitment: bytes,
    rows: torch.Tensor,
    attackers: Collection[int],
    lie_of: Callable[[int], torch.Tensor],
    p_verify: float,
    draw: Callable[[torch.Tensor, set[int]], Iterable[int]] | None = None,
) -> set[int]:
    """Attackers that lie this step without being drawn for verification.

    ``rows`` (N, K) are the honest rows, ``lie_of(rank)`` the (K,) lie of an attacker.
    Start from every attacker lying; drop those that the draw picks on the resulting
    matrix and redraw, until no liar is drawn (at most len(attackers) rounds). The last
    matrix is exactly the one submitted, so no liar in it is drawn. ``draw(matrix,
    candidates)`` is the path's claim draw: ``draw_claims`` on the matrix (the default, the
    all_gather path) or the sharded path's draw on the rows' commitments. A pure function
    of its arguments: every rank computes the same set.
    """
    if draw is None:
        def draw(matrix: torch.Tensor, candidates: set[int]) -> Iterable[int]:
            return draw_claims(commitment, matrix, p_verify, candidates)

    liars = set(attackers)
    lies = {rank: lie_of(rank) for rank in liars}
    while liars:
        matrix = rows.clone()
        for rank in liars:
            matrix[rank] = lies[rank]
        drawn = set(draw(matrix, set(liars)))
        if not drawn:
            break
        liars -= drawn
    return liars
