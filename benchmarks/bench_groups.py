#!/usr/bin/env python3
"""Reconstruction cost of direction groups (docs/PROTOCOL.md §9.1) versus G.

Per step every rank rebuilds g_hat from the N x K matrix: with G groups that is the
aggregation within each group plus G syntheses (``protocol.groups``), O(G D) for the
sketch, never a K x D matrix (one (D,) accumulator and one (D,) synthesis alive at a time).
For each (family, D, K, G) this times ``aggregate_groups`` + ``synthesize_groups`` (median
of ``--repeats`` after one untimed call) and reports it as a multiple of G = 1, and of one
pass over D floats (``copy_``). On a GPU it also reports the peak memory above the inputs.

  python -m benchmarks.bench_groups                              # tiny GPT-2 D, sketch K = 4096, G = 1..8
  python -m benchmarks.bench_groups --dims 445952,10000000 --ks 437,4096 --groups 1,2,4,8,16
  python -m benchmarks.bench_groups --families sketch,rademacher --ks 64 --dims 100000
  python -m benchmarks.bench_groups --dims 1000 --ks 16 --groups 1,2 --repeats 1   # smoke test

Timings on a shared machine are inflated by other processes; the header records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lightning_holograd.protocol import (
    aggregate_groups,
    direction_seeds,
    genesis_commitment,
    make_aggregator,
    make_family,
    synthesize_groups,
)

_RESULTS = Path(__file__).resolve().parent / "results"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Any, device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, dim: int, k: int, groups: int, world: int, device: torch.device, repeats: int) -> dict:
    """One configuration: ``world`` ranks (at least ``groups``), mean within groups."""
    family, aggregator = make_family(name, dim, k), make_aggregator("mean")
    commitment = genesis_commitment(f"bench_groups/{dim}/{k}")
    seeds = [direction_seeds(commitment, family.num_seeds, group=g) for g in range(groups)]
    matrix = torch.randn(max(world, groups), k, generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> torch.Tensor:
        result = aggregate_groups(aggregator, matrix, (), groups)
        return synthesize_groups(family, result.scalars, result.weights, seeds)

    peak = None
    if device.type == "cuda":
        step()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        peak = torch.cuda.max_memory_allocated(device) - base
    return {"family": name, "D": dim, "K": k, "G": groups, "ranks": max(world, groups),
            "seconds": _median_seconds(step, device, repeats), "peak_bytes": peak}


def render(meta: dict, rows: list[dict], copies: dict[int, float]) -> str:
    lines = ["# Direction groups: reconstruction cost versus G", "",
             f"`{meta['command']}` on {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
             f"{meta['threads']} thread(s), median of {meta['repeats']}, load average {meta['loadavg']}.", "",
             "Time of one step's aggregation within the groups plus the G syntheses, as a multiple of G = 1 "
             "and of one `copy_` of D floats. The sketch should grow about linearly in G (O(G D)).", "",
             "| family | D | K | G | ms | x G=1 | x copy | peak extra memory |", "|---|---|---|---|---|---|---|---|"]
    base = {(r["family"], r["D"], r["K"]): r["seconds"] for r in rows if r["G"] == 1}
    for r in rows:
        ref = base.get((r["family"], r["D"], r["K"]))
        peak = "n/a (CPU)" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 4 / r['D']:.2f} x 4D"
        lines.append(f"| {r['family']} | {r['D']:,} | {r['K']} | {r['G']} | {r['seconds'] * 1e3:.2f} | "
                     f"{r['seconds'] / ref:.2f} | {r['seconds'] / copies[r['D']]:.1f} | {peak} |"
                     if ref else f"| {r['family']} | {r['D']:,} | {r['K']} | {r['G']} | {r['seconds'] * 1e3:.2f} | "
                     f"- | {r['seconds'] / copies[r['D']]:.1f} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=_ints, default=[445_952])
    p.add_argument("--ks", type=_ints, default=[4096])
    p.add_argument("--groups", type=_ints, default=[1, 2, 4, 8])
    p.add_argument("--families", default="sketch", help="comma-separated: sketch, gaussian, rademacher")
    p.add_argument("--ranks", type=int, default=8, help="rows of the matrix (at least G)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="Markdown (default results/groups_<device>.md); JSON next to it")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows, copies = [], {}
    for dim in args.dims:
        src = torch.randn(dim, device=device)
        dst = torch.empty_like(src)
        copies[dim] = _median_seconds(lambda: dst.copy_(src), device, args.repeats)
        for name in args.families.split(","):
            for k in args.ks:
                for groups in args.groups:
                    rows.append(measure(name, dim, k, groups, args.ranks, device, args.repeats))
                    print(f"[bench_groups] {name} D={dim:,} K={k} G={groups}: {rows[-1]['seconds'] * 1e3:.2f} ms",
                          flush=True)
    meta = {"command": "python -m benchmarks.bench_groups " + shlex.join(sys.argv[1:] if argv is None else argv),
            "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
            "repeats": args.repeats, "loadavg": round(os.getloadavg()[0], 2)}
    out_md = Path(args.out) if args.out else _RESULTS / f"groups_{device.type}.md"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(render(meta, rows, copies))
    out_md.with_suffix(".json").write_text(json.dumps({"meta": meta, "copy_s": copies, "results": rows}, indent=2))
    print(f"[bench_groups] wrote {out_md}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
