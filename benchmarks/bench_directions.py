#!/usr/bin/env python3
"""Micro-benchmark of the direction families: project + synthesize time versus D and K.

For every (family, D, K) it times ``family.project(g, seeds)`` and
``family.synthesize(a, seeds)`` separately (median of ``--repeats`` after ``--warmup``
untimed calls; ``torch.cuda.synchronize`` around every call on a GPU) and compares them
with the raw random-number throughput of the device, measured first, so that
"generation versus RNG limit" can be read off (docs/PROTOCOL.md §3: generating the
directions, not the dot products, dominates the cost).

Families (rows):
  gaussian, rademacher   dense, O(D K) per call
  sketch                 count sketch, O(D) per call for any K
  codebook               codebook_rank = K, no exploration (pure U^T g / U a)
  codebook-halfexp       codebook_rank = K/2 plus K - K/2 Gaussian exploration directions
                         (``--families codebook`` runs both codebook rows)
  momentum               1 momentum direction + K - 1 Gaussian exploration directions

For the subspace families (codebook*, momentum) ``full_estimate`` (U a_U + P x, which
``reconstruct`` / ``update`` pay on every step) is timed too; with the default
exploration_weight = 0 ``synthesize`` returns U a_U only.
Their construction (seeded basis + QR, on the CPU) is reported as "setup".

Configurations whose estimated cost (setup + (warmup + repeats) calls) exceeds
``--max-seconds`` are not run and are reported as "skipped (budget)". Estimates come
from the measured RNG rates, rescaled by the measured/estimated ratio of the last
configuration of the same family that did run (configurations run in increasing D, K).

Examples:
  python -m benchmarks.bench_directions                      # defaults, ~1.5 min on 2 CPU cores
  python -m benchmarks.bench_directions --dims 1000000 --ks 64 --families gaussian,sketch
  python -m benchmarks.bench_directions --device cuda --dims 1000000,10000000
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_BENCH_DIR = Path(__file__).resolve().parent

from lightning_holograd.protocol import direction_seeds, make_family  # noqa: E402

FAMILIES = ("gaussian", "rademacher", "sketch", "codebook", "momentum")
STATEFUL = ("codebook", "codebook-halfexp", "momentum")
# Assumed single-thread CPU QR rate (flop/s) for the first codebook setup estimate only;
# later estimates are rescaled by what was measured.
_QR_FLOPS_PRIOR = 5e9


# --------------------------------------------------------------------------- helpers
def _csv_ints(text: str) -> list[int]:
    values = []
    for item in text.split(","):
        item = item.strip()
        if item:
            values.append(int(float(item)))  # accepts 1e6
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _csv_families(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    allowed = set(FAMILIES) | {"codebook-halfexp"}
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown families {bad}; choose from {', '.join(sorted(allowed))}")
    return names


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not available on every platform
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls of fn after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def measure_rng(device: torch.device, repeats: int, block: int = 8192) -> dict[str, float]:
    """Raw generator throughput in M values/s for the draws the families make."""
    n = (1 << 27) if device.type == "cuda" else (1 << 22)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    out: dict[str, float] = {"buffer_elements": float(n)}

    def rate(fn: Callable[[], Any], count: int) -> float:
        return count / statistics.median(_time_call(fn, device, 1, max(3, repeats))) / 1e6

    f32 = torch.empty(n, dtype=torch.float32, device=device)
    out["randn_Mps"] = rate(lambda: f32.normal_(generator=gen), n)
    u8 = torch.empty(n, dtype=torch.uint8, device=device)
    out["uint8_random_Mps"] = rate(lambda: u8.random_(0, 256, generator=gen), n)
    i64 = torch.empty(n, dtype=torch.int64, device=device)
    out["int64_random_Mps"] = rate(lambda: i64.random_(0, 256, generator=gen), n)
    del i64, u8

    # The families' actual pattern: re-seed a generator, fill one block (docs/PROTOCOL.md §3).
    nblocks = min(1024, n // block)
    blk = f32[:block]

    def blocked() -> None:
        for b in range(nblocks):
            gen.manual_seed(b + 1)
            blk.normal_(generator=gen)

    out["randn_blocked_Mps"] = rate(blocked, nblocks * block)
    out["block_size"] = float(block)
    return out


# --------------------------------------------------------------------------- cost model
def _draws(variant: str, dim: int, k: int, rank: int) -> dict[str, float]:
    """Random values one regenerating call draws, by kind."""
    if variant == "gaussian":
        return {"randn": dim * k}
    if variant == "rademacher":
        return {"uint8": dim * k / 8}
    if variant == "sketch":
        return {"int64": dim, "uint8": dim / 8}
    if variant in STATEFUL:
        return {"randn": dim * (k - rank)}
    raise ValueError(variant)


def _rng_bound_s(draws: dict[str, float], rng: dict[str, float]) -> float:
    key = {"randn": "randn_Mps", "uint8": "uint8_random_Mps", "int64": "int64_random_Mps"}
    return sum(count / (rng[key[kind]] * 1e6) for kind, count in draws.items())


def _rank(variant: str, k: int) -> int:
    return {"codebook": k, "codebook-halfexp": k // 2, "momentum": 1}.get(variant, 0)


def _prior_estimates(variant: str, dim: int, k: int, rng: dict[str, float]) -> dict[str, float]:
    """Rough seconds per call (project / synthesize / full_estimate) and for setup."""
    rank = _rank(variant, k)
    gen = _rng_bound_s(_draws(variant, dim, k, rank), rng)
    matvec = 2 * dim * max(rank, 1) / 2e9 + dim * 4 / 5e9  # small matrix-vector work + one pass
    est = {"project": 1.5 * gen + matvec, "synthesize": 1.5 * gen + matvec, "full_estimate": 0.0, "setup": 0.0}
    if variant in STATEFUL:
        est["synthesize"] = matvec
        est["full_estimate"] = 1.5 * gen + 3 * matvec
        init_gen = dim * rank / (rng["randn_Mps"] * 1e6)
        qr = 2 * dim * rank * rank / _QR_FLOPS_PRIOR if variant != "momentum" else 0.0
        est["setup"] = 1.5 * init_gen + qr
    return est


# --------------------------------------------------------------------------- one config
def build_family(variant: str, dim: int, k: int, device: torch.device):
    if variant == "codebook":
        fam = make_family("codebook", dim, k, codebook_rank=k)
    elif variant == "codebook-halfexp":
        fam = make_family("codebook", dim, k, codebook_rank=max(1, k // 2))
    else:
        fam = make_family(variant, dim, k)
    if hasattr(fam, "to"):
        fam.to(device)
    return fam


def run_config(variant: str, dim: int, k: int, device: torch.device, args, rng: dict[str, float]) -> dict[str, Any]:
    row: dict[str, Any] = {"family": variant, "D": dim, "K": k, "status": "ok"}
    _sync(device)
    t0 = time.perf_counter()
    fam = build_family(variant, dim, k, device)
    _sync(device)
    row["setup_s"] = time.perf_counter() - t0 if variant in STATEFUL else None
    row["rank"] = getattr(fam, "rank", None)
    row["num_exploration"] = getattr(fam, "num_exploration", None)

    seeds = direction_seeds(b"bench-directions", fam.num_seeds)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    grad = torch.randn(dim, generator=gen).to(device)
    scalars = fam.project(grad, seeds)

    ops: dict[str, Callable[[], Any]] = {
        "project": lambda: fam.project(grad, seeds),
        "synthesize": lambda: fam.synthesize(scalars, seeds),
    }
    if variant in STATEFUL:
        ops["full_estimate"] = lambda: fam.full_estimate(scalars, seeds)
    for name, fn in ops.items():
        times = _time_call(fn, device, args.warmup, args.repeats)
        row[f"{name}_times_s"] = times
        row[f"{name}_s"] = statistics.median(times)

    work = dim if variant == "sketch" else dim * k  # coordinates (x directions) touched per call
    row["work_unit"] = "D" if variant == "sketch" else "D*K"
    row["work"] = work
    row["project_Mps"] = work / row["project_s"] / 1e6
    row["synthesize_Mps"] = work / row["synthesize_s"] / 1e6
    rank = _rank(variant, k)
    row["rng_bound_s"] = _rng_bound_s(_draws(variant, dim, k, rank), rng)
    regen_synth = row.get("full_estimate_s", row["synthesize_s"])
    if row["rng_bound_s"] > 0:
        row["project_x_rng"] = row["project_s"] / row["rng_bound_s"]
        row["synthesize_x_rng"] = regen_synth / row["rng_bound_s"]
    else:
        row["project_x_rng"] = row["synthesize_x_rng"] = None
    del fam, grad, scalars
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------- output
def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else _fmt(seconds * 1e3)


def render_markdown(meta: dict[str, Any], rng: dict[str, float], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# Direction generation micro-benchmark ({meta['device']})",
        "",
        f"- device: `{meta['device']}` ({meta['device_name']})",
        f"- torch {meta['torch']}, python {meta['python']}, threads {meta['threads']}",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- repeats {meta['repeats']} (median reported), warmup {meta['warmup']}, "
        f"per-config budget {meta['max_seconds']} s, total wall {meta['total_wall_s']:.0f} s",
        f"- load average (1 min) at start / end: {meta['loadavg_start']} / {meta['loadavg_end']} "
        f"(on a shared machine, other processes inflate the times; the JSON keeps every repeat)",
        "",
        "Raw RNG throughput on this device (M values/s; "
        f"{int(rng['buffer_elements']):,}-element preallocated buffer):",
        "",
        "| torch.randn (normal_) | normal_ in re-seeded 8192 blocks | uint8 random_ | int64 random_ |",
        "|---|---|---|---|",
        f"| {rng['randn_Mps']:.0f} | {rng['randn_blocked_Mps']:.0f} | {rng['uint8_random_Mps']:.0f} "
        f"| {rng['int64_random_Mps']:.0f} |",
        "",
        "| family | D | K | setup s | project ms | synthesize ms | full_est ms | project M/s | "
        "synthesize M/s | RNG-bound ms | project x RNG | synth x RNG | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        label = r["family"] + (" (O(D))" if r["family"] == "sketch" else "")
        if r["status"] != "ok":
            est = r.get("estimated_s")
            note = r["status"] + (f", est. {est:.1f} s" if est is not None else "")
            lines.append(f"| {label} | {r['D']:,} | {r['K']} | - | - | - | - | - | - | - | - | - | {note} |")
            continue
        setup = "-" if r.get("setup_s") is None else f"{r['setup_s']:.2f}"
        lines.append(
            f"| {label} | {r['D']:,} | {r['K']} | {setup} | {_ms(r['project_s'])} | {_ms(r['synthesize_s'])} "
            f"| {_ms(r.get('full_estimate_s'))} | {_fmt(r['project_Mps'])} | {_fmt(r['synthesize_Mps'])} "
            f"| {_ms(r['rng_bound_s']) if r['rng_bound_s'] else '-'} | {_fmt(r['project_x_rng'])} "
            f"| {_fmt(r['synthesize_x_rng'])} | ok |"
        )
    lines += [
        "",
        "Columns:",
        "- *M/s*: throughput in M coordinates x directions per second (D*K / time); for the sketch "
        "(O(D) for any K) in M coordinates per second (D / time).",
        "- *RNG-bound ms*: time the random draws of one regenerating call would take at the raw "
        "rates above (gaussian and exploration directions: D*K' normals; rademacher: D*K/8 bytes; "
        "sketch: D int64 buckets + D/8 bytes). *x RNG* = measured / RNG-bound (1.0 = generation "
        "runs at the raw RNG limit). codebook without exploration draws nothing.",
        "- codebook: codebook_rank = K, no exploration. codebook-halfexp: rank K/2 plus K/2 Gaussian "
        "exploration directions. momentum: 1 momentum direction + K-1 exploration directions. "
        "*full_est* is full_estimate (U a_U + P x, what reconstruct/update pay every step); their "
        "*synth x RNG* uses it. With exploration_weight = 0 (default) *synthesize* returns U a_U but "
        "still synthesises the exploration part (hence about the same time as full_est).",
        "- *setup*: building the subspace family (seeded basis + QR on the CPU). The codebook repeats "
        "that O(D r^2) QR every qr_every (default 50) basis updates.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=_csv_ints, default=[100_000, 1_000_000], help="comma-separated D values")
    p.add_argument("--ks", type=_csv_ints, default=[16, 64, 256], help="comma-separated K values")
    p.add_argument("--families", type=_csv_families, default=list(FAMILIES),
                   help=f"comma-separated, from {', '.join(FAMILIES)}, codebook-halfexp "
                        "(codebook also runs codebook-halfexp unless --no-codebook-exploration)")
    p.add_argument("--no-codebook-exploration", action="store_true",
                   help="with --families codebook, skip the half-exploration codebook row")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per op; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per op before timing")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="per-config budget: configs estimated to take longer are skipped")
    p.add_argument("--out", default=None,
                   help="Markdown output (default benchmarks/results/directions_<device>.md); "
                        "the JSON goes next to it with the same stem")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    out_md = Path(args.out) if args.out else _BENCH_DIR / "results" / f"directions_{device.type}.md"
    out_json = out_md.with_suffix(".json")
    out_md.parent.mkdir(parents=True, exist_ok=True)

    variants: list[str] = []
    for name in args.families:
        for v in ([name, "codebook-halfexp"] if name == "codebook" and not args.no_codebook_exploration else [name]):
            if v not in variants:
                variants.append(v)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    meta = {
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python " + shlex.join(sys.argv),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "max_seconds": args.max_seconds,
        "dims": args.dims,
        "ks": args.ks,
        "families": variants,
    }
    meta["loadavg_start"] = _loadavg()
    wall0 = time.perf_counter()
    print(f"[bench] device={device} ({device_name}) torch={torch.__version__} threads={meta['threads']}", flush=True)
    rng = measure_rng(device, args.repeats)
    print("[bench] RNG M/s: " + ", ".join(f"{k}={v:.0f}" for k, v in rng.items() if k.endswith("Mps")), flush=True)

    rows: list[dict[str, Any]] = []
    scale: dict[str, dict[str, float]] = {}  # variant -> measured/prior ratio per op, from the last run config
    calls = args.warmup + args.repeats
    for dim in sorted(args.dims):
        for k in sorted(args.ks):
            for variant in variants:
                if variant in ("codebook-halfexp", "momentum") and k < 2:
                    rows.append({"family": variant, "D": dim, "K": k, "status": "skipped (needs K >= 2)"})
                    continue
                prior = _prior_estimates(variant, dim, k, rng)
                ratio = scale.get(variant, {})
                est = {op: prior[op] * ratio.get(op, 1.0) for op in prior}
                total_est = est["setup"] + calls * (est["project"] + est["synthesize"] + est["full_estimate"])
                tag = f"{variant:17s} D={dim:>10,} K={k:>4}"
                if total_est > args.max_seconds:
                    print(f"[bench] {tag}  skipped (budget): est. {total_est:.1f} s > {args.max_seconds} s", flush=True)
                    rows.append({"family": variant, "D": dim, "K": k, "status": "skipped (budget)",
                                 "estimated_s": total_est})
                    continue
                try:
                    row = run_config(variant, dim, k, device, args, rng)
                except Exception as exc:  # keep going: one broken config should not lose the table
                    print(f"[bench] {tag}  error: {exc!r}", flush=True)
                    rows.append({"family": variant, "D": dim, "K": k, "status": f"error: {type(exc).__name__}"})
                    continue
                row["estimated_s"] = total_est
                rows.append(row)
                scale[variant] = {
                    op: (row[f"{op}_s"] / prior[op]) if prior[op] > 0 and row.get(f"{op}_s") else 1.0
                    for op in ("project", "synthesize", "full_estimate")
                }
                if row.get("setup_s") and prior["setup"] > 0:
                    scale[variant]["setup"] = row["setup_s"] / prior["setup"]
                full = f" full_est {row['full_estimate_s'] * 1e3:8.1f} ms" if "full_estimate_s" in row else ""
                setup = f" setup {row['setup_s']:.2f} s" if row.get("setup_s") else ""
                print(f"[bench] {tag}  project {row['project_s'] * 1e3:8.1f} ms  synthesize "
                      f"{row['synthesize_s'] * 1e3:8.1f} ms{full}{setup}", flush=True)

    meta["total_wall_s"] = time.perf_counter() - wall0
    meta["loadavg_end"] = _loadavg()
    out_md.write_text(render_markdown(meta, rng, rows))
    out_json.write_text(json.dumps({"meta": meta, "rng": rng, "results": rows}, indent=2) + "\n")
    print(f"[bench] wrote {out_md} and {out_json} ({meta['total_wall_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
