"""The runs of the network benchmarks and how one of them is run: an N-node torchrun job of
``netbench_worker`` over a fresh ``netns.Cluster``, its rank files combined into one row.

``RUNS`` names every setting of the frontier (the peers and the HoloGrad families); a run's
spec is what ``baselines.build_strategy`` reads, plus ``"family"`` (the frontier's grouping)
and, for settings that need a strategy argument not every checkout has yet, ``"needs"``
(checked by ``missing_features`` before the run starts).
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path
from typing import Any

from benchmarks.harness import read_rank_files, remove_stale, run_metadata
from benchmarks.netns import Cluster

WORKER = "benchmarks.netbench_worker"  # run by torchrun as a module, from the repository root


def holograd_spec(family: str, k: int, **extra: Any) -> dict[str, Any]:
    """A HoloGrad run: ``family`` directions, K = ``k``; ``bootstrap``/``refresh`` add
    ADCBootstrap; ``direction_groups``/``local_steps``/``scalar_bits`` name the family after them."""
    init = {"directions": family, "num_directions": k}
    bootstrap = {key: extra.pop(key) for key in ("bootstrap", "refresh") if key in extra}
    needs = [key for key in ("direction_groups", "local_steps", "scalar_bits", "scalar_block") if key in extra]
    words = {"direction_groups": "groups", "local_steps": "local", "scalar_bits": f"q{extra.get('scalar_bits')}",
             "scalar_block": f"b{extra.get('scalar_block')}"}
    label = "-".join([f"holograd-{family}", *(words[key] for key in needs)])
    if extra.get("inner_state") == "private":  # each rank's own inner state: not verifiable (README "Local steps")
        label += "-private"
    if extra.get("outer_momentum"):  # Nesterov outer momentum: its own family on the frontier
        label += "-nesterov"
    spec = {"kind": "holograd", "family": label, "K": k, "init_args": {**init, **extra}, **bootstrap}
    return {**spec, "needs": needs} if needs else spec


# Ordered: the most informative runs first, so that a --runs subset or an interrupted
# invocation still has the reference and the main families.
PEERS: dict[str, dict[str, Any]] = {
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
}
HOLOGRAD: dict[str, dict[str, Any]] = {
    "sketch-64": holograd_spec("sketch", 64),
    "sketch-256": holograd_spec("sketch", 256),
    "sketch-1024": holograd_spec("sketch", 1024),
    "sketch-4096": holograd_spec("sketch", 4096),
    "sketch-16384": holograd_spec("sketch", 16384),
    "sketch-65536": holograd_spec("sketch", 65536),
    "rademacher-16": holograd_spec("rademacher", 16),
    "rademacher-64": holograd_spec("rademacher", 64),
    "gaussian-16": holograd_spec("gaussian", 16),
    "gaussian-64": holograd_spec("gaussian", 64),
    "momentum-64": holograd_spec("momentum", 64),
    "codebook-64-boot10": holograd_spec("codebook", 64, codebook_rank=64, bootstrap=10),
    "codebook-64-boot10-refresh50": holograd_spec("codebook", 64, codebook_rank=64, bootstrap=10, refresh=50),
    "rademacher-256": holograd_spec("rademacher", 256),
    "gaussian-256": holograd_spec("gaussian", 256),
}
# Independent directions per rank (issue 11 §1) and local steps with a sketched pseudo-gradient
# (§2): strategy arguments `direction_groups` and `local_steps` (README "Direction groups",
# "Local steps"). Payload per rank and step at N = 2: (33 + 4(K + E)) / H bytes, E = 28 AdamW
# statistics with local steps (0 without), i.e. about 1,730x at K = 4096, H = 16 and at
# K = 16384, H = 64, and about 430x at K = 1024 (per step) or K = 16384, H = 16.
SLOWLINK: dict[str, dict[str, Any]] = {
    "sketch-256-perrank": holograd_spec("sketch", 256, direction_groups="per_rank"),
    "sketch-1024-perrank": holograd_spec("sketch", 1024, direction_groups="per_rank"),
    "sketch-4096-perrank": holograd_spec("sketch", 4096, direction_groups="per_rank"),
    "sketch-4096-h16": holograd_spec("sketch", 4096, local_steps=16),  # shared directions: the ablation of §2
    "sketch-4096-perrank-h16": holograd_spec("sketch", 4096, direction_groups="per_rank", local_steps=16),
    "sketch-16384-perrank-h16": holograd_spec("sketch", 16384, direction_groups="per_rank", local_steps=16),
    "sketch-16384-perrank-h64": holograd_spec("sketch", 16384, direction_groups="per_rank", local_steps=64),
    "sketch-65536-perrank-h64": holograd_spec("sketch", 65536, direction_groups="per_rank", local_steps=64),
}
# Quantized scalars (issue 11, README "Quantized scalars"): 4-bit rows with 8x K, at the bytes of
# the float32 run named in the comment (ceil(K / 2) + 4 + 4E bytes against 4(K + E)).
QUANTIZED: dict[str, dict[str, Any]] = {
    "sketch-32768-q4": holograd_spec("sketch", 32768, scalar_bits=4),  # sketch-4096
    "sketch-32768-perrank-q4": holograd_spec("sketch", 32768, direction_groups="per_rank", scalar_bits=4),
    "sketch-32768-perrank-h16-q4": holograd_spec("sketch", 32768, direction_groups="per_rank", local_steps=16,
                                                 scalar_bits=4),  # sketch-4096-perrank-h16
    "sketch-131072-perrank-h64-q4": holograd_spec("sketch", 131072, direction_groups="per_rank", local_steps=64,
                                                  scalar_bits=4),  # sketch-16384-perrank-h64
    # the same bytes per step as sketch-32768-perrank-h16-q4, spent on H = 32 or on 2-bit levels
    "sketch-65536-perrank-h32-q4": holograd_spec("sketch", 65536, direction_groups="per_rank", local_steps=32,
                                                 scalar_bits=4),
    "sketch-65536-perrank-h16-q2": holograd_spec("sketch", 65536, direction_groups="per_rank", local_steps=16,
                                                 scalar_bits=2),
    "sketch-262144-perrank-h128-q4": holograd_spec("sketch", 262144, direction_groups="per_rank", local_steps=128,
                                                   scalar_bits=4),
    # sketch-32768-perrank-h16-q4 with Nesterov outer momentum 0.8 at outer lr 0.2 (the same
    # step, eta / (1 - mu) = 1, on a steady pseudo-gradient): the sketch noise of a round is
    # averaged over ~5 rounds, to 17.5 % of its variance, for a lag of ~4 rounds
    "sketch-32768-perrank-h16-q4-m8": holograd_spec("sketch", 32768, direction_groups="per_rank", local_steps=16,
                                                    scalar_bits=4, outer_lr=0.2, outer_momentum=0.8),
}
# K of the order of D at H = 128-160 and 4 bits, where the count sketch's collisions cost most:
# stratified coordinate sampling (docs/PROTOCOL.md §3.10) at the bytes of
# sketch-262144-perrank-h128-q4 (K/D = 0.59) and at K/D = 0.88 (~1.5x the bytes), and no
# projection at all (identity: every coordinate as a 4-bit scalar, once per 160 steps).
GPT2_TINY_DIM = 445_952  # D of configs/gpt2-tiny-cpu.yaml
LARGE_K: dict[str, dict[str, Any]] = {
    "subsample-262144-perrank-h128-q4": holograd_spec("subsample", 262144, direction_groups="per_rank",
                                                      local_steps=128, scalar_bits=4),
    "subsample-393216-perrank-h128-q4": holograd_spec("subsample", 393216, direction_groups="per_rank",
                                                      local_steps=128, scalar_bits=4),
    "identity-h160-q4": holograd_spec("identity", GPT2_TINY_DIM, local_steps=160, scalar_bits=4),
    # half the K of sketch-262144-perrank-h128-q4 at the same H (2,995x measured): twice its sketch noise
    "sketch-131072-perrank-h128-q4": holograd_spec("sketch", 131072, direction_groups="per_rank", local_steps=128,
                                                   scalar_bits=4),
    # and a quarter of it (5,250x measured): where the trade of K against loss starts to cost
    "sketch-65536-perrank-h128-q4": holograd_spec("sketch", 65536, direction_groups="per_rank", local_steps=128,
                                                  scalar_bits=4),
    # sketch-262144-perrank-h128-q4 again with another genesis seed (other directions and
    # dither, same data): how far the final loss moves with the draw of the directions
    "sketch-262144-perrank-h128-q4-s2": holograd_spec("sketch", 262144, direction_groups="per_rank", local_steps=128,
                                                      scalar_bits=4, seed="holograd-2"),
}
# The race's short-period settings: K/D = 0.59 (as sketch-262144-perrank-h128-q4) synced every 16
# or 32 steps, ~220x and ~440x in payload: on a link where a round's 131 KB cost little, fewer
# local steps should need fewer steps to DDP's loss (the counterparts of localsgd-h16, diloco-h16).
SHORT_PERIOD: dict[str, dict[str, Any]] = {
    "sketch-262144-perrank-h16-q4": holograd_spec("sketch", 262144, direction_groups="per_rank", local_steps=16,
                                                  scalar_bits=4),
    "sketch-262144-perrank-h32-q4": holograd_spec("sketch", 262144, direction_groups="per_rank", local_steps=32,
                                                  scalar_bits=4),
    # no projection noise at all: every coordinate as an 8-bit scalar every 16 steps (1 byte of
    # the 4 local SGD averages per coordinate, so ~4x fewer bytes than localsgd-h16)
    "identity-h16-q8": holograd_spec("identity", GPT2_TINY_DIM, local_steps=16, scalar_bits=8),
    # the same two with each rank's own AdamW state kept from round to round, as local SGD keeps
    # it (inner_state="private": no public statistics, and no verifier can replay a round)
    "identity-h16-q8-private": holograd_spec("identity", GPT2_TINY_DIM, local_steps=16, scalar_bits=8,
                                             inner_state="private"),
    "sketch-262144-perrank-h16-q4-private": holograd_spec("sketch", 262144, direction_groups="per_rank",
                                                          local_steps=16, scalar_bits=4, inner_state="private"),
    # and with 4 inner steps: closer to DDP's steps to target, 4x the bytes of H = 16 (~55x)
    "sketch-262144-perrank-h4-q4-private": holograd_spec("sketch", 262144, direction_groups="per_rank",
                                                         local_steps=4, scalar_bits=4, inner_state="private"),
    # no local steps and no projection: every gradient coordinate as an 8-bit scalar every step
    # (4x fewer bytes than DDP, 2x fewer than the bf16 hook, DDP's steps up to the rounding)
    "identity-q8": holograd_spec("identity", GPT2_TINY_DIM, scalar_bits=8),
    # the same in 4 bits: 8x fewer bytes than DDP, 4x fewer than the bf16 hook
    "identity-q4": holograd_spec("identity", GPT2_TINY_DIM, scalar_bits=4),
    # 4 bits with one scale per 256 coordinates (scalar_block=256): 7.8x fewer bytes than DDP
    "identity-q4-b256": holograd_spec("identity", GPT2_TINY_DIM, scalar_bits=4, scalar_block=256),
    # private inner state at >= 1000x (about 1 KB per rank and step, ~1,750x DDP's bytes): fewer
    # directions, a longer period or fewer bits per scalar, each against the H = 16, K = 262144 run
    "sketch-65536-perrank-h32-q4-private": holograd_spec("sketch", 65536, direction_groups="per_rank",
                                                         local_steps=32, scalar_bits=4, inner_state="private"),
    "sketch-65536-perrank-h16-q2-private": holograd_spec("sketch", 65536, direction_groups="per_rank",
                                                         local_steps=16, scalar_bits=2, inner_state="private"),
    "sketch-131072-perrank-h64-q4-private": holograd_spec("sketch", 131072, direction_groups="per_rank",
                                                          local_steps=64, scalar_bits=4, inner_state="private"),
    # the best verifiable >= 1000x run (sketch-262144-perrank-h128-q4, 1.043x) with each rank's own
    # AdamW state kept: at H = 128 the public round start resets Adam's moments 24 times a run
    "sketch-262144-perrank-h128-q4-private": holograd_spec("sketch", 262144, direction_groups="per_rank",
                                                           local_steps=128, scalar_bits=4, inner_state="private"),
    # the same with another genesis seed, at the lr swept for it ("lr_as"): the draw's spread
    "sketch-262144-perrank-h128-q4-private-s2": {
        **holograd_spec("sketch", 262144, direction_groups="per_rank", local_steps=128, scalar_bits=4,
                        inner_state="private", seed="holograd-2"),
        "lr_as": "sketch-262144-perrank-h128-q4-private"},
}
# Outer Nesterov momentum mu at outer lr 1 - mu (so eta / (1 - mu) = 1: a steady pseudo-gradient
# moves the parameters as plain averaging does). The directions are drawn afresh every round, so
# the sketch noise of successive rounds is independent and the velocity averages it: in steady
# state its variance falls to (1 - mu) / (1 + mu) of plain averaging's (11 % at mu = 0.8, 5 % at
# 0.9), for a lag of about 1 / (1 - mu) rounds.
OUTER_MOMENTUM: dict[str, dict[str, Any]] = {
    "sketch-65536-perrank-h32-q4-private-m8": holograd_spec("sketch", 65536, direction_groups="per_rank",
                                                            local_steps=32, scalar_bits=4, inner_state="private",
                                                            outer_lr=0.2, outer_momentum=0.8),
    "sketch-65536-perrank-h32-q4-private-m9": holograd_spec("sketch", 65536, direction_groups="per_rank",
                                                            local_steps=32, scalar_bits=4, inner_state="private",
                                                            outer_lr=0.1, outer_momentum=0.9),
    "sketch-49152-perrank-h16-q4-private-m9": holograd_spec("sketch", 49152, direction_groups="per_rank",
                                                            local_steps=16, scalar_bits=4, inner_state="private",
                                                            outer_lr=0.1, outer_momentum=0.9),
    # the velocity in pseudo-gradient per unit of inner lr (outer_momentum_units="lr_normalized"):
    # at m8 the velocity led by up to 0.05 nats mid-run, then lost it as the inner lr decayed,
    # its older, larger pseudo-gradients still in it; this one scales them with the schedule
    "sketch-65536-perrank-h32-q4-private-m8n": holograd_spec("sketch", 65536, direction_groups="per_rank",
                                                             local_steps=32, scalar_bits=4, inner_state="private",
                                                             outer_lr=0.2, outer_momentum=0.8,
                                                             outer_momentum_units="lr_normalized"),
    "sketch-65536-perrank-h32-q4-private-m9n": holograd_spec("sketch", 65536, direction_groups="per_rank",
                                                             local_steps=32, scalar_bits=4, inner_state="private",
                                                             outer_lr=0.1, outer_momentum=0.9,
                                                             outer_momentum_units="lr_normalized"),
}
# Peers at a longer period, the counterpart of the H = 128 HoloGrad setting (not in the profiles).
LONG_PERIOD_PEERS: dict[str, dict[str, Any]] = {
    "localsgd-h128": {"kind": "localsgd", "period": 128, "family": "localsgd"},
}


# A long-run learning-rate check. The sweep picks each run's lr on 300 steps, where an H = 128 run
# has synced twice; these runs take a fixed multiplier instead of the sweep's best ("lr_fixed"),
# each in its own "-lr-long" family so that the sweep-chosen numbers stay the headline. Measured
# (2 ranks): 1x ended at 1.2693 and 0.35x at 1.3062, both above the swept 0.5x (1.2447), so the
# sweep's choice holds. Were one to gain, DDP's runs at the same multiplier (ddp-lr1, ddp-lr0.35)
# say whether the gain is HoloGrad's or the schedule's.
def _lr_long(spec: dict[str, Any], scale: float) -> dict[str, Any]:
    return {**spec, "family": f"{spec['family']}-lr-long", "lr_fixed": scale}


_PRIVATE_H128 = "sketch-262144-perrank-h128-q4-private"
LR_LONG: dict[str, dict[str, Any]] = {
    f"{_PRIVATE_H128}-lr1": _lr_long(SHORT_PERIOD[_PRIVATE_H128], 1.0),
    f"{_PRIVATE_H128}-lr0.35": _lr_long(SHORT_PERIOD[_PRIVATE_H128], 0.35),
    "ddp-lr1": _lr_long(PEERS["ddp"], 1.0),
    "ddp-lr0.35": _lr_long(PEERS["ddp"], 0.35),
}


# Outer extrapolation without momentum: the H = 128, K = 262144, 4-bit run, private or
# verifiable, with the averaged pseudo-gradient applied at an outer lr above 1 (its inner lr the
# one swept for the outer-lr-1 run, "lr_as"). Averaging N ranks' inner trajectories shortens the
# step along directions they disagree on; a step longer than the average takes some of that back
# (and scales the sketch noise by the same factor). "-s2"/"-s3": other draws of the directions.
def _outer_lr(base: str, family: str, outer_lr: float, seed: str | None, **extra: Any) -> dict[str, Any]:
    draw = {"seed": seed} if seed else {}
    spec = holograd_spec("sketch", 262144, direction_groups="per_rank", local_steps=128, scalar_bits=4,
                         outer_lr=outer_lr, **extra, **draw)
    return {**spec, "family": family, "lr_as": base}


_SEEDS = {"": None, "-s2": "holograd-2", "-s3": "holograd-3"}
OUTER_LR: dict[str, dict[str, Any]] = {
    **{f"{_PRIVATE_H128}-o{tag}{draw}": _outer_lr(_PRIVATE_H128, "holograd-sketch-groups-local-q4-private-outer-lr",
                                                   lr, _SEEDS[draw], inner_state="private")
       for tag, lr, draws in (("11", 1.1, [""]), ("125", 1.25, ["", "-s2", "-s3"]), ("15", 1.5, [""]))
       for draw in draws},
    **{f"sketch-262144-perrank-h128-q4-o125{draw}": _outer_lr("sketch-262144-perrank-h128-q4",
                                                              "holograd-sketch-groups-local-q4-outer-lr", 1.25,
                                                              _SEEDS[draw])
       for draw in ("", "-s2")},
}
RUNS: dict[str, dict[str, Any]] = {**PEERS, **HOLOGRAD, **SLOWLINK, **QUANTIZED, **LARGE_K, **SHORT_PERIOD,
                                   **OUTER_MOMENTUM, **LONG_PERIOD_PEERS, **LR_LONG, **OUTER_LR}
SHORT_RUNS = [*PEERS, *HOLOGRAD]  # the 300-step frontier of results/frontier_cpu.md
# The long frontier: every peer, the sketch over K, the cheaper dense families, momentum, one
# codebook, and the slowlink settings (gaussian/rademacher at K = 256 cost 5-10x DDP's step).
LONG_RUNS = [*PEERS, "sketch-64", "sketch-256", "sketch-1024", "sketch-4096", "sketch-16384", "sketch-65536",
             "rademacher-64", "gaussian-64", "momentum-64", "codebook-64-boot10-refresh50", *SLOWLINK]
SMOKE_RUNS = ["ddp", "sketch-256"]
REFERENCE = "ddp"
LAST_REFERENCE = "ddp-last"  # DDP again at the end: the two give the noise level of the ratios


def spec_of(name: str) -> dict[str, Any]:
    return RUNS[REFERENCE] if name == LAST_REFERENCE else RUNS[name]


def with_lr(name: str, scales: dict[str, float]) -> dict[str, Any]:
    """The run's spec with its learning-rate multiplier: the sweep's best (of the run named by
    ``"lr_as"`` where the spec has one), a fixed ``"lr_fixed"``, or 1 (marked "not swept" when
    there is a sweep but it has no successful run of this one)."""
    base = REFERENCE if name == LAST_REFERENCE else name
    spec = spec_of(name)
    if "lr_fixed" in spec:  # a long-run lr check: its own multiplier, whatever the sweep says
        return {**spec, "lr_scale": spec["lr_fixed"]}
    base = spec.get("lr_as", base)  # a twin of a swept run (another seed) takes that run's lr
    if base in scales:
        return {**spec, "lr_scale": scales[base]}
    return {**spec, "lr_swept": False} if scales else dict(spec)


def label(r: dict[str, Any]) -> str:
    """A run's setting in a few characters: K (and bootstrap, groups, H), rank or H; and its
    learning-rate multiplier where it is not 1."""
    text = _setting(r["spec"])
    scale = r["spec"].get("lr_scale", 1.0)
    if "lr_fixed" in r["spec"]:
        return f"{text}, lr x{scale:g} (fixed: long-run check)"
    if r["spec"].get("lr_swept") is False:
        return f"{text}, lr x1 (not swept)"
    return text if scale == 1.0 else f"{text}, lr x{scale:g}"


def _setting(spec: dict[str, Any]) -> str:
    if spec.get("K"):
        init = spec.get("init_args", {})
        extra = [f"boot {spec['bootstrap']}" if spec.get("bootstrap") else "",
                 f"refresh {spec['refresh']}" if spec.get("refresh") else "",
                 f"groups {init['direction_groups']}" if init.get("direction_groups") else "",
                 f"H={init['local_steps']}" if init.get("local_steps") else "",
                 f"{init['scalar_bits']} bits" if init.get("scalar_bits") else "",
                 f"inner state {init['inner_state']}" if init.get("inner_state") else "",
                 (f"outer lr {init.get('outer_lr', 1.0):g} momentum {init['outer_momentum']:g}"
                  if init.get("outer_momentum") else
                  f"outer lr {init['outer_lr']:g}" if init.get("outer_lr", 1.0) != 1.0 else ""),
                 "velocity per unit lr" if init.get("outer_momentum_units") == "lr_normalized" else ""]
        return ", ".join([f"K={spec['K']}", *(e for e in extra if e)])
    if spec.get("rank"):
        return f"rank {spec['rank']}"
    if spec.get("period"):
        return f"H={spec['period']}"
    return "-"


def missing_features(spec: dict[str, Any]) -> list[str]:
    """The strategy arguments ``spec`` needs that this checkout's HoloGradStrategy lacks."""
    if not spec.get("needs"):
        return []
    from lightning_holograd import HoloGradStrategy

    accepted = set(inspect.signature(HoloGradStrategy.__init__).parameters)
    return [key for key in spec["needs"] if key not in accepted]


def network_metadata(module: str, argv: list[str] | None, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """``run_metadata`` with the settings every network benchmark shares (steps, validation,
    ranks, corpus); ``extra`` adds the benchmark's own."""
    return run_metadata(module, argv, profile=args.profile, steps=args.steps, val_every=args.val_every,
                        val_batches=args.val_batches, warmup=args.warmup, num_nodes=args.ranks,
                        max_bytes=args.max_bytes, **extra)


def worker_args(name: str, spec: dict[str, Any], args: argparse.Namespace, out_dir: Path) -> list[str]:
    """The worker's command line for run ``name`` under the invocation's settings ``args``."""
    out = ["--spec", json.dumps({**spec, "name": name}), "--out", str(out_dir), "--steps", str(args.steps),
           "--val-every", str(args.val_every), "--val-batches", str(args.val_batches), "--warmup", str(args.warmup)]
    for option in ("schedule_steps", "target", "time_cap", "batch_size", "max_bytes"):
        value = getattr(args, option, None)
        if value is not None:
            out += [f"--{option.replace('_', '-')}", str(value)]
    return out


def run_one(name: str, spec: dict[str, Any], args: argparse.Namespace, out_dir: Path, rate: str | None = None,
            num_nodes: int = 2, tag: str = "frontier") -> dict[str, Any]:
    """One run as an N-node torchrun job over a fresh cluster (``rate``: tbf shaping)."""
    missing = missing_features(spec)
    if missing:
        print(f"[{tag}] {name}: skipped, HoloGradStrategy has no {missing} in this checkout", flush=True)
        return {"run": name, "family": spec["family"], "spec": spec, "status": f"pending (needs {', '.join(missing)})"}
    remove_stale(out_dir, f"{name}_rank*.json")
    with Cluster(num_nodes=num_nodes, rate=rate) as cluster:
        job = cluster.run_torchrun(WORKER, worker_args(name, spec, args, out_dir), timeout=args.timeout,
                                   port=args.port)
    row = combine_ranks(name, spec, job, read_rank_files(out_dir, name, num_nodes), num_nodes)
    print(f"[{tag}] {summary(row)}", flush=True)
    return row


def summary(row: dict[str, Any]) -> str:
    """One line about a finished run; when it failed, the error and the output tail of each
    node that did not exit with 0 (rank 0's when none did)."""
    if row["status"] != "ok":
        tails, codes = row.get("output_tails", [""]), row.get("returncodes", [])
        bad = [i for i, c in enumerate(codes) if c != 0] or [0]
        shown = "\n".join(f"--- node {i} (rc={codes[i] if i < len(codes) else '?'}):\n{tails[i][-2000:]}"
                          for i in bad if i < len(tails))
        return f"{row['run']}: {row['status']}\n{shown}"
    val = "" if row["final_val_loss"] is None else f"val {row['final_val_loss']:.4f} (best {row['best_val_loss']:.4f})  "
    return (f"{row['run']:30s} {val}{row['bytes_per_step']:>12,.0f} B/step  step {row['step_median_s'] * 1e3:6.1f} ms  "
            f"RSS {row['peak_rss_mb']:.0f} MB  ({row['wall_s']:.0f} s)")


def combine_ranks(name: str, spec: dict[str, Any], job: dict[str, Any], ranks: list[dict[str, Any]],
                  num_nodes: int) -> dict[str, Any]:
    """One row from the rank files: the validation loss of rank 0 (synced across ranks), and
    per step or check the max over ranks of time and bytes (the slowest, busiest rank)."""
    row: dict[str, Any] = {"run": name, "family": spec["family"], "spec": spec, "wall_s": job["wall_s"],
                           "job_tx_bytes": job["job_tx_bytes"], "returncodes": job["returncodes"]}
    if job["returncodes"] != [0] * num_nodes or len(ranks) != num_nodes:
        row["status"] = f"error (rc={job['returncodes']}, {len(ranks)}/{num_nodes} rank files)"
        row["output_tails"] = job["output_tails"]
        return row
    r0 = ranks[0]
    curve = [{"step": points[0]["step"], "val_loss": points[0]["val_loss"],
              "train_s": max(p["train_s"] for p in points), "bytes": max(p["bytes"] for p in points)}
             for points in zip(*(r["curve"] for r in ranks))]
    sent = [r["bytes_sent_train"] for r in ranks]
    row.update({
        "status": "ok", "world_size": num_nodes, "D": r0["num_params"], "steps": r0["global_step"], "curve": curve,
        "final_val_loss": curve[-1]["val_loss"] if curve else None,
        "best_val_loss": min(p["val_loss"] for p in curve) if curve else None,
        "bytes_train_per_rank": max(sent), "bytes_train_by_rank": sent,
        "bytes_per_step": max(sent) / r0["global_step"],
        "bytes_per_step_after_warmup": max(r["bytes_per_step_after_warmup"] for r in ranks),
        "bytes_per_step_after_warmup_by_rank": [r["bytes_per_step_after_warmup"] for r in ranks],
        "step_median_s": max(r["step_median_s"] for r in ranks),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "holograd_meter_wire": r0.get("holograd_meter_wire"),
    })
    return row
