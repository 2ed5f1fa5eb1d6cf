"""The slow-link race's analysis and report: which peers race, time to target, each peer's
ratio to the fastest on its link, and the Markdown with a plain-words headline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.frontier_runs import LAST_REFERENCE, label
from benchmarks.harness import fmt, provenance, write_report

PEER_FAMILIES = ("powersgd", "localsgd", "diloco")  # a best rank / H is chosen for these


def time_to_target(curve: list[dict[str, Any]], target: float, key: str = "train_s") -> float | None:
    """``key`` (training seconds, or ``"step"``) at which the validation loss first reaches
    ``target``: linear interpolation between the two checks that bracket the crossing (the
    start is key 0 at loss +inf); None when no check reaches it."""
    prev_x, prev_loss = 0.0, None
    for point in curve:
        x, loss = point[key], point["val_loss"]
        if loss <= target:
            if prev_loss is None or prev_loss == loss:
                return x
            return prev_x + (prev_loss - target) / (prev_loss - loss) * (x - prev_x)
        prev_x, prev_loss = x, loss
    return None


def select_peers(rows: list[dict[str, Any]], target: float) -> dict[str, dict[str, Any]]:
    """The peers of a race from the long frontier's rows: DDP, the bf16 hook, the best run
    (lowest final val loss) of PowerSGD, local SGD and DiLoCo, and per HoloGrad family its
    best run and its highest-compression run at or below ``target``. ``{run: {spec, why}}``."""
    ok = [r for r in rows if r.get("status") == "ok" and r["run"] != LAST_REFERENCE]
    peers: dict[str, dict[str, Any]] = {}
    for r in ok:
        if r["family"] in ("ddp", "ddp-bf16"):
            peers[r["run"]] = {"spec": r["spec"], "why": "reference" if r["family"] == "ddp" else "peer"}
    for family in dict.fromkeys(r["family"] for r in ok):
        runs = [r for r in ok if r["family"] == family]
        if family in PEER_FAMILIES or family.startswith("holograd"):
            best = min(runs, key=lambda r: r["final_val_loss"])
            peers.setdefault(best["run"], {"spec": best["spec"], "why": f"lowest final val loss of {family}"})
        if family.startswith("holograd"):
            good = [r for r in runs if r["final_val_loss"] <= target and r.get("compression")]
            if good:
                top = max(good, key=lambda r: r["compression"])
                peers.setdefault(top["run"], {"spec": top["spec"], "why": f"highest compression of {family} "
                                                                          "within the target"})
    return peers


def rank_link(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of one link, fastest first (unreached last, by best loss); ``x_fastest`` and
    ``compression`` (DDP's bytes per step on the link / the peer's) added."""
    reached = sorted((r for r in rows if r.get("time_to_target_s") is not None), key=lambda r: r["time_to_target_s"])
    rest = sorted((r for r in rows if r.get("time_to_target_s") is None),
                  key=lambda r: (r.get("status") != "ok", r.get("best_val_loss") or float("inf")))
    fastest = reached[0]["time_to_target_s"] if reached else None
    ddp = next((r for r in rows if r.get("peer", r.get("strategy")) == "ddp" and r.get("status") == "ok"), None)
    for r in reached:
        r["x_fastest"] = r["time_to_target_s"] / fastest if fastest else None
    for r in rows:
        if ddp and r.get("status") == "ok" and r.get("bytes_per_step"):
            r["compression"] = ddp["bytes_per_step"] / r["bytes_per_step"]
    return reached + rest


def _status(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return r.get("status", "-")
    if r.get("time_to_target_s") is not None:
        return "reached"
    cap = f" within the cap ({r['time_cap_s']:.0f} s)" if r.get("time_cap_s") else f" in {r['steps']} steps"
    return f"**never reached**{cap}; best val {r['best_val_loss']:.4f}"


def _row(r: dict[str, Any]) -> str:
    peer = r.get("peer", r.get("strategy"))
    if r.get("status") != "ok":
        return f"| {peer} | - | {r.get('why', '-')} | - | - | - | - | - | - | - | {_status(r)} |"
    steps = "-" if r.get("steps_to_target") is None else f"{r['steps_to_target']:.0f}"
    return (f"| {peer} | {label(r)} | {r.get('why', '-')} | {fmt(r.get('time_to_target_s'), 1)} "
            f"| {fmt(r.get('x_fastest'))} | {steps} | {r['bytes_per_step']:,.0f} | {fmt(r.get('compression'), 1)} "
            f"| {r['step_median_s'] * 1e3:.1f} | {r['final_val_loss']:.4f} | {_status(r)} |")


def headline(rate: str, ranked: list[dict[str, Any]]) -> str:
    """The plain-words result of one link."""
    reached = [r for r in ranked if r.get("time_to_target_s") is not None]
    never = [r.get("peer", r.get("strategy")) for r in ranked if r not in reached]
    if not reached:
        return f"- **{rate}**: no peer reached the target."
    first = reached[0]
    ddp = next((r for r in reached if r.get("peer", r.get("strategy")) == "ddp"), None)
    vs_ddp = f", {ddp['time_to_target_s'] / first['time_to_target_s']:.2f}x faster than DDP" if ddp and ddp is not first else ""
    comp = f" at {first['compression']:,.0f}x compression" if first.get("compression") else ""
    runner = (f"; next: {reached[1].get('peer', reached[1].get('strategy'))} ({reached[1]['x_fastest']:.2f}x its "
              "time)" if len(reached) > 1 else "")
    return (f"- **{rate}**: {first.get('peer', first.get('strategy'))} reaches the target first, in "
            f"{first['time_to_target_s']:.0f} s{vs_ddp}{comp}{runner}."
            + (f" Never reached: {', '.join(never)}." if never else ""))


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    n = meta.get("num_nodes", 2)
    target = meta["target"]
    source = (f"DDP's final val loss of the long frontier ({meta['ddp_final_val_loss']:.4f}) x "
              f"{1 + meta.get('tolerance', 0.01):.2f}" if meta.get("ddp_final_val_loss") else "given on the command line")
    lines = [f"# Slow-link race to DDP's loss ({n} ranks, cpu, tbf-shaped links)", "",
             f"- machine: {meta.get('machine', '-')}; torch {meta['torch']}, lightning {meta['lightning']}",
             f"- target: val loss <= {target:.4f} ({source}); race clock = training seconds, validation excluded "
             f"(every {meta['val_every']} steps), max over ranks, interpolated between checks",
             f"- lr schedule over {meta.get('schedule_steps', '-')} steps (then min_lr), at most {meta.get('steps', '-')} "
             "steps; cap: " + (f"{meta['time_cap']:.0f} s of race clock" if meta.get("time_cap") else
                               f"{meta.get('cap_factor', '-')}x DDP's time to target on the link"),
             f"- links: {n} network namespaces on a bridge, every node's link shaped with `tc ... tbf rate R` both ways",
             provenance(meta) + f"; total wall {meta['total_wall_s'] / 60:.0f} min", "", "## Headline", ""]
    by_rate = {rate: rank_link([r for r in rows if r.get("rate") == rate])
               for rate in meta.get("rates", dict.fromkeys(r["rate"] for r in rows))}
    lines += [headline(rate, ranked) for rate, ranked in by_rate.items()]
    for rate, ranked in by_rate.items():
        lines += ["", f"## {rate}", "", "| peer | setting | chosen as | time to target s | x fastest | steps to target "
                  "| bytes/step/rank | compression vs DDP | step ms | final val loss | status |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|", *(_row(r) for r in ranked)]
    return "\n".join(lines) + "\n"


def report(payload: dict[str, Any], out_md: Path) -> None:
    write_report(out_md, render(payload["meta"], payload["rows"]), payload)
    print(f"[race] wrote {out_md} and its JSON", flush=True)
