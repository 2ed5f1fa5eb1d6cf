"""Exact mid-epoch resume of the GPT-2 example on CPU (2 gloo ranks, fork launcher).

N steps, kill -9 of rank 1, resume from the checkpoint at step N (mid-epoch), M more
steps: bitwise the parameters of N + M uninterrupted steps. This needs the example's
resumable training loader (torchdata's ``StatefulDataLoader``): with a plain
``DataLoader`` Lightning warns that the loader is not resumable and restarts the epoch's
batches, so the parameters differ.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_holograd import HoloGradStrategy
from lightning_holograd.demos import SaveRankState, free_port, load_ranks
from lightning_holograd.demos.gpt2_data import GPT2DataModule
from lightning_holograd.demos.gpt2_module import GPT2Module

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]

N, M, KILL_AT = 4, 4, 6  # checkpoint at step 4, rank 1 killed after step 6, resume, end at step 8


class KillRank1(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)


def run(out: Path, *callbacks: L.Callback, ckpt_path: str | None = None) -> None:
    os.environ["MASTER_PORT"] = str(free_port())
    L.seed_everything(1337, verbose=False)  # as the CLI does: the sampler's shuffle seed
    model = GPT2Module(block_size=32, n_layer=1, n_head=2, n_embd=32, warmup_steps=2)
    data = GPT2DataModule(batch_size=4, block_size=32, max_bytes=200_000)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=N + M, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        strategy=HoloGradStrategy(start_method="fork", num_directions=256),
        callbacks=[ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=N, save_top_k=-1),
                   SaveRankState(out / "ranks"), *callbacks])
    trainer.fit(model, data, ckpt_path=ckpt_path)


def test_kill_and_resume_mid_epoch_is_bitwise_the_uninterrupted_run(tmp_path):
    run(tmp_path / "straight")
    with pytest.raises(Exception, match="SIGKILL"):
        run(tmp_path / "crashed", KillRank1())
    checkpoint = tmp_path / "crashed" / "ckpt" / f"epoch=0-step={N}.ckpt"
    state = torch.load(checkpoint, weights_only=True)
    loader_state = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state["epoch"] == 0 and loader_state[0]["_num_yielded"] == N  # mid-epoch, with the loader's position
    run(tmp_path / "crashed", ckpt_path=str(checkpoint))
    straight, resumed = load_ranks(tmp_path / "straight" / "ranks", 2), load_ranks(tmp_path / "crashed" / "ranks", 2)
    for rank in range(2):
        assert resumed[rank]["global_step"] == N + M
        for name, tensor in straight[rank]["params"].items():
            assert torch.equal(resumed[rank]["params"][name], tensor), (rank, name)
        assert resumed[rank]["exchange"]["chain"] == straight[rank]["exchange"]["chain"]
