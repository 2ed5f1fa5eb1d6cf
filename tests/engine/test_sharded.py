"""The sharded and all_reduce aggregation paths against the all_gather path, with real gloo
ranks (forked processes, no Lightning): docs/PROTOCOL.md §4.5.

Each rank runs the same steps through two exchanges side by side, one per path, on the same
rows: a row per rank and step from a private generator, with a non-finite row at one step
and a slashed rank from another, so that the kept set, the owner reassignment and the
non-finite flag are all exercised. The sharded path must give bitwise the all_gather path's
aggregate and estimate, with review hooks (row commitments gathered) and without them
("sharded_bare": the flag rides in the all_to_all; at N = 2 "sharded" has no hooks either); the all_reduce path the mean of the kept rows up to the summation
order (so its chain, which records the aggregate, soon takes other seeds).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_holograd.demos import free_port
from lightning_holograd.engine import Comm, HoloGradExchange, NonFiniteError, TrafficMeter
from lightning_holograd.protocol import (
    CommitmentChain,
    Reason,
    make_aggregator,
    make_family,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]

DIM, K, STEPS = 64, 13, 3  # K not a multiple of N: blocks of unequal width, empty ones at N = 8 > K / 2
NONFINITE = (2, 1)  # (step, rank): this rank's row holds a NaN at that step
SLASH = (3, 2)  # (step, rank): this rank is slashed in the review of that step (N >= 3)
AGGREGATIONS = ("mean", "median", "trimmed_mean")


def _exchange(aggregation: str, path: str, world: int, a2a: str) -> HoloGradExchange:
    family = make_family("sketch", DIM, K)
    aggregator = make_aggregator(aggregation, trim_ratio=0.25)
    comm = Comm(TrafficMeter(world, DIM), all_to_all=a2a)
    exchange = HoloGradExchange(family, aggregator, CommitmentChain("sharded-test"), comm,
                                aggregation_path=path.replace("sharded_bare", "sharded"))
    if world >= 3 and path in ("all_gather", "sharded"):
        def review(ctx):
            if ctx.step >= SLASH[0]:
                exchange.slashing.slash(SLASH[1], Reason.MISMATCH, ctx.step)
        exchange.review_hooks.append(review)
    return exchange


def _row(rank: int, step: int, seeds: list[int], family) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    row = family.project(torch.randn(DIM, generator=gen), seeds)
    if (step, rank) == NONFINITE:
        row[3] = float("nan")
    return row


def _run_paths(rank: int, world: int, aggregation: str, a2a: str) -> dict:
    paths = (["all_gather", "sharded"] + (["sharded_bare"] if world >= 3 else [])
             + (["all_reduce"] if aggregation == "mean" else []))
    exchanges = {p: _exchange(aggregation, p, world, a2a) for p in paths}
    out = {p: [] for p in paths}
    for step in range(1, STEPS + 1):
        for path, ex in exchanges.items():
            if path in ("all_reduce", "sharded_bare") and world >= 3 and step == SLASH[0]:  # no review hooks
                ex.slashing.slash(SLASH[1], Reason.MISMATCH, step)
            estimate = ex.step(f"{rank}/{step}".encode().ljust(32, b"."),
                               lambda seeds, ex=ex, step=step: _row(rank, step, seeds, ex.family))
            out[path].append((ex.last_context.result.scalars.clone(), estimate.clone(),
                              ex.traffic.step_wire(), ex.last_context.local_scalars.clone()))
    return out


@contextmanager
def gloo_rank(rank: int, world: int, port: int, out_dir: str) -> Iterator[None]:
    """One rank's gloo group on loopback for the body; a failure's traceback is written to
    ``rank<r>.err`` (``_launch`` shows it) and re-raised; the group is destroyed on exit."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, world, port, out_dir):
        results = {(agg, a2a): _run_paths(rank, world, agg, a2a)
                   for agg in AGGREGATIONS for a2a in ("collective", "p2p")}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _all_nan_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Every rank's row is NaN at step 1 on each sharded variant: each must raise NonFiniteError."""
    with gloo_rank(rank, world, port, out_dir):
        outcome = {}
        for path in ("sharded", "sharded_bare"):
            ex = _exchange("median", path, world, "auto")
            try:
                ex.step(f"{rank}".encode().ljust(32, b"."), lambda seeds: torch.full((K,), float("nan")))
                outcome[path] = "no error"
            except NonFiniteError as error:
                outcome[path] = str(error)
        torch.save(outcome, Path(out_dir) / f"rank{rank}.pt")


def _launch(world: int, tmp_path: Path, worker=_worker) -> list[dict]:
    try:
        mp.start_processes(worker, args=(world, free_port(), str(tmp_path)), nprocs=world, start_method="fork")
    except Exception:
        errors = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.err")))
        raise AssertionError(f"a rank failed:\n{errors}") from None
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _wire_formula(world: int) -> dict[str, float]:
    """Wire bytes per rank and step of rank 0 on each path with nobody slashed (docs/PROTOCOL.md §8):
    rank 0 owns a full block of b columns and sends the other K - b to their owners; with
    review hooks (N >= 3 here) it gathers its 33-byte row commitment, without them it sends
    its 4-byte flag in each all_to_all message."""
    block = -(-K // world)
    bare = (world - 1) * (33 + 4 + 4 * block) + 4 * (K - block)
    return {"all_gather": (world - 1) * (33 + 4 * K),
            "sharded": (world - 1) * (33 + 33 + 4 * block) + 4 * (K - block) if world >= 3 else bare,
            "sharded_bare": bare,
            "all_reduce": (world - 1) * 33 + 2 * (world - 1) / world * 4 * (K + 1)}


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_sharded_is_bitwise_the_all_gather_path(world, tmp_path):
    ranks = _launch(world, tmp_path)
    for key, by_path in ranks[0].items():
        reference = by_path["all_gather"]
        for path, steps in by_path.items():
            for step, (scalars, estimate, wire, _) in enumerate(steps, start=1):
                for other in ranks[1:]:  # every rank holds the same aggregate and estimate
                    assert torch.equal(other[key][path][step - 1][1], estimate), (key, path, step)
                if path.startswith("sharded"):
                    assert torch.equal(scalars, reference[step - 1][0]), (key, step, scalars, reference[step - 1][0])
                    assert torch.equal(estimate, reference[step - 1][1]), (key, step)
                elif path == "all_reduce":  # the mean of the kept rows, summed in the backend's order
                    rows = [other[key][path][step - 1][3] for other in ranks]
                    kept = [r for r, row in enumerate(rows) if bool(torch.isfinite(row).all())
                            and not (world >= 3 and step >= SLASH[0] and r == SLASH[1])]
                    torch.testing.assert_close(scalars, torch.stack([rows[r] for r in kept]).mean(0))
                if step == 1:  # nobody slashed yet: the formula holds exactly
                    assert wire == pytest.approx(_wire_formula(world)[path]), (key, path, wire)


def test_rows_non_finite_on_every_rank_stop_both_sharded_variants_naming_the_step(tmp_path):
    """With and without review hooks (flags gathered with the commitments, or carried in the
    all_to_all), every rank learns that no row is finite and raises at the same step."""
    for outcome in _launch(3, tmp_path, _all_nan_worker):
        for path in ("sharded", "sharded_bare"):
            assert outcome[path].startswith("step 1: the loss or gradient was non-finite on every rank"), outcome


def test_paths_that_cannot_compute_the_aggregation_are_refused():
    from lightning_holograd import HoloGradStrategy

    with pytest.raises(ValueError, match="aggregation_path='sharded' with aggregation='krum'.*HINT"):
        HoloGradStrategy(aggregation="krum", aggregation_path="sharded")
    with pytest.raises(ValueError, match="clip_row_norms=True.*HINT"):
        HoloGradStrategy(aggregation="median", clip_row_norms=True, aggregation_path="sharded")
    with pytest.raises(ValueError, match="aggregation_path='all_reduce' computes a plain mean.*HINT"):
        HoloGradStrategy(aggregation="median", aggregation_path="all_reduce")
    with pytest.raises(ValueError, match="aggregation_path='ring' is unknown.*HINT"):
        HoloGradStrategy(aggregation_path="ring")
    with pytest.raises(ValueError, match="all_to_all='mpi' is unknown"):
        Comm(TrafficMeter(1, 1), all_to_all="mpi")


def test_auto_picks_the_cheapest_path_that_computes_the_same_thing(monkeypatch):
    def path(aggregation, world, hooks=False, clip=False):
        ex = _exchange(aggregation, "auto", 1, "auto")
        ex.aggregator.clip_row_norms = clip
        ex.review_hooks = [print] if hooks else []
        monkeypatch.setattr(HoloGradExchange, "world_size", property(lambda self: world))  # no process group
        return ex.current_path()

    assert path("mean", 2) == "all_gather"
    assert path("mean", 3) == "all_reduce"
    assert path("mean", 3, hooks=True) == "sharded"
    assert path("median", 8) == "sharded"
    assert path("median", 8, clip=True) == "all_gather"
