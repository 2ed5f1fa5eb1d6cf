"""The sharded path with direction groups against the grouped all_gather path, with real gloo
ranks (forked processes, no Lightning): docs/PROTOCOL.md §4.5 and §9.1.

Each rank runs the same steps through three exchanges side by side on the same rows:
``all_gather``, ``sharded`` with a review hook (row commitments gathered) and ``sharded``
without one (the flag rides in the all_to_all). Events, chosen so that every rule of
``aggregate_groups`` is met: at step 2 rank 1's row holds a NaN (dropped, its group's weight
falls); from step 3 rank 2 is slashed inside group 0 (its blocks move to the next member of
its group); from step 4 every member of the last group is slashed (that group is left out:
zero aggregate, zero weight, its blocks owned by nobody). The sharded paths must give
bitwise the all_gather path's group aggregates, weights, kept ranks, estimate and public
values (each row carries E public values after its K scalars, as with local steps).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_sharded import _launch, gloo_rank

from lightning_holograd.engine import Comm, HoloGradExchange, TrafficMeter
from lightning_holograd.protocol import CommitmentChain, Reason, make_aggregator, make_family
from lightning_holograd.protocol.groups import group_ranks

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]

DIM, K, STEPS = 64, 13, 4  # K not a multiple of any group size: blocks of unequal width
E = 2  # public values after the K scalars (local steps, docs/PROTOCOL.md §9.2): rows of W = K + E
NONFINITE = (2, 1)  # (step, rank): this rank's row holds a NaN at that step
SLASH_ONE = (3, 2)  # (step, rank): slashed in the review of that step
SLASH_GROUP = 4  # from this step every member of the last group is slashed
AGGREGATIONS = ("mean", "median", "trimmed_mean")
PATHS = ("all_gather", "sharded", "sharded_bare")


def _slashed_at(step: int, world: int, groups: int) -> list[int]:
    out = [SLASH_ONE[1]] if step >= SLASH_ONE[0] else []
    return out + (group_ranks(groups - 1, groups, world) if step >= SLASH_GROUP else [])


def _exchange(aggregation: str, path: str, world: int, groups: int, a2a: str) -> HoloGradExchange:
    family = make_family("sketch", DIM, K)
    aggregator = make_aggregator(aggregation, trim_ratio=0.25)
    comm = Comm(TrafficMeter(world, DIM), all_to_all=a2a)
    exchange = HoloGradExchange(family, aggregator, CommitmentChain("grouped-sharded-test"), comm,
                                aggregation_path=path.replace("sharded_bare", "sharded"), num_groups=groups)
    exchange.num_public_values = E
    if path != "sharded_bare":
        def review(ctx):
            for rank in _slashed_at(ctx.step, world, groups):
                if not exchange.slashing.is_slashed(rank):
                    exchange.slashing.slash(rank, Reason.MISMATCH, ctx.step)
        exchange.review_hooks.append(review)
    return exchange


def _row(rank: int, step: int, seeds: list[int], family) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    row = torch.cat([family.project(torch.randn(DIM, generator=gen), seeds), torch.randn(E, generator=gen)])
    if (step, rank) == NONFINITE:
        row[3] = float("nan")
    return row


def _run_paths(rank: int, world: int, groups: int, aggregation: str, a2a: str) -> dict:
    exchanges = {p: _exchange(aggregation, p, world, groups, a2a) for p in PATHS}
    out = {p: [] for p in PATHS}
    for step in range(1, STEPS + 1):
        for path, ex in exchanges.items():
            if path == "sharded_bare":  # no review hook: slash before the step, as a review would
                for r in _slashed_at(step, world, groups):
                    if not ex.slashing.is_slashed(r):
                        ex.slashing.slash(r, Reason.MISMATCH, step)
            estimate = ex.step(f"{rank}/{step}".encode().ljust(32, b"."),
                               lambda seeds, ex=ex, step=step: _row(rank, step, seeds, ex.family))
            ctx = ex.last_context
            assert ctx.path == path.replace("sharded_bare", "sharded")
            res = ctx.result
            out[path].append({"scalars": res.scalars.clone(), "weights": res.weights, "kept": res.kept_ranks,
                              "left_out": res.left_out_groups, "nonfinite": res.nonfinite_ranks,
                              "estimate": estimate.clone(), "wire": ex.traffic.step_wire(),
                              "public": ctx.public_values.clone(),
                              "digest": ex.chain.last_scalars_digest})
    return out


def _worker(rank: int, world: int, port: int, out_dir: str, groups: int) -> None:
    with gloo_rank(rank, world, port, out_dir):
        results = {(agg, a2a): _run_paths(rank, world, groups, agg, a2a)
                   for agg in AGGREGATIONS for a2a in ("collective", "p2p")}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _wire_formula(world: int, groups: int, path: str) -> int:
    """Rank 0's wire bytes at step 1 (nobody slashed), derived from docs/PROTOCOL.md §8 by hand:
    the hashes; the row commitments (reviewed) or a 4-byte flag to every peer (bare); the
    all_to_all of its row to the other members of group 0 (rank 0 keeps its own block of
    ceil(W / m_0) columns); the all_gather of the aggregates padded to the widest block,
    ceil(W / m) for the smallest group of m = floor(N / G) ranks (W = K + E)."""
    width = K + E
    own, pad = -(-width // len(group_ranks(0, groups, world))), -(-width // (world // groups))
    hashes = (world - 1) * 33
    if path == "all_gather":
        return hashes + (world - 1) * 4 * width
    flags = (world - 1) * (33 if path == "sharded" else 4)
    return hashes + flags + 4 * (width - own) + (world - 1) * 4 * pad


@pytest.mark.parametrize("world, groups", [(4, 2), (5, 2), (6, 2)])
def test_grouped_sharded_is_bitwise_the_grouped_all_gather_path(world, groups, tmp_path):
    ranks = _launch(world, tmp_path, lambda *args: _worker(*args, groups))
    for key, by_path in ranks[0].items():
        reference = by_path["all_gather"]
        assert reference[SLASH_GROUP - 1]["left_out"] == (groups - 1,)  # the events happened
        assert reference[NONFINITE[0] - 1]["nonfinite"] == (NONFINITE[1],)
        for path in PATHS[1:]:
            for step, (got, want) in enumerate(zip(by_path[path], reference), start=1):
                for field in ("weights", "kept", "left_out", "nonfinite", "digest"):
                    assert got[field] == want[field], (key, path, step, field)
                assert torch.equal(got["scalars"], want["scalars"]), (key, path, step)
                assert torch.equal(got["estimate"], want["estimate"]), (key, path, step)
                assert torch.equal(got["public"], want["public"]), (key, path, step)
                for other in ranks[1:]:  # every rank holds the same estimate
                    assert torch.equal(other[key][path][step - 1]["estimate"], got["estimate"]), (key, path, step)
        for path in PATHS:
            assert by_path[path][0]["wire"] == _wire_formula(world, groups, path), (key, path)


def _auto(monkeypatch, aggregation: str, world: int, groups: int, k: int, hooks: bool = False,
          clip: bool = False) -> str:
    """``current_path`` of an ``auto`` exchange as it would be on ``world`` ranks (no process group)."""
    ex = HoloGradExchange(make_family("sketch", DIM, k), make_aggregator(aggregation, clip_row_norms=clip),
                          CommitmentChain("auto"), Comm(TrafficMeter(1, DIM)), aggregation_path="auto",
                          num_groups=groups)
    ex.review_hooks = [print] if hooks else []
    monkeypatch.setattr(HoloGradExchange, "world_size", property(lambda self: world))
    return ex.current_path()


def test_auto_with_groups_takes_sharded_exactly_when_its_formula_sends_fewer_bytes(monkeypatch):
    # N = 8, G = 2, K = 4096, no hooks: 7 x 4 flags + 4 (4096 - 1024) + 7 x 4 x 1024 = 40,988 < 7 x 4 x 4096
    assert _auto(monkeypatch, "mean", 8, 2, 4096) == "sharded"
    assert _auto(monkeypatch, "median", 8, 2, 4096, hooks=True) == "sharded"
    # N = 4, G = 2 (groups of 2), K = 13 with a verifier: 3 x 33 + 4 (13 - 6) + 3 x 4 x 7 = 211 > 3 x 4 x 13 = 156
    assert _auto(monkeypatch, "mean", 4, 2, 13, hooks=True) == "all_gather"
    assert _auto(monkeypatch, "mean", 4, 2, 4096, hooks=True) == "sharded"
    # groups of one rank (per_rank): 4W (N - 1) for the aggregates alone, never fewer bytes
    assert _auto(monkeypatch, "mean", 8, 8, 4096) == "all_gather"
    # whole-row defences and N <= 2 keep all_gather, as without groups
    assert _auto(monkeypatch, "mean", 8, 2, 4096, clip=True) == "all_gather"
    assert _auto(monkeypatch, "krum", 14, 2, 4096) == "all_gather"
    assert _auto(monkeypatch, "mean", 2, 2, 4096) == "all_gather"


def test_group_settings_that_cannot_shard_are_refused_with_a_hint(monkeypatch):
    from lightning_holograd import HoloGradStrategy

    HoloGradStrategy(direction_groups=2, aggregation_path="sharded", aggregation="median")  # accepted
    with pytest.raises(ValueError, match="aggregation_path='sharded' with direction_groups='per_rank'.*HINT"):
        HoloGradStrategy(direction_groups="per_rank", aggregation_path="sharded")
    with pytest.raises(ValueError, match="aggregation_path='all_reduce' with direction_groups=2.*HINT"):
        HoloGradStrategy(direction_groups=2, aggregation_path="all_reduce")
    monkeypatch.setattr(Comm, "world_size", property(lambda self: 4))
    family, mean = make_family("sketch", DIM, K), make_aggregator("mean")
    with pytest.raises(ValueError, match="'sharded' with 4 direction groups on 4 ranks.*HINT"):
        HoloGradExchange(family, mean, CommitmentChain("x"), Comm(TrafficMeter(4, DIM)), aggregation_path="sharded",
                         num_groups=4)
    with pytest.raises(ValueError, match="'all_reduce' with 2 direction groups.*HINT"):
        HoloGradExchange(family, mean, CommitmentChain("x"), Comm(TrafficMeter(4, DIM)),
                         aggregation_path="all_reduce", num_groups=2)
    HoloGradExchange(family, mean, CommitmentChain("x"), Comm(TrafficMeter(4, DIM)), aggregation_path="sharded",
                     num_groups=2)  # groups of two ranks: accepted
