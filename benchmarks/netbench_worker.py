"""One rank of a network benchmark run (started by ``torchrun`` inside a network namespace).

``frontier``, ``lr_sweep``, ``slow_link`` and ``bytes_per_rank`` start this module on every
"node" of a ``netns.Cluster`` with ``torchrun --nnodes N --nproc-per-node 1``. It trains the
tiny GPT-2 of ``configs/gpt2-tiny-cpu.yaml`` under one communication strategy, described by
a JSON spec (``--spec``, see ``baselines.build_strategy``); ``"lr_scale"`` in the spec
multiplies the model's ``lr`` and ``min_lr`` (the learning-rate sweep).

Run settings: ``--steps``; ``--val-every`` / ``--val-batches`` (0: no validation);
``--warmup`` (steps left out of step times and bytes per step); ``--schedule-steps`` (the
cosine schedule ends there whatever ``--steps`` is: a race runs past it at ``min_lr``);
``--target`` and ``--time-cap`` (the race: stop at the first validation whose loss is at or
below the target, or once the training seconds of the slowest rank pass the cap);
``--batch-size`` and ``--max-bytes`` (data).

Every rank writes ``<out>/<name>_rank<r>.json`` (``probes.NetProbe``): step times, peak
RSS, the validation curve (val_loss, training seconds and bytes sent at each check) and
the bytes its interface (``--iface``) sent between train start and train end, read from
the kernel, so they include everything the rank sent: gradients or scalars, Lightning's
own collectives, TCP/IP headers and ACKs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402
from typing_extensions import override  # noqa: E402

from lightning_holograd.demos.gpt2_data import GPT2DataModule  # noqa: E402
from lightning_holograd.demos.gpt2_module import GPT2Module  # noqa: E402

from benchmarks.baselines import build_strategy  # noqa: E402
from benchmarks.harness import DATA_KW, MODEL_KW, SEED, make_parser  # noqa: E402
from benchmarks.probes import NetProbe  # noqa: E402


class RaceStop(L.Callback):
    """Stop at the first validation whose loss is <= ``target`` or once the training seconds
    (validation excluded, ``probe.train_s``) pass ``time_cap_s`` on any rank. Every rank
    takes the same decision (``reduce_boolean_decision``), so all of them stop together."""

    def __init__(self, probe: NetProbe, target: float | None, time_cap_s: float | None) -> None:
        self.probe, self.target, self.time_cap_s = probe, target, time_cap_s

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or not self.probe.curve:
            return
        point = self.probe.curve[-1]
        reached = self.target is not None and point["val_loss"] <= self.target
        over = self.time_cap_s is not None and point["train_s"] >= self.time_cap_s
        if trainer.strategy.reduce_boolean_decision(bool(reached or over), all=False):
            trainer.should_stop = True


class FixedScheduleGPT2(GPT2Module):
    """The tiny GPT-2 whose cosine schedule ends at ``schedule_steps`` whatever ``max_steps``
    is; later steps run at ``min_lr``."""

    def __init__(self, schedule_steps: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.schedule_steps = schedule_steps

    @override
    def lr_factor(self, step: int, total: int) -> float:
        return super().lr_factor(step, self.schedule_steps)


def make_module(spec: dict[str, Any], schedule_steps: int | None) -> GPT2Module:
    """The tiny GPT-2 with the spec's learning-rate scale and an optional fixed schedule length."""
    scale = float(spec.get("lr_scale", 1.0))
    kwargs = {**MODEL_KW, "lr": MODEL_KW["lr"] * scale, "min_lr": MODEL_KW["min_lr"] * scale}
    return FixedScheduleGPT2(schedule_steps, **kwargs) if schedule_steps else GPT2Module(**kwargs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser(__doc__)
    p.add_argument("--spec", required=True, help="JSON run spec (see benchmarks/baselines.py)")
    p.add_argument("--out", required=True, help="directory for <name>_rank<r>.json")
    p.add_argument("--iface", default=None, help="network interface whose sent bytes are counted")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--val-every", type=int, default=50, help="steps between validations (0: none)")
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of step times and bytes/step")
    p.add_argument("--schedule-steps", type=int, default=0, help="lr schedule length (0: --steps)")
    p.add_argument("--target", type=float, default=None, help="stop once val loss <= target")
    p.add_argument("--time-cap", type=float, default=None, help="stop after this many training seconds")
    p.add_argument("--batch-size", type=int, default=DATA_KW["batch_size"])
    p.add_argument("--max-bytes", type=int, default=DATA_KW["max_bytes"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = json.loads(args.spec)
    torch.set_num_threads(1)
    L.seed_everything(SEED, verbose=False)
    strategy, callbacks = build_strategy(spec)
    probe = NetProbe(Path(args.out), spec["name"], args.iface, args.warmup)
    callbacks = [probe, *callbacks]
    if args.target is not None or args.time_cap is not None:
        callbacks.insert(1, RaceStop(probe, args.target, args.time_cap))
    validation = ({"val_check_interval": args.val_every, "check_val_every_n_epoch": None,
                   "limit_val_batches": args.val_batches} if args.val_every > 0 else {"limit_val_batches": 0})
    trainer = L.Trainer(
        accelerator="cpu", devices=1, num_nodes=int(os.environ.get("WORLD_SIZE", "1")), strategy=strategy,
        max_steps=args.steps, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        default_root_dir=str(Path(args.out) / "lightning"), **validation,
    )
    data = GPT2DataModule(**{**DATA_KW, "batch_size": args.batch_size, "max_bytes": args.max_bytes})
    trainer.fit(make_module(spec, args.schedule_steps or None), datamodule=data)
    if torch.distributed.is_initialized():
        # A clean end: every rank is past its last collective before any rank closes its
        # sockets, so a fast rank's exit cannot reset a peer still in a collective.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
