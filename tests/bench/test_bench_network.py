"""The network benchmarks' analysis (N ranks, the lr sweep, the race, bytes per rank) without
root, and (as root) short smoke runs of the sweep, the race and the N-rank bytes benchmark."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import bytes_per_rank, frontier, frontier_runs, harness, lr_sweep, race_report, slow_link
from benchmarks.frontier_runs import combine_ranks, holograd_spec, run_one
from benchmarks.netns import unavailable_reason

GPT2_124M = 124_439_808


# ----------------------------------------------------------------------------- N ranks
def _rank_file(rank: int, train_s: list[float], sent: list[int], step_s: float) -> dict:
    curve = [{"step": 4 * (i + 1), "val_loss": 3.0 - 0.1 * i, "train_s": t, "bytes": b}
             for i, (t, b) in enumerate(zip(train_s, sent))]
    return {"rank": rank, "num_params": 100, "global_step": 8, "curve": curve, "bytes_sent_train": sent[-1],
            "bytes_per_step_after_warmup": sent[-1] / 8, "step_median_s": step_s, "peak_rss_mb": 100 + rank}


def test_combine_ranks_takes_the_slowest_and_busiest_of_n_ranks():
    ranks = [_rank_file(0, [1.0, 2.0], [10, 20], 0.1), _rank_file(1, [1.5, 2.5], [12, 18], 0.3),
             _rank_file(2, [0.5, 3.0], [11, 24], 0.2)]
    job = {"returncodes": [0, 0, 0], "wall_s": 9.0, "job_tx_bytes": [1, 2, 3], "output_tails": ["", "", ""]}
    row = combine_ranks("x", {"family": "f"}, job, ranks, 3)
    assert row["status"] == "ok" and row["world_size"] == 3
    assert [p["train_s"] for p in row["curve"]] == [1.5, 3.0]
    assert [p["bytes"] for p in row["curve"]] == [12, 24]
    assert row["bytes_train_by_rank"] == [20, 18, 24] and row["bytes_train_per_rank"] == 24
    assert row["step_median_s"] == 0.3 and row["peak_rss_mb"] == 102
    assert row["final_val_loss"] == pytest.approx(2.9) and row["best_val_loss"] == pytest.approx(2.9)
    broken = combine_ranks("x", {"family": "f"}, {**job, "returncodes": [0, "timeout", 0]}, ranks[:2], 3)
    assert broken["status"].startswith("error") and "2/3 rank files" in broken["status"]


def test_a_run_needing_an_argument_this_checkout_lacks_is_pending_without_starting(tmp_path):
    spec = {**holograd_spec("sketch", 64), "needs": ["no_such_argument"]}
    row = run_one("future", spec, None, tmp_path, num_nodes=4)  # args=None: it must not get as far as using them
    assert row["status"] == "pending (needs no_such_argument)"


# ----------------------------------------------------------------------------- harness
def test_resume_keeps_ok_rows_and_refuses_other_settings(tmp_path):
    path = tmp_path / "r.json"
    first = harness.Results(path, {"command": "a", "steps": 10}, ("steps",))
    first.add({"run": "ddp", "status": "ok"})
    first.add({"run": "bad", "status": "error (rc=1)"})
    again = harness.Results(path, {"command": "b", "steps": 10}, ("steps",), resume=True)
    assert again.done("ddp") and not again.done("bad")
    assert again.meta["command"] == "a; b"
    with pytest.raises(SystemExit, match="steps"):
        harness.Results(path, {"command": "c", "steps": 20}, ("steps",), resume=True)


def test_profiles_set_defaults_and_explicit_options_win():
    args = frontier.parse_args(["--profile", "long", "--lr-from", "none", "--ranks", "4"])
    assert (args.steps, args.val_every, args.max_bytes) == (4096, 64, 32_000_000)
    assert args.out.endswith("frontier_long_4r.md")
    assert args.steps % 64 == 0 and args.val_every % 64 == 0  # validated where every H in {4, 16, 64} has synced
    assert frontier.parse_args(["--profile", "long", "--lr-from", "none", "--steps", "3000"]).steps == 3000
    short4 = frontier.parse_args(["--ranks", "4"])
    assert short4.out.endswith("frontier_short_4r.md") and short4.steps == 300


def test_long_frontier_needs_the_sweep_or_says_how(tmp_path, capsys):
    with pytest.raises(SystemExit):
        frontier.parse_args(["--profile", "long", "--lr-from", str(tmp_path / "missing.json")])
    assert "HINT: run `python -m benchmarks.lr_sweep --ranks 2` first" in capsys.readouterr().err


def test_steps_times_k_exceeds_d_several_times_at_the_1000x_point():
    """At 1000x, a rank sends 4D/1000 bytes per step (2 ranks), i.e. about D/1000 scalars: over
    the long run's steps that is steps/1000 times D."""
    steps = frontier.PROFILES["long"]["steps"]
    scalars = steps * (harness.ring_allreduce_bytes(harness.TINY_GPT2_DIM, 2) / 1000) / 4
    assert scalars / harness.TINY_GPT2_DIM >= 4.0


# ----------------------------------------------------------------------------- lr sweep
def _sweep_row(run: str, scale: float, loss: float | None, status: str = "ok") -> dict:
    return {"run": lr_sweep.sweep_name(run, scale), "base_run": run, "family": run, "status": status,
            "spec": {"lr_scale": scale}, "final_val_loss": loss}


def test_best_lr_is_the_lowest_loss_ties_go_to_the_default_and_edges_are_flagged():
    rows = [_sweep_row("a", 0.5, 2.3), _sweep_row("a", 1.0, 2.2), _sweep_row("a", 2.0, 2.25),
            _sweep_row("b", 0.5, 2.1), _sweep_row("b", 1.0, 2.1), _sweep_row("b", 2.0, 2.4),
            _sweep_row("c", 0.5, 3.0), _sweep_row("c", 1.0, None, "error (rc=1)"), _sweep_row("c", 2.0, 2.9)]
    best = lr_sweep.best_scales(rows, [0.5, 1.0, 2.0])
    assert best["a"]["scale"] == 1.0 and not best["a"]["edge"]
    assert best["b"]["scale"] == 1.0  # 0.5 ties with the default
    assert best["c"]["scale"] == 2.0 and best["c"]["edge"] and set(best["c"]["losses"]) == {0.5, 2.0}
    text = lr_sweep.render({"scales": [0.5, 1.0, 2.0], "num_nodes": 2, "steps": 300, "machine": "m", "torch": "t",
                            "lightning": "l", "max_bytes": 32e6, "date": "d", "command": "c", "total_wall_s": 60,
                            "stem": "s"}, rows, best)
    assert "| c | c | 3.0000 | - | 2.9000 | 2x | at the edge of the sweep: widen it |" in text


def test_sweep_refuses_fewer_than_three_multipliers(capsys):
    with pytest.raises(SystemExit):
        lr_sweep.parse_args(["--scales", "1,2"])
    assert "at least 3 positive multipliers" in capsys.readouterr().err


# ----------------------------------------------------------------------------- race
def test_time_to_target_interpolates_steps_too():
    curve = [{"step": 32, "train_s": 10.0, "val_loss": 3.0}, {"step": 64, "train_s": 20.0, "val_loss": 2.0}]
    assert race_report.time_to_target(curve, 2.5) == pytest.approx(15.0)
    assert race_report.time_to_target(curve, 2.5, key="step") == pytest.approx(48.0)


def _frontier_row(run: str, family: str, loss: float, compression: float, kind: str = "x") -> dict:
    return {"run": run, "family": family, "status": "ok", "final_val_loss": loss, "compression": compression,
            "spec": {"kind": kind, "lr_scale": 2.0}}


def test_race_peers_are_each_familys_best_and_holograds_cheapest_within_the_target():
    rows = [_frontier_row("ddp", "ddp", 2.00, 1), _frontier_row("ddp-last", "ddp", 2.00, 1),
            _frontier_row("ddp-bf16", "ddp-bf16", 2.00, 2),
            _frontier_row("powersgd-r1", "powersgd", 2.10, 40), _frontier_row("powersgd-r4", "powersgd", 2.03, 11),
            _frontier_row("localsgd-h16", "localsgd", 2.01, 16), _frontier_row("localsgd-h64", "localsgd", 2.05, 60),
            _frontier_row("sketch-4096", "holograd-sketch", 2.05, 100),
            _frontier_row("sketch-16384", "holograd-sketch", 2.01, 26),
            _frontier_row("sketch-65536", "holograd-sketch", 2.00, 7)]
    peers = race_report.select_peers(rows, target=2.02)
    assert list(peers) == ["ddp", "ddp-bf16", "powersgd-r4", "localsgd-h16", "sketch-65536", "sketch-16384"]
    assert peers["sketch-16384"]["why"].startswith("highest compression")
    assert peers["powersgd-r4"]["spec"]["lr_scale"] == 2.0  # the lr it had in the long run


def _race_row(peer: str, t: float | None, bytes_per_step: float, best: float = 2.1) -> dict:
    return {"run": f"{peer}@20mbit", "peer": peer, "rate": "20mbit", "status": "ok", "time_to_target_s": t,
            "bytes_per_step": bytes_per_step, "best_val_loss": best, "final_val_loss": best, "steps": 100,
            "time_cap_s": 400.0, "step_median_s": 0.1, "spec": {"kind": "x"}, "why": "w", "steps_to_target": None}


def test_race_ranks_by_time_to_target_and_names_who_never_got_there():
    ranked = race_report.rank_link([_race_row("ddp", 200.0, 1e6), _race_row("hg", 50.0, 1e4),
                                    _race_row("psgd", None, 1e5, best=2.2), _race_row("local", 80.0, 2e4)])
    assert [r["peer"] for r in ranked] == ["hg", "local", "ddp", "psgd"]
    assert [r.get("x_fastest") for r in ranked] == [1.0, 1.6, 4.0, None]
    assert ranked[0]["compression"] == pytest.approx(100.0)
    line = race_report.headline("20mbit", ranked)
    assert "hg reaches the target first, in 50 s, 4.00x faster than DDP" in line and "Never reached: psgd" in line
    assert "**never reached** within the cap (400 s); best val 2.2000" in race_report._row(ranked[-1])


def test_race_refuses_a_bad_rate_and_a_race_without_a_cap(capsys):
    with pytest.raises(SystemExit):
        slow_link.parse_args(["--rates", "100mbit,fast", "--peers", "ddp", "--target", "2", "--schedule-steps", "9"])
    assert "--rates: rate='fast'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        slow_link.parse_args(["--frontier", "", "--peers", "sketch-256", "--target", "2", "--schedule-steps", "9"])
    assert "--time-cap is needed when DDP does not race" in capsys.readouterr().err


def test_race_takes_a_named_peer_outside_the_frontier_at_its_best_swept_lr(tmp_path, capsys):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"best": {"localsgd-h16": {"scale": 0.5}}}))
    base = ["--frontier", "", "--target", "2", "--schedule-steps", "9", "--time-cap", "5", "--rates", "100mbit"]
    args = slow_link.parse_args([*base, "--peers", "localsgd-h16,sketch-256", "--lr-from", str(sweep)])
    assert args.peer_specs["localsgd-h16"]["spec"]["lr_scale"] == 0.5  # the sweep's best
    assert args.peer_specs["sketch-256"]["spec"]["lr_swept"] is False  # not in the sweep: 1x, marked
    assert "lr_scale" not in args.peer_specs["sketch-256"]["spec"]
    assert "lr_scale" not in slow_link.parse_args([*base, "--peers", "localsgd-h16", "--lr-from", "none"]
                                                  ).peer_specs["localsgd-h16"]["spec"]
    with pytest.raises(SystemExit):
        slow_link.parse_args([*base, "--peers", "localsgd-h16", "--lr-from", str(tmp_path / "missing.json")])
    assert "--lr-from=" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bytes per rank
def test_formulas_are_arithmetic_only():
    assert bytes_per_rank.evaluate("(N-1)*(32+4*K)", N=4, K=10, D=0) == 216
    assert bytes_per_rank.evaluate("2**3 // 3 - -1", N=1, K=1, D=1) == 3
    for bad in ("__import__('os')", "N.real", "open", "[N]"):
        with pytest.raises(ValueError, match="HINT"):
            bytes_per_rank.evaluate(bad, N=1, K=1, D=1)


def test_model_table_for_gpt2_124m_matches_the_config_arithmetic():
    formulas = {p: v["formula"] for p, v in bytes_per_rank.PATHS.items()}
    model = {m["N"]: m for m in bytes_per_rank.modelled(formulas, GPT2_124M, 2 ** 20)}
    assert model[2]["ddp"] == pytest.approx(497_759_232)  # configs/gpt2-small-gpu.yaml: 497.8 MB at N = 2
    assert model[2]["allgather"] == 4_194_337 and model[2]["allgather_compression"] == pytest.approx(118.67, abs=0.01)
    assert model[8]["allgather_compression"] == pytest.approx(29.67, abs=0.01)  # 29.7 there
    # sharded without a verifier: 2 x 4K (N-1)/N + 37 (N-1) (the hash with its flag byte, a
    # float32 flag per all_to_all message); stays near 8K bytes: compression ~ D / K at any N
    assert model[1024]["sharded"] == pytest.approx(8 * 2 ** 20 * 1023 / 1024 + 37 * 1023)
    assert model[1024]["sharded_compression"] > 0.9 * model[2]["sharded_compression"]
    assert model[1024]["allgather_compression"] < 0.3


def test_floor_is_the_smallest_overhead_of_a_path():
    rows = [{"status": "ok", "path": "allgather", "world_size": n, "D": 100, "spec": {"K": 10},
             "bytes_per_step_after_warmup": measured} for n, measured in ((2, 172.0), (4, 300.0))]
    bytes_per_rank.add_formulas(rows, {"allgather": "(N-1)*(32+4*K)"}, {})
    assert [r["overhead"] for r in rows] == [100.0, 84.0]
    assert all(r["floor"] == 84.0 for r in rows)
    assert rows[1]["ratio_to_model"] == pytest.approx(1.0) and rows[0]["ratio_to_model"] == pytest.approx(172 / 156)


def test_per_message_floor_scales_with_the_peers():
    """Overheads of 100 B at N = 2 and 240 B at N = 4 are 100 and 80 B per peer: the per-peer
    floor is 80, so the model adds 80 x (N-1): 80 at N = 2 and 240 at N = 4."""
    rows = [{"status": "ok", "path": "allgather", "world_size": n, "D": 100, "spec": {"K": 10},
             "bytes_per_step_after_warmup": measured} for n, measured in ((2, 172.0), (4, 456.0))]
    bytes_per_rank.add_formulas(rows, {"allgather": "(N-1)*(32+4*K)"}, {})
    assert all(r["floor_per_peer"] == 80.0 for r in rows)
    assert rows[1]["ratio_to_model_per_message"] == pytest.approx(1.0)
    assert rows[0]["ratio_to_model_per_message"] == pytest.approx(172 / (72 + 80))
    assert rows[1]["ratio_to_model"] == pytest.approx(456 / (216 + 100))  # the constant floor: N = 2's 100 B


# ----------------------------------------------------------------------------- the worker's schedule
def test_fixed_schedule_ends_at_its_steps_and_then_holds_min_lr():
    from benchmarks.netbench_worker import make_module

    fixed = make_module({"lr_scale": 2.0}, schedule_steps=100)
    assert fixed.hparams.lr == pytest.approx(6e-3) and fixed.hparams.min_lr == pytest.approx(6e-4)
    assert fixed.lr_factor(50, 10_000) == pytest.approx(fixed.__class__.__mro__[1].lr_factor(fixed, 50, 100))
    assert fixed.lr_factor(100, 10_000) == pytest.approx(0.1) and fixed.lr_factor(5000, 10_000) == pytest.approx(0.1)
    assert make_module({}, None).lr_factor(50, 100) == fixed.lr_factor(50, 10_000)


# ----------------------------------------------------------------------------- as root: smoke runs
needs_root = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


@pytest.mark.multiprocess
@needs_root
def test_race_smoke_over_a_shaped_link(tmp_path):
    """DDP and the sketch race over a 100 Mbit/s link for at most 12 steps towards val 5.45
    (about where 4-8 steps of the tiny GPT-2 get): each either reaches it, with a time, or is
    said not to; the fastest has ratio 1."""
    out = tmp_path / "race.md"
    assert slow_link.main(["--smoke", "--out", str(out)]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    rows = {r["peer"]: r for r in payload["rows"]}
    assert set(rows) == {"ddp", "sketch-256"} and all(r["status"] == "ok" for r in rows.values())
    reached = [r for r in rows.values() if r["time_to_target_s"] is not None]
    text = out.read_text()
    for r in rows.values():
        assert (r in reached) or f"| {r['peer']} |" in text and "never reached" in text
        assert r["steps"] <= 12 and r["curve"][-1]["step"] == r["steps"]
        assert r["spec"].get("lr_scale", 1.0) == 1.0
    if reached:
        assert min(r["time_to_target_s"] for r in reached) > 0 and "reaches the target first" in text


@pytest.mark.multiprocess
@needs_root
def test_bytes_per_rank_at_three_ranks_matches_the_allgather_formula(tmp_path):
    """HoloGrad's all_gather path at N = 3 (K = 256): each rank sends (N-1)(32 + 4K) = 2,112
    payload bytes per step; what the interfaces count must be at least that, and at most
    that plus 3 KB per peer of per-message cost (headers, ACKs, gloo framing, Lightning's
    broadcast: ~1.9 KB per step at N = 2 in the frontier, 1.7-2.0 KB per peer at N = 2-8)."""
    out = tmp_path / "bytes.md"
    assert bytes_per_rank.main(["--smoke", "--ranks", "3", "--paths", "allgather", "--k", "256",
                                "--out", str(out)]) == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert row["status"] == "ok" and row["world_size"] == 3
    assert row["formula_bytes"] == 2 * (33 + 4 * 256)
    for measured in row["bytes_per_step_after_warmup_by_rank"]:
        assert row["formula_bytes"] <= measured <= row["formula_bytes"] + 3072 * (3 - 1)
    assert "| allgather | 3 | 256 |" in out.read_text()
    assert not math.isnan(row["ratio_to_model"])


def test_long_runs_take_the_sweeps_best_lr_and_say_when_there_is_none():
    scales = {"ddp": 2.0, "sketch-4096": 0.5}
    assert frontier.with_lr("ddp-last", scales)["lr_scale"] == 2.0  # DDP's second run: DDP's lr
    assert frontier.with_lr("sketch-4096", scales)["lr_scale"] == 0.5
    unswept = {"run": "x", "spec": frontier.with_lr("sketch-4096-perrank-h16", scales)}
    assert "lr_scale" not in unswept["spec"]
    assert frontier_runs.label(unswept) == "K=4096, groups per_rank, H=16, lr x1 (not swept)"
    assert frontier_runs.label({"spec": frontier.with_lr("sketch-4096", scales)}) == "K=4096, lr x0.5"
    assert "lr_swept" not in frontier.with_lr("sketch-4096", {})  # no sweep at all: plain 1x


def test_a_seed_twin_takes_its_swept_runs_lr_and_a_long_run_check_keeps_its_own():
    swept = "sketch-262144-perrank-h128-q4-private"
    scales = {"ddp": 0.5, swept: 0.5}
    twin = frontier.with_lr(f"{swept}-s2", scales)
    assert twin["lr_scale"] == 0.5 and twin["family"] == frontier_runs.RUNS[swept]["family"]
    assert twin["init_args"]["seed"] != frontier_runs.RUNS[swept]["init_args"].get("seed")
    check = frontier.with_lr("ddp-lr1", scales)  # the sweep says 0.5x; the check runs at 1x
    assert check["lr_scale"] == 1.0 and check["family"] == "ddp-lr-long"
    assert frontier_runs.label({"spec": check}) == "-, lr x1 (fixed: long-run check)"
    assert frontier.with_lr("ddp-lr0.35", {})["lr_scale"] == 0.35  # with no sweep at all too
    extrapolated = frontier.with_lr(f"{swept}-o15", scales)
    assert extrapolated["lr_scale"] == 0.5 and extrapolated["init_args"]["outer_lr"] == 1.5
    assert frontier_runs.label({"spec": extrapolated}).endswith("inner state private, outer lr 1.5, lr x0.5")
