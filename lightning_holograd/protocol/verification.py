"""Verification maths for proof-of-gradient-projection (docs/PROTOCOL.md §6).

Symbols: N ranks, K scalars per claim, A (N, K) the submitted scalar matrix of step t,
c_t the step commitment, p = ``p_verify``.

- Draw: claim i is checked iff u_i < p, with u_i = uint64(SHA256(r || i)[:8]) / 2^64 and
  r = SHA256("holograd/verify" || c_t || SHA256(A as float32 LE)). The draw depends on
  every submitted scalar, so no rank can know at submission time whether its claim will
  be checked, and every rank computes the same draw. A rank that cheats on m claims goes
  undetected with probability (1 - p)^m.
- Verdict: a recomputed claim a* accepts a iff |a_j - a*_j| <= atol + rtol |a*_j| for every j.
  A non-finite claim is an honest fault when the recomputation is non-finite too (accepted,
  reason ``nonfinite``: the row was only dropped for its step) and a lie when the
  recomputation is finite (rejected, reason ``nonfinite``).
- Quantized claim (docs/PROTOCOL.md §9.5): levels q, scale M, with M* = max |a*_j|, Delta = M / L
  and x*_j = a*_j / Delta + u_j: accepted iff |M - M*| <= atol + rtol M* and every q_j lies in
  [floor(x*_j - tau_j), floor(x*_j + tau_j)] (clamped to [-L, L]), tau_j = (atol + rtol |a*_j|) / Delta;
  the E public values are judged as float32 claims. With ``scalar_block`` B > 0 each block b
  has its own scale: |M_b - M*_b| <= atol + rtol M*_b with M*_b = max |a*_j| over the block,
  and coordinate j uses Delta = M_{b(j)} / L.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .chain import scalars_digest
from .quantize import QuantizedClaim, block_deltas, block_max, dequantize, levels_of, num_blocks

__all__ = ["Reason", "Verdict", "draw_claims", "draw_claims_from_root", "judge_claim", "judge_quantized_claim", "claim_digest"]

_DRAW_TAG = b"holograd/verify"


class Reason(str, enum.Enum):
    """Why a claim was accepted or a rank slashed (stored in the ledger as its value)."""

    OK = "ok"
    MISMATCH = "mismatch"  # recomputed scalars differ beyond tolerance
    BATCH_HASH = "batch_hash"  # the batch sent to the verifier does not match the commitment
    NONFINITE = "nonfinite"  # NaN or inf among the submitted scalars (a lie iff the recomputation is finite)
    MISSING = "missing"  # the claimant did not provide its batch
    ROW_COMMITMENT = "row_commitment"  # sharded: the row or leaves sent do not match the committed row (§4.5)
    AGGREGATE = "aggregate"  # sharded: a block owner published an aggregate its own received block does not give
    DISPUTE = "dispute"  # sharded: an owner's received block differs from the claimant's committed leaf


def claim_digest(scalars: torch.Tensor) -> str:
    """Hex SHA-256 of a claim (a (K,) row) as float32 little-endian bytes."""
    return scalars_digest(scalars).hex()


def draw_claims(commitment: bytes, matrix: torch.Tensor, p_verify: float, candidates: Iterable[int]) -> list[int]:
    """Ranks among ``candidates`` whose claims are checked at this step (sorted)."""
    return draw_claims_from_root(commitment, scalars_digest(matrix), p_verify, candidates)


def draw_claims_from_root(commitment: bytes, rows_digest: bytes, p_verify: float,
                          candidates: Iterable[int]) -> list[int]:
    """The draw with ``rows_digest`` (32 bytes) standing for the submitted rows: SHA256(f32le(A))
    on the all_gather path, the digest of the row commitments on the sharded one (§4.5)."""
    if not 0.0 <= p_verify <= 1.0:
        raise ValueError(f"p_verify={p_verify!r} must lie in [0, 1].")
    root = hashlib.sha256(_DRAW_TAG + commitment + rows_digest).digest()
    chosen = []
    for rank in sorted(set(int(r) for r in candidates)):
        u = int.from_bytes(hashlib.sha256(root + struct.pack("<Q", rank)).digest()[:8], "little") / 2.0**64
        if p_verify >= 1.0 or u < p_verify:  # u can round to 1.0: p_verify = 1 checks every claim
            chosen.append(rank)
    return chosen


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: Reason
    max_abs_error: float
    max_rel_error: float


def judge_claim(claimed: torch.Tensor, recomputed: torch.Tensor, rtol: float, atol: float) -> Verdict:
    """Accept iff |a - a*| <= atol + rtol |a*| for every direction."""
    claimed = claimed.detach().to(torch.float64).cpu()
    recomputed = recomputed.detach().to(torch.float64).cpu()
    if claimed.shape != recomputed.shape:
        return Verdict(False, Reason.MISMATCH, float("inf"), float("inf"))
    if not bool(torch.isfinite(claimed).all()):  # honest iff the recomputation is non-finite too
        return Verdict(not bool(torch.isfinite(recomputed).all()), Reason.NONFINITE, float("inf"), float("inf"))
    error = (claimed - recomputed).abs()
    accepted = bool((error <= atol + rtol * recomputed.abs()).all())
    return Verdict(accepted, Reason.OK if accepted else Reason.MISMATCH, *_errors(claimed, recomputed))


def _errors(claimed: torch.Tensor, recomputed: torch.Tensor) -> tuple[float, float]:
    """(max |a - a*|, max |a - a*| / |a*|), the relative error 0 where both are 0, inf where only a* is."""
    error = (claimed - recomputed).abs()
    scale = recomputed.abs()
    relative = torch.where(scale > 0, error / scale.clamp_min(torch.finfo(torch.float64).tiny),
                           torch.where(error > 0, torch.full_like(error, float("inf")), torch.zeros_like(error)))
    max_abs = float(error.max()) if error.numel() else 0.0
    max_rel = float(relative.max()) if relative.numel() else 0.0
    return max_abs, max_rel


def judge_quantized_claim(claim: QuantizedClaim, recomputed: torch.Tensor, rtol: float, atol: float) -> Verdict:
    """Accept a quantized claim (K levels, scale M, E public values) against the recomputed
    float row a* (K + E,) by the rule of the module docstring; the reported errors compare
    the dequantized claim with a*."""
    k = claim.levels.numel()
    recomputed = recomputed.detach().to(torch.float64).cpu()
    values = dequantize(claim.levels, torch.as_tensor(claim.scale, dtype=torch.float32), claim.bits, claim.block)
    claimed = torch.cat([values, claim.public.to("cpu", torch.float32)]).to(torch.float64)
    if claimed.shape != recomputed.shape:
        return Verdict(False, Reason.MISMATCH, float("inf"), float("inf"))
    if not bool(torch.isfinite(claimed).all()):  # M = NaN: honest iff the recomputation is non-finite too
        return Verdict(not bool(torch.isfinite(recomputed).all()), Reason.NONFINITE, float("inf"), float("inf"))
    if not bool(torch.isfinite(recomputed).all()):
        return Verdict(False, Reason.MISMATCH, float("inf"), float("inf"))
    public = judge_claim(claimed[k:], recomputed[k:], rtol, atol)
    accepted = public.accepted and _levels_hold(claim, recomputed[:k], rtol, atol)
    return Verdict(accepted, Reason.OK if accepted else Reason.MISMATCH, *_errors(claimed, recomputed))


def _levels_hold(claim: QuantizedClaim, target: torch.Tensor, rtol: float, atol: float) -> bool:
    """Every scale within tolerance of its block's max |a*_j| (one block of K when
    ``claim.block`` is 0), level 0 throughout a block of scale 0, and every other level one
    that a float row within tolerance of ``target`` (a*, (K,) float64) could round to with
    the claim's dither and its block's quantum."""
    k = target.numel()
    block = claim.block or max(k, 1)
    scales = torch.as_tensor(claim.scale, dtype=torch.float32).reshape(-1).to(torch.float64)
    if scales.numel() != num_blocks(k, block):
        return False
    scale_star = block_max(target.abs(), block)
    if not bool((scales - scale_star).abs().le(atol + rtol * scale_star).all()):
        return False
    levels = claim.levels.to(torch.int64)
    delta = block_deltas(scales, k, claim.bits, block)
    zero = delta == 0
    if not bool((levels[zero] == 0).all()):
        return False
    top = levels_of(claim.bits)
    safe = delta.masked_fill(zero, 1.0)
    x = target / safe + claim.dither.to(torch.float64)
    tau = (atol + rtol * target.abs()) / safe
    low = (x - tau).floor().clamp(-top, top)
    high = (x + tau).floor().clamp(-top, top)
    return bool(((levels >= low) & (levels <= high))[~zero].all())
