"""The GPU check: one command, offline, about 9 minutes on one H200 (issue 17).

Stages, in this order, each in its own forked process (its own time budget; a stage that
fails or runs out of time is recorded and the next one starts; a stage whose budget no
longer fits before the overall ``--deadline`` is skipped):

  machine              nvidia-smi, torch / CUDA / cuDNN versions, the device's properties
  pytest_cuda          ``pytest -m cuda tests/``, one process per test function (strategy on
                       cuda, directions CUDA vs CPU, compiled kernels vs eager, bf16-mixed)
  directions_dense     bench_directions on the device: sketch, rademacher, gaussian for
                       D up to 124,439,808 and K up to 4096, with the card's copy / randn / hash
                       throughput measured in the same run (the ratios' denominators)
  directions_compiled  the fused torch.compile kernels (Triton on CUDA) beside the eager
                       sketch, D = 10M and 124M: does "auto" pay off on CUDA?
  c8_default           C8: 200 honest claims recomputed on the GPU, default kernels
  gpt2                 GPT-2 124M, 50 steps: HoloGrad sketch vs plain, step ratio, direction share
  directions_subspace  bench_directions for codebook and momentum (D <= 10M)
  ranks                two gloo ranks on one GPU: collectives on CUDA tensors (each op in
                       its own pair of processes), a two-rank fit
  c8_deterministic     40 claims under torch.use_deterministic_algorithms(True)

Everything goes to ``--results`` (default ``benchmarks/results/gpu``): ``summary.md`` /
``summary.json`` (one line per stage: status, seconds, headline), ``machine.md``, each
stage's report, and ``logs/<stage>.log``. ``--stages a,b`` reruns some stages and keeps
the others' entries in the summary. ``--dry-run`` runs every stage on the CPU with tiny
sizes (seconds each) into ``benchmarks/results/gpu_dry_run``: it proves the script, not the GPU.

  python -m benchmarks.gpu_check                       # on the GPU machine (benchmarks/gpu_check.sh)
  python -m benchmarks.gpu_check --dry-run             # anywhere, CPU
  python -m benchmarks.gpu_check --stages c8_default,gpt2 --deadline 200
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, as in the tests
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() without initialising CUDA
os.environ.setdefault("PYTHONUNBUFFERED", "1")

import json  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.gpu_machine import describe_machine, stage_headline  # noqa: E402
from benchmarks.harness import REPO_ROOT, RESULTS, csv_items, make_parser, utc_now  # noqa: E402

D_124M = 124_439_808  # GPT-2 124M's trainable parameters (GPT2Config defaults, tied head)


@dataclass
class Stage:
    name: str
    budget_s: float
    call: Callable[[], int | None]
    files: list[str] = field(default_factory=list)  # reports the stage writes (relative to the results)


# ----------------------------------------------------------------------------- the plan
def _module_main(module: str, argv: list[str]) -> Callable[[], int | None]:
    def call() -> int | None:
        import importlib

        return importlib.import_module(f"benchmarks.{module}").main(argv)
    return call


def _pytest(argv: list[str]) -> Callable[[], int | None]:
    def call() -> int | None:
        import pytest

        os.chdir(REPO_ROOT)
        return int(pytest.main(argv))  # 5 (no test selected) is a failure here too
    return call


def _pytest_each(argv: list[str], paths: list[str], xml: Path, per_test_s: float) -> Callable[[], int | None]:
    """``pytest -m cuda``, one process per test function (all its parametrizations), the
    results merged into one JUnit file: on the H200 each pytest process that ran a CUDA fit
    exited 195 after its summary, and one died mid-run, hiding the tests after it. Status
    comes from the JUnit records, not the exit codes; a function with no record (crash,
    timeout) is counted as an error."""
    def call() -> int | None:
        import subprocess
        import xml.etree.ElementTree as ET

        os.chdir(REPO_ROOT)
        base = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-o", "addopts="]
        listed = subprocess.run([*base, "--collect-only", "-q", *paths], capture_output=True, text=True)
        functions = list(dict.fromkeys(line.split("[")[0] for line in listed.stdout.splitlines() if "::" in line))
        print(f"[pytest_cuda] {len(functions)} test functions", flush=True)
        parts = xml.parent / "pytest_cuda_parts"
        parts.mkdir(exist_ok=True)
        suite = ET.Element("testsuite", name="pytest -m cuda (one process per test function)")
        totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
        for i, node in enumerate(functions):
            part = parts / f"{i}.xml"
            part.unlink(missing_ok=True)
            try:
                done = subprocess.run([*base, *argv, f"--junitxml={part}", node], timeout=per_test_s)
                rc = done.returncode
            except subprocess.TimeoutExpired:
                rc = f"timeout ({per_test_s:.0f} s)"
            cases = []
            if part.is_file():
                root = ET.parse(part).getroot()
                cases = list(root.iter("testcase"))
            if not cases:
                case = ET.Element("testcase", classname=node.split("::")[0], name=node.split("::")[-1])
                ET.SubElement(case, "error", message=f"no JUnit record: exit {rc}")
                cases = [case]
            for case in cases:
                suite.append(case)
                totals["tests"] += 1
                for kind, key in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
                    totals[key] += case.find(kind) is not None
            print(f"[pytest_cuda] {node}: exit {rc}, {len(cases)} records", flush=True)
        for key, value in totals.items():
            suite.set(key, str(value))
        root = ET.Element("testsuites")
        root.append(suite)
        ET.ElementTree(root).write(xml, encoding="utf-8", xml_declaration=True)
        return 0 if functions and totals["failures"] == totals["errors"] == 0 else 1
    return call


def _directions(out: Path, stem: str, dry: bool, families: str, dims: str, ks: str, max_s: int) -> list[str]:
    if dry:
        return ["--device", "cpu", "--dims", "1000", "--ks", "16", "--repeats", "1", "--warmup", "0",
                "--families", families.split(",")[0], "--out", str(out / f"{stem}.md")]
    return ["--device", "cuda", "--dims", dims, "--ks", ks, "--families", families, "--repeats", "3",
            "--warmup", "1", "--max-seconds", str(max_s), "--no-codebook-exploration", "--out", str(out / f"{stem}.md")]


def plan(out: Path, dry: bool) -> list[Stage]:
    """The stages and their budgets (seconds on an H200; the deadline, not their sum, bounds a run)."""
    d = ["--dry-run"] if dry else []
    if dry:  # one process: the dry run only proves the wiring, and every test skips
        pytest_call = _pytest(["-q", "-m", "cuda", "-p", "no:cacheprovider", "-o", "addopts=", "-rs",
                               f"--junitxml={out / 'pytest_cuda.xml'}", "tests/strategy/test_cuda.py"])
    else:
        pytest_call = _pytest_each(["-q", "-rA", "--tb=short"], ["tests/"], out / "pytest_cuda.xml", 90)
    dense = _directions(out, "directions_dense", dry, "sketch,rademacher,gaussian",
                        f"1000000,10000000,{D_124M}", "64,1024,4096", 12)
    subspace = _directions(out, "directions_subspace", dry, "momentum,codebook", "1000000,10000000", "64,1024", 8)
    fused = _directions(out, "directions_compiled", dry, "sketch-compiled,rademacher-compiled,sketch",
                        f"10000000,{D_124M}", "64,1024,4096", 12)
    # Most telling first: a stage the overall deadline cuts is skipped, and the slowest
    # (deterministic kernels: > 110 s for 200 claims on the first H200 run) comes last, with
    # 40 claims.
    return [
        Stage("machine", 30, lambda: describe_machine(out), ["machine.md"]),
        Stage("pytest_cuda", 240, pytest_call, ["pytest_cuda.xml"]),
        Stage("directions_dense", 100, _module_main("bench_directions", dense), ["directions_dense.md"]),
        Stage("directions_compiled", 120, _module_main("bench_directions", fused), ["directions_compiled.md"]),
        Stage("c8_default", 55, _module_main("gpu_c8", ["--out", str(out), "--mode", "default", *d]),
              ["c8_default.md"]),
        Stage("gpt2", 80, _module_main("gpu_gpt2", ["--out", str(out), *d]), ["gpt2.md"]),
        Stage("directions_subspace", 30, _module_main("bench_directions", subspace), ["directions_subspace.md"]),
        Stage("ranks", 90, _module_main("gpu_ranks", ["--out", str(out), *d]), ["ranks.md"]),
        Stage("c8_deterministic", 110, _module_main("gpu_c8", ["--out", str(out), "--mode", "deterministic",
                                                               *(d or ["--steps", "40"])]),
              ["c8_deterministic.md"]),
    ]


# ----------------------------------------------------------------------------- running
def _child(stage: Stage, log: Path) -> None:
    """In the forked process: own session (so a timeout kills its ranks too), output to
    ``log``; never returns."""
    rc = 1
    try:
        os.setsid()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        # Python-level streams may not write to fds 1 and 2 (pytest's capture): rebind them.
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        result = stage.call()
        rc = 0 if result is None else int(result)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the log gets the traceback, the summary the rc
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def _stop(pid: int) -> None:
    """SIGTERM to the stage's process group, SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
            time.sleep(0.1)


def run_stage(stage: Stage, budget_s: float, log: Path) -> dict[str, Any]:
    """Run ``stage`` in a forked child for at most ``budget_s`` seconds."""
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(stage, log)
    status: str | None = None
    while status is None:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(code)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        elif time.monotonic() - t0 > budget_s:
            _stop(pid)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            status = f"timeout ({budget_s:.0f} s)"
        else:
            time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)  # ranks a finished stage left behind
    except (ProcessLookupError, PermissionError):
        pass
    return {"status": status, "wall_s": round(time.monotonic() - t0, 1), "budget_s": round(budget_s, 1),
            "log": str(log.relative_to(log.parent.parent)), "date": utc_now()}


def run_all(stages: list[Stage], out: Path, deadline_s: float, min_budget_s: float = 5.0) -> dict[str, dict[str, Any]]:
    """Stages in order; each gets min(its budget, what is left of the deadline), and is
    skipped when the deadline cuts its budget below ``min_budget_s``."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    records: dict[str, dict[str, Any]] = {}
    for stage in stages:
        left = deadline_s - (time.monotonic() - t0)
        budget = min(stage.budget_s, left)
        if budget < min(stage.budget_s, min_budget_s):
            records[stage.name] = {"status": f"skipped (deadline {deadline_s:.0f} s)", "wall_s": 0.0,
                                   "budget_s": stage.budget_s, "date": utc_now()}
        else:
            print(f"[gpu_check] {stage.name}: budget {budget:.0f} s", flush=True)
            records[stage.name] = run_stage(stage, budget, out / "logs" / f"{stage.name}.log")
        records[stage.name]["headline"] = stage_headline(stage.name, out)
        print(f"[gpu_check] {stage.name}: {records[stage.name]['status']} in {records[stage.name]['wall_s']} s"
              f" -- {records[stage.name]['headline']}", flush=True)
    return records


# ----------------------------------------------------------------------------- summary
def write_summary(out: Path, records: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    """Merge ``records`` into ``summary.json`` (stages not rerun keep their entries) and
    redraw ``summary.md``."""
    path = out / "summary.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    stages = {**earlier.get("stages", {}), **records}
    payload = {"meta": meta, "stages": stages}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"# GPU check{' (DRY RUN: CPU, tiny sizes)' if meta['dry_run'] else ''}", "",
             f"- {meta['date']}; command `{meta['command']}`; deadline {meta['deadline_s']} s; "
             f"wall {meta['wall_s']} s", "- machine: see machine.md; each stage's log is in logs/", "",
             "| stage | status | s (budget) | headline |", "|---|---|---:|---|"]
    for name, r in stages.items():
        lines.append(f"| {name} | {r['status']} | {r.get('wall_s', '-')} ({r.get('budget_s', '-')}) "
                     f"| {r.get('headline') or '-'} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None) -> Any:
    p = make_parser(__doc__)
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU with tiny sizes")
    p.add_argument("--results", default=None, help="results folder (default benchmarks/results/gpu, "
                                                   "or benchmarks/results/gpu_dry_run with --dry-run)")
    p.add_argument("--deadline", type=float, default=540.0, help="overall seconds for all stages (default 540)")
    p.add_argument("--stages", type=csv_items, default=None, help="comma-separated stage names (default: all)")
    args = p.parse_args(argv)
    names = [s.name for s in plan(Path("."), args.dry_run)]
    unknown = [s for s in args.stages or [] if s not in names]
    if unknown:
        p.error(f"--stages={','.join(args.stages)}: unknown {unknown}. HINT: choose from {','.join(names)}.")
    if not args.deadline > 0:
        p.error(f"--deadline={args.deadline} must be > 0 seconds. HINT: 540 fits a 10-minute device call.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.results or RESULTS / ("gpu_dry_run" if args.dry_run else "gpu")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = [s for s in plan(out, args.dry_run) if args.stages is None or s.name in args.stages]
    # Import the stages' heavy modules once, before forking: each stage then starts in a
    # fraction of a second. Nothing here touches CUDA, so the forked stages can.
    import benchmarks.bench_directions  # noqa: F401
    import benchmarks.gpu_c8  # noqa: F401
    import benchmarks.gpu_gpt2  # noqa: F401
    import benchmarks.gpu_ranks  # noqa: F401

    t0 = time.monotonic()
    meta = {"date": utc_now(), "command": "python -m benchmarks.gpu_check " + " ".join(argv or sys.argv[1:]),
            "dry_run": args.dry_run, "deadline_s": args.deadline}
    records = run_all(stages, out, args.deadline)
    meta["wall_s"] = round(time.monotonic() - t0, 1)
    write_summary(out, records, meta)
    print(f"[gpu_check] wrote {out / 'summary.md'} ({meta['wall_s']} s)", flush=True)
    return 0 if all(r["status"] == "ok" for r in records.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
