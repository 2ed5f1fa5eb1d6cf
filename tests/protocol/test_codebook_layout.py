"""Structured codebook bases, the gradient sketch and the refit (docs/PROTOCOL.md §5).

Notation: D coordinates, r basis scalars, U (D, r) the basis materialised densely.
"""

from __future__ import annotations

import pytest
import torch

import lightning_holograd.protocol.codebook_fit as codebook_fit
from lightning_holograd.protocol import CodebookDirections, make_family
from lightning_holograd.protocol.codebook_fit import GradientSketch, allocate
from lightning_holograd.protocol.codebook_layout import Segment, segments_from_shapes

SHAPES = [(12, 10), (7,), (9, 6), (5,)]  # D = 120 + 7 + 54 + 5 = 186
DIM = 186


def _stream(seed: int, count: int, dim: int = DIM) -> list[torch.Tensor]:
    """Gradients with a dominant shared part plus noise (so spectra decay)."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(dim, 3, generator=gen)
    return [shared @ torch.randn(3, generator=gen) + 0.3 * torch.randn(dim, generator=gen) for _ in range(count)]


def _fitted(structure: str, rank: int, shapes=SHAPES, dim: int = DIM, **kwargs) -> CodebookDirections:
    codebook = CodebookDirections(dim, rank, structure=structure, param_shapes=shapes, chunk_size=256, **kwargs)
    for grad in _stream(0, 6, dim):
        codebook.observe_gradient(grad)
    return codebook


@pytest.mark.parametrize("structure", ["dense", "block", "factor"])
@pytest.mark.parametrize("fitted", [False, True])
def test_structured_basis_acts_as_its_dense_matrix(structure, fitted):
    """project, synthesize, direction and captured_energy all equal the dense U's maths."""
    codebook = (_fitted(structure, 20, num_exploration=3) if fitted else
                CodebookDirections(DIM, 20, num_exploration=3, structure=structure, param_shapes=SHAPES,
                                   chunk_size=256))
    basis = codebook.basis  # (D, r)
    used = codebook.layout.used
    assert torch.allclose(basis[:, :used].T @ basis[:, :used], torch.eye(used), atol=1e-5)
    assert not basis[:, used:].any()  # idle slots are zero columns
    grad = torch.randn(DIM, generator=torch.Generator().manual_seed(1))
    seeds = [5, 6, 7]
    scalars = codebook.project(grad, seeds)
    matrix = torch.stack([codebook.direction(seeds, j) for j in range(codebook.num_directions)])  # (K, D)
    torch.testing.assert_close(matrix[:20].T, basis)
    torch.testing.assert_close(scalars, matrix @ grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(codebook.synthesize(scalars, seeds), basis @ (basis.T @ grad), rtol=1e-5, atol=1e-5)
    gamma = float((basis.T @ grad).square().sum() / grad.square().sum())
    assert codebook.captured_energy(grad) == pytest.approx(gamma, rel=1e-5)
    full = codebook.full_estimate(scalars, seeds)
    outside = full - basis @ (basis.T @ full)
    assert float((basis.T @ outside).abs().max()) < 1e-4  # P x is orthogonal to U


def test_factor_block_scalars_are_the_two_sided_core():
    codebook = _fitted("factor", 20)
    block = codebook.layout.blocks[0]
    assert block.kind == "factor" and block.rank >= 1
    grad = torch.randn(DIM, generator=torch.Generator().manual_seed(2))
    core = block.left.T @ grad[:120].view(12, 10) @ block.right
    torch.testing.assert_close(codebook.project(grad, [])[: block.rank**2], core.reshape(-1))


def test_leftover_slots_stay_idle_when_no_square_fits():
    """One 8 x 8 matrix, r = 7: ranks 1 (1 scalar) and 2 (4) fit, rank 3 needs 9: 3 idle slots."""
    codebook = _fitted("factor", 7, shapes=[(8, 8)], dim=64)
    assert codebook.layout.used == 4
    assert codebook.project(torch.randn(64), []).shape == (7,)
    assert not codebook.project(torch.randn(64), [])[4:].any()
    assert not codebook.direction([], 6).any()


def test_factor_memory_is_far_below_dense():
    """factor holds sum (m + n) k floats (here < 2 % of the dense D r); block holds
    sum d_b k_b, which is D r at worst."""
    shapes = [(256, 128), (128,), (128, 512)]
    dim = 256 * 128 + 128 + 128 * 512
    for structure in ("factor", "block"):
        codebook = CodebookDirections(dim, 64, structure=structure, param_shapes=shapes)
        stored = sum(t.numel() for block in codebook.layout.blocks for t in block.tensors())
        expected = sum(b.segment.size * b.rank if b.kind == "vector" else (b.segment.rows + b.segment.cols) * b.rank
                       for b in codebook.layout.blocks)
        assert stored == expected <= dim * 64
        if structure == "factor":
            assert stored < 0.02 * dim * 64


def test_greedy_allocation_takes_the_best_value_per_scalar():
    values = {0: [5.0, 1.0, 0.5], 1: [3.0, 2.5, 0.1]}

    def move(segment):
        return lambda k: None if k >= 3 else (1, values[segment][k])

    assert allocate(4, [move(0), move(1)]) == [2, 2]  # 5, 3, 2.5, 1
    assert allocate(10, [move(0), move(1)]) == [3, 3]  # stops when nothing can grow
    expensive = [lambda k: (2 * k + 1, 10.0 * (2 * k + 1)) if k < 5 else None]
    assert allocate(7, expensive) == [2]  # 1 + 3 scalars; rank 3 would need 5 more


def test_frequent_directions_bound_holds_per_segment():
    """After 40 unit gradients in an 8-column sketch, each segment's second moment B B^T
    under-estimates A A^T (A: the observed unit columns) by at most ||A||_F^2 / (l/2)
    in spectral norm (Liberty 2013), and never over-estimates it."""
    segments = segments_from_shapes(DIM, SHAPES)
    sketch = GradientSketch(DIM, segments, size=8, decay=1.0)
    grads = _stream(3, 40)
    for grad in grads:
        sketch.add(grad)
    assert sketch.count <= 8
    units = torch.stack([g / g.norm() for g in grads], dim=1).double()  # (D, 40)
    for segment in segments:
        observed = units[segment.offset : segment.offset + segment.size]
        kept = sketch.view(segment).double()
        gap = torch.linalg.eigvalsh(observed @ observed.T - kept @ kept.T)
        assert float(gap.min()) > -1e-4
        assert float(gap.max()) <= float(observed.square().sum()) / 4 + 1e-4


def test_subspace_iteration_matches_the_gram_path(monkeypatch):
    """Sides above GRAM_LIMIT use seeded subspace iteration: same span as the exact Gram."""
    exact = _fitted("factor", 20)
    monkeypatch.setattr(codebook_fit, "GRAM_LIMIT", 4)
    iterated = _fitted("factor", 20)
    assert [b.rank for b in exact.layout.blocks] == [b.rank for b in iterated.layout.blocks]
    for a, b in zip(exact.layout.blocks, iterated.layout.blocks):
        for x, y in zip(a.tensors(), b.tensors()):
            torch.testing.assert_close(x @ x.T, y @ y.T, rtol=0, atol=1e-3)


def test_refresh_refits_and_decay_favours_recent_gradients():
    """A true gradient after tracking refits U from the sketch; with decay 0.01 the newest
    gradient dominates the sketch, so a rank-1 dense codebook points along it."""
    codebook = CodebookDirections(DIM, 1, sketch_decay=0.01, chunk_size=256)
    old, new = _stream(4, 2)
    codebook.observe_gradient(old)
    codebook.observe_gradient(new)
    assert codebook.captured_energy(new) > 0.95


def test_without_shapes_every_structure_is_dense():
    """Without param_shapes g is one 1-D parameter: all structures fit the same span."""
    grads = _stream(5, 4)
    bases = []
    for structure in ("dense", "block", "factor"):
        codebook = CodebookDirections(DIM, 4, structure=structure, chunk_size=256)
        for grad in grads:
            codebook.observe_gradient(grad)
        bases.append(codebook.basis)
    torch.testing.assert_close(bases[0] @ bases[0].T, bases[1] @ bases[1].T, rtol=0, atol=1e-5)
    torch.testing.assert_close(bases[0] @ bases[0].T, bases[2] @ bases[2].T, rtol=0, atol=1e-5)


def test_make_family_passes_codebook_settings():
    family = make_family("codebook", DIM, 12, codebook_rank=10, codebook_structure="factor", param_shapes=SHAPES,
                         sketch_size=4, sketch_decay=0.5, tracking_lr=0.02)
    assert (family.structure, family.sketch.size, family.sketch.decay, family.tracking_lr) == ("factor", 4, 0.5, 0.02)
    assert family.num_exploration == 2


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"structure": "tucker"}, "structure='tucker' is unknown"),
        ({"fit": "svd"}, "fit='svd' is unknown"),
        ({"fit": "oja", "structure": "block"}, "fit='oja' works on structure='dense' only"),
        ({"sketch_size": 0}, "sketch_size=0 must be an integer >= 1"),
        ({"sketch_decay": 0.0}, r"sketch_decay=0.0 must lie in \(0, 1\]"),
        ({"tracking_lr": -0.1}, "tracking_lr=-0.1 must be a finite number >= 0"),
        ({"structure": "block", "param_shapes": [(10, 10)]}, "param_shapes cover 100 coordinates.*dim=186"),
        ({"structure": "block", "param_shapes": [(186, 0)]}, r"param_shapes\[0\]=\(186, 0\)"),
    ],
)
def test_codebook_settings_are_checked(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        CodebookDirections(DIM, 4, **kwargs)


def test_segment_reads_a_parameter_as_rows_by_the_rest():
    conv = Segment(10, (4, 3, 2, 2))
    assert (conv.rows, conv.cols, conv.size, conv.is_matrix) == (4, 12, 48, True)
    assert not Segment(0, (7,)).is_matrix and not Segment(0, (1, 9)).is_matrix
