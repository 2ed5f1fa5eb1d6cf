"""The GPU check (benchmarks/gpu_check.py) on the CPU: its dry run end to end, and the
stage runner's isolation (a failing or overrunning stage does not stop the next one; the
overall deadline skips what no longer fits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpu_check import Stage, plan, run_all, write_summary
from benchmarks.gpu_machine import stage_headline

REPO = Path(__file__).resolve().parents[2]
STAGES = [s.name for s in plan(Path("."), dry=True)]


@pytest.mark.multiprocess
@pytest.mark.timeout(240)  # ~35 s on an idle 2-core machine; imports dominate under load
def test_dry_run_writes_every_stage_report(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--results", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=230)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == STAGES and summary["meta"]["dry_run"] is True
    for name, record in summary["stages"].items():
        assert record["status"] == "ok", (name, record)
        assert record["headline"], name
        assert (out / "logs" / f"{name}.log").is_file()
    expected = ["summary.md", "machine.md", "machine.json", "pytest_cuda.xml", "c8_default.md", "c8_default.json",
                "c8_deterministic.json", "gpt2.md", "gpt2.json", "ranks.json", "directions_dense.json",
                "directions_subspace.json"]
    assert [f for f in expected if not (out / f).is_file()] == []
    c8 = json.loads((out / "c8_default.json").read_text())["result"]
    assert c8["recomputations"] == c8["expected"] == 3  # p_verify = 1: one claim per step
    assert "12 skipped" in summary["stages"]["pytest_cuda"]["headline"]  # no CUDA here: every cuda test skips
    assert "DRY RUN" in (out / "summary.md").read_text()


def _ok() -> int:
    Path(os.environ["GPU_CHECK_TEST_DIR"], "ok.txt").write_text("ran")
    return 0


def _boom() -> int:
    raise RuntimeError("stage broke")


def _sleep() -> int:
    time.sleep(60)
    return 0


def test_runner_isolates_failures_timeouts_and_the_deadline(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_CHECK_TEST_DIR", str(tmp_path))
    # ~3.3 s pass before "ok" (boom ~0.2 s, sleepy its 3 s budget): "ok" still fits its own
    # 3 s budget into the ~4.7 s left; "late" would get < min_budget_s = 5 s and is skipped.
    stages = [Stage("boom", 10, _boom), Stage("sleepy", 3, _sleep), Stage("ok", 3, _ok), Stage("late", 30, _ok)]
    t0 = time.monotonic()
    records = run_all(stages, tmp_path, deadline_s=8.0, min_budget_s=5.0)
    assert time.monotonic() - t0 < 30
    assert records["boom"]["status"] == "failed (exit 1)"
    assert "RuntimeError: stage broke" in (tmp_path / "logs" / "boom.log").read_text()
    assert records["sleepy"]["status"].startswith("timeout")
    assert records["ok"]["status"] == "ok" and (tmp_path / "ok.txt").read_text() == "ran"
    assert records["late"]["status"].startswith("skipped (deadline")
    write_summary(tmp_path, records, {"date": "d", "command": "c", "dry_run": True, "deadline_s": 9.0, "wall_s": 1})
    write_summary(tmp_path, {"ok": {**records["ok"], "status": "ok", "headline": "rerun"}},
                  {"date": "d", "command": "c", "dry_run": True, "deadline_s": 9.0, "wall_s": 1})
    merged = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert list(merged) == ["boom", "sleepy", "ok", "late"] and merged["ok"]["headline"] == "rerun"


def test_headline_of_a_missing_or_broken_report(tmp_path):
    assert stage_headline("gpt2", tmp_path) is None
    (tmp_path / "gpt2.json").write_text(json.dumps({"summary": {}}))
    assert stage_headline("gpt2", tmp_path).startswith("(report unreadable: KeyError")


def test_unknown_stage_is_refused_with_the_names():
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--stages", "gpt3", "--dry-run"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and "unknown ['gpt3']" in done.stderr and "HINT" in done.stderr


@pytest.mark.timeout(120)
def test_pytest_stage_runs_each_cuda_test_function_in_its_own_process(tmp_path):
    """The GPU machine's pytest stage: one process per test function, the JUnit records
    merged; here the one CUDA test of test_subsample.py is collected and skips (no CUDA)."""
    from benchmarks.gpu_check import _pytest_each

    xml = tmp_path / "pytest_cuda.xml"
    rc = _pytest_each(["-q"], ["tests/protocol/test_subsample.py"], xml, 100)()
    assert rc == 0
    from benchmarks.gpu_machine import _pytest_headline

    assert _pytest_headline(tmp_path) == "pytest -m cuda: 0 passed, 0 failed, 0 errors, 1 skipped"
