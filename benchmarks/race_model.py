"""The slow-link race, MODELLED from measured quantities: time for each run of the long
frontier to reach a target validation loss on a link of rate R, at several targets.

This is not the measured race (``python -m benchmarks.slow_link``: every peer trained again
over tbf-shaped links, ~5 h at 2 ranks on 2 cores, not run yet). It answers the same question
from what the long frontier measured, with a step-time model checked against the shaped runs
that were measured:

- steps to target: from each run's validation curve (a check every 64 steps), interpolated
  linearly between the two checks that bracket the crossing; none if no check reaches it;
- step time on a link of rate R (bits/s): t0 + 8 B / R, with B the run's measured bytes sent
  per rank and step (interface counters, so headers, ACKs and Lightning's own collectives
  are in) and t0 the compute time of a step: by default (``--t0 common``) DDP's median step
  time on the unshaped bridge for every run, because the runs' own step times were measured
  on a shared machine and differ by more from load than from method (DDP's two runs differ
  by ~30 %; on a quiet machine the sketch's step is 1.03x DDP's, results/strategy_cpu.md);
  ``--t0 measured`` uses each run's own median instead. No overlap of communication with
  compute is assumed, so the model is pessimistic for runs that send many bytes per step
  (DDP overlaps its bucket all-reduces with the backward pass); the validation table gives
  the size of that error;
- time to target = steps to target x step time (validation excluded, as in the measured race);
- ``--continuations RACE_JSON``: the measured race (``slow_link``) trains past the long
  run's schedule, at ``min_lr``, up to twice its steps. A run of the frontier that raced
  there takes the race's longer validation curve (the same training up to the schedule's
  end, then the continuation), so a run that gets to a target only after the schedule ends
  is timed instead of marked "never". Bytes per step stay the frontier's unshaped ones.

Validation: ``results/slow_link_cpu.json`` measured DDP and the K = 4096 sketch at 300 steps
on unshaped, 1 Gbit/s, 100 Mbit/s and 20 Mbit/s links (tbf on both ends); the model's step
time from the unshaped row is compared with each shaped row.

Outputs ``results/race_model_<N>r.{md,json}``.

Examples:
  python -m benchmarks.race_model                      # from results/frontier_long_2r.json
  python -m benchmarks.race_model --rates 100mbit,20mbit,5mbit --targets 1.01,1.05,1.1,1.25
  python -m benchmarks.race_model --t0 measured --out /tmp/race_measured_t0.md
  python -m benchmarks.race_model --continuations benchmarks/results/race_20mbit_2r.json --targets 1.01,1.02,1.05,1.1
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.frontier_runs import LAST_REFERENCE, label
from benchmarks.harness import RESULTS, csv_floats, csv_items, finish_metadata, fmt, make_parser, provenance, \
    run_metadata, write_report
from benchmarks.race_report import time_to_target

UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def rate_bps(text: str) -> float:
    """``"100mbit"`` -> 1e8 bits per second (tc's spelling of a rate)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)", text.strip().lower())
    if not match:
        raise ValueError(f"rate={text!r} is not a tc rate. HINT: write it as e.g. 100mbit, 20mbit or 1gbit.")
    return float(match.group(1)) * UNITS[match.group(2)]


def step_time(t0: float, bytes_per_step: float, bps: float) -> float:
    """The model: unshaped step time plus the time to send one step's bytes at ``bps``."""
    return t0 + 8.0 * bytes_per_step / bps


def validate(slow: dict[str, Any]) -> list[dict[str, Any]]:
    """Model against measurement for every shaped row of the slow-link results."""
    rows = [r for r in slow["rows"] if r.get("status") == "ok"]
    base = {r["strategy"]: r for r in rows if r["rate"] == "none"}
    out = []
    for r in rows:
        if r["rate"] == "none" or r["strategy"] not in base:
            continue
        b = base[r["strategy"]]
        predicted = step_time(b["step_median_s"], r["bytes_per_step"], rate_bps(r["rate"]))
        out.append({"strategy": r["strategy"], "rate": r["rate"], "bytes_per_step": r["bytes_per_step"],
                    "unshaped_ms": b["step_median_s"] * 1e3, "measured_ms": r["step_median_s"] * 1e3,
                    "model_ms": predicted * 1e3, "model_over_measured": predicted / r["step_median_s"]})
    return out


def continuation_curves(races: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Run name -> the longest validation curve of its successful rows in the races."""
    curves: dict[str, list[dict[str, Any]]] = {}
    for payload in races:
        for r in payload["rows"]:
            if r.get("status") == "ok" and r.get("curve") and len(r["curve"]) > len(curves.get(r["peer"], [])):
                curves[r["peer"]] = r["curve"]
    return curves


def race(frontier: dict[str, Any], rates: list[str], multipliers: list[float], t0_mode: str = "common",
         continuations: dict[str, list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """One row per (run, link, target) of the long frontier; ``t0_mode``: "common" (DDP's
    step time for every run) or "measured" (each run's own); ``continuations``: run name ->
    a longer curve of the same run (``continuation_curves``)."""
    ref = frontier["reference"]
    rows = [r for r in frontier["rows"] if r.get("status") == "ok" and r["run"] != LAST_REFERENCE]
    out = []
    for r in rows:
        t0 = ref["step_median_s"] if t0_mode == "common" or r["family"] == "ddp" else r["step_median_s"]
        longer = (continuations or {}).get(r["run"])
        curve = longer if longer and longer[-1]["step"] > r["curve"][-1]["step"] else r["curve"]
        for m in multipliers:
            target = ref["final_val_loss"] * m
            steps = time_to_target(curve, target, key="step")
            for rate in rates:
                t_step = step_time(t0, r["bytes_per_step"], rate_bps(rate))
                out.append({"run": r["run"], "label": label(r), "family": r["family"], "rate": rate,
                            "multiplier": m, "target": target, "steps_to_target": steps, "t0_s": t0,
                            "bytes_per_step": r["bytes_per_step"], "compression": r.get("compression"),
                            "step_s": t_step, "time_to_target_s": None if steps is None else steps * t_step,
                            "measured_step_s": r["step_median_s"], "final_val_loss": r["final_val_loss"],
                            "curve_steps": curve[-1]["step"], "best_val_loss": min(p["val_loss"] for p in curve)})
    return out


def _first(rows: list[dict[str, Any]]) -> str:
    reached = sorted((r for r in rows if r["time_to_target_s"] is not None), key=lambda r: r["time_to_target_s"])
    never = [r["run"] for r in rows if r["time_to_target_s"] is None]
    if not reached:
        return "no run reaches it"
    text = f"**{reached[0]['run']}** first ({reached[0]['time_to_target_s'] / 60:.1f} min"
    if len(reached) > 1:
        text += f"; next {reached[1]['run']}, {reached[1]['time_to_target_s'] / reached[0]['time_to_target_s']:.2f}x"
    text += ")"
    return text + (f"; never: {', '.join(never)}" if never else "")


def render(meta: dict[str, Any], checks: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    ddp = meta["ddp_final_val_loss"]
    continued = meta.get("continuations") or []
    lines = [f"# Slow-link race, MODELLED from the long frontier ({meta['num_nodes']} ranks, cpu)", "",
             "**A model, not a measurement.** The full measured race (`python -m benchmarks.slow_link`, every peer "
             "on both links, ~5 h on this machine) has not been run" +
             (f"; the runs marked + were raced past the schedule's end at min_lr (`{', '.join(continued)}`), and "
              "their longer curves are used here" if continued else "") +
             ". Steps to target come from the long frontier's validation curves "
             f"(`{meta['frontier']}`, {meta['steps']} steps, the best swept learning rate per run); a step on a link "
             "of rate R is modelled as t0 + 8 B / R (t0 = the run's median step time unshaped, B = its measured "
             "bytes per rank and step). The model assumes no overlap of communication and compute: pessimistic "
             "for byte-heavy runs (DDP), see the validation table.", "",
             f"- targets: DDP's final val loss of the long frontier ({ddp:.4f}) x " +
             ", ".join(f"{m:g}" for m in meta["multipliers"]) + " (the issue's race target is x 1.01)",
             (f"- t0 = DDP's median step time unshaped ({meta['ddp_step_s'] * 1e3:.0f} ms, the mean of its two runs) "
              "for every run (`--t0 common`): the runs' own step times (column 'measured step ms') were taken on "
              f"a shared 2-core machine, where DDP's two runs differ by {meta['ddp_step_noise_pct']:.0f} %"
              if meta["t0"] == "common" else
              f"- t0 = each run's own median step time unshaped (`--t0 measured`); DDP's two runs differ by "
              f"{meta['ddp_step_noise_pct']:.0f} % (its t0 is their mean)"),
             provenance(meta), "", "## Headline", ""]
    for rate in meta["rates"]:
        for m in meta["multipliers"]:
            sel = [r for r in rows if r["rate"] == rate and r["multiplier"] == m]
            lines.append(f"- **{rate}, target x{m:g} ({ddp * m:.4f})**: {_first(sel)}")
    lines += ["", "## Steps to target (link-independent)", "",
              "| run | setting | bytes/step/rank | compression | measured step ms | final val loss | "
              "steps in the curve | best val loss in it | " +
              " | ".join(f"steps to x{m:g}" for m in meta["multipliers"]) + " |",
              "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(meta["multipliers"])]
    runs = list(dict.fromkeys(r["run"] for r in rows))
    for run in runs:
        sel = {r["multiplier"]: r for r in rows if r["run"] == run and r["rate"] == meta["rates"][0]}
        r0 = next(iter(sel.values()))
        plus = " +" if r0.get("curve_steps", meta["steps"]) > meta["steps"] else ""
        lines.append(f"| {run}{plus} | {r0['label']} | {r0['bytes_per_step']:,.0f} | {fmt(r0['compression'], 1)} | "
                     f"{r0['measured_step_s'] * 1e3:.0f} | {r0['final_val_loss']:.4f} | "
                     f"{r0.get('curve_steps', meta['steps'])} | {r0.get('best_val_loss', float('nan')):.4f} | "
                     + " | ".join(
                         "never" if sel[m]["steps_to_target"] is None else f"{sel[m]['steps_to_target']:.0f}"
                         for m in meta["multipliers"]) + " |")
    for rate in meta["rates"]:
        lines += ["", f"## {rate}: modelled time to target (minutes)", "",
                  "| run | step ms (model) | " + " | ".join(f"x{m:g}" for m in meta["multipliers"]) + " |",
                  "|---|---:|" + "---:|" * len(meta["multipliers"])]
        for run in runs:
            sel = {r["multiplier"]: r for r in rows if r["run"] == run and r["rate"] == rate}
            r0 = next(iter(sel.values()))
            lines.append(f"| {run} | {r0['step_s'] * 1e3:.0f} | " + " | ".join(
                "never" if sel[m]["time_to_target_s"] is None else f"{sel[m]['time_to_target_s'] / 60:.1f}"
                for m in meta["multipliers"]) + " |")
    lines += ["", "## Validation of the step-time model against measured shaped runs", "",
              f"From `{meta['validation']}` (300 steps, 2 ranks, tbf on both ends of each link; measured "
              f"{meta['validation_date']}).", "",
              "| strategy | link | bytes/step/rank | unshaped ms | measured ms | model ms | model / measured |",
              "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {c['strategy']} | {c['rate']} | {c['bytes_per_step']:,.0f} | {c['unshaped_ms']:.1f} | "
              f"{c['measured_ms']:.1f} | {c['model_ms']:.1f} | {c['model_over_measured']:.2f} |" for c in checks]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--ranks", type=int, default=2, help="which long frontier to read (default 2)")
    p.add_argument("--frontier", default=None, help="long frontier JSON (default results/frontier_long_<N>r.json)")
    p.add_argument("--validation", default=str(RESULTS / "slow_link_cpu.json"), help="measured shaped runs")
    p.add_argument("--rates", default="100mbit,20mbit", help="links to model (tc rates, comma-separated)")
    p.add_argument("--targets", type=csv_floats, default=[1.01, 1.05, 1.1, 1.25],
                   help="target = DDP's final val loss x each of these (default 1.01,1.05,1.1,1.25)")
    p.add_argument("--t0", choices=("common", "measured"), default="common",
                   help="compute time per step: DDP's for every run (default) or each run's own measured one")
    p.add_argument("--continuations", default="", help="measured race JSONs (comma-separated) whose longer curves "
                   "replace their runs' frontier curves")
    p.add_argument("--out", default=None, help="Markdown output (default results/race_model_<N>r.md)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    frontier_path = Path(args.frontier or RESULTS / f"frontier_long_{args.ranks}r.json")
    frontier = json.loads(frontier_path.read_text())
    slow = json.loads(Path(args.validation).read_text())
    rates = csv_items(args.rates)
    for rate in rates:
        rate_bps(rate)  # fail early on a bad rate
    race_paths = [Path(item) for item in csv_items(args.continuations)] if args.continuations else []
    for path in race_paths:
        if not path.is_file():
            p.error(f"--continuations: {path} does not exist. HINT: run `python -m benchmarks.slow_link` first, "
                    "or leave --continuations out.")
    continuations = continuation_curves([json.loads(path.read_text()) for path in race_paths])
    meta = run_metadata("race_model", argv, num_nodes=frontier["meta"]["num_nodes"],
                        frontier=frontier_path.name, validation=Path(args.validation).name,
                        validation_date=slow["meta"]["date"], steps=frontier["meta"]["steps"], rates=rates,
                        multipliers=args.targets, ddp_final_val_loss=frontier["reference"]["final_val_loss"],
                        ddp_step_noise_pct=frontier["reference"].get("step_noise_pct", float("nan")),
                        ddp_step_s=frontier["reference"]["step_median_s"], t0=args.t0,
                        continuations=[path.name for path in race_paths])
    checks, rows = validate(slow), race(frontier, rates, args.targets, args.t0, continuations)
    out = Path(args.out or RESULTS / f"race_model_{args.ranks}r.md")
    write_report(out, render(finish_metadata(meta, start), checks, rows), {"meta": meta, "validation": checks,
                                                                            "rows": rows})
    print(f"[race-model] wrote {out} and its JSON", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
