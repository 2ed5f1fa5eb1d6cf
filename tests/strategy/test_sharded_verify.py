"""Verification on the sharded path (docs/PROTOCOL.md §4.5, §6.12), real gloo ranks: a claim
cheater is slashed at its first cheating step and no honest rank ever is; an owner that
publishes a wrong aggregate for its block is caught by the aggregate audit, slashed, and its
block replaced by the verifier's before the estimate is built (replicas stay identical)."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from replicas import assert_identical_replicas
from test_verifier import SaveVerifier, ScalarCheater

from lightning_holograd import HoloGradStrategy, ProofVerifier
from lightning_holograd.demos import ToyModule, fit
from lightning_holograd.protocol import Ledger

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]


class LyingOwner(L.Callback):
    """``rank`` adds 1.0 to the aggregates of the blocks it owns from chain step ``first`` on."""

    def __init__(self, rank: int, first: int) -> None:
        self.rank, self.first = rank, first

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank != self.rank:
            return
        sharding = trainer.strategy.exchange.sharding
        honest = sharding._aggregate_owned

        def lie(state, received):
            out = honest(state, received)
            return out + 1.0 if sharding.comm.step >= self.first else out

        sharding._aggregate_owned = lie


def run(tmp_path, cheater, steps, devices=4):
    verifier = ProofVerifier(p_verify=1.0, ledger_path=str(tmp_path / "ledger.jsonl"))
    strategy = HoloGradStrategy(start_method="fork", directions="gaussian", num_directions=16,
                                aggregation="median", aggregation_path="sharded")
    states = fit(ToyModule(), strategy, tmp_path / "ranks", devices=devices, max_steps=steps,
                 callbacks=[verifier, SaveVerifier(verifier, tmp_path), cheater])
    reports = [torch.load(tmp_path / f"verifier{r}.pt", weights_only=False) for r in range(devices)]
    return states, reports, Ledger.load(tmp_path / "ledger.jsonl")


def test_sharded_claim_cheater_is_slashed_and_no_honest_rank(tmp_path):
    states, reports, ledger = run(tmp_path, ScalarCheater(3, 3), steps=5)
    assert_identical_replicas(states)
    assert all(r["slashed_set"] == [3] for r in reports)
    slashes = [(r.step, r.rank, r.data["reason"]) for r in ledger if r.event == "slash"]
    assert slashes == [(3, 3, "mismatch")]
    accepted = sorted((r.step, r.rank) for r in ledger if r.event == "verify" and r.data["verdict"] == "accept")
    assert accepted == sorted([(s, w) for s in range(1, 6) for w in (1, 2)] + [(1, 3), (2, 3)])


def test_sharded_lying_aggregator_is_caught(tmp_path):
    liar, first, steps = 2, 3, 12
    states, reports, ledger = run(tmp_path, LyingOwner(liar, first), steps=steps)
    assert_identical_replicas(states)  # the lie was patched out on every rank alike
    assert all(r["slashed_set"] == [liar] for r in reports)
    (slash,) = [r for r in ledger if r.event == "slash"]
    assert (slash.rank, slash.data["reason"], slash.data["block"]) == (liar, "aggregate", liar)
    assert slash.step >= first
    assert all(r.data["verdict"] == "accept" for r in ledger if r.event == "verify")  # its claims are honest
