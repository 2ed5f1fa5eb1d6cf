"""Local steps on issue 16's fault handling (docs/PROTOCOL.md §9.2 "Faults", "Verification of
a round"): non-finite rounds, SIGTERM at a round boundary, the round's batches through the
bundle transport within max_transfer_bytes, a malformed round. Real ranks (fork, gloo, CPU)."""

from __future__ import annotations

import signal
import time

import pytest
import torch
from replicas import assert_identical_replicas
from test_faults import SlowSteps, StepClock, _send_when_running, step_times
from test_honest_faults import WORLD, NaNInputs, records

from lightning_holograd import HoloGradStrategy, ProofVerifier
from lightning_holograd.demos import ToyModule, fit
from lightning_holograd.engine import MalformedInputs, check_claim, encode_bundle
from lightning_holograd.protocol import step_batch_hash

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(150)]


def holograd(**kwargs) -> HoloGradStrategy:
    return HoloGradStrategy(**{"start_method": "fork", "directions": "sketch", "num_directions": 16, **kwargs})


def verifier(tmp_path, **kwargs) -> ProofVerifier:
    return ProofVerifier(**{"p_verify": 0.0, "rtol": 0.0, "atol": 0.0, "ledger_path": str(tmp_path / "ledger.jsonl"),
                            **kwargs})


def test_an_honest_non_finite_round_is_dropped_checked_and_the_rank_recovers(tmp_path):
    """NaN inputs in rank 1's inner step 3 (round 2 of H = 2): its Adam parameters, so its
    pseudo-gradient and statistics, turn NaN. The row is dropped for the round, checked (a
    non-finite row always is, with p_verify = 0) and accepted (the replay is NaN too); the
    outer step gives rank 1 the shared parameters back, so the run ends finite and identical."""
    states = fit(NaNInputs((1,), 3, adam=True), holograd(local_steps=2), tmp_path / "ranks", devices=WORLD,
                 use_distributed_sampler=False, max_steps=8, callbacks=[verifier(tmp_path)])
    assert_identical_replicas(states)
    assert [s["exchange"]["slashed"] for s in states] == [[]] * WORLD
    assert records(tmp_path, "verify") == [(2, 1, "accept", "nonfinite")]
    assert all(torch.isfinite(p).all() for p in states[0]["params"].values())


def test_a_round_non_finite_on_every_rank_stops_naming_the_round(tmp_path):
    with pytest.raises(Exception, match=r"NonFiniteError: step 2: the loss or gradient was non-finite"):
        fit(NaNInputs((0, 1, 2), 3, adam=True), holograd(local_steps=2), tmp_path / "ranks", devices=WORLD,
            use_distributed_sampler=False, max_steps=8)


def test_sigterm_mid_round_stops_every_rank_at_the_next_round_boundary(tmp_path):
    """SIGTERM to rank 1 during a round of H = 4: its flag rides in the round's commit, so
    every rank runs the same inner steps, stops before the same chain step, exit code 143."""
    sender = _send_when_running(tmp_path, 1, 3, signal.SIGTERM)
    with pytest.raises(Exception) as failure:
        fit(ToyModule(adam=True), holograd(local_steps=4), tmp_path / "ranks", devices=3, max_steps=400,
            max_epochs=-1, callbacks=[StepClock(tmp_path), SlowSteps()])
    ended = time.time()
    sender.join()
    assert "exit code 143" in str(failure.value), str(failure.value)[-2000:]
    assert ended - float((tmp_path / "signalled").read_text()) < 20
    last = [max(step_times(tmp_path, rank)) for rank in range(3)]
    assert len(set(last)) == 1 and last[0] < 100, last
    inner = [len((tmp_path / f"steps{rank}.jsonl").read_text().splitlines()) for rank in range(3)]
    assert len(set(inner)) == 1, inner  # the signalled rank did not stop mid-round alone


def _round_bundle_bytes(steps: int) -> int:
    """Bytes of the bundle a claimant sends for a round of ``steps`` inner steps of one toy batch."""
    batch = next(iter(ToyModule().train_dataloader()))
    return len(encode_bundle({"batches": [[[batch] for _ in range(steps)]]}))


@pytest.mark.parametrize("local_steps, verdict", [(2, ("accept", "ok")), (4, ("reject", "missing"))])
def test_a_rounds_batches_travel_as_one_bundle_within_max_transfer_bytes(tmp_path, local_steps, verdict):
    """max_transfer_bytes = the bundle of a 2-step round: such rounds are replayed and accepted,
    a 4-step round does not fit and its claim is missing (slash=False: verdicts only)."""
    limit = _round_bundle_bytes(2)
    assert _round_bundle_bytes(4) > limit
    states = fit(ToyModule(adam=True), holograd(local_steps=local_steps), tmp_path / "ranks", max_steps=8,
                 max_epochs=-1, callbacks=[verifier(tmp_path, p_verify=1.0, slash=False, max_transfer_bytes=limit)])
    assert_identical_replicas(states)
    rounds = 8 // local_steps
    assert records(tmp_path, "verify") == [(step, 1, *verdict) for step in range(1, rounds + 1)]


def test_a_committed_round_that_does_not_pair_with_the_verifiers_is_a_batch_hash_reject():
    """The batches match the commitment, but the replay finds them malformed (another number of
    inner steps): reason batch_hash, never a NaN replay that would pass as an honest fault."""
    batches = [[[torch.ones(2)], [torch.ones(2)]]]  # [R], R: 2 inner steps

    def replay(inputs, seeds):
        raise MalformedInputs("a round of 3 inner steps was expected")

    claimed = torch.full((4,), float("nan"))
    report = check_claim(claimed, batches, [[[0], [1], [2]]], step_batch_hash(batches), [1, 2], replay, 0.0, 0.0)
    assert (report["accepted"], report["reason"]) == (False, "batch_hash")
