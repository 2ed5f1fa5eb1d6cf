"""Learning-rate sweep: every run of the frontier at the same few multipliers of its default
learning rate, on the short run; the best multiplier of each run is what the long frontier
and the slow-link race use.

Every run of ``--runs`` (default: the long frontier's) trains ``--steps`` (300) optimizer
steps at each multiplier of ``--scales`` (0.5, 1, 2) of the tiny GPT-2's AdamW learning rate
(peak ``lr`` 3e-3 and the cosine's floor ``min_lr`` 3e-4 are scaled together; DiLoCo's outer
learning rate is not swept), otherwise exactly as ``frontier`` runs it: same init, data,
seeds, ranks (``--ranks``) and corpus (the long frontier's 32 MB, so that only the length
differs). The best multiplier of a run is the one with the lowest final validation loss; a
best at either end of the sweep is flagged (the optimum may lie beyond it).

Outputs ``results/lr_sweep_<N>r.{md,json}``; results are saved after every run, ``--resume``
keeps the runs already done, ``--report-only`` redraws the table, ``--smoke`` runs a few
steps of two runs into a temporary folder.

Examples:
  python -m benchmarks.lr_sweep --ranks 2 --resume        # every long-frontier run x 3 lrs
  python -m benchmarks.lr_sweep --runs ddp,sketch-4096 --scales 0.25,0.5,1,2
  python -m benchmarks.lr_sweep --smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.frontier_runs import LONG_RUNS, RUNS, SMOKE_RUNS, network_metadata, run_one
from benchmarks.harness import (RESULTS, SMOKE_DIR, Results, choose, csv_floats, make_parser, parse_with_profile,
                                provenance, report_only, write_report)

PROFILES: dict[str, dict[str, Any]] = {
    "sweep": {"runs": ",".join(LONG_RUNS), "scales": "0.5,1,2", "steps": 300, "val_every": 50, "val_batches": 8,
              "warmup": 10, "max_bytes": 32_000_000, "out": str(RESULTS / "lr_sweep_{ranks}r.md"), "timeout": 1800.0},
    "smoke": {"runs": ",".join(SMOKE_RUNS), "scales": "0.5,1,2", "steps": 6, "val_every": 3, "val_batches": 1,
              "warmup": 2, "max_bytes": 1_000_000, "out": str(SMOKE_DIR / "lr_sweep_{ranks}r.md"), "timeout": 300.0},
}
SETTINGS = ("steps", "val_every", "val_batches", "warmup", "num_nodes", "max_bytes")


def sweep_name(run: str, scale: float) -> str:
    return f"{run}@lr{scale:g}"


def best_scales(rows: list[dict[str, Any]], scales: list[float]) -> dict[str, dict[str, Any]]:
    """Per run: the multiplier with the lowest final val loss among its successful runs, its
    loss, every multiplier's loss and whether the best lies at an end of the sweep."""
    by_run: dict[str, dict[float, float]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("final_val_loss") is not None:
            by_run.setdefault(r["base_run"], {})[r["spec"]["lr_scale"]] = r["final_val_loss"]
    out = {}
    for run, losses in by_run.items():
        best = min(losses, key=lambda s: (losses[s], abs(s - 1.0)))  # a tie goes to the default
        edge = len(scales) > 1 and best in (min(scales), max(scales))
        out[run] = {"scale": best, "final_val_loss": losses[best], "losses": losses, "edge": edge}
    return out


def load_best_scales(path: Path) -> dict[str, float]:
    """``{run: best multiplier}`` from a sweep's JSON."""
    payload = json.loads(path.read_text())
    return {run: float(b["scale"]) for run, b in payload["best"].items()}


def swept_scales(meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[float]:
    """Every multiplier in this invocation or in a resumed one's rows."""
    return sorted({*meta["scales"], *(r["spec"]["lr_scale"] for r in rows)})


def render(meta: dict[str, Any], rows: list[dict[str, Any]], best: dict[str, dict[str, Any]]) -> str:
    scales = swept_scales(meta, rows)
    lines = [
        f"# Learning-rate sweep ({meta['num_nodes']} ranks, {meta['steps']} steps)",
        "",
        f"- machine: {meta['machine']}; torch {meta['torch']}, lightning {meta['lightning']}",
        f"- every run as in the frontier (tiny GPT-2, {meta['num_nodes']}-node torchrun job over network namespaces, "
        f"corpus: the first {meta['max_bytes'] / 1e6:.0f} MB of the stdlib), at {', '.join(f'{s:g}x' for s in scales)} "
        "of its default learning rate (AdamW peak 3e-3, min 3e-4, scaled together); best = lowest final val loss",
        provenance(meta) + f"; total wall {meta['total_wall_s'] / 60:.0f} min",
        "",
        "| run | family | " + " | ".join(f"val loss at {s:g}x" for s in scales) + " | best | note |",
        "|---|---|" + "---:|" * len(scales) + "---:|---|",
    ]
    failed = {r["base_run"]: r["status"] for r in rows if r.get("status") != "ok"}
    for run in dict.fromkeys(r["base_run"] for r in rows):
        b = best.get(run)
        cells = [f"{b['losses'][s]:.4f}" if b and s in b["losses"] else "-" for s in scales]
        note = "at the edge of the sweep: widen it" if b and b["edge"] else failed.get(run, "")
        family = next(r["family"] for r in rows if r["base_run"] == run)
        best_txt = f"{b['scale']:g}x" if b else "-"
        lines.append(f"| {run} | {family} | " + " | ".join(cells) + f" | {best_txt} | {note} |")
    lines += ["", f"JSON with every run and validation point: [{meta['stem']}.json]({meta['stem']}.json)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser(__doc__)
    p.add_argument("--runs", help=f"comma-separated subset of: {', '.join(RUNS)}")
    p.add_argument("--scales", help="comma-separated lr multipliers (default 0.5,1,2)")
    p.add_argument("--steps", type=int)
    p.add_argument("--val-every", type=int)
    p.add_argument("--val-batches", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--max-bytes", type=int)
    p.add_argument("--timeout", type=float, help="seconds per run")
    p.add_argument("--port", type=int, default=29537)
    p.add_argument("--out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--report-only", action="store_true")
    args = parse_with_profile(p, argv, PROFILES, "sweep")
    args.run_list = choose(p, "--runs", args.runs, RUNS)
    try:
        args.scale_list = csv_floats(args.scales)
    except argparse.ArgumentTypeError as err:
        p.error(f"--scales: {err}")
    if len(args.scale_list) < 3 or any(s <= 0 for s in args.scale_list):
        p.error(f"--scales={args.scales}: give at least 3 positive multipliers. HINT: 0.5,1,2")
    return args


def report(payload: dict[str, Any], out_md: Path) -> None:
    payload["meta"]["stem"] = out_md.stem
    payload["best"] = best_scales(payload["rows"], swept_scales(payload["meta"], payload["rows"]))
    write_report(out_md, render(payload["meta"], payload["rows"], payload["best"]), payload)
    print(f"[lr_sweep] wrote {out_md} and its JSON", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if report_only(args, report):
        return 0
    out_md = Path(args.out)
    meta = network_metadata("lr_sweep", argv, args, scales=args.scale_list)
    results = Results(out_md.with_suffix(".json"), meta, SETTINGS, resume=args.resume)
    with tempfile.TemporaryDirectory(prefix="holograd-lr-sweep-") as tmp:
        for run in args.run_list:
            for scale in args.scale_list:
                name = sweep_name(run, scale)
                if not results.done(name):
                    row = run_one(name, {**RUNS[run], "lr_scale": scale}, args, Path(tmp), num_nodes=args.ranks,
                                  tag="lr_sweep")
                    results.add({**row, "base_run": run})
    report(results.payload(), out_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
