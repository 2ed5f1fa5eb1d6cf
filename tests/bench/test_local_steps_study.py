"""The local-steps design study (benchmarks/local_steps_study.py): its byte arithmetic, the
inner-state edits, the sketch it simulates with, and one short run end to end."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from benchmarks import local_steps_study as study

SHAPES = [torch.Size([4, 3]), torch.Size([5])]  # one matrix, one vector: D = 17


def fake_work() -> SimpleNamespace:
    hparams = SimpleNamespace(lr=0.1, betas=(0.9, 0.95), weight_decay=0.1)
    return SimpleNamespace(shapes=SHAPES, sizes=[s.numel() for s in SHAPES], dim=17, decayed=[True, False],
                           module=SimpleNamespace(hparams=hparams))


def test_round_costs_follow_the_byte_formulas():
    work = fake_work()
    args = study.parse_args(["--ratio", "1", "--local-steps", "16", "--inner", "private"])
    check = 16 * 16 * 128 * 8 + 4 * (2 * 17 + 2)  # 16 int64 batches + m, v and two step counters
    costs = study.round_costs(work, args, 16)
    assert costs["check"] == check
    assert costs["verify"] == pytest.approx(0.05 * check)
    assert costs["k"] == (4 * 17 * 16 - 32 - 32) // 4  # batch hash and state hash per round
    assert costs["exchange"] == 4 * costs["k"] + 64
    public = study.parse_args(["--ratio", "1", "--local-steps", "16", "--inner", "public_v"])
    assert study.round_costs(work, public, 16)["k"] == (4 * 17 * 16 - 32 - 4 * 2) // 4  # one float per tensor
    assert study.state_floats(work, "factored_v") == (4 + 3) + 5 + 2
    with pytest.raises(SystemExit, match="--ratio"):  # verification alone exceeds a 1x budget of 17 floats
        study.round_costs(work, study.parse_args(["--ratio", "1", "--budget", "total"]), 1)


def _two_workers(option: str) -> list[study.FlatAdamW]:
    work = fake_work()
    opts = [study.FlatAdamW(work, torch.zeros(17)) for _ in range(2)]
    for w, o in enumerate(opts):
        o.step(torch.arange(17.0) * (w + 1) + 1.0, lr=0.1)
    study.start_round(opts, option)
    return opts


def test_start_round_edits_the_adamw_state_as_documented():
    assert all(not o.opt.state for o in _two_workers("reset"))
    kept = _two_workers("keep_v")[0]
    g = torch.arange(17.0) + 1.0
    for view, part in zip(kept.views, g.split([12, 5])):
        assert torch.count_nonzero(kept.opt.state[view]["exp_avg"]) == 0
        assert torch.allclose(kept.opt.state[view]["exp_avg_sq"].reshape(-1), 0.05 * part**2)
    fac = _two_workers("factored_v")[0]
    full = 0.05 * (g[:12].view(4, 3) ** 2)
    v = fac.opt.state[fac.views[0]]["exp_avg_sq"]
    assert torch.linalg.matrix_rank(v) == 1
    assert torch.allclose(v.sum(1), full.sum(1)) and torch.allclose(v.sum(0), full.sum(0))
    assert torch.allclose(fac.opt.state[fac.views[1]]["exp_avg_sq"], 0.05 * g[12:] ** 2)  # vectors kept
    pub = _two_workers("public_v")
    for view0, view1 in zip(pub[0].views, pub[1].views):
        v0, v1 = pub[0].opt.state[view0]["exp_avg_sq"], pub[1].opt.state[view1]["exp_avg_sq"]
        assert torch.equal(v0, v1) and torch.unique(v0).numel() == 1  # one public value per tensor


def test_sketch_roundtrip_is_unbiased():
    """Mean of M reconstructions: per coordinate variance <= ||v||^2 / K / M; 6 sigma bound."""
    vec, k, m = torch.linspace(-1.0, 2.0, 50), 10, 4000
    mean = sum(study.sketch_roundtrip(vec, seed, k) for seed in range(m)) / m
    assert (mean - vec).abs().max() < 6 * math.sqrt(float(vec.square().sum()) / k / m)


def test_per_rank_directions_cut_the_sketch_error_n_fold():
    """Identical worker vectors: shared seeds give one sketch (error ~ ||v||^2 / K per coordinate),
    per-rank seeds the mean of N independent ones (N times less). 400 trials keep the measured
    ratio within a few percent of N; the bound allows 25 %."""
    vec, k, n = torch.randn(200, generator=torch.Generator().manual_seed(0)), 20, 4
    errs = {}
    for groups in ("1", "per_rank"):
        args = study.parse_args(["--workers", str(n), "--groups", groups])
        errs[groups] = sum(float((study.estimate([vec] * n, t, k, args) - vec).square().sum()) for t in range(400))
    assert errs["1"] / errs["per_rank"] == pytest.approx(n, rel=0.25)


def test_a_short_run_writes_its_json(tmp_path):
    argv = ["--workers", "2", "--steps", "2", "--local-steps", "2", "--ratio", "100", "--groups", "per_rank",
            "--inner", "factored_v", "--val-batches", "2", "--out", str(tmp_path)]
    assert study.main(argv) == 0
    (path,) = tmp_path.glob("*.json")
    run = json.loads(path.read_text())
    assert run["tag"] == "n2-s2-h2-r100-exchange-gper_rank-factored_v-avg"
    assert math.isfinite(run["final_val"]) and run["k"] > 0
    assert run["compression_exchange"] == pytest.approx(100.0, rel=1e-3)
    assert run["compression_total"] < run["compression_exchange"]
