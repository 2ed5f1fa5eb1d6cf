"""The shared harness of the benchmarks: paths, run metadata, report files, the tiny GPT-2
settings, argument parsing and process groups with a deadline.

Every benchmark runs from the repository root as a module (``python -m benchmarks.<name>``)
and writes ``results/<stem>.md`` with ``<stem>.json`` beside it (and a CSV or plots where it
has them); ``--report-only`` redraws the Markdown from the JSON where a script offers it.
``run_metadata`` records what a reader needs to trust a number: machine, versions, the
command, the git commit, the date and the load average.

Nothing here imports torch at module level, so ``--help`` is fast and scripts can set
``OMP_NUM_THREADS`` before torch is loaded.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent  # modules run (and torchrun starts workers) from here
RESULTS = BENCH_DIR / "results"

# ----------------------------------------------------------------------------- tiny GPT-2
# The model and data of configs/gpt2-tiny-cpu.yaml (the README's main job).
SEED = 1337
MODEL_KW: dict[str, Any] = {"block_size": 128, "n_layer": 2, "n_head": 2, "n_embd": 128, "lr": 3e-3,
                            "min_lr": 3e-4, "warmup_steps": 20}
DATA_KW: dict[str, Any] = {"batch_size": 16, "block_size": 128, "val_every": 10, "max_bytes": 4_000_000}
TINY_GPT2_DIM = 445_952  # its trainable parameters D (lm_head tied to wte)


def ring_allreduce_bytes(num_params: int, world_size: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``num_params`` float32: 2(N-1)/N x 4D."""
    from lightning_holograd.engine.traffic import ring_wire_bytes

    return ring_wire_bytes("all_reduce", 4 * num_params, world_size)


# ----------------------------------------------------------------------------- metadata
def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def git_commit() -> str | None:
    """The checkout's commit (12 hex digits), ``-dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """How this invocation is typed: ``python -m benchmarks.<module> <args>``."""
    return f"python -m benchmarks.{module} " + shlex.join(list(argv) if argv is not None else sys.argv[1:])


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_metadata(module: str, argv: Sequence[str] | None, **extra: Any) -> dict[str, Any]:
    """Machine, versions, command, commit, date and load at the start of a benchmark."""
    return {
        "machine": f"{platform.machine()}, {cpu_name()}, {os.cpu_count()} cores, {platform.system()} "
                   f"{platform.release()}",
        "python": platform.python_version(), "torch": version("torch"), "lightning": version("lightning"),
        "transformers": version("transformers"), "commit": git_commit(), "command": command_line(module, argv),
        "date": utc_now(), "loadavg_start": loadavg(), **extra,
    }


def finish_metadata(meta: dict[str, Any], start: float) -> dict[str, Any]:
    """Add the wall time since ``start`` (perf_counter) and the load at the end."""
    meta["total_wall_s"] = time.perf_counter() - start
    meta["loadavg_end"] = loadavg()
    return meta


def provenance(meta: dict[str, Any]) -> str:
    """One Markdown line: commit, date and command (the commit only where it was recorded)."""
    commit = f"commit `{meta['commit']}`; " if meta.get("commit") else ""
    return f"- {commit}date: {meta['date']}; command: `{meta['command']}`"


# ----------------------------------------------------------------------------- report files
def write_report(out_md: Path, markdown: str, payload: dict[str, Any]) -> Path:
    """Write the Markdown and its JSON (same stem); returns the JSON's path."""
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(markdown)
    out_json = out_md.with_suffix(".json")
    out_json.write_text(json.dumps(payload, indent=1) + "\n")
    return out_json


def read_report(out_md: Path) -> dict[str, Any]:
    """The JSON beside ``out_md`` (for ``--report-only``)."""
    path = out_md.with_suffix(".json")
    if not path.exists():
        raise SystemExit(f"--report-only: {path} does not exist. HINT: run the benchmark first, or pass the "
                         "--out of an earlier run.")
    return json.loads(path.read_text())


def report_only(args: argparse.Namespace, report: Any) -> bool:
    """With ``--report-only``: ``report(payload, out_md)`` from the JSON beside ``args.out``."""
    if args.report_only:
        report(read_report(Path(args.out)), Path(args.out))
    return bool(args.report_only)


def write_csv(path: Path, rows: Iterable[dict[str, Any]], keys: Sequence[str]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(keys), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def fmt(x: float | None, digits: int = 2) -> str:
    """``x`` with ``digits`` decimals; "-" for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


@contextmanager
def figure(path: Path, size: tuple[float, float] = (9, 6)) -> Iterator[Any]:
    """Axes of a new matplotlib figure (Agg backend), saved to ``path`` at 120 dpi on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- arguments
def make_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of ``doc`` and whose epilog is the rest."""
    head, _, rest = (doc or "").strip().partition("\n\n")
    return argparse.ArgumentParser(description=head, epilog=rest or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def csv_items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def csv_ints(text: str) -> list[int]:
    """argparse type: comma-separated positive integers (``1e6`` accepted)."""
    try:
        values = [int(float(item)) for item in csv_items(text)]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def csv_floats(text: str) -> list[float]:
    """argparse type: comma-separated numbers."""
    try:
        values = [float(item) for item in csv_items(text)]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def choose(parser: argparse.ArgumentParser, option: str, text: str, allowed: Iterable[str]) -> list[str]:
    """The comma-separated names in ``text``; ``parser.error`` names the unknown ones."""
    allowed = list(allowed)
    names = csv_items(text)
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        parser.error(f"{option}: unknown {unknown or text!r}. HINT: choose from {', '.join(allowed)}")
    return names


def parse_with_profile(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                       profiles: dict[str, dict[str, Any]], default: str) -> argparse.Namespace:
    """Parse ``argv`` with the defaults of the profile it names (``--profile NAME``; ``--smoke``
    means ``--profile smoke``); options given on the command line win. ``{ranks}`` in a string
    default is replaced by ``args.ranks``. ``args.profile`` names the profile."""
    parser.add_argument("--profile", choices=list(profiles), default=default,
                        help=f"a set of defaults: {', '.join(profiles)} (default {default})")
    if "smoke" in profiles:
        parser.add_argument("--smoke", action="store_const", dest="profile", const="smoke",
                            help="= --profile smoke: a few steps of a few runs, results in a temporary folder")
    known, _ = parser.parse_known_args(argv)
    parser.set_defaults(**profiles[known.profile])
    args = parser.parse_args(argv)
    for key, value in vars(args).items():
        if isinstance(value, str) and "{ranks}" in value:
            setattr(args, key, value.format(ranks=args.ranks))
    return args


SMOKE_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "holograd-bench-smoke"  # --smoke results go here


# ----------------------------------------------------------------------------- processes
def start_process(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """``cmd`` from the repository root in its own session (so its children can be killed
    with it), stdout and stderr together."""
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_all(procs: list[subprocess.Popen], deadline: float,
             grace_after_failure: float = 30.0) -> tuple[list[str], list[Any]]:
    """Outputs and return codes of ``procs`` (started by ``start_process``).

    A process still running at ``deadline`` (a ``time.perf_counter`` value) is killed and
    gets the code ``"timeout"``. Once one process has exited with a nonzero code, the others
    get ``grace_after_failure`` seconds more, then are killed with the code
    ``"killed after a failure"``: a torchrun agent whose peer's worker died otherwise sits
    in torchelastic's exit barrier for 300 s. Every process group is killed on Ctrl-C /
    SIGTERM too, so no rank outlives its benchmark."""

    def kill(p: subprocess.Popen) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    outputs: list[str] = [""] * len(procs)
    readers = []
    for i, proc in enumerate(procs):  # drain every pipe as it fills, so no process blocks on it
        def read(i: int = i, proc: subprocess.Popen = proc) -> None:
            outputs[i] = proc.stdout.read() if proc.stdout is not None else ""
        t = threading.Thread(target=read, daemon=True)
        t.start()
        readers.append(t)
    codes: list[Any] = [None] * len(procs)
    try:
        end = deadline
        while any(c is None for c in codes):
            now = time.perf_counter()
            for i, proc in enumerate(procs):
                if codes[i] is None and proc.poll() is not None:
                    codes[i] = proc.returncode
                    if proc.returncode != 0:
                        end = min(end, now + grace_after_failure)
            if now >= end:
                failed = end < deadline
                for i, proc in enumerate(procs):
                    if codes[i] is None:
                        kill(proc)
                        proc.wait()
                        codes[i] = "killed after a failure" if failed else "timeout"
                break
            time.sleep(0.2)
    except BaseException:
        for proc in procs:
            kill(proc)
        raise
    for t in readers:
        t.join(timeout=10.0)
    return outputs, codes


def read_rank_files(directory: Path, name: str, world_size: int) -> list[dict[str, Any]]:
    """The ``<name>_rank<r>.json`` files that exist, in rank order."""
    paths = [directory / f"{name}_rank{r}.json" for r in range(world_size)]
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def remove_stale(directory: Path, pattern: str) -> None:
    for stale in directory.glob(pattern):
        stale.unlink()



# ----------------------------------------------------------------------------- resumable results
class Results:
    """A benchmark's JSON results (``{"meta": ..., "rows": [...]}``, one row per ``row["run"]``),
    saved after every run so that an interrupted invocation resumes where it stopped.

    With ``resume``, the rows of an earlier invocation with status "ok" are kept, provided its
    ``settings`` (meta keys such as steps or ranks) equal this one's; their commands are
    kept in ``meta["command"]`` and their wall time is added to ``meta["total_wall_s"]``.
    """

    def __init__(self, path: Path, meta: dict[str, Any], settings: Sequence[str] = (), resume: bool = False) -> None:
        self.path, self.meta, self.rows = path, meta, []
        self._start, self._prior_wall = time.perf_counter(), 0.0
        if resume and path.exists():
            old = json.loads(path.read_text())
            old_meta = old.get("meta", {})
            changed = {k: (old_meta[k], meta.get(k)) for k in settings if k in old_meta and old_meta[k] != meta.get(k)}
            if changed:
                raise SystemExit(f"--resume: {path} was written with other settings {changed} (old, new). HINT: "
                                 "resume with the same options, or pass another --out.")
            self.rows = [r for r in old.get("rows", []) if r.get("status") == "ok"]
            if self.rows:
                self._prior_wall = old_meta.get("total_wall_s", 0.0)
                commands = [c for c in old_meta.get("command", "").split("; ") if c]
                meta["command"] = "; ".join(dict.fromkeys([*commands, meta["command"]]))

    def done(self, name: str) -> bool:
        return any(r["run"] == name for r in self.rows)

    def add(self, row: dict[str, Any]) -> None:
        self.rows = [r for r in self.rows if r["run"] != row["run"]] + [row]
        self.save()

    def payload(self) -> dict[str, Any]:
        finish_metadata(self.meta, self._start - self._prior_wall)
        return {"meta": self.meta, "rows": self.rows}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.payload(), indent=1) + "\n")
