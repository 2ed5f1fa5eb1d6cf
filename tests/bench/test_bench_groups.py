"""benchmarks.bench_groups runs and writes one row per (family, D, K, G)."""

from __future__ import annotations

import json

from benchmarks import bench_groups


def test_smoke(tmp_path):
    out = tmp_path / "groups.md"
    assert bench_groups.main(["--dims", "1000", "--ks", "16", "--groups", "1,3", "--families", "sketch,gaussian",
                              "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [(r["family"], r["G"], r["ranks"]) for r in rows] == [("sketch", 1, 8), ("sketch", 3, 8),
                                                                  ("gaussian", 1, 8), ("gaussian", 3, 8)]
    assert all(r["seconds"] > 0 for r in rows)
    assert "| sketch | 1,000 | 16 | 3 |" in out.read_text()
