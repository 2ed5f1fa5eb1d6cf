#!/usr/bin/env python3
"""Frontier benchmark: validation loss against bytes sent, HoloGrad beside DDP, PowerSGD,
local SGD and DiLoCo, on the same model, data, seeds and steps.

Every run trains the tiny GPT-2 of ``configs/gpt2-tiny-cpu.yaml`` (byte-level, D = 445,952)
for ``--steps`` optimizer steps on 2 ranks, as a two-node torchrun job: one process in each
of two network namespaces joined by a veth pair (``netns.py``; root needed). The bytes each
rank sent are read from its interface's kernel counters, so they are *measured*, for DDP's
C++ all-reduce as for everything else, and include Lightning's own collectives, gloo's
framing and TCP/IP headers and ACKs. See ``netbench_worker.py`` for the strategies.

For each run the table gives final and best validation loss (8 batches of 16 x 128 tokens
per rank, every ``--val-every`` steps), bytes sent per rank during training and per step,
compression (DDP's bytes / the run's bytes, both measured in this invocation), step time
and peak RSS as ratios to DDP (the mean of a DDP run first and a DDP run last). Outputs:
``results/frontier_cpu.{md,json,csv}``, ``results/frontier_loss_vs_bytes.png`` (log x) and
``results/frontier_loss_vs_step.png``. Results are saved after every run; ``--resume``
keeps the runs already in the JSON.

Examples:
  python -m benchmarks.frontier                       # every run (~35-40 min on 2 cores)
  python -m benchmarks.frontier --runs ddp,sketch-4096,powersgd-r1 --steps 100
  python -m benchmarks.frontier --resume              # finish an interrupted invocation
  python -m benchmarks.frontier --report-only         # redraw table and plots from the JSON
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_strategy import _cpu_name, _ring_allreduce_bytes, _version
from benchmarks.netns import TwoNodeLink

_BENCH_DIR = Path(__file__).resolve().parent
WORKER = "benchmarks.netbench_worker"  # run by torchrun as a module, from the repository root
RESULTS = _BENCH_DIR / "results"


def _hg(family: str, k: int, **extra: Any) -> dict[str, Any]:
    init = {"directions": family, "num_directions": k}
    bootstrap = {key: extra.pop(key) for key in ("bootstrap", "refresh") if key in extra}
    return {"kind": "holograd", "family": f"holograd-{family}", "K": k, "init_args": {**init, **extra}, **bootstrap}


# Ordered: the most informative runs first, so that a --runs subset or an interrupted
# invocation still has the reference and the main families.
RUNS: dict[str, dict[str, Any]] = {
    "ddp": {"kind": "ddp", "family": "ddp"},
    "ddp-bf16": {"kind": "ddp_hook", "hook": "bf16", "family": "ddp-bf16"},
    "powersgd-r1": {"kind": "ddp_hook", "hook": "powersgd", "rank": 1, "family": "powersgd"},
    "powersgd-r2": {"kind": "ddp_hook", "hook": "powersgd", "rank": 2, "family": "powersgd"},
    "powersgd-r4": {"kind": "ddp_hook", "hook": "powersgd", "rank": 4, "family": "powersgd"},
    "localsgd-h4": {"kind": "localsgd", "period": 4, "family": "localsgd"},
    "localsgd-h16": {"kind": "localsgd", "period": 16, "family": "localsgd"},
    "localsgd-h64": {"kind": "localsgd", "period": 64, "family": "localsgd"},
    "diloco-h16": {"kind": "diloco", "period": 16, "family": "diloco"},
    "diloco-h64": {"kind": "diloco", "period": 64, "family": "diloco"},
    "sketch-64": _hg("sketch", 64),
    "sketch-256": _hg("sketch", 256),
    "sketch-1024": _hg("sketch", 1024),
    "sketch-4096": _hg("sketch", 4096),
    "sketch-16384": _hg("sketch", 16384),
    "sketch-65536": _hg("sketch", 65536),
    "rademacher-16": _hg("rademacher", 16),
    "rademacher-64": _hg("rademacher", 64),
    "gaussian-16": _hg("gaussian", 16),
    "gaussian-64": _hg("gaussian", 64),
    "momentum-64": _hg("momentum", 64),
    "codebook-64-boot10": _hg("codebook", 64, codebook_rank=64, bootstrap=10),
    "codebook-64-boot10-refresh50": _hg("codebook", 64, codebook_rank=64, bootstrap=10, refresh=50),
    "rademacher-256": _hg("rademacher", 256),
    "gaussian-256": _hg("gaussian", 256),
}
REFERENCE = "ddp"
LAST_REFERENCE = "ddp-last"  # DDP again at the end: the two give the noise level of the ratios
WITHIN = 0.02  # "within 2 % of DDP"
TARGET_COMPRESSION = 1000.0


# ============================================================================ running
def tbf_burst(rate: str | None) -> str:
    """tbf bucket: 10 ms worth of ``rate`` ("100mbit", "1gbit", ...), at least 32 KiB."""
    if not rate:
        return "256kb"
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    for unit, scale in units.items():
        if rate.endswith(unit):
            bits = float(rate[: -len(unit)]) * scale
            return f"{max(int(bits / 8 * 0.01), 32 * 1024)}b"
    raise ValueError(f"rate={rate!r}: expected a number with kbit, mbit or gbit, e.g. 100mbit.")


def run_one(name: str, spec: dict[str, Any], args: argparse.Namespace, out_dir: Path,
            rate: str | None = None) -> dict[str, Any]:
    """One run as a two-node torchrun job over a fresh veth link (``rate``: tbf shaping)."""
    worker_spec = {**spec, "name": name}
    worker_args = ["--spec", json.dumps(worker_spec), "--out", str(out_dir), "--steps", str(args.steps),
                   "--val-every", str(args.val_every), "--val-batches", str(args.val_batches),
                   "--warmup", str(args.warmup)]
    for stale in out_dir.glob(f"{name}_rank*.json"):
        stale.unlink()
    with TwoNodeLink(rate=rate, burst=tbf_burst(rate)) as link:
        job = link.run_torchrun(WORKER, worker_args, timeout=args.timeout, port=args.port)
    ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob(f"{name}_rank*.json"))]
    row: dict[str, Any] = {"run": name, "family": spec["family"], "spec": spec, "wall_s": job["wall_s"],
                           "job_tx_bytes": job["job_tx_bytes"], "returncodes": job["returncodes"]}
    if job["returncodes"] != [0, 0] or len(ranks) != 2:
        row["status"] = f"error (rc={job['returncodes']}, {len(ranks)}/2 rank files)"
        row["output_tails"] = job["output_tails"]
        print(f"[frontier] {name}: {row['status']}\n{job['output_tails'][0][-2000:]}", flush=True)
        return row
    r0 = ranks[0]
    curve = [{"step": p["step"], "val_loss": p["val_loss"], "train_s": max(r["curve"][i]["train_s"] for r in ranks),
              "bytes": max(r["curve"][i]["bytes"] for r in ranks)} for i, p in enumerate(r0["curve"])]
    row.update({
        "status": "ok", "D": r0["num_params"], "steps": r0["global_step"], "curve": curve,
        "final_val_loss": curve[-1]["val_loss"], "best_val_loss": min(p["val_loss"] for p in curve),
        "bytes_train_per_rank": max(r["bytes_sent_train"] for r in ranks),
        "bytes_train_by_rank": [r["bytes_sent_train"] for r in ranks],
        "bytes_per_step": max(r["bytes_sent_train"] for r in ranks) / r0["global_step"],
        "bytes_per_step_after_warmup": max(r["bytes_per_step_after_warmup"] for r in ranks),
        "step_median_s": max(r["step_median_s"] for r in ranks),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "holograd_meter_wire": r0.get("holograd_meter_wire"),
    })
    print(f"[frontier] {name:30s} val {row['final_val_loss']:.4f} (best {row['best_val_loss']:.4f})  "
          f"{row['bytes_per_step']:>12,.0f} B/step  step {row['step_median_s'] * 1e3:6.1f} ms  "
          f"RSS {row['peak_rss_mb']:.0f} MB  ({row['wall_s']:.0f} s)", flush=True)
    return row


# ============================================================================ analysis
def interpolate_at(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of y at x over (x, y) points in log10(x); None outside their range."""
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return y0
            t = (math.log10(x) - math.log10(x0)) / (math.log10(x1) - math.log10(x0))
            return y0 + t * (y1 - y0)
    return pts[0][1]  # a single point at exactly x


def headlines(rows: list[dict[str, Any]], ddp_loss: float, within: float = WITHIN,
              target: float = TARGET_COMPRESSION) -> list[dict[str, Any]]:
    """Per family: the best compression whose final val loss is within ``within`` of DDP's,
    and the val-loss ratio to DDP at ``target`` compression (interpolated in log compression
    between the family's measured runs; None where the runs do not reach it)."""
    families: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok" and r["family"] != "ddp":
            families.setdefault(r["family"], []).append(r)
    out = []
    for family, runs in families.items():
        good = [r for r in runs if r["final_val_loss"] <= ddp_loss * (1 + within)]
        best = max(good, key=lambda r: r["compression"]) if good else None
        points = [(r["compression"], r["final_val_loss"] / ddp_loss) for r in runs]
        at_target = interpolate_at(points, target)
        top = max(runs, key=lambda r: r["compression"])
        out.append({
            "family": family, "runs": len(runs),
            "best_within": None if best is None else {"run": best["run"], "compression": best["compression"],
                                                      "val_ratio": best["final_val_loss"] / ddp_loss},
            "val_ratio_at_target": at_target,
            "max_compression": {"run": top["run"], "compression": top["compression"],
                                "val_ratio": top["final_val_loss"] / ddp_loss},
        })
    return out


def add_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    refs = [r for r in rows if r["run"] in (REFERENCE, LAST_REFERENCE) and r.get("status") == "ok"]
    if not refs:
        raise SystemExit("no successful DDP run: nothing to compare against")
    mean = lambda key: sum(r[key] for r in refs) / len(refs)  # noqa: E731
    ref = {key: mean(key) for key in ("bytes_train_per_rank", "step_median_s", "peak_rss_mb", "final_val_loss")}
    ref["runs"] = [r["run"] for r in refs]
    ref["step_noise_pct"] = (100 * abs(refs[0]["step_median_s"] - refs[-1]["step_median_s"]) / ref["step_median_s"]
                             if len(refs) == 2 else None)
    for r in rows:
        if r.get("status") == "ok":
            r["compression"] = ref["bytes_train_per_rank"] / r["bytes_train_per_rank"]
            r["val_ratio"] = r["final_val_loss"] / ref["final_val_loss"]
            r["step_ratio"] = r["step_median_s"] / ref["step_median_s"]
            r["rss_ratio"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
    return ref


def _label(r: dict[str, Any]) -> str:
    spec = r["spec"]
    if spec.get("K"):
        return f"K={spec['K']}" + (f", boot {spec['bootstrap']}" if spec.get("bootstrap") else "") + (
            f", refresh {spec['refresh']}" if spec.get("refresh") else "")
    if spec.get("rank"):
        return f"rank {spec['rank']}"
    if spec.get("period"):
        return f"H={spec['period']}"
    return "-"


def render(meta: dict[str, Any], rows: list[dict[str, Any]], ref: dict[str, Any], heads: list[dict[str, Any]]) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    lines = [
        "# Frontier: validation loss against bytes sent (cpu, 2 ranks, measured at the interface)",
        "",
        f"- machine: {meta['machine']}; torch {meta['torch']}, lightning {meta['lightning']}",
        f"- model: tiny GPT-2 of `configs/gpt2-tiny-cpu.yaml` (D = {ok[0]['D']:,}), AdamW, "
        f"{meta['steps']} steps, 16 x 128 tokens per rank and step, seed 1337, same init, data and data "
        "order in every run",
        f"- 2 ranks = a two-node torchrun job (gloo), one process per network namespace, joined by a veth pair "
        "with no shaping; 1 thread per rank",
        f"- validation: {meta['val_batches']} batches x 16 x 128 tokens per rank every {meta['val_every']} steps; "
        "loss in nats per byte",
        "- bytes: the kernel's tx counter of each rank's veth end from train start to train end (max over the "
        "two ranks): payload, Lightning's own collectives (8 B broadcast per step, metric syncs), gloo framing, "
        "TCP/IP headers and ACKs. veth offloads segmentation (TSO/GSO): a large message pays its 66 B of "
        "Ethernet/IP/TCP headers once per super-packet of up to 64 KB, not once per 1448-byte segment, so on a "
        "1500-byte-MTU NIC the large-message runs (DDP, hooks, averaging) would count ~4.6 % more",
        f"- DDP reference = mean of {', '.join(ref['runs'])}: {ref['bytes_train_per_rank'] / meta['steps']:,.0f} B "
        f"per rank and step (ring model 2(N-1)/N x 4D = {_ring_allreduce_bytes(ok[0]['D'], 2):,.0f}), val loss "
        f"{ref['final_val_loss']:.4f}, {ref['step_median_s'] * 1e3:.1f} ms/step, peak RSS "
        f"{ref['peak_rss_mb']:.0f} MB" + (f"; the two DDP runs differ by {ref['step_noise_pct']:.1f} % in step "
                                           "time (noise level)" if ref.get("step_noise_pct") is not None else ""),
        f"- date: {meta['date']}; command: `{meta['command']}`; total wall {meta['total_wall_s'] / 60:.0f} min",
        "",
        "## Headline (per family)",
        "",
        f"| family | best compression within {WITHIN:.0%} of DDP's val loss | val loss ratio at "
        f"{TARGET_COMPRESSION:.0f}x | highest compression measured (val loss ratio) |",
        "|---|---|---|---|",
    ]
    for h in heads:
        best = h["best_within"]
        best_txt = "none" if best is None else f"{best['compression']:,.1f}x ({best['run']}, {best['val_ratio']:.3f})"
        at = h["val_ratio_at_target"]
        top = h["max_compression"]
        at_txt = f"{at:.3f}" if at is not None else f"not reached (max {top['compression']:,.0f}x)"
        lines.append(f"| {h['family']} | {best_txt} | {at_txt} | {top['compression']:,.1f}x "
                     f"({top['run']}, {top['val_ratio']:.3f}) |")
    floor = min((r for r in ok if r["spec"].get("kind") == "holograd"), key=lambda r: r["bytes_per_step_after_warmup"],
                default=None)
    if floor is not None:
        payload_bytes = 32 + 4 * floor["spec"]["K"]
        lines += [
            "",
            f"Per-step floor: the smallest HoloGrad run ({floor['run']}) sends "
            f"{floor['bytes_per_step_after_warmup']:,.0f} B per rank and step, of which {payload_bytes:,} B are "
            "protocol payload (32 hash bytes + 4K scalar bytes); the rest is per-message cost (TCP/IP headers, ACKs, "
            "gloo framing, Lightning's 8-byte broadcast every step). At 2 ranks this caps the measured compression "
            f"near {ref['bytes_train_per_rank'] / ok[0]['steps'] / floor['bytes_per_step_after_warmup']:,.0f}x "
            "whatever K is.",
        ]
    lines += [
        "",
        "## Every run",
        "",
        "| run | family | setting | final val loss | best val loss | x DDP (final) | bytes/rank (train) | bytes/step "
        "| bytes/step after warm-up | compression | step ms | x DDP | peak RSS MB | x DDP | wall s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['run']} | {r['family']} | {_label(r)} | {r.get('status')} |||||||||||")
            continue
        lines.append(
            f"| {r['run']} | {r['family']} | {_label(r)} | {r['final_val_loss']:.4f} | {r['best_val_loss']:.4f} "
            f"| {r['val_ratio']:.3f} | {r['bytes_train_per_rank']:,} | {r['bytes_per_step']:,.0f} "
            f"| {r['bytes_per_step_after_warmup']:,.0f} | {r['compression']:,.1f} | {r['step_median_s'] * 1e3:.1f} "
            f"| {r['step_ratio']:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_ratio']:.2f} | {r['wall_s']:.0f} |")
    lines += [
        "",
        "Plots: [loss vs bytes](frontier_loss_vs_bytes.png), [loss vs step](frontier_loss_vs_step.png). "
        "CSV: [frontier_cpu.csv](frontier_cpu.csv); JSON with every validation point: "
        "[frontier_cpu.json](frontier_cpu.json).",
        "",
        "Settings: PowerSGD = torch's `powerSGD_hook` (error feedback, warm start, `start_powerSGD_iter=10`; "
        "1-D tensors go uncompressed), each bucket finished before the next (gloo); bf16 = torch's "
        "`bf16_compress_hook`; local SGD = torch's `PeriodicModelAverager` through Lightning's post-local-SGD "
        "support, no gradient traffic, parameters averaged every H steps (AdamW states stay local); DiLoCo = "
        "the same with an outer Nesterov SGD (lr 0.7, momentum 0.9) on the averaged pseudo-gradient every H "
        "steps; HoloGrad = `HoloGradStrategy(directions=..., num_directions=K)` with the defaults otherwise "
        "(mean aggregation, audit every 100 steps); codebook runs add `ADCBootstrap` (true-gradient steps are "
        "full all-reduces and are counted).",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], ref: dict[str, Any], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    families = list(dict.fromkeys(r["family"] for r in ok))
    colors = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}

    fig, ax = plt.subplots(figsize=(9, 6))
    for family in families:
        runs = sorted((r for r in ok if r["family"] == family), key=lambda r: r["bytes_train_per_rank"])
        xs = [r["bytes_train_per_rank"] / r["steps"] for r in runs]
        ys = [r["final_val_loss"] for r in runs]
        marker = "*" if family == "ddp" else "o"
        ax.plot(xs, ys, marker=marker, ms=12 if family == "ddp" else 6, color=colors[family], label=family,
                lw=1 if family != "ddp" else 0)
        for r, x, y in zip(runs, xs, ys):
            if family != "ddp":
                ax.annotate(_label(r).replace("K=", ""), (x, y), fontsize=7, xytext=(3, 3),
                            textcoords="offset points", color=colors[family])
    ddp_loss = ref["final_val_loss"]
    ax.axhline(ddp_loss * (1 + WITHIN), ls="--", color="grey", lw=0.8, label=f"DDP + {WITHIN:.0%}")
    ddp_bps = ref["bytes_train_per_rank"] / ok[0]["steps"]
    ax.axvline(ddp_bps / TARGET_COMPRESSION, ls=":", color="grey", lw=0.8, label=f"{TARGET_COMPRESSION:.0f}x compression")
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per rank and training step (measured at the interface, log scale)")
    ax.set_ylabel(f"final validation loss after {ok[0]['steps']} steps (nats/byte)")
    ax.set_title("Tiny GPT-2, 2 ranks: loss vs bytes")
    ax.set_ylim(top=min(max(r["final_val_loss"] for r in ok) + 0.05, ddp_loss * 1.6))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "frontier_loss_vs_bytes.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 6))
    styles = ["-", "--", "-.", ":", (0, (1, 1)), (0, (5, 1))]
    for family in families:
        runs = sorted((r for r in ok if r["family"] == family), key=lambda r: r["bytes_train_per_rank"])
        for i, r in enumerate(runs):
            label = r["run"] if family != "ddp" else f"{r['run']}"
            ax.plot([p["step"] for p in r["curve"]], [p["val_loss"] for p in r["curve"]], color=colors[family],
                    ls=styles[i % len(styles)], lw=2 if family == "ddp" else 1, marker=".", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_ylim(top=min(max(p["val_loss"] for r in ok for p in r["curve"]) + 0.05, ddp_loss * 2))
    ax.set_title("Tiny GPT-2, 2 ranks: loss vs step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(out_dir / "frontier_loss_vs_step.png", dpi=120)
    plt.close(fig)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys = ["run", "family", "status", "final_val_loss", "best_val_loss", "val_ratio", "bytes_train_per_rank",
            "bytes_per_step", "bytes_per_step_after_warmup", "compression", "step_median_s", "step_ratio",
            "peak_rss_mb", "rss_ratio", "wall_s"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow(r)


def report(payload: dict[str, Any], out_md: Path) -> None:
    order = {name: i for i, name in enumerate([*RUNS, LAST_REFERENCE])}
    payload["rows"].sort(key=lambda r: order.get(r["run"], len(order)))
    rows = payload["rows"]
    ref = add_ratios(rows)
    heads = headlines(rows, ref["final_val_loss"])
    payload["reference"], payload["headlines"] = ref, heads
    out_md.write_text(render(payload["meta"], rows, ref, heads))
    out_md.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    write_csv(rows, out_md.with_suffix(".csv"))
    plot(rows, ref, out_md.parent)
    print(f"[frontier] wrote {out_md}, .json, .csv and the two plots", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of: {', '.join(RUNS)}")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300, as the README job)")
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of step time and bytes/step after warm-up")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it counts as failed")
    p.add_argument("--port", type=int, default=29517)
    p.add_argument("--out", default=str(RESULTS / "frontier_cpu.md"), help="Markdown; JSON/CSV/plots beside it")
    p.add_argument("--resume", action="store_true", help="keep the successful runs already in the JSON")
    p.add_argument("--report-only", action="store_true", help="rebuild table and plots from the JSON")
    args = p.parse_args(argv)
    unknown = [r for r in args.runs.split(",") if r not in RUNS]
    if unknown:
        p.error(f"--runs: unknown {unknown}. HINT: choose from {', '.join(RUNS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_md = Path(args.out)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    json_path = out_md.with_suffix(".json")
    if args.report_only:
        report(json.loads(json_path.read_text()), out_md)
        return 0
    payload: dict[str, Any] = {"rows": []}
    if args.resume and json_path.exists():
        payload = json.loads(json_path.read_text())
    done = {r["run"] for r in payload["rows"] if r.get("status") == "ok"}
    payload["rows"] = [r for r in payload["rows"] if r["run"] in done]
    start = time.perf_counter() - payload.get("meta", {}).get("total_wall_s", 0.0)
    command = "python -m benchmarks.frontier " + shlex.join(argv if argv is not None else sys.argv[1:])
    prior_commands = payload.get("meta", {}).get("command", "").split("; ") if payload["rows"] else []
    prior_commands = [c for c in prior_commands if c]
    names = [n for n in args.runs.split(",")]
    if REFERENCE in names:
        names.append(LAST_REFERENCE)
    with tempfile.TemporaryDirectory(prefix="holograd-frontier-") as tmp:
        for name in names:
            if name in done:
                continue
            spec = RUNS[REFERENCE] if name == LAST_REFERENCE else RUNS[name]
            row = run_one(name, spec, args, Path(tmp))
            payload["rows"] = [r for r in payload["rows"] if r["run"] != name] + [row]
            payload["meta"] = {
                "machine": f"{platform.machine()}, {_cpu_name()}", "torch": _version("torch"),
                "lightning": _version("lightning"), "steps": args.steps, "val_every": args.val_every,
                "val_batches": args.val_batches, "warmup": args.warmup,
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "command": "; ".join(dict.fromkeys(prior_commands + [command])),
                "total_wall_s": time.perf_counter() - start,
            }
            json_path.write_text(json.dumps(payload, indent=1))
    report(payload, out_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
