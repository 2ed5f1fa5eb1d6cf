#!/usr/bin/env python3
"""Wall clock on a slow link: DDP against HoloGrad, two "nodes" joined by a shaped veth pair.

For each link rate (``tc qdisc ... tbf`` on both ends of a veth pair between two network
namespaces, see ``netns.py``; root needed) this trains the tiny GPT-2 of
``configs/gpt2-tiny-cpu.yaml`` as a two-node torchrun job (one process per namespace,
gloo) under DDP and under HoloGrad (the README job: count sketch, K = 4096), with the
same init, data and steps as ``frontier.py``. It reports, per rate:

- step time (median, validation excluded) of each strategy and their ratio;
- time to a fixed validation loss (``--target``): training seconds, validation excluded,
  interpolated linearly between the two validation checks (every ``--val-every`` steps)
  that bracket the target; "not reached" when a run never gets there;
- bytes sent per rank and step (kernel counters) and the final validation loss.

The namespaces are created and deleted by the script (also on Ctrl-C), traffic stays
between them, and every run has a time limit (``--timeout``).

Examples:
  python -m benchmarks.slow_link                         # none, 1gbit, 100mbit, 20mbit (~13 min)
  python -m benchmarks.slow_link --rates 100mbit,20mbit --steps 150 --target 2.6
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.frontier_runs import RUNS, run_one
from benchmarks.harness import (RESULTS, csv_items, finish_metadata, make_parser, read_report, run_metadata,
                                write_report)
from benchmarks.netns import tbf_burst

STRATEGIES = {"ddp": RUNS["ddp"], "holograd-sketch-4096": RUNS["sketch-4096"]}


def time_to_target(curve: list[dict[str, Any]], target: float) -> float | None:
    """Training seconds at which the validation loss first reaches ``target`` (linear
    interpolation between the bracketing checks; the start is (0 s, +inf))."""
    prev_t, prev_loss = 0.0, None
    for point in curve:
        t, loss = point["train_s"], point["val_loss"]
        if loss <= target:
            if prev_loss is None or prev_loss == loss:
                return t
            frac = (prev_loss - target) / (prev_loss - loss)
            return prev_t + frac * (t - prev_t)
        prev_t, prev_loss = t, loss
    return None


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Slow link: DDP vs HoloGrad wall clock (cpu, two network namespaces, tbf-shaped veth)",
        "",
        f"- torch {meta['torch']}, lightning {meta['lightning']}; date {meta['date']}"
        + (f"; commit `{meta['commit']}`" if meta.get("commit") else ""),
        f"- command: `{meta['command']}`; total wall {meta['total_wall_s'] / 60:.1f} min",
        f"- model: tiny GPT-2 of `configs/gpt2-tiny-cpu.yaml` (D = 445,952), {meta['steps']} steps, 16 x 128 tokens "
        "per rank and step; 2 ranks = two-node torchrun (gloo), one process per namespace, 1 thread each",
        "- link: a veth pair; `tc qdisc add dev <end> root tbf rate R burst <10 ms of R> latency 200ms` on both "
        "ends (each direction gets R); 'none' = unshaped veth",
        f"- time to target: training seconds (validation excluded) until val loss <= {meta['target']}, "
        f"interpolated between checks every {meta['val_every']} steps",
        "- HoloGrad = `HoloGradStrategy(directions='sketch', num_directions=4096)` (the README job)",
        "",
        "| link | strategy | step ms (median) | DDP / HoloGrad step time | time to target s | DDP / HoloGrad time "
        "to target | bytes/step/rank | final val loss | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['rate']} | {r['strategy']} | - | - | - | - | - | - | {r.get('status')} |")
            continue
        ttt = "not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f}"
        sr = f"{r['step_speedup']:.2f}" if r.get("step_speedup") else "-"
        tr = f"{r['target_speedup']:.2f}" if r.get("target_speedup") else "-"
        lines.append(f"| {r['rate']} | {r['strategy']} | {r['step_median_s'] * 1e3:.1f} | {sr} | {ttt} | {tr} "
                     f"| {r['bytes_per_step']:,.0f} | {r['final_val_loss']:.4f} | ok |")
    lines += ["", "Ratios > 1 mean HoloGrad is faster; they are given on the HoloGrad row of each link. "
              "JSON with every validation point: [slow_link_cpu.json](slow_link_cpu.json)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser(__doc__)
    p.add_argument("--rates", default="none,1gbit,100mbit,20mbit", help="comma-separated tbf rates; 'none' = unshaped")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--target", type=float, default=2.45, help="validation loss to reach (nats/byte)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--port", type=int, default=29527)
    p.add_argument("--out", default=str(RESULTS / "slow_link_cpu.md"))
    p.add_argument("--report-only", action="store_true", help="rebuild the table from the JSON")
    args = p.parse_args(argv)
    args.rate_list = csv_items(args.rates)
    for rate in args.rate_list:  # refuse a bad rate before any run starts
        if rate != "none":
            try:
                tbf_burst(rate)
            except ValueError as err:
                p.error(f"--rates: {err}")
    return args


def race_at(rate: str, args: argparse.Namespace, out_dir: Path) -> list[dict[str, Any]]:
    """DDP and HoloGrad over one link; the HoloGrad row gets the DDP / HoloGrad ratios."""
    by_name = {}
    for name, spec in STRATEGIES.items():
        row = run_one(f"{name}@{rate}", spec, args, out_dir, rate=None if rate == "none" else rate, tag="slow_link")
        row.update({"rate": rate, "strategy": name})
        if row.get("status") == "ok":
            row["time_to_target_s"] = time_to_target(row["curve"], args.target)
        by_name[name] = row
    ddp, hg = by_name["ddp"], by_name["holograd-sketch-4096"]
    if ddp.get("status") == "ok" and hg.get("status") == "ok":
        hg["step_speedup"] = ddp["step_median_s"] / hg["step_median_s"]
        if ddp["time_to_target_s"] and hg["time_to_target_s"]:
            hg["target_speedup"] = ddp["time_to_target_s"] / hg["time_to_target_s"]
    return list(by_name.values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        payload = read_report(out)
        meta, rows = payload["meta"], payload["rows"]
    else:
        start = time.perf_counter()
        meta = run_metadata("slow_link", argv, steps=args.steps, val_every=args.val_every, target=args.target)
        rows = []
        with tempfile.TemporaryDirectory(prefix="holograd-slowlink-") as tmp:
            for rate in args.rate_list:
                rows += race_at(rate, args, Path(tmp))
        finish_metadata(meta, start)
    text = render(meta, rows)
    write_report(out, text, {"meta": meta, "rows": rows})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
