"""The GPU check's machine description and the one-line headline of each stage's report.

``describe_machine`` runs in the check's first forked stage (it initialises CUDA there,
never in the parent that forks the later stages). ``stage_headline`` reads what a stage
wrote; a stage that wrote nothing has no headline.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from benchmarks.harness import cpu_name, git_commit, utc_now, version

PACKAGES = ("torch", "lightning", "pytorch-lightning", "torchmetrics", "transformers", "tokenizers",
            "huggingface-hub", "safetensors", "torchdata", "numpy", "lightning-holograd")


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return f"({cmd[0]} not found)"
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({' '.join(cmd)} failed: {exc})"
    return (done.stdout + done.stderr).strip()


def _torch_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"torch": torch.__version__, "cuda_build": torch.version.cuda,
                             "cuda_available": torch.cuda.is_available(), "devices": []}
    if facts["cuda_available"]:
        facts["cudnn"] = torch.backends.cudnn.version()
        facts["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None
        for index in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(index)
            facts["devices"].append({"name": prop.name, "capability": f"{prop.major}.{prop.minor}",
                                     "memory_gib": round(prop.total_memory / 2**30, 1),
                                     "multiprocessors": prop.multi_processor_count})
    facts["gloo_available"] = torch.distributed.is_gloo_available()
    facts["nccl_available"] = torch.distributed.is_nccl_available()
    return facts


def describe_machine(out: Path) -> int:
    """Write ``machine.md`` and ``machine.json`` under ``out``."""
    facts = {"date": utc_now(), "commit": git_commit(), "python": platform.python_version(),
             "platform": platform.platform(), "cpu": cpu_name(),
             "packages": {name: version(name) for name in PACKAGES}, **_torch_facts()}
    smi = _run(["nvidia-smi"])
    facts["nvidia_smi_query"] = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                      "clocks.max.mem,power.limit", "--format=csv"])
    (out / "machine.json").write_text(json.dumps({**facts, "nvidia_smi": smi}, indent=1) + "\n")
    devices = "; ".join(f"{d['name']} (sm {d['capability']}, {d['memory_gib']} GiB, {d['multiprocessors']} SMs)"
                        for d in facts["devices"]) or "none (CPU only)"
    lines = ["# Machine", "", f"- date {facts['date']}; commit {facts['commit'] or '-'}",
             f"- python {facts['python']}; {facts['platform']}; CPU {facts['cpu']}",
             f"- torch {facts['torch']} (CUDA build {facts['cuda_build']}), cuDNN {facts.get('cudnn', '-')}, "
             f"NCCL {facts.get('nccl', '-')}; gloo {facts['gloo_available']}, nccl {facts['nccl_available']}",
             f"- devices: {devices}",
             "- packages: " + ", ".join(f"{k} {v}" for k, v in facts["packages"].items()), "",
             "```", facts["nvidia_smi_query"], "", smi, "```"]
    (out / "machine.md").write_text("\n".join(lines) + "\n")
    print(f"[machine] {devices}; torch {facts['torch']}", flush=True)
    return 0


# ----------------------------------------------------------------------------- headlines
def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pytest_headline(out: Path) -> str | None:
    try:
        root = ET.parse(out / "pytest_cuda.xml").getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return (f"pytest -m cuda: {passed} passed, {n['failures']} failed, {n['errors']} errors, "
            f"{n['skipped']} skipped")


def _directions_headline(payload: dict[str, Any]) -> str:
    """The card's throughput at the largest D (the denominators), and the sketch at the largest (D, K)."""
    refs = payload["references"]
    dim = max(int(d) for d in refs["copy_s"])
    key = next(k for k in refs["copy_s"] if int(k) == dim)
    copy_gbs = 8 * dim / refs["copy_s"][key] / 1e9  # 4 bytes read + 4 written per coordinate
    parts = [f"D={dim:,}: copy {copy_gbs:.3g} GB/s, randn {dim / refs['randn_s'][key] / 1e9:.3g} G values/s, "
             f"hash {dim / refs['hash_s'][key] / 1e9:.3g} G words/s"]
    rows = [r for r in payload["results"] if r["status"] == "ok"]
    if rows:
        last = max(rows, key=lambda r: (r["D"], r["K"]))
        parts.append(f"{last['family']} D={last['D']:,} K={last['K']}: project {last['project_s'] * 1e3:.1f} ms "
                     f"({last['project_x_copy']:.1f}x copy), synthesize {last['synthesize_s'] * 1e3:.1f} ms")
    skipped = sum(1 for r in payload["results"] if r["status"] != "ok")
    return "; ".join(parts) + f"; {len(rows)} configs ok, {skipped} skipped/failed"


def stage_headline(name: str, out: Path) -> str | None:
    """One line from the report ``name`` wrote under ``out`` (None where there is none)."""
    try:
        if name == "machine":
            facts = _json(out / "machine.json")
            return None if facts is None else (", ".join(d["name"] for d in facts["devices"]) or "no CUDA device") + \
                f"; torch {facts['torch']}, CUDA {facts['cuda_build']}"
        if name == "pytest_cuda":
            return _pytest_headline(out)
        if name.startswith("directions_"):
            payload = _json(out / f"{name}.json")
            return None if payload is None else _directions_headline(payload)
        payload = _json(out / f"{'ranks' if name == 'ranks' else name}.json")
        if payload is None:
            return None
        return {"gpt2": lambda: payload["summary"]["headline"], "ranks": lambda: payload["meta"]["headline"]}.get(
            name, lambda: payload["result"]["headline"])()
    except (KeyError, StopIteration, TypeError, ValueError, ZeroDivisionError) as exc:
        return f"(report unreadable: {type(exc).__name__}: {exc})"
