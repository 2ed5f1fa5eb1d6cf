"""Quantized scalars end to end (docs/PROTOCOL.md §9.5): settings, the evasive plan of the
Byzantine simulator, and real ranks (fork launcher, gloo, CPU)."""

from __future__ import annotations

import csv
import hashlib
import json
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from replicas import assert_identical_replicas
from test_byzantine import _SaveCounts
from test_fabric import identical, launch, ranks, toy_loop
from test_traffic import _MarkSteps, _per_step, counted_collectives  # noqa: F401 (a fixture)

from lightning_holograd import (
    ByzantineSimulator,
    HoloGradConfig,
    HoloGradFabricStrategy,
    HoloGradStrategy,
    ProofVerifier,
    StepContext,
)
from lightning_holograd.demos import ToyModule, fit
from lightning_holograd.protocol import Ledger, draw_claims
from lightning_holograd.protocol.quantize import requantize_rows, row_bytes
from lightning_holograd.strategies.advice import advise, compression_at

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]


def holograd(**kwargs) -> HoloGradStrategy:
    return HoloGradStrategy(**{"start_method": "fork", "directions": "sketch", "audit_every": 0, **kwargs})


# -- settings ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [0, 1, 16, 64, 4.0, "4", True])
@pytest.mark.parametrize("cls", [HoloGradStrategy, HoloGradFabricStrategy])
def test_bad_scalar_bits_fail_at_construction(cls, bits):
    with pytest.raises(ValueError, match=r"scalar_bits=.* is not supported. HINT: choose one of 32, 8, 4, 2"):
        cls(scalar_bits=bits)


@pytest.mark.parametrize("path", ["sharded", "all_reduce"])
@pytest.mark.parametrize("cls", [HoloGradStrategy, HoloGradFabricStrategy])
def test_quantized_rows_on_sharded_or_all_reduce_fail_at_construction(cls, path):
    with pytest.raises(ValueError, match=rf"aggregation_path='{path}' with scalar_bits=4: .*HINT: use "
                                         r"aggregation_path='all_gather' \(or 'auto'"):
        cls(scalar_bits=4, aggregation_path=path)


def test_allowed_settings():
    for bits in (32, 8, 4, 2):
        assert HoloGradStrategy(scalar_bits=bits).config.scalar_bits == bits
        assert HoloGradFabricStrategy(scalar_bits=bits, aggregation_path="all_gather").config.scalar_bits == bits
    assert HoloGradConfig().scalar_bits == 32  # the default keeps float32 scalars


def test_setup_advice_counts_quantized_bytes():
    """D = 4000 on 2 ranks: K = 1000 float32 scalars (32 + 4000 bytes) and K = 8000 4-bit ones
    (32 + 4004 bytes) compress about 4x; K = 3999 warns at float32 (2D / (N (K + 8)) = 0.998)
    and not at 4 bits (32 + 2004 bytes: 3.9x)."""
    adam = [torch.optim.Adam([torch.zeros(1)])]
    assert compression_at(2, 4000, 1000) == pytest.approx(8 * 4000 / (2 * (32 + 4000)))
    assert compression_at(2, 4000, 8000, 4) == pytest.approx(8 * 4000 / (2 * (32 + 4004)))
    assert not advise(HoloGradConfig(num_directions=3999, scalar_bits=4).resolve(4000), 4000, 2, adam)
    (message,) = advise(HoloGradConfig(num_directions=3999).resolve(4000), 4000, 2, adam)
    assert "compression 0.998 < 1" in message


# -- the evasive plan sees the decoded rows ------------------------------------------------------------

def test_evasive_liars_are_never_drawn_on_the_decoded_matrix():
    """With scalar_bits = 4 the draw runs on the decoded matrix: over 100 commitments with
    p_verify = 0.5, no liar of the plan is drawn on the matrix every rank decodes. The plan
    made on the float rows instead (scalar_bits = 32) gets a liar drawn at some step: the
    draw hashes every decoded value, so it is another draw (each of the 100 steps where a
    float plan lies is drawn with probability ~1/2 on the decoded matrix)."""
    p_verify, k = 0.5, 8
    rows = torch.randn(4, k, generator=torch.Generator().manual_seed(0))
    caught = {4: 0, 32: 0}
    for bits in (4, 32):
        simulator = ByzantineSimulator([3], "sign_flip", only_unverified=True, p_verify=p_verify)
        simulator._exchange = SimpleNamespace(scalar_bits=bits, scalar_block=0,
                                              family=SimpleNamespace(num_directions=k),
                                              current_path=lambda: "all_gather")
        for step in range(100):
            ctx = StepContext(step + 1, hashlib.sha256(str(step).encode()).digest(), [], [])
            liars = simulator.liars(ctx, rows)
            submitted = rows.clone()
            for r in liars:
                submitted[r] = -rows[r]
            decoded = requantize_rows(submitted, ctx.commitment, k, 4)
            caught[bits] += len(draw_claims(ctx.commitment, decoded, p_verify, liars))
    assert caught[4] == 0 and caught[32] > 0


# -- real ranks -------------------------------------------------------------------------------------

def test_quantized_rows_train_with_identical_replicas_and_the_bytes_of_the_formula(tmp_path, counted_collectives):
    """2 ranks, K = 64 at 4 bits: each step's HoloGrad collectives carry exactly the 33-byte
    hash row and ceil(64 * 4 / 8) + 4 = 36 bytes of scalars (counted by wrapping
    torch.distributed), and the logged payload per step is their sum."""
    k, steps = 64, 12
    logger = CSVLogger(tmp_path, name="logs")
    states = fit(ToyModule(), holograd(num_directions=k, scalar_bits=4), tmp_path, max_steps=steps, logger=logger,
                 log_every_n_steps=1, callbacks=[_MarkSteps(tmp_path)])
    assert_identical_replicas(states)
    losses = states[0]["losses"]
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])  # it learns
    scalars = row_bytes(k, 0, 4)
    assert scalars == 36
    traffic = states[0]["exchange"]["traffic"]
    assert traffic["total_payload"]["scalars"] == steps * scalars
    assert traffic["total_wire"]["scalars"] == steps * scalars  # (N - 1) n with N = 2
    (metrics_file,) = (tmp_path / "logs").rglob("metrics.csv")
    with open(metrics_file) as handle:
        logged = [float(r["holograd/payload_bytes_per_step"]) for r in csv.DictReader(handle)
                  if r.get("holograd/payload_bytes_per_step")]
    assert logged == [33.0 + scalars] * steps
    for rank in range(2):
        for step, calls in _per_step(torch.load(tmp_path / f"collectives{rank}.pt")).items():
            assert sorted(size for _, size, ours in calls if ours) == [33, scalars], (step, calls)
            assert [call for call in calls if not call[2]] == []


@pytest.mark.parametrize("block", [0, 8])
def test_verifier_slashes_a_quantized_liar_and_never_an_honest_rank(tmp_path, block):
    """3 ranks, rank 0 verifies every worker claim (p_verify = 1, default tolerance); rank 2
    flips the sign of its float row from optimizer step 5 (chain step 6), before quantization.
    Rank 1 is accepted at all 10 steps, rank 2 at steps 1-5, and rejected and slashed at 6.
    With ``scalar_block=8`` each row carries 4 scales (K = 32) and is judged block by block."""
    attack = ByzantineSimulator(ranks=[2], attack="sign_flip", start_step=5)
    verifier = ProofVerifier(p_verify=1.0, ledger_path=str(tmp_path / "ledger.jsonl"))
    states = fit(ToyModule(), holograd(num_directions=32, scalar_bits=4, scalar_block=block), tmp_path / "ranks",
                 devices=3, max_steps=10, callbacks=[verifier, attack, _SaveCounts(attack, tmp_path)])
    assert states[0]["exchange"]["traffic"]["total_payload"]["scalars"] == 10 * row_bytes(32, 0, 4, block)
    assert_identical_replicas(states)
    assert all(state["exchange"]["slashed"] == [2] for state in states)
    ledger = Ledger.load(tmp_path / "ledger.jsonl")
    rejected = [(r.step, r.rank, r.data["reason"]) for r in ledger if r.data.get("verdict") == "reject"]
    assert rejected == [(6, 2, "mismatch")]
    accepted = [(r.step, r.rank) for r in ledger if r.data.get("verdict") == "accept"]
    assert sorted(accepted) == sorted([(s, 1) for s in range(1, 11)] + [(s, 2) for s in range(1, 6)])
    assert json.loads((tmp_path / "counts2.json").read_text())["lies"] >= 1


@pytest.mark.parametrize("directions", ["sketch", "subsample"])
def test_local_steps_with_per_rank_groups_and_quantized_rows(tmp_path, directions):
    """2 ranks, rounds of H = 2 Adam steps, per-rank directions, 4-bit scalars, every worker
    round replayed by the verifier (p_verify = 1, default tolerance): replicas identical, no
    slash, and each round sends ceil(16 * 4 / 8) + 4 + 4E bytes of scalars (E = 4 public values).
    The two families are the ones the long frontier runs in this setting."""
    k, e, rounds = 16, 4, 4
    verifier = ProofVerifier(p_verify=1.0, ledger_path=str(tmp_path / "ledger.jsonl"))
    states = fit(ToyModule(adam=True), holograd(directions=directions, num_directions=k, scalar_bits=4,
                                                 local_steps=2, direction_groups="per_rank"),
                 tmp_path / "ranks", callbacks=[verifier], max_steps=2 * rounds)
    assert_identical_replicas(states)
    exchange = states[0]["exchange"]
    assert exchange["chain"]["step"] == rounds and exchange["direction_groups"] == 2
    assert exchange["traffic"]["total_payload"]["scalars"] == rounds * row_bytes(k, e, 4) == rounds * 28
    assert exchange["slashed"] == []
    verdicts = [(r.step, r.rank, r.data["verdict"]) for r in Ledger.load(tmp_path / "ledger.jsonl")]
    assert verdicts == [(step, 1, "accept") for step in range(1, rounds + 1)]


def test_fabric_loop_with_quantized_rows(tmp_path):
    """The Fabric loop of test_fabric (16 optimizer steps, K = 64 for D = 178) at 8 bits:
    identical replicas, it learns, and each step sends 33 + 64 + 4 bytes."""
    launch(HoloGradFabricStrategy(start_method="fork", scalar_bits=8), toy_loop, tmp_path)
    states = ranks(tmp_path)
    assert identical(states)
    assert states[0]["exchange"]["traffic"]["total_payload"]["scalars"] == 16 * row_bytes(64, 0, 8) == 16 * 68
    assert states[0]["metrics"]["holograd/bytes_per_step"] == 33 + 68
    losses = states[0]["losses"]
    assert sum(losses[-4:]) < 0.6 * sum(losses[:4]), losses
