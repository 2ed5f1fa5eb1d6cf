"""Frontier benchmark: validation loss against bytes sent, HoloGrad beside DDP, PowerSGD,
local SGD and DiLoCo, on the same model, data, seeds and steps.

Every run trains the tiny GPT-2 of ``configs/gpt2-tiny-cpu.yaml`` (byte-level, D = 445,952)
for ``--steps`` optimizer steps on ``--ranks`` ranks, as an N-node torchrun job: one process
in each of N network namespaces on a private bridge (``netns.py``; root needed). The bytes
each rank sent are read from its interface's kernel counters, so they are *measured*, for
DDP's C++ all-reduce as for everything else, and include Lightning's own collectives,
gloo's framing and TCP/IP headers and ACKs. See ``baselines.py`` for the strategies and
``frontier_runs.py`` for the runs.

For each run the table gives final and best validation loss (8 batches of 16 x 128 tokens
per rank, every ``--val-every`` steps), bytes sent per rank (max over ranks) during training
and per step, compression (DDP's bytes / the run's bytes, both measured in this invocation),
step time and peak RSS as ratios to DDP (the mean of a DDP run first and a DDP run last).
Outputs: ``results/frontier_cpu.{md,json,csv}``, ``results/frontier_loss_vs_bytes.png`` (log x)
and ``results/frontier_loss_vs_step.png``. Results are saved after every run; ``--resume``
keeps the runs already in the JSON.

Examples:
  python -m benchmarks.frontier                       # every run (~35-40 min on 2 cores)
  python -m benchmarks.frontier --runs ddp,sketch-4096,powersgd-r1 --steps 100
  python -m benchmarks.frontier --resume              # finish an interrupted invocation
  python -m benchmarks.frontier --report-only         # redraw table and plots from the JSON
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.frontier_report import report
from benchmarks.frontier_runs import LAST_REFERENCE, REFERENCE, RUNS, run_one, spec_of
from benchmarks.harness import RESULTS, Results, choose, make_parser, read_report, run_metadata

SETTINGS = ("steps", "val_every", "val_batches", "warmup", "num_nodes")  # equal in every resumed run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser(__doc__)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of: {', '.join(RUNS)}")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300, as the README job)")
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of step time and bytes/step after warm-up")
    p.add_argument("--ranks", type=int, default=2, help="ranks = network namespaces, one process each (default 2)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it counts as failed")
    p.add_argument("--port", type=int, default=29517)
    p.add_argument("--out", default=str(RESULTS / "frontier_cpu.md"), help="Markdown; JSON/CSV/plots beside it")
    p.add_argument("--resume", action="store_true", help="keep the successful runs already in the JSON")
    p.add_argument("--report-only", action="store_true", help="rebuild table and plots from the JSON")
    args = p.parse_args(argv)
    args.run_list = choose(p, "--runs", args.runs, RUNS)
    if args.ranks < 2:
        p.error(f"--ranks={args.ranks} must be >= 2. HINT: a frontier compares communication between ranks.")
    return args


def schedule(names: list[str]) -> list[str]:
    """The runs in order, DDP again at the end when DDP runs (the noise level of the ratios)."""
    return [*names, LAST_REFERENCE] if REFERENCE in names else list(names)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_md = Path(args.out)
    if args.report_only:
        report(read_report(out_md), out_md)
        return 0
    meta = run_metadata("frontier", argv, steps=args.steps, val_every=args.val_every, val_batches=args.val_batches,
                        warmup=args.warmup, num_nodes=args.ranks,
                        topology="on a private bridge (one veth per namespace), no shaping")
    results = Results(out_md.with_suffix(".json"), meta, SETTINGS, resume=args.resume)
    with tempfile.TemporaryDirectory(prefix="holograd-frontier-") as tmp:
        for name in schedule(args.run_list):
            if not results.done(name):
                results.add(run_one(name, spec_of(name), args, Path(tmp), num_nodes=args.ranks))
    report(results.payload(), out_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
