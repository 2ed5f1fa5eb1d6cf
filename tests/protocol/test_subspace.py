"""Codebook (ADC) and momentum-centric families (docs/PROTOCOL.md §5 and §7).

Notation: D coordinates, r codebook columns, e exploration directions, U (D, r) the
shared basis, P a planted (D, r) orthonormal basis that generates the gradient stream.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_holograd.protocol import (
    CodebookDirections,
    CommitmentChain,
    MomentumDirections,
    captured_energy,
    hash_batch,
    make_family,
)


def _orthonormality_error(basis: torch.Tensor) -> float:
    eye = torch.eye(basis.shape[1], dtype=basis.dtype)
    return float((basis.T @ basis - eye).abs().max())


class PlantedStream:
    """g = P w + noise_std * n with w ~ N(0, I_r), n ~ N(0, I_D): a rank-r gradient stream.

    Energy outside span(P) is D noise_std^2 against r inside; with D = 512, r = 4 and
    noise_std = 0.01 that is 0.0512 vs 4, so the best possible captured energy is
    about 4 / 4.05 = 0.987.
    """

    def __init__(self, dim: int, rank: int, noise_std: float, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.basis, _ = torch.linalg.qr(torch.randn(dim, rank, generator=self.gen))  # P (D, r)
        self.noise_std = noise_std

    def sample(self) -> torch.Tensor:
        dim, rank = self.basis.shape
        coeffs = torch.randn(rank, generator=self.gen)
        return self.basis @ coeffs + self.noise_std * torch.randn(dim, generator=self.gen)

    def mean_captured_energy(self, basis: torch.Tensor, count: int = 100) -> float:
        return sum(captured_energy(basis, self.sample()) for _ in range(count)) / count


def _random_unit_stream(dim: int, seed: int):
    """Endless i.i.d. N(0, I_D) vectors from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(dim, generator=gen)


# -- orthonormality --------------------------------------------------------------------


@pytest.mark.parametrize("qr_every", [10**9, 1, 7])
@pytest.mark.parametrize("oja_lr", [0.1, 1.0])
def test_basis_stays_orthonormal(qr_every, oja_lr):
    """200 Oja updates keep U^T U = I to 1e-5. With qr_every = 10^9 no QR ever runs, so this
    tests the O(D r) rank-one re-orthonormalisation alone: without it, one update would
    leave U^T U = I + (2 alpha + alpha^2) b b^T, an error of order alpha (0.1 .. 3)."""
    dim, rank = 512, 16
    codebook = CodebookDirections(dim, rank, oja_lr=oja_lr, qr_every=qr_every, chunk_size=512,
                                  fit="oja")
    assert _orthonormality_error(codebook.basis) < 1e-5
    gen = torch.Generator().manual_seed(3)
    for step in range(200):
        grad = torch.randn(dim, generator=gen)
        if step % 2:  # half the updates lie mostly inside span(U): large b, hardest case
            grad = codebook.basis @ torch.randn(rank, generator=gen) + 0.1 * grad
        codebook.observe_gradient(grad)
    assert codebook.num_updates == 200
    assert _orthonormality_error(codebook.basis) < 1e-5


def test_rank_one_update_equals_qr_of_oja_step():
    """The rank-one correction must span the same subspace as QR of the raw Oja step
    U + alpha u_hat (u_hat^T U); compare projectors after one update."""
    dim, rank, oja_lr = 256, 8, 0.5
    codebook = CodebookDirections(dim, rank, oja_lr=oja_lr, qr_every=10**9, chunk_size=256, fit="oja")
    before = codebook.basis.clone()
    grad = before @ torch.arange(1.0, rank + 1) + torch.randn(dim, generator=torch.Generator().manual_seed(0))
    codebook.observe_gradient(grad)
    unit = grad / grad.norm()
    raw = before + oja_lr * torch.outer(unit, before.T @ unit)
    q, _ = torch.linalg.qr(raw)
    torch.testing.assert_close(codebook.basis @ codebook.basis.T, q @ q.T, rtol=0, atol=1e-5)
    assert not torch.allclose(codebook.basis @ codebook.basis.T, before @ before.T, atol=1e-3)  # it moved


def test_periodic_qr_does_not_change_the_basis():
    """The rank-one step already orthonormalises exactly (in exact arithmetic), and QR with a
    positive R diagonal of an orthonormal matrix is that matrix: qr_every only removes
    float drift, so every rank gets the same basis whatever its qr_every."""
    dim, rank = 512, 8
    stream = _random_unit_stream(dim, seed=4)
    grads = [next(stream) for _ in range(60)]
    bases = []
    for qr_every in (1, 10**9):
        codebook = CodebookDirections(dim, rank, oja_lr=0.3, qr_every=qr_every, chunk_size=512,
                                      fit="oja")
        for grad in grads:
            codebook.observe_gradient(grad)
        bases.append(codebook.basis)
    torch.testing.assert_close(bases[0], bases[1], rtol=0, atol=1e-4)


def test_initial_basis_is_seeded_and_orthonormal():
    first = CodebookDirections(256, 8, init_seed=5, chunk_size=256)
    again = CodebookDirections(256, 8, init_seed=5, chunk_size=256)
    other = CodebookDirections(256, 8, init_seed=6, chunk_size=256)
    assert torch.equal(first.basis, again.basis)
    assert not torch.allclose(first.basis, other.basis)
    assert _orthonormality_error(first.basis) < 1e-5


def test_observe_ignores_zero_and_non_finite_gradients():
    codebook = CodebookDirections(64, 4, chunk_size=64)
    before = codebook.basis.clone()
    codebook.observe_gradient(torch.zeros(64))
    bad = torch.ones(64)
    bad[3] = float("nan")
    codebook.observe_gradient(bad)
    assert torch.equal(codebook.basis, before)


# -- learning a planted subspace -------------------------------------------------------


def test_oja_converges_to_planted_subspace_from_true_gradients():
    """Normalised Oja is power iteration with E[u_hat u_hat^T] ~ P P^T / r: per update the
    planted directions grow by ~ (1 + alpha/r) relative to the rest, so the initial
    tan(angle) ~ sqrt(D/r) = 11 shrinks below 0.1 in ~ ln(110)/ln(1.05) ~ 100 updates at
    alpha = 0.2. After 300 updates the captured energy of fresh samples must exceed 0.9
    (ceiling 0.987, see PlantedStream); a random basis captures about r/D = 0.008."""
    dim, rank = 512, 4
    stream = PlantedStream(dim, rank, noise_std=0.01)
    codebook = CodebookDirections(dim, rank, oja_lr=0.2, qr_every=50, chunk_size=512, fit="oja")
    assert stream.mean_captured_energy(codebook.basis) < 0.05
    for _ in range(300):
        codebook.observe_gradient(stream.sample())
    assert stream.mean_captured_energy(codebook.basis) > 0.9
    fresh = [stream.sample() for _ in range(100)]
    assert sum(codebook.captured_energy(g) for g in fresh) / len(fresh) > 0.9
    assert _orthonormality_error(codebook.basis) < 1e-5


def test_exploration_estimates_rotate_the_basis_toward_the_planted_subspace():
    """Only estimates go through update(scalars, seeds) here, as in a verifiable run.

    The unbiased full estimate is u = U U^T g + P_perp x, where x, the Gaussian estimate
    from e exploration directions, has noise energy ~ (D/e)||g||^2. That makes u_hat mostly
    noise (signal fraction ~ e/D), so Oja converges far more slowly than from true gradients
    (the previous test); we only require a large, measurable gain in 400 steps.
    A random r-dimensional basis captures Beta(r/2, (D-r)/2) of a fixed vector: mean
    r/D = 0.016 and sd ~ sqrt(2r)/D = 0.011 at D = 256, r = 4, so 0.3 is > 25 sd above it.
    (With this seed the value reached is about 0.65.)"""
    dim, rank, num_exploration = 256, 4, 32
    stream = PlantedStream(dim, rank, noise_std=0.01, seed=1)
    codebook = CodebookDirections(
        dim, rank, num_exploration=num_exploration, oja_lr=0.3, qr_every=50, chunk_size=256,
        fit="oja",
    )
    fresh = [stream.sample() for _ in range(100)]
    initial = sum(codebook.captured_energy(g) for g in fresh) / len(fresh)
    chain = CommitmentChain("explore")
    for step in range(400):
        chain.advance([hash_batch(step)])
        seeds = chain.seeds(codebook.num_seeds)
        scalars = codebook.project(stream.sample(), seeds)
        codebook.update(scalars, seeds)
    final = sum(codebook.captured_energy(g) for g in fresh) / len(fresh)
    assert initial < 0.05
    assert final > 0.3
    assert _orthonormality_error(codebook.basis) < 1e-5


def test_estimate_inside_span_cannot_rotate_the_basis():
    """Without exploration g_hat = U U^T g lies in span(U), and U + alpha u_hat b^T keeps
    every column in span(U): the subspace never moves, however many steps are taken."""
    dim, rank = 256, 4
    stream = PlantedStream(dim, rank, noise_std=0.01, seed=2)
    codebook = CodebookDirections(dim, rank, oja_lr=0.5, qr_every=10, chunk_size=256, fit="oja")
    projector = codebook.basis @ codebook.basis.T
    for _ in range(100):
        codebook.reconstruct(codebook.project(stream.sample(), []), [])
    assert codebook.num_updates == 100
    torch.testing.assert_close(codebook.basis @ codebook.basis.T, projector, rtol=0, atol=1e-5)
    assert stream.mean_captured_energy(codebook.basis) < 0.1


def test_captured_energy_against_estimate_is_the_trap():
    """gamma against g_hat reads 1 (g_hat = U U^T g is in span(U) by construction) while
    against the true gradient it is r/D-ish for an untrained basis (E = 8/256 = 0.03)."""
    dim, rank = 256, 8
    codebook = make_family("codebook", dim, rank, chunk_size=256)
    grad = torch.randn(dim, generator=torch.Generator().manual_seed(7))
    estimate = codebook.synthesize(codebook.project(grad, []), [])
    torch.testing.assert_close(estimate, codebook.basis @ (codebook.basis.T @ grad))
    assert codebook.captured_energy(estimate) == pytest.approx(1.0, abs=1e-5)
    assert codebook.captured_energy(grad) < 0.2
    assert math.isnan(captured_energy(codebook.basis, torch.zeros(dim)))


def test_exploration_weight_one_is_unbiased_and_zero_is_the_projection():
    """u = U U^T g + P_perp x with E[x] = g is unbiased. Its noise is P_perp (x - g) with
    E||P_perp(x - g)||^2 <= E||x - g||^2 = (D + 1)/e ||g||^2 (P_perp is a contraction), so
    the mean of M draws has relative squared error <= (D + 1)/(e M); the threshold is
    twice that (chi-square concentration over ~D dimensions, see test_directions)."""
    dim, rank, num_exploration, draws = 64, 4, 8, 500
    grad = torch.randn(dim, generator=torch.Generator().manual_seed(8))
    unbiased = CodebookDirections(
        dim, rank, num_exploration=num_exploration, exploration_weight=1.0, chunk_size=64
    )
    projection = CodebookDirections(dim, rank, num_exploration=num_exploration, chunk_size=64)
    exact = projection.basis @ (projection.basis.T @ grad)
    chain = CommitmentChain("weights")
    total = torch.zeros(dim, dtype=torch.float64)
    for step in range(draws):
        chain.advance([hash_batch(step)])
        seeds = chain.seeds(num_exploration)
        total += unbiased.synthesize(unbiased.project(grad, seeds), seeds)
        torch.testing.assert_close(projection.synthesize(projection.project(grad, seeds), seeds), exact)
    error = float(((total / draws).float() - grad).square().sum() / grad.square().sum())
    assert error < 2 * (dim + 1) / (num_exploration * draws)
    # The projection alone is far from g: it misses ||P_perp g||^2 ~ (1 - r/D) of it.
    assert float((exact - grad).square().sum() / grad.square().sum()) > 0.5


def test_codebook_directions_and_scalars():
    codebook = CodebookDirections(128, 4, num_exploration=3, chunk_size=128)
    seeds = [11, 22, 33]
    grad = torch.randn(128, generator=torch.Generator().manual_seed(9))
    matrix = torch.stack([codebook.direction(seeds, j) for j in range(7)])  # (K, D)
    torch.testing.assert_close(matrix[:4].T, codebook.basis)
    torch.testing.assert_close(codebook.project(grad, seeds), matrix @ grad, rtol=1e-5, atol=1e-4)


def test_codebook_state_dict_round_trip_continues_identically():
    stream = PlantedStream(128, 4, noise_std=0.1, seed=5)
    grads = [stream.sample() for _ in range(20)]
    original = CodebookDirections(128, 4, oja_lr=0.3, qr_every=3, chunk_size=128, fit="oja")
    for grad in grads[:7]:
        original.observe_gradient(grad)
    resumed = CodebookDirections(128, 4, oja_lr=0.3, qr_every=3, init_seed=99, chunk_size=128,
                                   fit="oja")
    resumed.load_state_dict(original.state_dict())
    assert resumed.num_updates == 7
    for grad in grads[7:]:
        original.observe_gradient(grad)
        resumed.observe_gradient(grad)
    assert torch.equal(resumed.basis, original.basis)
    with pytest.raises(ValueError, match="num_directions=4.*num_directions=5"):
        CodebookDirections(128, 5, chunk_size=128, fit="oja").load_state_dict(original.state_dict())


# -- fitting to true gradients and tracking (issue 13) ---------------------------------

# Two weight matrices and a bias: D = 32*24 + 40 + 16*16 = 1064.
SHAPES = [(32, 24), (40,), (16, 16)]


class PlantedFactorStream:
    """Per matrix G = A C B^T (A (m, 2), B (n, 2) orthonormal, C ~ N(0, I_2x2)), the bias
    p w (w ~ N(0, 1)), plus noise_std * N(0, I_D) everywhere. Signal energy 4 + 1 + 4 = 9,
    noise 1064 * 1e-4 = 0.11 at noise_std = 0.01: the best captured energy is 9 / 9.11 = 0.988.
    Exactly captured by factor ranks (2, -, 2) plus one bias column: 4 + 1 + 4 = 9 scalars."""

    def __init__(self, noise_std: float = 0.01, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.noise_std = noise_std

        def orthonormal(rows, cols):
            return torch.linalg.qr(torch.randn(rows, cols, generator=self.gen))[0]

        self.factors = [(orthonormal(32, 2), orthonormal(24, 2)), (orthonormal(16, 2), orthonormal(16, 2))]
        self.bias = orthonormal(40, 1)[:, 0]

    def sample(self) -> torch.Tensor:
        (a0, b0), (a2, b2) = self.factors
        parts = [a0 @ torch.randn(2, 2, generator=self.gen) @ b0.T, self.bias * torch.randn(1, generator=self.gen),
                 a2 @ torch.randn(2, 2, generator=self.gen) @ b2.T]
        flat = torch.cat([p.reshape(-1) for p in parts])
        return flat + self.noise_std * torch.randn(flat.numel(), generator=self.gen)


def _mean_energy(family, samples) -> float:
    return sum(family.captured_energy(g) for g in samples) / len(samples)


def _layout_tensors(family) -> list[torch.Tensor]:
    return [t for block in family.layout.blocks for t in block.tensors()]


@pytest.mark.parametrize("structure", ["dense", "block", "factor"])
def test_bootstrap_fit_captures_a_planted_stream(structure):
    """10 true gradients (ADCBootstrap(10)) fit U to the planted span at once.

    dense: PlantedStream rank 4 in D = 512, r = 8. Unit-scaled samples give a sketch second
    moment whose 4 signal eigenvalues are ~10/4 against noise ones ~10 * 0.05/512 / 4.05:
    a gap > 10^4, so the fitted span misses P by sin^2 ~ 1e-4 (Davis-Kahan) and gamma sits
    at the 0.987 ceiling. block/factor: PlantedFactorStream, r = 9; the greedy takes the
    2 x 2 cores and the bias column (value per scalar ~1/9 each) before any noise direction
    (value ~1e-3). Before the fit a random basis captures ~ r/D (< 0.05); we require > 0.9."""
    if structure == "dense":
        stream, dim, rank, shapes = PlantedStream(512, 4, noise_std=0.01, seed=3), 512, 8, None
    else:
        stream, dim, rank, shapes = PlantedFactorStream(seed=3), 1064, 9, SHAPES
    codebook = CodebookDirections(dim, rank, structure=structure, param_shapes=shapes, chunk_size=1024)
    fresh = [stream.sample() for _ in range(100)]
    assert _mean_energy(codebook, fresh) < 0.05
    for _ in range(10):
        codebook.observe_gradient(stream.sample())
    assert _mean_energy(codebook, fresh) > 0.9
    assert _orthonormality_error(codebook.basis) < 1e-5
    if structure == "factor":
        assert [(b.kind, b.rank) for b in codebook.layout.blocks] == [("factor", 2), ("vector", 1), ("factor", 2)]


@pytest.mark.parametrize("structure", ["dense", "block", "factor"])
def test_fit_and_tracking_are_bitwise_reproducible(structure):
    """Same true gradients and scalars in the same order -> the same U, bit for bit."""
    runs = []
    for _ in range(2):
        stream = PlantedFactorStream(noise_std=0.1, seed=4)
        codebook = CodebookDirections(1064, 12, num_exploration=8, structure=structure, param_shapes=SHAPES,
                                      tracking_lr=0.05, sketch_size=4, chunk_size=1024)
        chain = CommitmentChain("same")
        for step in range(14):  # 6 true gradients (one frequent-directions shrink at 5), then 8 tracked steps
            if step < 6:
                codebook.observe_gradient(stream.sample())
                continue
            chain.advance([hash_batch(step)])
            seeds = chain.seeds(codebook.num_seeds)
            codebook.reconstruct(codebook.project(stream.sample(), seeds), seeds)
        runs.append(_layout_tensors(codebook))
    assert codebook.num_updates == 8
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: all-reduce local gradients for 5 bootstrap steps, then 6 tracked steps on
    all-gathered, averaged scalars; write a digest of U and the sketch."""
    import hashlib

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    stream = PlantedFactorStream(noise_std=0.1, seed=10 + rank)  # each rank its own data
    codebook = CodebookDirections(1064, 9, num_exploration=6, structure="factor", param_shapes=SHAPES,
                                  tracking_lr=0.05, chunk_size=1024)
    chain = CommitmentChain("two-ranks")
    for step in range(11):
        local = stream.sample()
        if step < 5:
            dist.all_reduce(local)
            codebook.observe_gradient(local / 2)
            continue
        chain.advance([hash_batch(step)])
        seeds = chain.seeds(codebook.num_seeds)
        rows = [torch.empty(codebook.num_directions) for _ in range(2)]
        dist.all_gather(rows, codebook.project(local, seeds))
        codebook.reconstruct((rows[0] + rows[1]) / 2, seeds)
    digest = hashlib.sha256()
    for tensor in _layout_tensors(codebook) + [codebook.sketch.columns]:
        digest.update(tensor.contiguous().numpy().tobytes())
    with open(f"{out_dir}/rank{rank}.txt", "w") as handle:
        handle.write(f"{digest.hexdigest()} {codebook.num_updates}")
    dist.destroy_process_group()


def test_two_gloo_ranks_hold_the_same_codebook(tmp_path):
    """Real processes: after the fit and after tracking both ranks hold the same U bitwise."""
    import multiprocessing
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_two_rank_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    for proc in procs:
        if proc.is_alive():  # a hung rank must not outlive the test
            proc.terminate()
            proc.join()
    assert [p.exitcode for p in procs] == [0, 0]
    digests = [(tmp_path / f"rank{r}.txt").read_text().split() for r in range(2)]
    assert digests[0] == digests[1]
    assert digests[0][1] == "6"  # the tracking steps ran


def test_sketch_codebook_state_dict_round_trip_continues_identically():
    """Checkpoint with a refit pending and one after tracking: the resumed codebook (built
    with another init_seed) continues bit for bit."""
    stream = PlantedFactorStream(noise_std=0.1, seed=5)
    grads = [stream.sample() for _ in range(16)]
    kwargs = dict(num_exploration=4, structure="factor", param_shapes=SHAPES, tracking_lr=0.05, sketch_size=4,
                  chunk_size=1024)

    def step(family, index):
        if index < 5 or index == 12:  # bootstrap, then a refresh step
            family.observe_gradient(grads[index])
            return
        chain = CommitmentChain(f"resume/{index}")  # the step's seeds depend on the step only
        chain.advance([hash_batch(index)])
        seeds = chain.seeds(family.num_seeds)
        family.reconstruct(family.project(grads[index], seeds), seeds)

    for cut in (3, 9):  # refit due (mid-bootstrap) / after tracking
        original = CodebookDirections(1064, 9, **kwargs)
        for index in range(cut):
            step(original, index)
        resumed = CodebookDirections(1064, 9, init_seed=77, **kwargs)
        resumed.load_state_dict(original.state_dict())
        for index in range(cut, 16):
            step(original, index)
            step(resumed, index)
        assert all(torch.equal(a, b) for a, b in zip(_layout_tensors(original), _layout_tensors(resumed)))
        assert resumed.num_updates == original.num_updates > 0
    with pytest.raises(ValueError, match="structure='block'.*structure='factor'"):
        CodebookDirections(1064, 9, structure="factor", param_shapes=SHAPES).load_state_dict(
            CodebookDirections(1064, 9, structure="block", param_shapes=SHAPES).state_dict())


def _rotating_run(fit: str, rate: float, seed: int, dim: int = 1024, steps: int = 300) -> float:
    """Mean over the last 50 steps of the energy U captures of a planted rank-2 subspace that
    turns by pi/2 over ``steps`` (P_t = cos(theta_t) A + sin(theta_t) B); only public
    scalars (2 basis + 32 exploration) reach the codebook, which starts at span(A)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, 4, generator=gen))
    start, end = q[:, :2], q[:, 2:]
    rates = {"oja_lr": rate} if fit == "oja" else {"tracking_lr": rate}
    codebook = CodebookDirections(dim, 2, num_exploration=32, fit=fit, chunk_size=1024, **rates)
    for _ in range(4):  # start both rules at span(A): a sketch fit, or Oja's own steps on A's directions
        codebook.observe_gradient(start @ torch.randn(2, generator=gen))
    if fit == "oja":
        codebook.layout.blocks[0].columns = start.clone()
    chain, energies = CommitmentChain("rotating"), []
    for step in range(steps):
        angle = (math.pi / 2) * step / steps
        planted = math.cos(angle) * start + math.sin(angle) * end
        energies.append(float((codebook.basis.T @ planted).square().sum()) / 2)
        chain.advance([hash_batch(step)])
        seeds = chain.seeds(codebook.num_seeds)
        codebook.update(codebook.project(planted @ torch.randn(2, generator=gen), seeds), seeds)
    return sum(energies[-50:]) / 50


def test_tracking_follows_a_rotating_subspace_that_the_old_oja_loses():
    """D = 1024, r = 2, e = 32; the planted span turns by delta = (pi/2)/300 per step.

    Old rule (fit='oja', oja_lr = 0.1): the step alpha u_hat (u_hat^T U) has the directed
    part alpha (P g)(U^T g)^T / ||u||^2 with E||u||^2 ~ ((D - r)/e) ||g||^2, at most
    alpha e / (2 (D - r)) = 1.6e-3 rad per step: <= 0.47 rad in 300 steps against the
    planted pi/2, so it lags by >= 1.1 rad and captures <= cos^2(1.1) = 0.20 at the end
    (measured ~0.08). New rule (tracking_lr = eta = 0.03): the directed step is about
    eta sqrt(gamma (1 - gamma)), > delta = 5.2e-3 once the lag's sin^2 exceeds ~(2 delta/eta)^2
    = 0.12, so the lag stays bounded; the exploration noise it lets in costs about
    eta (D - r)/(2 e) = 0.48 of the energy: expect ~0.4-0.6 (measured ~0.57). We require
    the old rule below 0.2, the new one above 0.4, on two seeds."""
    for seed in (0, 1):
        assert _rotating_run("oja", 0.1, seed) < 0.2
        assert _rotating_run("sketch", 0.03, seed) > 0.4


def test_tracking_needs_exploration_and_a_rate():
    """Without exploration u lies in span(U) (no rotation possible); tracking_lr = 0 is off."""
    stream = PlantedStream(256, 4, noise_std=0.1, seed=6)
    for kwargs in ({"tracking_lr": 0.5}, {"tracking_lr": 0.0, "num_exploration": 8}):
        codebook = CodebookDirections(256, 4, chunk_size=256, **kwargs)
        before = codebook.basis.clone()
        chain = CommitmentChain("off")
        for step in range(5):
            chain.advance([hash_batch(step)])
            seeds = chain.seeds(codebook.num_seeds)
            codebook.reconstruct(codebook.project(stream.sample(), seeds), seeds)
        assert torch.equal(codebook.basis, before) and codebook.num_updates == 0


# -- momentum --------------------------------------------------------------------------


def test_momentum_direction_rotates_toward_a_persistent_gradient():
    """With a fixed true gradient g*, each step's unbiased estimate is u = g* + noise with
    E||noise||^2 ~ (D + 1)/e ||g*||^2 (the exploration part). m = EMA_beta(u) keeps g* and
    shrinks the noise energy by (1 - beta)/(1 + beta), so in steady state
    cos(m, g*) ~ 1/sqrt(1 + (1 - beta)/(1 + beta) (D + 1)/e) = 1/sqrt(1 + 0.43) = 0.84
    for D = 64, e = 8, beta = 0.9. A random start has |cos| ~ 1/sqrt(D) = 0.125.
    We require the last-50-step mean above 0.7 and a gain of at least 0.4 over the start."""
    dim, num_exploration = 64, 8
    momentum = MomentumDirections(dim, num_exploration, beta=0.9, chunk_size=64)
    target = torch.randn(dim, generator=torch.Generator().manual_seed(10))

    def alignment() -> float:
        return float(torch.nn.functional.cosine_similarity(momentum.basis[:, 0], target, dim=0))

    start = abs(alignment())
    chain = CommitmentChain("momentum")
    history = []
    for step in range(200):
        chain.advance([hash_batch(step)])
        seeds = chain.seeds(momentum.num_seeds)
        estimate = momentum.reconstruct(momentum.project(target, seeds), seeds)
        assert estimate.shape == (dim,)
        history.append(alignment())
    final = sum(history[-50:]) / 50
    assert start < 0.4
    assert final > 0.7
    assert final > start + 0.4
    assert momentum.basis.norm() == pytest.approx(1.0, abs=1e-5)


def test_momentum_state_dict_round_trip():
    grads = list(itertools.islice(_random_unit_stream(64, seed=11), 10))
    original = MomentumDirections(64, 2, beta=0.8, chunk_size=64)
    for grad in grads[:4]:
        original.observe_gradient(grad)
    resumed = MomentumDirections(64, 2, beta=0.8, init_seed=3, chunk_size=64)
    resumed.load_state_dict(original.state_dict())
    for grad in grads[4:]:
        original.observe_gradient(grad)
        resumed.observe_gradient(grad)
    assert torch.equal(resumed.basis, original.basis)
    assert torch.equal(resumed.momentum, original.momentum)


# -- argument checks -------------------------------------------------------------------


def test_momentum_rejects_no_exploration():
    with pytest.raises(ValueError, match="num_exploration=0 must be >= 1"):
        MomentumDirections(64, 0)
    with pytest.raises(ValueError, match="num_exploration=0 must be >= 1"):
        make_family("momentum", 64, 1)


@pytest.mark.parametrize("rank", [0, -1, 65])
def test_codebook_rejects_bad_rank(rank):
    with pytest.raises(ValueError, match=rf"rank={rank} must lie in \[1, dim=64\]"):
        CodebookDirections(64, rank)


@pytest.mark.parametrize("rank", [0, 9])
def test_make_family_rejects_bad_codebook_rank(rank):
    with pytest.raises(ValueError, match=rf"codebook_rank={rank} must lie in \[1, num_directions=8\]"):
        make_family("codebook", 64, 8, codebook_rank=rank)


def test_subspace_families_reject_bad_settings():
    with pytest.raises(ValueError, match="num_exploration=-1 must be >= 0"):
        CodebookDirections(64, 4, num_exploration=-1)
    with pytest.raises(ValueError, match="oja_lr=0.0 must be > 0"):
        CodebookDirections(64, 4, oja_lr=0.0)
    with pytest.raises(ValueError, match="qr_every=0 must be >= 1"):
        CodebookDirections(64, 4, qr_every=0)
    with pytest.raises(ValueError, match=r"exploration_weight=1.5 must lie in \[0.0, 1.0\]"):
        CodebookDirections(64, 4, num_exploration=2, exploration_weight=1.5)
    with pytest.raises(ValueError, match=r"beta=1.0 must lie in \[0.0, 1.0\)"):
        MomentumDirections(64, 2, beta=1.0)


def test_subspace_families_check_gradient_and_seeds():
    codebook = CodebookDirections(64, 4, num_exploration=2, chunk_size=64)
    with pytest.raises(ValueError, match=r"flat_grad has shape \(63,\), expected \(64,\)"):
        codebook.project(torch.zeros(63), [1, 2])
    with pytest.raises(ValueError, match="got 1 seeds, codebook needs 2"):
        codebook.project(torch.zeros(64), [1])
    with pytest.raises(ValueError, match=r"scalars has shape \(4,\), expected \(6,\)"):
        codebook.synthesize(torch.zeros(4), [1, 2])


def test_make_family_codebook_splits_columns_and_exploration():
    family = make_family("codebook", 64, 8, codebook_rank=5, chunk_size=64)
    assert (family.rank, family.num_exploration, family.num_directions, family.num_seeds) == (5, 3, 8, 3)
    momentum = make_family("momentum", 64, 4, chunk_size=64)
    assert (momentum.rank, momentum.num_exploration, momentum.num_seeds) == (1, 3, 3)


@pytest.mark.parametrize("bad_seed", [-1, 2**64])
def test_init_seed_out_of_range_is_named(bad_seed):
    with pytest.raises(ValueError, match=rf"init_seed={bad_seed}"):
        CodebookDirections(16, 2, init_seed=bad_seed)
    with pytest.raises(ValueError, match=rf"init_seed={bad_seed}"):
        MomentumDirections(16, 1, init_seed=bad_seed)
