"""The benchmark harness: its analysis maths, the DiLoCo baseline, and (as root) a short
two-namespace frontier run whose interface-measured bytes must match the wire models."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import pytest
import torch

from benchmarks import frontier, frontier_report, race_model  # the repository root is on sys.path (pyproject: pytest pythonpath)
from benchmarks.claims_gpt2 import random_abs_cos
from benchmarks.harness import start_process, wait_all
from benchmarks.netns import tbf_burst, unavailable_reason
from benchmarks.slow_link import time_to_target

D_TINY = 445_952  # parameters of configs/gpt2-tiny-cpu.yaml


def test_interpolate_at_is_linear_in_log_x_and_refuses_to_extrapolate():
    pts = [(10.0, 1.0), (1000.0, 2.0)]
    assert frontier_report.interpolate_at(pts, 100.0) == pytest.approx(1.5)
    assert frontier_report.interpolate_at(pts, 10.0) == pytest.approx(1.0)
    assert frontier_report.interpolate_at(pts, 1000.0) == pytest.approx(2.0)
    assert frontier_report.interpolate_at(pts, 5.0) is None
    assert frontier_report.interpolate_at(pts, 2000.0) is None
    assert frontier_report.interpolate_at([], 1.0) is None


def test_headlines_pick_best_compression_within_two_percent():
    def row(run, family, compression, loss):
        return {"run": run, "family": family, "status": "ok", "compression": compression, "final_val_loss": loss}

    rows = [row("ddp", "ddp", 1.0, 2.0), row("a1", "fam", 100.0, 2.03), row("a2", "fam", 500.0, 2.05),
            row("a3", "fam", 5000.0, 2.6), row("b1", "other", 4.0, 2.5)]
    heads = {h["family"]: h for h in frontier_report.headlines(rows, ddp_loss=2.0)}
    assert set(heads) == {"fam", "other"}
    assert heads["fam"]["best_within"]["run"] == "a1"  # 2.05 is 2.5 % above DDP: out
    # log-interpolation between 500x (1.025) and 5000x (1.3): 1000x is log10(2) = 0.301 of the way
    expected = 1.025 + math.log10(2.0) * (1.3 - 1.025)
    assert heads["fam"]["val_ratio_at_target"] == pytest.approx(expected)
    assert heads["other"]["best_within"] is None
    assert heads["other"]["val_ratio_at_target"] is None  # 4x never reaches 1000x
    assert heads["other"]["max_compression"]["run"] == "b1"


def test_the_ratio_at_1000x_is_read_off_the_pareto_frontier():
    """A dominated setting (1,559x at 1.043x, beaten by 1,613x at 1.027x) must not pull the
    family's ratio at 1000x up: it is interpolated between 214x and 1,613x only."""
    pts = [(214.0, 1.026), (1559.0, 1.043), (1613.0, 1.027), (1200.0, 1.05)]
    assert frontier_report.pareto(pts) == [(214.0, 1.026), (1613.0, 1.027)]
    rows = [{"run": f"r{i}", "family": "fam", "status": "ok", "compression": x, "final_val_loss": 2.0 * y}
            for i, (x, y) in enumerate(pts)]
    (head,) = frontier_report.headlines(rows, ddp_loss=2.0)
    t = (math.log10(1000.0) - math.log10(214.0)) / (math.log10(1613.0) - math.log10(214.0))
    assert head["val_ratio_at_target"] == pytest.approx(1.026 + t * 0.001)
    assert frontier_report.pareto([(10.0, 1.0), (10.0, 1.0)]) == [(10.0, 1.0)]


def test_a_family_whose_pareto_runs_all_compress_more_than_1000x_reads_the_least_compressing():
    """Two draws at ~1,613x (1.027x, 1.026x) dominate the 214x run (1.0263x): the frontier has
    no point below 1000x, and a run at >= 1000x reaches 1.026x, so that is the ratio at 1000x;
    beyond the most compressing run there is still nothing to read."""
    pts = [(214.0, 1.0263), (1613.2, 1.027), (1612.8, 1.026)]
    assert frontier_report.pareto(pts) == [(1612.8, 1.026), (1613.2, 1.027)]
    assert frontier_report.frontier_at(pts, 1000.0) == pytest.approx(1.026)
    assert frontier_report.frontier_at(pts, 1613.0) == pytest.approx(1.026 + 0.001 * 0.5, abs=2e-4)
    assert frontier_report.frontier_at(pts, 2000.0) is None
    assert frontier_report.frontier_at([], 1000.0) is None


def test_time_to_target_interpolates_between_checks():
    curve = [{"train_s": 10.0, "val_loss": 3.0}, {"train_s": 20.0, "val_loss": 2.5}, {"train_s": 30.0, "val_loss": 2.0}]
    assert time_to_target(curve, 2.25) == pytest.approx(25.0)
    assert time_to_target(curve, 3.5) == pytest.approx(10.0)  # the first check already meets it
    assert time_to_target(curve, 1.9) is None


def test_race_model_times_steps_to_target_by_modelled_step_time(tmp_path):
    assert race_model.rate_bps("20mbit") == 20e6 and race_model.rate_bps("1gbit") == 1e9
    with pytest.raises(ValueError, match="rate='fast'"):
        race_model.rate_bps("fast")
    # 1 MB per step over 8 Mbit/s adds 1 s to a 0.1 s step.
    assert race_model.step_time(0.1, 1e6, 8e6) == pytest.approx(1.1)
    curve = [{"step": 64, "val_loss": 3.0}, {"step": 128, "val_loss": 2.0}]
    run = {"status": "ok", "family": "localsgd", "spec": {"kind": "localsgd", "period": 64}, "curve": curve,
           "step_median_s": 0.2, "bytes_per_step": 1e5, "compression": 10.0, "final_val_loss": 2.0}
    frontier = {"reference": {"final_val_loss": 2.0, "step_median_s": 0.1}, "rows": [dict(run, run="localsgd-h64")]}
    (row,) = race_model.race(frontier, ["8mbit"], [1.25], "measured")  # target 2.5: halfway between the checks
    assert row["steps_to_target"] == pytest.approx(96.0)
    assert row["time_to_target_s"] == pytest.approx(96.0 * (0.2 + 0.1))
    (common,) = race_model.race(frontier, ["8mbit"], [1.25])  # DDP's 0.1 s of compute for every run
    assert common["time_to_target_s"] == pytest.approx(96.0 * (0.1 + 0.1))
    (never,) = race_model.race(frontier, ["8mbit"], [0.9])
    assert never["time_to_target_s"] is None
    # a measured race that continued the run past its schedule: its longer curve is used
    longer = [*curve, {"step": 192, "val_loss": 1.9}, {"step": 256, "val_loss": 1.7}]
    races = [{"rows": [{"peer": "localsgd-h64", "status": "ok", "curve": longer},
                       {"peer": "localsgd-h64", "status": "error", "curve": []}]}]
    (continued,) = race_model.race(frontier, ["8mbit"], [0.9], continuations=race_model.continuation_curves(races))
    assert continued["steps_to_target"] == pytest.approx(224.0)  # 1.8: halfway between steps 192 and 256
    assert continued["curve_steps"] == 256 and continued["best_val_loss"] == 1.7


def test_wait_all_ends_the_job_soon_after_one_process_fails():
    """A node whose worker failed must not leave its peers waiting (torchelastic's exit
    barrier waits 300 s): with a 1 s grace the sleeper is killed, so it cannot report the 0
    it would return after 60 s, and the failed one keeps its own code and output."""
    procs = [start_process([sys.executable, "-c", "print('bye'); raise SystemExit(3)"]),
             start_process([sys.executable, "-c", "import time; time.sleep(60)"])]
    outputs, codes = wait_all(procs, time.perf_counter() + 600, grace_after_failure=1.0)
    assert codes == [3, "killed after a failure"]
    assert outputs[0].strip() == "bye"


def test_wait_all_reports_timeout_at_the_deadline():
    procs = [start_process([sys.executable, "-c", "print('done')"]),
             start_process([sys.executable, "-c", "import time; time.sleep(60)"])]
    outputs, codes = wait_all(procs, time.perf_counter() + 3.0)
    assert codes == [0, "timeout"] and outputs[0].strip() == "done"


def test_floor_payload_counts_quantized_rows_at_their_bits():
    """The report's per-step payload of the cheapest HoloGrad run: (33 + row bytes) / H, with a
    4-bit row of K = 262144 taking 131,076 bytes (not 4K = 1,048,576)."""
    run = {"run": "q4", "spec": {"kind": "holograd", "K": 262144,
                                 "init_args": {"local_steps": 128, "scalar_bits": 4}},
           "bytes_per_step_after_warmup": 1115.0, "steps": 3072}
    (_, line) = frontier_report._floor_lines([run], {"bytes_train_per_rank": 1.8e6 * 3072}, 2)
    assert f"of which {round((33 + 131_076) / 128):,} B are protocol payload" in line
    assert "4-bit scalars" in line


def test_tbf_burst_is_ten_ms_of_rate_with_a_floor():
    assert tbf_burst("100mbit") == "125000b"
    assert tbf_burst("1gbit") == "1250000b"
    assert tbf_burst("1mbit") == f"{32 * 1024}b"
    with pytest.raises(ValueError, match="100mbit"):
        tbf_burst("fast")


def test_iface_tx_bytes_reads_the_transmit_column(tmp_path):
    from benchmarks.probes import iface_tx_bytes

    dev = tmp_path / "dev"
    dev.write_text(
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
        "    lo:     100       1    0    0    0     0          0         0      200       2    0    0    0     0       0          0\n"
        " hgA1v:   12345      10    0    0    0     0          0         0    67890      11    0    0    0     0       0          0\n"
    )
    assert iface_tx_bytes("hgA1v", str(dev)) == 67890
    assert iface_tx_bytes("lo", str(dev)) == 200
    assert iface_tx_bytes("eth9", str(dev)) is None
    assert iface_tx_bytes(None, str(dev)) is None


def test_random_abs_cos_matches_monte_carlo():
    """E|cos(z, g)| for z uniform on the sphere; 4000 draws at D = 500: the sample mean lies
    within 4 standard errors (sd of |cos| <= sqrt(E[cos^2]) = 1/sqrt(D))."""
    dim, n = 500, 4000
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(dim, generator=gen, dtype=torch.float64)
    z = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    sample = ((z @ g) / (z.norm(dim=1) * g.norm())).abs()
    bound = 4 * math.sqrt(1 / dim) / math.sqrt(n)
    assert abs(float(sample.mean()) - random_abs_cos(dim)) < bound
    assert random_abs_cos(dim) == pytest.approx(math.sqrt(2 / (math.pi * dim)), rel=2e-3)  # large-D limit


def _diloco_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from benchmarks.baselines import DiLoCoAverager

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        params = [torch.ones(3), torch.zeros(2, 2)]
        averager = DiLoCoAverager(params, period=2, outer_lr=0.5, outer_momentum=0.9)
        drift = [torch.full((3,), 0.1 * (rank + 1)), torch.full((2, 2), -0.2 * (rank + 1))]
        with torch.no_grad():
            for p, d in zip(params, drift):
                p.sub_(d)  # a local "inner step"
        averager.average_parameters(iter(params))  # step 1 of 2: nothing happens
        after_first = [p.clone() for p in params]
        averager.average_parameters(iter(params))  # step 2: outer step
        torch.save({"after_first": after_first, "final": params, "anchor": averager.anchor}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_diloco_outer_step_is_nesterov_on_the_mean_pseudo_gradient(tmp_path):
    import torch.multiprocessing as mp
    from lightning_holograd.demos import free_port

    mp.start_processes(_diloco_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # pseudo-gradient = anchor - local = mean drift: 0.15 (vector), -0.3 (matrix). First Nesterov
    # step: buf = delta, update = delta + 0.9 buf = 1.9 delta; anchor -= 0.5 x 1.9 delta.
    expected = [torch.ones(3) - 0.95 * 0.15, torch.zeros(2, 2) + 0.95 * 0.3]
    for r in range(2):
        assert not torch.equal(res[r]["after_first"][0], torch.ones(3))  # untouched before the period
        for got, anchor, want in zip(res[r]["final"], res[r]["anchor"], expected):
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(anchor.detach(), want)


@pytest.mark.multiprocess
@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_frontier_measures_ddp_and_holograd_bytes_at_the_interface(tmp_path):
    """Three 6-step two-namespace torchrun jobs (DDP, sketch K = 256, DDP again). DDP's bytes,
    read from the kernel's interface counters, match the ring all-reduce model 2(N-1)/N x 4D
    within 2 % (headers and Lightning's small collectives on top); HoloGrad's are a few KB
    (payload 32 + 4K = 1,056 B plus per-message headers); both DDP runs give the same loss."""
    out = tmp_path / "frontier_cpu.md"
    assert frontier.main(["--runs", "ddp,sketch-256", "--steps", "6", "--val-every", "3", "--warmup", "2",
                          "--out", str(out)]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    rows = {r["run"]: r for r in payload["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), {k: r["status"] for k, r in rows.items()}
    ring = 2 * (2 - 1) / 2 * 4 * D_TINY
    ddp = rows["ddp"]["bytes_per_step_after_warmup"]
    assert ring <= ddp <= 1.02 * ring
    hg = rows["sketch-256"]["bytes_per_step_after_warmup"]
    assert 32 + 4 * 256 <= hg <= 10_000
    assert rows["ddp"]["final_val_loss"] == rows["ddp-last"]["final_val_loss"]
    assert rows["sketch-256"]["compression"] > 100
    for name in ("frontier_loss_vs_bytes.png", "frontier_loss_vs_step.png", "frontier_cpu.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| holograd-sketch |" in out.read_text()


def test_bad_arguments_are_refused_before_any_run(capsys):
    from benchmarks import claims, slow_link

    with pytest.raises(SystemExit) as exc:
        slow_link.main(["--rates", "none,fast"])
    assert exc.value.code == 2
    assert "--rates: rate='fast'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        claims.main(["c5", "--train-steps", "5"])
    assert "--train-steps=5 must be >= 20" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        claims.main(["c7", "--c7-ranks", "3"])
    assert "--c7-ranks=3 must be >= 4" in capsys.readouterr().err


def test_claims_codebook_runs_c5_on_its_own(capsys, tmp_path):
    """``python -m benchmarks.claims_codebook`` forwards to ``claims c5``: its checks, and
    --report-only redraws the Markdown of a JSON in --out-dir."""
    from benchmarks import claims_codebook

    with pytest.raises(SystemExit):
        claims_codebook.main(["--train-steps", "5"])
    assert "--train-steps=5 must be >= 20" in capsys.readouterr().err
    committed = claims_codebook.Path(claims_codebook.__file__).parent / "results" / "claims_c5.md"
    (tmp_path / "claims_c5.md").write_text(committed.read_text())
    (tmp_path / "claims_c5.json").write_text(committed.with_suffix(".json").read_text())
    assert claims_codebook.main(["--report-only", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "claims_c5.md").read_text() == committed.read_text()
