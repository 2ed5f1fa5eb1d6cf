"""Checkpoints of earlier versions resume exactly (fork launcher, gloo, CPU).

``tests/fixtures/v1`` holds what lightning-holograd 0.1.0 (commit 99511df, state version 1:
the protocol state under ``"holograd"``) wrote for the toy task with Adam on 2 ranks:
``<family>_last.ckpt`` after one epoch (8 steps) with ``ProofVerifier(p_verify=0.5,
ledger_path=...)``, the ledger file of that epoch, and rank 0's parameters and exchange
state after 2 uninterrupted epochs of the same run (``*_expected_*.pt``). Resuming the
checkpoint for the second epoch must give those parameters bit for bit, the same chain
and traffic totals, and a ledger whose chain verifies across the resume.

0.1.0 generated directions with definition 1 (a generator per block, genesis tag
"holograd/v1"); such a checkpoint resumes with that definition (docs/PROTOCOL.md §3.8),
while a new run always uses the current one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from replicas import assert_identical_replicas

from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_holograd import HoloGradStrategy, ProofVerifier
from lightning_holograd.demos import ToyModule, fit
from lightning_holograd.engine.bundle import encode_bundle, frame_message
from lightning_holograd.protocol import Ledger
from lightning_holograd.strategies.checkpoint import STATE_KEY, exchange_state

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "v1"
FAMILIES = {"identity": {"directions": "identity"}, "sketch": {"directions": "sketch", "num_directions": 8}}


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_version_1_checkpoint_resumes_bitwise(tmp_path, family):
    checkpoint = tmp_path / "last.ckpt"
    shutil.copy(FIXTURES / f"{family}_last.ckpt", checkpoint)
    ledger_path = tmp_path / "ledger.jsonl"
    shutil.copy(FIXTURES / f"{family}_ledger.jsonl", ledger_path)  # as the first run left it
    strategy = HoloGradStrategy(start_method="fork", **FAMILIES[family])
    states = fit(ToyModule(adam=True), strategy, tmp_path / "ranks", max_epochs=2, max_steps=-1,
                 ckpt_path=str(checkpoint), callbacks=[ProofVerifier(p_verify=0.5, ledger_path=str(ledger_path))])
    assert_identical_replicas(states)
    expected = torch.load(FIXTURES / f"{family}_expected_params.pt", weights_only=True)
    assert states[0]["params"].keys() == expected.keys()
    assert all(torch.equal(states[0]["params"][name], tensor) for name, tensor in expected.items())
    expected_exchange = torch.load(FIXTURES / f"{family}_expected_exchange.pt", weights_only=True)
    assert states[0]["exchange"]["chain"] == expected_exchange["chain"]
    assert states[0]["exchange"]["slashed"] == expected_exchange["excluded"] == []
    first = Ledger.load(FIXTURES / f"{family}_ledger.jsonl").records
    resumed = Ledger.load(ledger_path).records  # verifies the chain across the resume
    assert resumed[: len(first)] == first and len(resumed) > len(first)
    assert {r.step for r in resumed[len(first):]} <= set(range(9, 17))
    assert_traffic_since_0_1_0(states[0]["exchange"]["traffic"], expected_exchange["traffic"],
                               torch.load(checkpoint, weights_only=True)["holograd"]["exchange"]["traffic"],
                               resumed[len(first):])


def assert_traffic_since_0_1_0(got: dict, expected: dict, at_checkpoint: dict, records: list) -> None:
    """Rank 0's traffic totals equal 0.1.0's, except what this version counts differently in the
    resumed epoch: the commit's flag byte (8 steps x 1 byte, N = 2) and the verification
    transfers, now bundles (rank 0, the verifier, sends one verdict bundle per checked step,
    rebuilt here from the ledger's verify records)."""
    verdicts = sum(len(frame_message(encode_bundle({str(r.rank): {"accepted": r.data["verdict"] == "accept",
                                                                  **{k: v for k, v in r.data.items() if k != "verdict"}}})))
                   for r in records if r.event == "verify")
    verification = at_checkpoint["total_payload"].get("verification", 0) + verdicts
    for totals in ("total_payload", "total_wire"):
        adjusted = {**expected[totals], "hashes": expected[totals]["hashes"] + 8, "verification": verification}
        assert got[totals] == adjusted, totals
    assert got["steps"] == expected["steps"]


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_resumed_version_1_run_stays_version_1_and_a_new_run_is_version_2(tmp_path):
    """The checkpoint a resumed 0.1.0 run writes keeps direction version 1 (family state, and
    the chain in 0.1.0's format: no tag, i.e. "holograd/v1"), and resumes again; the same
    settings without a checkpoint start a version-2 run."""
    settings = FAMILIES["sketch"]
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(ToyModule(adam=True), HoloGradStrategy(start_method="fork", **settings), tmp_path / "second", max_epochs=2,
        max_steps=-1, ckpt_path=str(FIXTURES / "sketch_last.ckpt"), enable_checkpointing=True, callbacks=[checkpoint])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)[STATE_KEY]["exchange"]
    expected = torch.load(FIXTURES / "sketch_expected_exchange.pt", weights_only=True)
    assert saved["chain"] == expected["chain"] and "genesis_tag" not in saved["chain"]
    assert saved["family"] == {"name": "sketch", "dim": 178, "num_directions": 8, "block_size": 8192,
                               "direction_version": 1}
    third = fit(ToyModule(adam=True), HoloGradStrategy(start_method="fork", **settings), tmp_path / "third",
                max_epochs=3, max_steps=-1, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert_identical_replicas(third)
    assert third[0]["exchange"]["chain"]["step"] == 24 and third[0]["exchange"]["family"] == saved["family"]

    fresh = fit(ToyModule(adam=True), HoloGradStrategy(start_method="fork", **settings), tmp_path / "fresh",
                max_steps=2)
    family = fresh[0]["exchange"]["family"]
    assert family["direction_version"] == 2 and "block_size" not in family
    assert fresh[0]["exchange"]["chain"]["genesis_tag"] == "holograd/v2/dirs2"


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_version_1_codebook_checkpoint_is_refused_with_what_to_do(tmp_path):
    """0.1.0's codebook (and momentum) state belongs to an algorithm rewritten since: the strategy
    refuses it at setup instead of continuing with other directions. The checkpoint is the
    identity fixture with a hand-written 0.1.0 codebook family state."""
    checkpoint = torch.load(FIXTURES / "identity_last.ckpt", weights_only=True)
    checkpoint["holograd"]["config"].update(directions="codebook", num_directions=8)
    checkpoint["holograd"]["exchange"]["family"] = {"name": "codebook", "dim": 178, "num_directions": 8,
                                                    "basis": torch.eye(178, 8), "num_updates": 8}
    torch.save(checkpoint, tmp_path / "codebook.ckpt")
    strategy = HoloGradStrategy(start_method="fork", directions="codebook", num_directions=8)
    with pytest.raises(Exception, match="directions='codebook' with direction_version=1.*"
                                        "HINT: start a new run or finish it with lightning-holograd 0.1.x"):
        fit(ToyModule(adam=True), strategy, tmp_path / "ranks", devices=1, max_epochs=2, max_steps=-1,
            ckpt_path=str(tmp_path / "codebook.ckpt"))


def test_version_1_state_is_migrated():
    checkpoint = torch.load(FIXTURES / "identity_last.ckpt", weights_only=True)
    old = checkpoint["holograd"]["exchange"]
    old["excluded"] = [3]
    old["traffic"]["total_payload"]["bootstrap"] = 10
    state = exchange_state(checkpoint)
    assert state is not None and state["slashed"] == [3] and "excluded" not in state
    assert state["traffic"]["total_payload"]["true_gradient"] == 10
    assert "bootstrap" not in state["traffic"]["total_payload"]
    assert state["chain"] == old["chain"] and state["family"] == old["family"]
    assert exchange_state({STATE_KEY: {"config": {}, "exchange": state}}) == state
    assert exchange_state({"state_dict": {}}) is None


def test_a_newer_state_version_is_refused_with_a_hint():
    with pytest.raises(ValueError, match=r"HoloGradStrategy\{'version': 99\}.*HINT: upgrade"):
        exchange_state({"HoloGradStrategy{'version': 99}": {"config": {}, "exchange": {}}})
