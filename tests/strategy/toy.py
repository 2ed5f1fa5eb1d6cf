"""A small learnable task and helpers shared by the strategy tests.

The task: y = W* x + noise with a 2-layer MLP, fixed synthetic data, no shuffling, so
each rank's batches are the same in every run (DistributedSampler with shuffle=False).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

IN_FEATURES, HIDDEN, OUT_FEATURES = 8, 16, 2


def make_dataset(num_samples: int = 256, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, IN_FEATURES, generator=gen)
    teacher = torch.randn(IN_FEATURES, OUT_FEATURES, generator=gen)
    y = x @ teacher + 0.01 * torch.randn(num_samples, OUT_FEATURES, generator=gen)
    return TensorDataset(x, y)


class ToyModule(L.LightningModule):
    def __init__(self, lr: float = 0.05, batch_size: int = 16, num_samples: int = 256, manual: bool = False,
                 with_buffer: bool = False, unused_param: bool = False, adam: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(1234)  # identical init on every rank; the strategy broadcasts anyway
        self.net = nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT_FEATURES))
        if with_buffer:
            self.norm = nn.BatchNorm1d(IN_FEATURES)
        if unused_param:
            self.unused = nn.Linear(3, 3)
        self.automatic_optimization = not manual
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.with_buffer:
            x = self.norm(x)
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(float(loss.detach()))
        self.log("train_loss", loss)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return None
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.adam:
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr / 10)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_dataset(self.hparams.num_samples), batch_size=self.hparams.batch_size, shuffle=False)


class SaveRankState(L.Callback):
    """Each rank writes its final parameters, losses and protocol state to ``out_dir``."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        exchange = getattr(trainer.strategy, "exchange", None)
        state = {
            "params": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "losses": list(pl_module.losses),
            "global_step": trainer.global_step,
            "exchange": exchange.state_dict() if exchange is not None else None,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")


def load_ranks(out_dir: str | os.PathLike[str], world_size: int) -> list[dict[str, Any]]:
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fit(module: L.LightningModule, strategy: Any, out_dir: str | os.PathLike[str], devices: int = 2,
        callbacks: list[L.Callback] | None = None, ckpt_path: str | None = None, **trainer_kwargs: Any) -> list[dict[str, Any]]:
    """Fit with real processes (the strategy's launcher, fork inside pytest) and load each rank's state.

    Each fit gets a fresh rendezvous port: the fork launcher otherwise reuses the first
    MASTER_PORT it set in this process, and a job still tearing down on that port (or
    another test process on the machine) could join the wrong group.
    """
    # A process group initialised in the pytest process would be inherited by every later
    # forked job and hang it: in-process runs (devices=1 with start_method="popen") leak one.
    assert not torch.distributed.is_initialized(), "run devices=1 tests with start_method='fork'"
    os.environ["MASTER_PORT"] = str(free_port())
    defaults = dict(max_steps=16, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    defaults.update(trainer_kwargs)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy,
                        callbacks=[SaveRankState(out_dir), *(callbacks or [])], **defaults)
    trainer.fit(module, ckpt_path=ckpt_path)
    return load_ranks(out_dir, devices)


def assert_identical_replicas(states: list[dict[str, Any]]) -> None:
    reference = states[0]["params"]
    for rank, state in enumerate(states[1:], start=1):
        for name, tensor in state["params"].items():
            assert torch.equal(tensor, reference[name]), f"rank {rank} differs from rank 0 in {name}"


def max_param_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(float((a["params"][k].float() - b["params"][k].float()).abs().max()) for k in a["params"])
