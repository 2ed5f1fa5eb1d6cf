"""Verification draw and verdict maths (protocol/verification.py)."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from lightning_holograd.protocol import Reason, draw_claims, judge_claim


def _commitment(i: int) -> bytes:
    return hashlib.sha256(f"step-{i}".encode()).digest()


def test_draw_rate_matches_p_verify_within_binomial_bound():
    """20,000 draws over 3 candidates at p = 0.1: count ~ Binomial(60,000, 0.1), mean 6,000,
    sd = sqrt(60,000 * 0.1 * 0.9) = 73.5. Bound: 4 sd (failure probability < 1e-4)."""
    n, p = 20_000, 0.1
    matrix = torch.ones(4, 8)
    chosen = sum(len(draw_claims(_commitment(i), matrix, p, [1, 2, 3])) for i in range(n))
    trials = 3 * n
    assert abs(chosen - trials * p) <= 4 * math.sqrt(trials * p * (1 - p))


def test_draw_depends_on_every_submitted_scalar_and_is_deterministic():
    matrix = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    base = [draw_claims(_commitment(i), matrix, 0.5, range(4)) for i in range(200)]
    assert base == [draw_claims(_commitment(i), matrix.clone(), 0.5, range(4)) for i in range(200)]
    nudged = matrix.clone()
    nudged[2, 5] = torch.nextafter(nudged[2, 5], torch.tensor(float("inf")))
    # a one-ulp change in any rank's claim reshuffles the draw: a submitter cannot predict it
    changed = [draw_claims(_commitment(i), nudged, 0.5, range(4)) for i in range(200)]
    # two independent draws over 4 candidates at p = 0.5 agree w.p. 16 x (1/16)^2 = 1/16:
    # expect 187.5 of 200 to differ (sd 3.4); 100 is > 25 sd away
    assert sum(a != b for a, b in zip(base, changed)) > 100


def test_draw_edges_and_bad_probability():
    matrix = torch.zeros(3, 2)
    assert draw_claims(_commitment(0), matrix, 1.0, [2, 1, 1]) == [1, 2]
    assert draw_claims(_commitment(0), matrix, 0.0, [0, 1, 2]) == []
    with pytest.raises(ValueError, match="p_verify=1.5"):
        draw_claims(_commitment(0), matrix, 1.5, [1])


def test_judge_claim_tolerance_and_reasons():
    exact = torch.tensor([1.0, -2.0, 0.0])
    assert judge_claim(exact, exact.clone(), 0.0, 0.0).accepted
    off = exact + torch.tensor([0.0, 1e-3, 0.0])
    verdict = judge_claim(off, exact, 0.0, 0.0)
    assert not verdict.accepted and verdict.reason is Reason.MISMATCH
    assert verdict.max_abs_error == pytest.approx(1e-3, rel=1e-3)
    assert verdict.max_rel_error == pytest.approx(5e-4, rel=1e-3)
    assert judge_claim(off, exact, rtol=1e-3, atol=0.0).accepted  # 1e-3 <= 1e-3 * |-2|
    assert not judge_claim(off, exact, rtol=1e-4, atol=0.0).accepted
    nonfinite = judge_claim(torch.tensor([float("nan"), 0.0, 0.0]), exact, 1.0, 1.0)
    assert not nonfinite.accepted and nonfinite.reason is Reason.NONFINITE
    assert not judge_claim(exact[:2], exact, 1.0, 1.0).accepted
