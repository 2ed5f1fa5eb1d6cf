"""The sketch's slot cache (docs/PROTOCOL.md §3.7): the step's synthesize reuses the slots
its project computed for the same seed; a hit is bitwise the recomputation, a different
seed recomputes, and the cache is kept only within its memory bound."""

from __future__ import annotations

import pytest
import torch

from lightning_holograd.protocol import SketchDirections, make_family
from lightning_holograd.protocol import sketch as sketch_module


def _pair(dim: int, k: int):
    cached, plain = make_family("sketch", dim, k), make_family("sketch", dim, k)
    plain.slot_cache.enabled = False
    return cached, plain


def _count_hashing(monkeypatch, family: SketchDirections) -> list[int]:
    calls: list[int] = []
    original = family._slots
    monkeypatch.setattr(family, "_slots", lambda *args: calls.append(1) or original(*args))
    return calls


def test_synthesize_after_project_reuses_the_slots_bitwise(monkeypatch):
    cached, plain = _pair(3000, 17)
    grad = torch.randn(3000, generator=torch.Generator().manual_seed(0))
    scalars = cached.project(grad, [11])
    assert torch.equal(scalars, plain.project(grad, [11]))
    calls = _count_hashing(monkeypatch, cached)
    assert torch.equal(cached.synthesize(scalars, [11]), plain.synthesize(scalars, [11]))
    assert calls == []  # no coordinate hashed again
    assert torch.equal(cached.direction([11], 16), plain.direction([11], 16))


def test_another_seed_recomputes_and_the_last_project_wins(monkeypatch):
    cached, plain = _pair(3000, 17)
    grad = torch.randn(3000, generator=torch.Generator().manual_seed(1))
    scalars = cached.project(grad, [11])
    cached.project(grad, [12])  # the cache now holds seed 12
    calls = _count_hashing(monkeypatch, cached)
    assert torch.equal(cached.synthesize(scalars, [11]), plain.synthesize(scalars, [11]))
    assert len(calls) > 0  # seed 11 was recomputed, not read from seed 12's slots
    calls.clear()
    assert torch.equal(cached.synthesize(scalars, [12]), plain.synthesize(scalars, [12]))
    assert calls == []


def test_a_project_that_fails_midway_leaves_no_stale_slots(monkeypatch):
    cached, plain = _pair(3000, 17)
    grad = torch.randn(3000, generator=torch.Generator().manual_seed(2))
    scalars = cached.project(grad, [11])
    monkeypatch.setattr(cached, "_slots", lambda *args: (_ for _ in ()).throw(RuntimeError("interrupted")))
    with pytest.raises(RuntimeError, match="interrupted"):
        cached.project(grad, [11])
    monkeypatch.undo()
    assert cached.slot_cache.get(11, grad.device) is None
    assert torch.equal(cached.synthesize(scalars, [11]), plain.synthesize(scalars, [11]))


def test_the_cache_is_kept_only_within_its_bound(monkeypatch):
    monkeypatch.setattr(sketch_module, "SLOT_CACHE_BYTES", 400)  # 100 int32 slots
    assert make_family("sketch", 100, 8).slot_cache.enabled
    big = make_family("sketch", 101, 8)
    assert not big.slot_cache.enabled
    big.project(torch.ones(101), [5])
    assert big.slot_cache.get(5, torch.device("cpu")) is None and big.slot_cache._slots is None
    assert not make_family("sketch", 100, 1 << 30).slot_cache.enabled  # slot 2K - 1 must fit int32
