#!/usr/bin/env python3
"""Byzantine robustness table: every attack x defence with 1 of N = 4 ranks lying.

Task (``lightning_holograd.demos.ToyModule``, as in the tests): a 2-layer MLP (8 -> 16 -> 2, D = 178) regresses y = W* x + noise on 256 fixed samples,
batch 16 per rank, SGD lr 0.05, HoloGrad with Gaussian directions, K = 64, 4 ranks on
CPU (fork launcher, gloo), ``--steps`` optimizer steps. Rank ``--attacker`` (default 3)
runs ``ByzantineSimulator`` from step 0; rank 0 records the loss on the full dataset
after every step (identical replicas, so any rank's parameters are the model's).

Defences (columns): mean, median, trimmed_mean (tau = 0.25: with N = 4 it cuts one
value at each end of every direction), krum and mean+clip (mean after clipping rows to
the median row norm). Krum with f Byzantine rows needs N >= 2f + 3, so with N = 4 it
runs with ``krum_byzantine = 0`` (score = squared distances to the N - 2 = 2 nearest
rows); that is recorded in the header.

Rows: the clean run, then every attack; ``name=value`` sets that attack's strength (scale
c, alie z, ipm epsilon) for its row, e.g. ``alie=20``. Cells: final (and best) full-dataset loss as a
ratio to the clean run with mean aggregation; the JSON keeps absolute values and the
loss curve of every run.

Verification column (on by default, ``--no-verifier`` drops it): ``ProofVerifier(p_verify=
--p-verify)`` in one more column, "mean+verify" (mean aggregation, attacker not a
verifier rank); ``--evasive`` makes the attacker lie only when its claim would not be
drawn (``only_unverified=True``, an omniscient attacker).

Examples:
  python -m benchmarks.bench_byzantine                  # the committed table, ~2-3 min on 2 CPU cores
  python -m benchmarks.bench_byzantine --attacks scale,alie --defences mean,median --steps 32
  python -m benchmarks.bench_byzantine --evasive --p-verify 0.25
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # forked ranks must not inherit an OpenMP pool

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import lightning_holograd  # noqa: E402
from lightning_holograd import ByzantineSimulator, HoloGradStrategy  # noqa: E402
from benchmarks.harness import (RESULTS, finish_metadata, make_parser, read_report,  # noqa: E402
                                run_metadata, write_report)
from lightning_holograd.demos import ToyModule, free_port, make_dataset  # noqa: E402

ATTACKS = ("random", "scale", "sign_flip", "alie", "ipm")
STRENGTH = {"scale": "scale", "alie": "alie_z", "ipm": "ipm_epsilon"}  # what "name=value" sets
DEFAULT_ATTACKS = "random,scale,sign_flip,alie,ipm,alie=20,ipm=2"  # the last two: strengths the tests use
DEFENCES = {  # column -> HoloGradConfig fields
    "mean": {"aggregation": "mean"},
    "median": {"aggregation": "median"},
    "trimmed_mean": {"aggregation": "trimmed_mean", "trim_ratio": 0.25},
    "krum": {"aggregation": "krum", "krum_byzantine": 0},
    "mean+clip": {"aggregation": "mean", "clip_row_norms": True},
}
VERIFY_COLUMN = "mean+verify"  # dropped by --no-verifier
WORLD_SIZE = 4


# -- the task: lightning_holograd.demos.ToyModule -----------------------------------------
class RecordFullLoss(L.Callback):
    """Rank 0: full-dataset loss before training and after every optimizer step -> ``path``."""

    def __init__(self, path: Path) -> None:
        self.path, self.losses = path, []
        self.x, self.y = make_dataset().tensors

    @torch.no_grad()
    def _record(self, pl_module: L.LightningModule) -> None:
        self.losses.append(float(nn.functional.mse_loss(pl_module.net(self.x), self.y)))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._record(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        slashed = sorted(trainer.strategy.exchange.slashing.slashed)
        if trainer.global_rank == 0:
            self.path.write_text(json.dumps({"losses": self.losses, "slashed": slashed}))


# -- one run ------------------------------------------------------------------------------------
def holograd(**fields: Any) -> HoloGradStrategy:
    """Gaussian K = 64 HoloGrad with any further strategy argument."""
    return HoloGradStrategy(**{"start_method": "fork", "directions": "gaussian", "num_directions": 64,
                               "audit_every": 0, **fields})


def run_one(defence: str, attack: str | None, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    fields = dict(DEFENCES.get(defence, DEFENCES["mean"]))
    record = workdir / f"{defence}-{attack or 'clean'}.json"
    callbacks: list[L.Callback] = [RecordFullLoss(record)]
    if defence == VERIFY_COLUMN:
        callbacks.append(lightning_holograd.ProofVerifier(p_verify=args.p_verify))
    if attack is not None:
        name, _, strength = attack.partition("=")
        kwargs = {"scale": args.scale, "alie_z": args.alie_z, "ipm_epsilon": args.ipm_epsilon}
        if strength:
            kwargs[STRENGTH[name]] = float(strength)
        evasive = defence == VERIFY_COLUMN and args.evasive
        callbacks.append(ByzantineSimulator([args.attacker], name, only_unverified=evasive,
                                            p_verify=args.p_verify if evasive else 0.0, **kwargs))
    os.environ["MASTER_PORT"] = str(free_port())  # fresh rendezvous per fit (see lightning_holograd.demos.fit)
    start = time.perf_counter()
    trainer = L.Trainer(accelerator="cpu", devices=WORLD_SIZE, strategy=holograd(**fields), callbacks=callbacks,
                        max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ToyModule())
    outcome = json.loads(record.read_text())
    losses = outcome["losses"]
    return {"defence": defence, "attack": attack or "clean", "final": losses[-1], "best": min(losses),
            "initial": losses[0], "slashed": outcome["slashed"], "seconds": time.perf_counter() - start,
            "curve": losses}


# -- report ------------------------------------------------------------------------------------
_STRENGTH_SYMBOL = {"scale": "c", "alie": "z", "ipm": "epsilon"}


def _cell(value: float) -> str:
    return f"{value:.3g}" if value < 1e4 else f"{value:.2e}"


def markdown(results: list[dict[str, Any]], defences: list[str], attacks: list[str], meta: dict[str, Any]) -> str:
    reference = next(r for r in results if r["defence"] == "mean" and r["attack"] == "clean")
    cells = {(r["attack"], r["defence"]): r for r in results}
    lines = [
        "# Byzantine robustness on CPU: 1 of 4 ranks lying",
        "",
        f"- command: `{meta['command']}`" + (f"; commit `{meta['commit']}`" if meta.get("commit") else ""),
        f"- torch {meta['torch']}, lightning {meta['lightning']}, python {meta['python']}, date {meta['date']}",
        f"- task: MLP 8-16-2 (D = 178) regression, 256 samples, batch 16 per rank, SGD lr 0.05, "
        f"gaussian directions K = 64, N = 4 ranks, {meta['steps']} steps; attacker rank {meta['attacker']} "
        "lies from step 0",
        f"- attacks: scale c = {meta['scale']}, alie z = {meta['alie_z']}, ipm epsilon = {meta['ipm_epsilon']} "
        "unless the row says `name=value`; random = Gaussian with the honest row's RMS",
        "- defences: trimmed_mean tau = 0.25; krum with f = 0 (f = 1 needs N >= 5); mean+clip = rows clipped "
        "to the median row norm, then mean" + (f"; mean+verify = ProofVerifier(p_verify={meta['p_verify']})"
                                              f"{', evasive attacker' if meta['evasive'] else ''}"
                                              if VERIFY_COLUMN in defences else ""),
        f"- reference: clean run with mean aggregation, final loss {reference['final']:.4g} "
        f"(initial {reference['initial']:.4g}); total wall {meta.get('total_wall_s', meta.get('wall_s')):.0f} s",
        "",
    ]
    for key, title in (("final", "Final"), ("best", "Best")):
        lines += [f"{title} full-dataset loss / clean mean {key} loss ({reference[key]:.4g}); "
                  "lower is better, 1.0 = no harm", "",
                  "| attack | " + " | ".join(defences) + " |", "|---|" + "---:|" * len(defences)]
        for attack in ["clean", *attacks]:
            row = [_cell(cells[(attack, d)][key] / reference[key]) for d in defences]
            label = attack if "=" not in attack else attack.replace("=", f" {_STRENGTH_SYMBOL[attack.split('=')[0]]}=")
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        lines.append("")
    slashed = [r for r in results if r.get("slashed", r.get("excluded"))]  # "excluded" in older JSON
    if slashed:
        lines.append("Ranks slashed by the end: " + ", ".join(
            f"{r['attack']}/{r['defence']}: {r.get('slashed', r.get('excluded'))}" for r in slashed) + ".")
        lines.append("")
    return "\n".join(lines)


def _valid_attack(spec: str) -> bool:
    name, sep, strength = spec.partition("=")
    if not sep:
        return name in ATTACKS
    try:
        float(strength)
    except ValueError:
        return False
    return name in STRENGTH


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser(__doc__)
    parser.add_argument("--attacks", default=DEFAULT_ATTACKS,
                        help=f"comma-separated, each one of {','.join(ATTACKS)}, or name=strength for "
                             f"{','.join(STRENGTH)}")
    parser.add_argument("--defences", default=",".join(DEFENCES),
                        help="comma-separated subset of " + ",".join(DEFENCES))
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--attacker", type=int, default=3, help="the Byzantine rank (not 0: rank 0 verifies)")
    parser.add_argument("--scale", type=float, default=-4.0)
    parser.add_argument("--alie-z", type=float, default=1.5)
    parser.add_argument("--ipm-epsilon", type=float, default=0.5)
    parser.add_argument("--no-verifier", action="store_true", help=f"drop the '{VERIFY_COLUMN}' column")
    parser.add_argument("--p-verify", type=float, default=0.25)
    parser.add_argument("--evasive", action="store_true", help="only_unverified attacker in the verify column")
    parser.add_argument("--out", type=Path, default=RESULTS / "byzantine_cpu.md")
    parser.add_argument("--report-only", action="store_true", help="rebuild the tables from the JSON")
    args = parser.parse_args(argv)
    args.with_verifier = not args.no_verifier
    args.attack_list = [a for a in args.attacks.split(",") if a]
    args.defence_list = [d for d in args.defences.split(",") if d]
    unknown = [a for a in args.attack_list if not _valid_attack(a)]
    unknown += [d for d in args.defence_list if d not in DEFENCES]
    if unknown:
        parser.error(f"unknown attacks/defences {unknown}")
    if "mean" not in args.defence_list:
        args.defence_list.insert(0, "mean")  # the reference column
    if args.with_verifier:
        if args.attacker == 0:
            parser.error("--attacker must not be 0, the verifier rank (or pass --no-verifier).")
        args.defence_list.append(VERIFY_COLUMN)
    elif args.evasive:
        parser.error("--evasive needs the verify column (drop --no-verifier).")
    return args


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for attack in [None, *args.attack_list]:
            for defence in args.defence_list:
                result = run_one(defence, attack, args, Path(tmp))
                results.append(result)
                print(f"{result['attack']:>10} {defence:>13}: final {result['final']:.4g} best {result['best']:.4g} "
                      f"({result['seconds']:.1f} s)", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report_only:
        payload = read_report(args.out)
        meta, results = payload["meta"], payload["results"]
        attacks = list(dict.fromkeys(r["attack"] for r in results if r["attack"] != "clean"))
        write_report(args.out, markdown(results, list(meta["defences"]), attacks, meta), payload)
        return
    torch.set_num_threads(1)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    meta = run_metadata(
        "bench_byzantine", argv, steps=args.steps, attacker=args.attacker, scale=args.scale, alie_z=args.alie_z,
        ipm_epsilon=args.ipm_epsilon, p_verify=args.p_verify, evasive=args.evasive, world_size=WORLD_SIZE,
        defences={d: DEFENCES.get(d, {"aggregation": "mean", "verifier": True}) for d in args.defence_list})
    results = run_all(args)
    finish_metadata(meta, start)
    write_report(args.out, markdown(results, args.defence_list, args.attack_list, meta),
                 {"meta": meta, "results": results})
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
