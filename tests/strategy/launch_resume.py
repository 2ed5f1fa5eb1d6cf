"""Fit ``ToyModule`` with verification and checkpoints, resuming from the last checkpoint if
there is one; optionally kill -9 one rank once, mid-run. Driver for ``test_restart.py``:

    python -m lightning_holograd.relaunch --max-restarts 2 -- \\
        torchrun --nproc-per-node 3 tests/strategy/launch_resume.py --out DIR --devices 3 \\
        --kill-rank 1 --kill-step 7

Each rank writes ``rank{R}.pt`` (``SaveRankState``) to ``DIR/ranks`` at the end; the ledger
is ``DIR/ledger.jsonl``; checkpoints go to ``DIR/ckpt`` every ``--ckpt-every`` steps.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--ckpt-every", type=int, default=4)
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--kill-step", type=int, default=None)
    parser.add_argument("--cheater", type=int, default=None, help="this rank lies from step 2 on")
    parser.add_argument("--resume-rank-map", default=None, help="e.g. 0:0,1:1")
    parser.add_argument("--start-method", default="popen", help="fork: run in this process (a test's reference)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_holograd import HoloGradStrategy, ProofVerifier
    from lightning_holograd.demos import SaveRankState, ToyModule

    out = Path(args.out)

    class KillOnce(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            marker = out / "killed"
            if (trainer.global_rank == args.kill_rank and trainer.global_step == args.kill_step
                    and not marker.exists()):
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)

    class Cheat(L.Callback):
        def on_train_start(self, trainer, pl_module):
            if trainer.global_rank == args.cheater:
                trainer.strategy.exchange.claim_hooks.append(
                    lambda ctx, scalars: scalars * -3.0 if ctx.step >= 2 else scalars)

    rank_map = None
    if args.resume_rank_map:
        rank_map = {int(a): int(b) for a, b in (pair.split(":") for pair in args.resume_rank_map.split(","))}
    strategy = HoloGradStrategy(directions="gaussian", num_directions=16, resume_rank_map=rank_map,
                                start_method=args.start_method)
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=args.ckpt_every, save_last=True,
                                  save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.max_steps, max_epochs=-1,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ProofVerifier(p_verify=1.0, ledger_path=str(out / "ledger.jsonl")), checkpoints, KillOnce(),
                   Cheat(), SaveRankState(out / "ranks")],
    )
    trainer.fit(ToyModule(resumable=True), ckpt_path="last")


if __name__ == "__main__":
    main()
