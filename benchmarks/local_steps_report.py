"""Tables of ``local_steps_study.py`` runs: val loss as a ratio to DDP, bytes and compression.

``python -m benchmarks.local_steps_study --report`` reads every run JSON in the runs folder,
writes ``results/local_steps_study.json`` (all runs, train curves dropped) and prints the
Markdown tables that ``results/local_steps_study.md`` quotes. The reference of a run is the
DDP run (``--ratio 0 --local-steps 1``) with the same number of workers and steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def load_runs(folder: Path) -> list[dict[str, Any]]:
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    ddp = {(r["args"]["workers"], r["args"]["steps"]): r["final_val"] for r in runs
           if r["args"]["ratio"] == 0 and r["args"]["local_steps"] == 1}
    for r in runs:
        ref = ddp.get((r["args"]["workers"], r["args"]["steps"]))
        r["ddp_val"] = ref
        r["ratio_to_ddp"] = r["final_val"] / ref if ref else None
    return runs


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _row(r: dict[str, Any]) -> str:
    a = r["args"]
    method = "DDP" if a["ratio"] == 0 and a["local_steps"] == 1 else (
        f"groups={a['groups']}" if a["local_steps"] == 1 else f"{a['inner']}, {a['outer']} (lr {a['outer_lr']:g})")
    ratio = "none" if a["ratio"] == 0 else f"{a['ratio']:g}x {a['budget']}"
    cells = [str(a["workers"]), str(a["steps"]), str(a["local_steps"]), method, ratio, str(a["groups"]),
             _f(r["final_val"], ".4f"), _f(r["ratio_to_ddp"], ".3f"), str(r["k"]),
             _f(r["exchange_bytes_per_step"], ".0f"),
             _f(r["verify_bytes_per_step"] if a["ratio"] else None, ".0f"),
             _f(r["compression_exchange"], ".0f"), _f(r["compression_total"] if a["ratio"] else None, ".0f"),
             f"`{r['command']}`"]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| N | steps | H | method | compression target | groups | val | / DDP | K | exchange B/step "
          "| verify B/step | compression (exchange) | compression (with verification) | command |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def tables(runs: list[dict[str, Any]]) -> str:
    """One table per (workers, steps), per-step runs first, then local-step runs."""
    out = []
    for key in sorted({(r["args"]["workers"], r["args"]["steps"]) for r in runs}):
        sel = [r for r in runs if (r["args"]["workers"], r["args"]["steps"]) == key]
        sel.sort(key=lambda r: (r["args"]["local_steps"] > 1, r["args"]["ratio"], r["args"]["local_steps"],
                                str(r["args"]["groups"]), r["args"]["inner"], r["args"]["outer"]))
        ddp = sel[0]["ddp_val"]
        out.append(f"### N = {key[0]}, {key[1]} steps (DDP val {_f(ddp, '.4f')})\n\n{HEADER}")
        out += [_row(r) for r in sel]
        out.append("")
    return "\n".join(out)


def report(folder: Path) -> int:
    runs = load_runs(folder)
    if not runs:
        raise SystemExit(f"no run JSON in {folder}. HINT: run a configuration first (see --help).")
    keep = [{k: v for k, v in r.items() if k != "train_loss"} for r in runs]
    (RESULTS / "local_steps_study.json").write_text(json.dumps(keep, indent=1) + "\n")
    print(tables(runs))
    return 0
