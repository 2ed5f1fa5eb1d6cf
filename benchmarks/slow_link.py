"""The slow-link race: every peer, over a shaped link, trains until it reaches DDP's final
validation loss of the long frontier (within 1 %) or a time cap; the time to that target
and each peer's ratio to the fastest, per link.

Links (``--rates``, default 100mbit and 20mbit): every node of a ``netns.Cluster`` is shaped
with ``tc ... tbf`` in both directions (root needed); ``none`` = unshaped.

Peers (``--peers``, default ``auto``): chosen from the long frontier's JSON (``--frontier``,
default ``results/frontier_long_<N>r.json``): DDP, the bf16 hook, for PowerSGD, local SGD and
DiLoCo the run with the lowest final val loss (its best rank or H), and for every HoloGrad
family the run with the lowest final val loss and the highest-compression run within the
race's tolerance of DDP. Each runs with the learning-rate multiplier it had there. A list
of run names (``frontier_runs.RUNS``) races those instead: a run of the long frontier with
its multiplier there, any other with its best of the sweep ``--lr-from`` (default
``results/lr_sweep_<N>r.json``; 1x, marked "not swept", when the sweep lacks it).

Target: DDP's final val loss of the long frontier (the mean of its two DDP runs) x
(1 + ``--tolerance``), or ``--target``. The lr schedule ends where the long run's did
(``--schedule-steps``); a peer still short of the target then continues at ``min_lr``, up to
``--steps``. The race clock is training seconds (validation excluded, max over ranks), with a
validation every ``--val-every`` steps; the time to target is interpolated between the two
checks that bracket the crossing. A peer stops at the first check at or below the target,
or once its race clock passes the cap: ``--cap-factor`` x DDP's time to target on the same
link (DDP races first), or ``--time-cap`` seconds. Where a peer never gets there, the report
says so, with its best loss.

Outputs ``results/race_<N>r.{md,json}``, saved after every run; ``--resume``,
``--report-only``, ``--smoke``. (``results/slow_link_cpu.*`` were written by the earlier
two-peer version of this script: DDP and the sketch at K = 4096 to a fixed loss.)

Examples:
  python -m benchmarks.slow_link --ranks 2 --resume           # after the long frontier
  python -m benchmarks.slow_link --peers ddp,localsgd-h64,sketch-4096 --rates 20mbit --target 2.30 --time-cap 3600
  python -m benchmarks.slow_link --smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.frontier_runs import REFERENCE, RUNS, network_metadata, run_one, with_lr
from benchmarks.harness import RESULTS, SMOKE_DIR, Results, csv_items, make_parser, parse_with_profile, report_only
from benchmarks.lr_sweep import load_best_scales
from benchmarks.netns import tbf_burst
from benchmarks.race_report import report, select_peers, time_to_target

PROFILES: dict[str, dict[str, Any]] = {
    "race": {"rates": "100mbit,20mbit", "peers": "auto", "frontier": str(RESULTS / "frontier_long_{ranks}r.json"),
             "val_every": 32, "val_batches": 8, "warmup": 10, "max_bytes": 32_000_000, "cap_factor": 2.0,
             "lr_from": str(RESULTS / "lr_sweep_{ranks}r.json"), "out": str(RESULTS / "race_{ranks}r.md")},
    "smoke": {"rates": "100mbit", "peers": "ddp,sketch-256", "frontier": "", "target": 5.45, "schedule_steps": 12,
              "steps": 12, "val_every": 4, "val_batches": 1, "warmup": 2, "max_bytes": 1_000_000, "cap_factor": 2.0,
              "time_cap": 120.0, "lr_from": "none", "out": str(SMOKE_DIR / "race_{ranks}r.md")},
}
SETTINGS = ("val_every", "val_batches", "warmup", "num_nodes", "max_bytes", "target", "schedule_steps", "steps")


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rates", help="comma-separated tbf rates ('none' = unshaped); default 100mbit,20mbit")
    p.add_argument("--peers", help=f"'auto' (from --frontier) or comma-separated runs of: {', '.join(RUNS)}")
    p.add_argument("--frontier", help="the long frontier's JSON (peers, their lrs, the target, the schedule)")
    p.add_argument("--target", type=float, help="validation loss to reach (default: from --frontier)")
    p.add_argument("--tolerance", type=float, default=0.01, help="target = DDP's final val loss x (1 + this)")
    p.add_argument("--lr-from", help="an lr sweep's JSON: the multiplier of a named peer that is not in --frontier "
                   "('none': 1x)")
    p.add_argument("--schedule-steps", type=int, help="lr schedule length (default: the long run's steps)")
    p.add_argument("--steps", type=int, help="most steps a peer may run (default: 2 x --schedule-steps)")
    p.add_argument("--time-cap", type=float, help="race-clock seconds after which a peer stops")
    p.add_argument("--cap-factor", type=float, help="cap = this x DDP's time to target on the link")
    p.add_argument("--val-every", type=int)
    p.add_argument("--val-batches", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--max-bytes", type=int)
    p.add_argument("--port", type=int, default=29527)
    p.add_argument("--out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--report-only", action="store_true")


def _check_rates(p: argparse.ArgumentParser, rates: list[str]) -> None:
    for rate in rates:  # refuse a bad rate before any run starts
        if rate != "none":
            try:
                tbf_burst(rate)
            except ValueError as err:
                p.error(f"--rates: {err}")


def _from_frontier(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The peers, the target and the schedule from the long frontier's JSON."""
    path = Path(args.frontier)
    if not path.exists():
        p.error(f"--frontier={path}: no such file. HINT: run `python -m benchmarks.frontier --profile long --ranks "
                f"{args.ranks}` first, or pass --peers NAMES --target LOSS --schedule-steps S.")
    payload = json.loads(path.read_text())
    ddp_loss = payload["reference"]["final_val_loss"]
    target = args.target if args.target is not None else ddp_loss * (1 + args.tolerance)
    return {"ddp_final_val_loss": ddp_loss, "target": target, "schedule_steps": payload["meta"]["steps"],
            "peers": select_peers(payload["rows"], target) if args.peers == "auto" else None,
            "rows": {r["run"]: r for r in payload["rows"] if r.get("status") == "ok"}}


def _peer_specs(p: argparse.ArgumentParser, args: argparse.Namespace, frontier: dict[str, Any]) -> dict[str, Any]:
    if frontier.get("peers"):
        return frontier["peers"]
    names = [n for n in csv_items(args.peers) if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        p.error(f"--peers: unknown {unknown or args.peers!r}. HINT: 'auto' or names from {', '.join(RUNS)}")
    rows = frontier.get("rows", {})
    scales = {}
    if args.lr_from not in (None, "", "none"):
        if not Path(args.lr_from).exists():
            p.error(f"--lr-from={args.lr_from}: no such file. HINT: run `python -m benchmarks.lr_sweep --ranks "
                    f"{args.ranks} --runs {','.join(names)}` first, or pass --lr-from none (1x).")
        scales = load_best_scales(Path(args.lr_from))
    return {n: {"spec": rows[n]["spec"] if n in rows else with_lr(n, scales), "why": "named on the command line"}
            for n in names}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser(__doc__)
    _add_options(p)
    args = parse_with_profile(p, argv, PROFILES, "race")
    args.rate_list = csv_items(args.rates)
    _check_rates(p, args.rate_list)
    if args.report_only:
        return args
    frontier = _from_frontier(p, args) if args.frontier else {}
    args.target = args.target if args.target is not None else frontier.get("target")
    args.schedule_steps = args.schedule_steps or frontier.get("schedule_steps")
    if args.target is None or not args.schedule_steps:
        p.error("without --frontier, pass --target LOSS and --schedule-steps S. HINT: --frontier "
                "results/frontier_long_2r.json takes both from the long frontier.")
    args.steps = args.steps or 2 * args.schedule_steps
    args.peer_specs = _peer_specs(p, args, frontier)
    args.ddp_final_val_loss = frontier.get("ddp_final_val_loss")
    if REFERENCE not in args.peer_specs and args.time_cap is None:
        p.error("--time-cap is needed when DDP does not race. HINT: add ddp to --peers, or pass --time-cap SECONDS.")
    return args


def _cap(args: argparse.Namespace, results: Results, rate: str, peer: str) -> float | None:
    """The race-clock cap of ``peer`` on ``rate``: --time-cap, else cap-factor x DDP's time."""
    if args.time_cap is not None or peer == REFERENCE:
        return args.time_cap
    ddp = next((r for r in results.rows if r["run"] == f"{REFERENCE}@{rate}"), None)
    if ddp is None or ddp.get("time_to_target_s") is None:
        return None  # DDP did not reach the target here: the peer is bounded by --steps alone
    return args.cap_factor * ddp["time_to_target_s"]


def race(args: argparse.Namespace, results: Results, rate: str, peer: str, out_dir: Path) -> dict[str, Any]:
    """One peer on one link, stopped at the target or the cap."""
    entry = args.peer_specs[peer]
    cap = _cap(args, results, rate, peer)
    # the job's own deadline: the cap's training seconds, then validation and start-up on top
    run_args = argparse.Namespace(**{**vars(args), "time_cap": cap, "timeout": 2 * (cap or 4 * 3600.0) + 900.0})
    row = run_one(f"{peer}@{rate}", entry["spec"], run_args, out_dir, rate=None if rate == "none" else rate,
                  num_nodes=args.ranks, tag="race")
    row.update(rate=rate, peer=peer, why=entry["why"], time_cap_s=cap)
    if row.get("status") == "ok":
        row["time_to_target_s"] = time_to_target(row["curve"], args.target)
        row["steps_to_target"] = time_to_target(row["curve"], args.target, key="step")
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if report_only(args, report):
        return 0
    out_md = Path(args.out)
    meta = network_metadata("slow_link", argv, args, rates=args.rate_list, target=args.target,
                            ddp_final_val_loss=args.ddp_final_val_loss, tolerance=args.tolerance,
                            schedule_steps=args.schedule_steps, cap_factor=args.cap_factor, time_cap=args.time_cap,
                            frontier=args.frontier, peers={n: e["why"] for n, e in args.peer_specs.items()})
    results = Results(out_md.with_suffix(".json"), meta, SETTINGS, resume=args.resume)
    order = sorted(args.peer_specs, key=lambda n: n != REFERENCE)  # DDP first: its time sets the others' cap
    with tempfile.TemporaryDirectory(prefix="holograd-race-") as tmp:
        for rate in args.rate_list:
            for peer in order:
                if not results.done(f"{peer}@{rate}"):
                    results.add(race(args, results, rate, peer, Path(tmp)))
    report(results.payload(), out_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
