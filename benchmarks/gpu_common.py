"""Shared pieces of the GPU check's stages (``benchmarks/gpu_check.py``): arguments, the
device, a GPT-2 on random tokens, a per-step timer and the deterministic-algorithms switch.

The classes live in an importable module so that spawned ranks can unpickle them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from benchmarks.harness import make_parser
from lightning_holograd.demos.gpt2_module import GPT2Module

# GPT-2 124M: transformers.GPT2Config's default shape (dropout 0 so claims are recomputable).
GPT2_124M: dict[str, int] = {"vocab_size": 50257, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768}
# The tiny GPT-2 of configs/gpt2-tiny-cpu.yaml (D = 445,952): C8's model on the GPU.
GPT2_TINY: dict[str, int] = {"vocab_size": 256, "block_size": 128, "n_layer": 2, "n_head": 2, "n_embd": 128}
# Seconds-long CPU stand-in for --dry-run.
GPT2_DRY: dict[str, int] = {"vocab_size": 256, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32}


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    p = make_parser(doc)
    p.add_argument("--out", required=True, help="results folder (created); this stage writes <stage>.md/.json there")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, seconds: proves the stage runs")
    p.add_argument("--device", default=None, help="cuda (default) or cpu (default with --dry-run)")
    return p


def stage_device(args: argparse.Namespace) -> torch.device:
    """cuda unless --dry-run; asking for cuda without one is an error that names the fix."""
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device={device} but torch.cuda.is_available() is False. "
                         "HINT: run on the GPU machine, or pass --dry-run (CPU, tiny sizes).")
    if device.type == "cuda" and device.index is None:
        # torch.cuda.set_device (Lightning's CUDA accelerator, the ranks' setup) refuses an
        # unindexed "cuda" in torch 2.11; the GPU check uses the first card.
        device = torch.device("cuda", 0)
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class RandomTokens(Dataset):
    """``count`` windows of ``block_size`` uniformly random token ids from a fixed seed."""

    def __init__(self, count: int, block_size: int, vocab_size: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab_size, (count, block_size), generator=gen)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.tokens[index]


class RandomTokenGPT2(GPT2Module):
    """The demo's GPT2Module (AdamW, warmup + cosine) fed ``RandomTokens``; the init is
    drawn from a private seed, so every process builds the same weights."""

    def __init__(self, shape: dict[str, int], batch_size: int, num_batches: int, seed: int = 0) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            super().__init__(**shape, dropout=0.0, warmup_steps=5)
        self.batch_size, self.num_batches = batch_size, num_batches
        self.losses: list[float] = []

    @override
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.losses.append(float(loss.detach()))
        return loss

    @override
    def train_dataloader(self) -> DataLoader:
        data = RandomTokens(self.batch_size * self.num_batches, self.hparams.block_size, self.hparams.vocab_size)
        return DataLoader(data, batch_size=self.batch_size, shuffle=False)


class StepTimer(L.Callback):
    """Wall seconds of each training batch (the device synchronised at both ends) and, when
    the strategy has ``exchange_gradients``, of each exchange inside it (synchronised too)."""

    def __init__(self) -> None:
        self.step_s: list[float] = []
        self.exchange_s: list[float] = []
        self._t0 = 0.0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if hasattr(strategy, "exchange_gradients") and not hasattr(strategy, "_timed_exchange"):
            inner = strategy.exchange_gradients

            def timed(*args: Any, **kwargs: Any) -> Any:
                sync(strategy.root_device)
                t0 = time.perf_counter()
                out = inner(*args, **kwargs)
                sync(strategy.root_device)
                self.exchange_s.append(time.perf_counter() - t0)
                return out

            strategy.exchange_gradients = timed  # type: ignore[method-assign]
            strategy._timed_exchange = True

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        sync(pl_module.device)
        self._t0 = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        sync(pl_module.device)
        self.step_s.append(time.perf_counter() - self._t0)


class DeterministicAlgorithms(L.Callback):
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` in every rank at setup
    (an op without a deterministic kernel warns into the stage's log instead of stopping it).
    cuBLAS also needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment before CUDA
    starts: the stage sets it before the ranks are spawned."""

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        torch.use_deterministic_algorithms(True, warn_only=True)


def trainer_defaults(max_steps: int) -> dict[str, Any]:
    return dict(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)


def results_path(out: str, stem: str) -> Path:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{stem}.md"
