"""One rank of a network benchmark run (started by ``torchrun`` inside a network namespace).

``frontier``, ``lr_sweep``, ``slow_link`` and ``bytes_per_rank`` start this module on every
"node" of a ``netns.Cluster`` with ``torchrun --nnodes N --nproc-per-node 1``. It trains the
tiny GPT-2 of ``configs/gpt2-tiny-cpu.yaml`` under one communication strategy, described by
a JSON spec (``--spec``, see ``baselines.build_strategy``).

Run settings: ``--steps``, ``--val-every``, ``--val-batches`` and ``--warmup`` (steps left
out of step times and bytes per step).

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

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402

from lightning_holograd.demos.gpt2_data import GPT2DataModule  # noqa: E402
from lightning_holograd.demos.gpt2_module import GPT2Module  # noqa: E402

from benchmarks.baselines import build_strategy  # noqa: E402
from benchmarks.harness import DATA_KW, MODEL_KW, SEED, make_parser  # noqa: E402
from benchmarks.probes import NetProbe  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser(__doc__)
    p.add_argument("--spec", required=True, help="JSON run spec (see benchmarks/baselines.py)")
    p.add_argument("--out", required=True, help="directory for <name>_rank<r>.json")
    p.add_argument("--iface", default=None, help="network interface whose sent bytes are counted")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--val-every", type=int, default=50, help="steps between validations")
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of step times and bytes/step")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = json.loads(args.spec)
    torch.set_num_threads(1)
    L.seed_everything(SEED, verbose=False)
    strategy, callbacks = build_strategy(spec)
    probe = NetProbe(Path(args.out), spec["name"], args.iface, args.warmup)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, num_nodes=int(os.environ.get("WORLD_SIZE", "1")), strategy=strategy,
        max_steps=args.steps, val_check_interval=args.val_every, check_val_every_n_epoch=None,
        limit_val_batches=args.val_batches, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe, *callbacks],
        default_root_dir=str(Path(args.out) / "lightning"),
    )
    trainer.fit(GPT2Module(**MODEL_KW), datamodule=GPT2DataModule(**DATA_KW))


if __name__ == "__main__":
    main()
