"""Elastic world size: a 3-rank checkpoint resumed on 2 ranks (real gloo ranks, fork launcher).

Nothing in the protocol state depends on N except the slashed ranks, whose numbers name
processes, not workers. So the resume works (chain and family continue, the change is a
``resize`` record in the ledger) when nobody is slashed or when ``resume_rank_map`` says
which old rank is which new one, and is refused, with the reason and the fix, otherwise.
"""

from __future__ import annotations

import lightning.pytorch as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from replicas import assert_identical_replicas

from lightning_holograd import HoloGradStrategy, ProofVerifier
from lightning_holograd.demos import ToyModule, fit
from lightning_holograd.protocol import Ledger

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(150)]


class Cheat(L.Callback):
    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 2:
            trainer.strategy.exchange.claim_hooks.append(lambda ctx, scalars: -3.0 * scalars)


def first_run(tmp_path, cheat: bool) -> str:
    """4 steps on 3 ranks, every claim verified; returns the checkpoint."""
    callbacks = [ProofVerifier(p_verify=1.0, ledger_path=str(tmp_path / "ledger.jsonl")),
                 ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4)] + ([Cheat()] if cheat else [])
    fit(ToyModule(), HoloGradStrategy(start_method="fork", directions="gaussian", num_directions=16),
        tmp_path / "three", devices=3, max_steps=4, enable_checkpointing=True, callbacks=callbacks)
    return str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt")


def resume_on_two(tmp_path, checkpoint: str, **strategy_kwargs):
    strategy = HoloGradStrategy(start_method="fork", directions="gaussian", num_directions=16, **strategy_kwargs)
    return fit(ToyModule(), strategy, tmp_path / "two", devices=2, max_steps=8, ckpt_path=checkpoint,
               callbacks=[ProofVerifier(p_verify=1.0, ledger_path=str(tmp_path / "ledger.jsonl"))])


def test_three_ranks_to_two_without_slashes_continues_and_is_recorded(tmp_path):
    checkpoint = first_run(tmp_path, cheat=False)
    states = resume_on_two(tmp_path, checkpoint)
    assert_identical_replicas(states)
    assert states[0]["exchange"]["chain"]["step"] == 8 and states[0]["exchange"]["world_size"] == 2
    ledger = Ledger.load(tmp_path / "ledger.jsonl")  # one file, one chain across the resize
    resize = [r for r in ledger if r.event == "resize"]
    assert [(r.step, r.rank, r.data) for r in resize] == [(4, -1, {"world_size_before": 3, "world_size": 2,
                                                                    "slashed": []})]
    assert {r.rank for r in ledger if r.event == "verify" and r.step > 4} == {1}  # the one worker left


def test_three_ranks_to_two_with_a_slashed_rank_needs_a_rank_map(tmp_path):
    checkpoint = first_run(tmp_path, cheat=True)
    with pytest.raises(Exception, match=r"3-rank job that slashed ranks \[2\].*HINT: resume with 3 ranks"):
        resume_on_two(tmp_path, checkpoint)
    states = resume_on_two(tmp_path, checkpoint, resume_rank_map={0: 0, 1: 1})  # rank 2 (slashed) left the job
    assert_identical_replicas(states)
    assert states[0]["exchange"]["slashed"] == []
    ledger = Ledger.load(tmp_path / "ledger.jsonl")
    assert [(r.step, r.rank, r.data["reason"]) for r in ledger if r.event == "slash"] == [(1, 2, "mismatch")]
    assert [r.data for r in ledger if r.event == "resize"] == [{"world_size_before": 3, "world_size": 2,
                                                               "slashed": []}]
