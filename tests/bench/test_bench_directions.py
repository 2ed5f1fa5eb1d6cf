"""bench_directions' fused-kernel rows: the plain rows must measure the eager kernels (auto
would switch them to the compiled ones at large D) and the report must name the compile time."""

from __future__ import annotations

import torch

from benchmarks import bench_directions
from benchmarks.directions_timing import base_family, build_family, prior_estimates

CPU = torch.device("cpu")


def test_plain_rows_pin_eager_and_compiled_rows_pin_compiled():
    assert build_family("sketch", 100, 4, CPU).kernel == "eager"
    assert build_family("rademacher", 100, 40, CPU).kernel == "eager"
    assert build_family("sketch-compiled", 100, 4, CPU).kernel == "compiled"
    assert build_family("rademacher-compiled", 100, 40, CPU).kernel == "compiled"
    assert base_family("sketch-compiled") == "sketch" and base_family("codebook") == "codebook"
    assert base_family("sketch-cached") == "sketch"
    assert not build_family("sketch", 100, 4, CPU).slot_cache.enabled  # rows time the kernels
    assert not build_family("sketch-compiled", 100, 4, CPU).slot_cache.enabled
    cached = build_family("sketch-cached", 100, 4, CPU)
    assert cached.slot_cache.enabled and cached.kernel == "eager"


def test_compiled_rows_use_their_family_reference():
    refs = {"copy_s": {100: 1e-6}, "randn_s": {100: 1e-5}, "index_add_s": {"100,4": 2e-6}}
    assert prior_estimates("sketch-compiled", 100, 4, refs) == prior_estimates("sketch", 100, 4, refs)


def test_report_states_the_compile_time_and_the_failure():
    meta = {"device": "cpu", "device_name": "x", "torch": "t", "python": "p", "threads": 1, "direction_version": 2,
            "date": "d", "command": "c", "repeats": 1, "warmup": 0, "max_seconds": 1.0, "total_wall_s": 1.0,
            "loadavg_start": 0.1, "loadavg_end": 0.2, "compile_s": 12.34, "inductor_cache": "/tmp/c"}
    refs = {"copy_s": {}, "randn_s": {}, "hash_s": {}, "index_add_s": {}}
    text = bench_directions.render_markdown(meta, refs, [])
    assert "took 12.3 s in this process (inductor cache: /tmp/c)" in text
    meta["compile_s"] = None
    assert "check failed, so those rows ran eager" in bench_directions.render_markdown(meta, refs, [])
    del meta["compile_s"]  # no compiled rows requested: no line
    assert "fused kernels" not in bench_directions.render_markdown(meta, refs, [])


def test_subsample_rows_time_fresh_picks_against_one_pass(monkeypatch):
    """The subsample row's reference is one copy of D floats, and every timed call hashes its
    picks again (a step's seed is new), so the cache never makes it look cheaper."""
    from types import SimpleNamespace

    import benchmarks.directions_timing as timing

    refs = {"copy_s": {1000: 1e-6}, "randn_s": {1000: 1e-5}, "index_add_s": {"1000,300": 2e-6}}
    fam = build_family("subsample", 1000, 300, CPU)
    fresh = []
    original = fam.picks
    monkeypatch.setattr(fam, "picks", lambda seed, device="cpu": (fresh.append(fam._picked is None),
                                                                   original(seed, device))[1])
    monkeypatch.setattr(timing, "build_family", lambda *args: fam)
    row = timing.run_config("subsample", 1000, 300, CPU, SimpleNamespace(warmup=1, repeats=3), refs)
    assert row["reference"] == "copy" and row["reference_s"] == 1e-6
    assert len(fresh) == 1 + 2 * 4 and all(fresh[1:])  # the untimed project, then 2 ops x (1 + 3) calls
