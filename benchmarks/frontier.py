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

Profiles (``--profile``; options given explicitly win):
- ``short`` (default): today's frontier, 300 steps, validation every 50, the 4 MB corpus,
  ``results/frontier_cpu.*`` (``frontier_short_<N>r.*`` for N != 2), every learning rate 1x.
- ``long``: 4096 steps (steps x K is 4.1 D at the 1000x point), validation every 64 (a
  multiple of every H, so averaging methods are validated on synced replicas), the whole
  stdlib corpus (32 MB, so that 4 ranks see about one epoch), the peers and the HoloGrad
  settings of ``frontier_runs.LONG_RUNS``, each at the best learning rate of
  ``results/lr_sweep_<N>r.json`` (``python -m benchmarks.lr_sweep``), a loss-vs-wall-clock
  plot, ``results/frontier_long_<N>r.*``. Hours on 2 cores: see benchmarks/README.md.
- ``smoke`` (``--smoke``): 8 steps of DDP and the sketch, results in a temporary folder.

Examples:
  python -m benchmarks.frontier                       # every run (~35-40 min on 2 cores)
  python -m benchmarks.frontier --runs ddp,sketch-4096,powersgd-r1 --steps 100
  python -m benchmarks.frontier --resume              # finish an interrupted invocation
  python -m benchmarks.frontier --report-only         # redraw table and plots from the JSON
  python -m benchmarks.frontier --profile long --ranks 2 --resume   # after the lr sweep
  python -m benchmarks.frontier --smoke --ranks 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.frontier_report import report
from benchmarks.frontier_runs import (LAST_REFERENCE, LONG_RUNS, REFERENCE, RUNS, SHORT_RUNS, SMOKE_RUNS,
                                      network_metadata, run_one, with_lr)
from benchmarks.harness import (DATA_KW, RESULTS, SMOKE_DIR, Results, choose, make_parser, parse_with_profile,
                                report_only)
from benchmarks.lr_sweep import load_best_scales

LONG_MAX_BYTES = 32_000_000  # the whole stdlib (31.5 MB)
PROFILES: dict[str, dict[str, Any]] = {
    "short": {"runs": ",".join(SHORT_RUNS), "steps": 300, "val_every": 50, "val_batches": 8, "warmup": 10,
              "max_bytes": DATA_KW["max_bytes"], "out": str(RESULTS / "frontier_cpu.md"), "lr_from": "none",
              "timeout": 900.0},
    "long": {"runs": ",".join(LONG_RUNS), "steps": 4096, "val_every": 64, "val_batches": 8, "warmup": 10,
             "max_bytes": LONG_MAX_BYTES, "out": str(RESULTS / "frontier_long_{ranks}r.md"),
             "lr_from": str(RESULTS / "lr_sweep_{ranks}r.json"), "timeout": 4 * 3600.0},
    "smoke": {"runs": ",".join(SMOKE_RUNS), "steps": 8, "val_every": 4, "val_batches": 1, "warmup": 2,
              "max_bytes": 1_000_000, "out": str(SMOKE_DIR / "frontier_{ranks}r.md"), "lr_from": "none",
              "timeout": 300.0},
}
# equal in every resumed run
SETTINGS = ("steps", "val_every", "val_batches", "warmup", "num_nodes", "max_bytes", "lr_from")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser(__doc__)
    p.add_argument("--runs", help=f"comma-separated subset of: {', '.join(RUNS)}")
    p.add_argument("--steps", type=int, help="optimizer steps per run (short: 300, as the README job)")
    p.add_argument("--val-every", type=int)
    p.add_argument("--val-batches", type=int)
    p.add_argument("--warmup", type=int, help="steps left out of step time and bytes/step after warm-up")
    p.add_argument("--ranks", type=int, default=2, help="ranks = network namespaces, one process each (default 2)")
    p.add_argument("--max-bytes", type=int, help="corpus bytes (short: 4 MB as the README job; long: 32 MB)")
    p.add_argument("--lr-from", help="an lr sweep's JSON: each run at its best lr multiplier ('none': 1x)")
    p.add_argument("--timeout", type=float, help="seconds per run before it counts as failed")
    p.add_argument("--port", type=int, default=29517)
    p.add_argument("--out", help="Markdown; JSON/CSV/plots beside it")
    p.add_argument("--resume", action="store_true", help="keep the successful runs already in the JSON")
    p.add_argument("--report-only", action="store_true", help="rebuild table and plots from the JSON")
    args = parse_with_profile(p, argv, PROFILES, "short")
    args.run_list = choose(p, "--runs", args.runs, RUNS)
    if args.ranks < 2:
        p.error(f"--ranks={args.ranks} must be >= 2. HINT: a frontier compares communication between ranks.")
    if args.profile == "short" and args.ranks != 2 and args.out == PROFILES["short"]["out"]:
        args.out = str(RESULTS / f"frontier_short_{args.ranks}r.md")  # frontier_cpu.md is the 2-rank one
    if args.lr_from != "none" and not args.report_only and not Path(args.lr_from).exists():
        p.error(f"--lr-from={args.lr_from}: no such file. HINT: run `python -m benchmarks.lr_sweep --ranks "
                f"{args.ranks}` first, or pass --lr-from none (every run at 1x).")
    return args


def schedule(names: list[str]) -> list[str]:
    """The runs in order, DDP again at the end when DDP runs (the noise level of the ratios)."""
    return [*names, LAST_REFERENCE] if REFERENCE in names else list(names)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if report_only(args, report):
        return 0
    out_md = Path(args.out)
    scales = {} if args.lr_from == "none" else load_best_scales(Path(args.lr_from))
    meta = network_metadata("frontier", argv, args, lr_from=args.lr_from, wall_clock_plot=args.profile != "short",
                            topology="on a private bridge (one veth per namespace), no shaping")
    if scales:
        meta["lr_note"] = f"per run the best multiplier of the sweep `{Path(args.lr_from).name}` (see the run table)"
    results = Results(out_md.with_suffix(".json"), meta, SETTINGS, resume=args.resume)
    with tempfile.TemporaryDirectory(prefix="holograd-frontier-") as tmp:
        for name in schedule(args.run_list):
            if not results.done(name):
                results.add(run_one(name, with_lr(name, scales), args, Path(tmp), num_nodes=args.ranks))
    report(results.payload(), out_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
