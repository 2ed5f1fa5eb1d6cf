"""A small learnable task, and a multi-process fit that returns every rank's final state.

The task: y = W* x + noise with a 2-layer MLP (D = 178 trainable parameters) on fixed
synthetic data. The DistributedSampler that Lightning inserts for training shuffles from a
fixed seed (0, or PL_GLOBAL_SEED), so each rank's batches are the same in every run. The
tests and the benchmarks use it:

    from lightning_holograd import HoloGradStrategy
    from lightning_holograd.demos import ToyModule, fit

    states = fit(ToyModule(), HoloGradStrategy(start_method="fork"), "runs/toy", devices=2)
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
from typing_extensions import override

IN_FEATURES, HIDDEN, OUT_FEATURES = 8, 16, 2


def make_dataset(num_samples: int = 256, seed: int = 0) -> TensorDataset:
    """(x (n, 8), y (n, 2)) with y = x W* + 0.01 noise, from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, IN_FEATURES, generator=gen)
    teacher = torch.randn(IN_FEATURES, OUT_FEATURES, generator=gen)
    y = x @ teacher + 0.01 * torch.randn(num_samples, OUT_FEATURES, generator=gen)
    return TensorDataset(x, y)


class ToyModule(L.LightningModule):
    """The MLP 8-16-2 regression task; ``manual``, ``with_buffer``, ``unused_param`` and
    ``adam`` switch on the features the strategy must support; ``resumable`` serves the
    data through torchdata's ``StatefulDataLoader``, which Lightning saves in checkpoints,
    so that a mid-epoch resume continues with the same batches."""

    def __init__(self, lr: float = 0.05, batch_size: int = 16, num_samples: int = 256, manual: bool = False,
                 with_buffer: bool = False, unused_param: bool = False, adam: bool = False,
                 resumable: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        with torch.random.fork_rng(devices=[]):  # the same init in every process, the global RNG untouched
            torch.manual_seed(1234)
            self.net = nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT_FEATURES))
            if with_buffer:
                self.norm = nn.BatchNorm1d(IN_FEATURES)
            if unused_param:
                self.unused = nn.Linear(3, 3)
        self.automatic_optimization = not manual
        self.losses: list[float] = []

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.with_buffer:
            x = self.norm(x)
        return self.net(x)

    @override
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

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.adam:
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr / 10)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    @override
    def train_dataloader(self) -> DataLoader:
        loader = resumable_loader_class() if self.hparams.get("resumable") else DataLoader
        return loader(make_dataset(self.hparams.num_samples), batch_size=self.hparams.batch_size, shuffle=False)


def resumable_loader_class() -> type[DataLoader]:
    """torchdata's ``StatefulDataLoader`` (a ``DataLoader`` with ``state_dict``/``load_state_dict``)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader


class SaveRankState(L.Callback):
    """Each rank writes its final parameters, losses and protocol state to ``out_dir``."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        exchange = getattr(trainer.strategy, "exchange", None)
        state = {
            "params": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "losses": list(getattr(pl_module, "losses", [])),
            "global_step": trainer.global_step,
            "exchange": exchange.state_dict() if exchange is not None else None,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")


def load_ranks(out_dir: str | os.PathLike[str], world_size: int) -> list[dict[str, Any]]:
    """The states ``SaveRankState`` wrote, in rank order."""
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fit(module: L.LightningModule, strategy: Any, out_dir: str | os.PathLike[str], devices: int = 2,
        callbacks: list[L.Callback] | None = None, ckpt_path: str | None = None, **trainer_kwargs: Any) -> list[dict[str, Any]]:
    """Fit on ``devices`` CPU ranks with the strategy's launcher (use fork or spawn when
    calling this from a larger program) and return each rank's ``SaveRankState`` state.

    Each fit gets a fresh rendezvous port: the fork launcher otherwise reuses the first
    MASTER_PORT it set in this process, and a job still tearing down on that port (or
    another program on the machine) could join the wrong group.
    """
    # A process group initialised in this process would be inherited by every later forked
    # job and hang it: in-process runs (devices=1 with start_method="popen") leave one behind.
    if torch.distributed.is_initialized():
        raise RuntimeError("fit() found a process group already initialised in this process. HINT: run "
                           "devices=1 fits with start_method='fork' so that the group lives in the child.")
    os.environ["MASTER_PORT"] = str(free_port())
    defaults = dict(max_steps=16, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    defaults.update(trainer_kwargs)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy,
                        callbacks=[SaveRankState(out_dir), *(callbacks or [])], **defaults)
    trainer.fit(module, ckpt_path=ckpt_path)
    return load_ranks(out_dir, devices)
