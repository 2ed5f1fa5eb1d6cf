"""Which wheels the offline GPU machine needs: the package's runtime dependency closure,
at the versions installed here, minus torch (the machine has its own CUDA build) and minus
the common base packages its image holds in any usable version.

Prints one ``name==version`` per line for ``benchmarks/gpu_wheels.sh`` (which downloads
them for Python 3.12 / manylinux x86_64), and, on stderr, what it leaves to the image.

  python -m benchmarks.gpu_wheels            # the pins
  python -m benchmarks.gpu_wheels --lacking .whl   # on the GPU machine: wheels whose package the image lacks
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOTS = ["lightning", "pytorch-lightning", "torchmetrics", "torchdata", "transformers", "datasets",
         "jsonargparse[signatures]"]  # pyproject.toml's dependencies, torch aside
TORCH_FAMILY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|pytorch-triton.*|setuptools|pip|wheel)$")
# In the lent machine's image (docs of the device), where any recent version serves.
IMAGE_BASE = {
    "numpy", "pandas", "pyarrow", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "regex", "pyyaml",
    "xxhash", "python-dateutil", "six", "filelock", "fsspec", "packaging", "typing-extensions", "requests",
    "urllib3", "idna", "certifi", "charset-normalizer", "tqdm", "click", "rich", "markdown-it-py", "mdurl",
    "pygments", "typer", "shellingham", "anyio", "h11", "annotated-doc", "aiohttp", "aiosignal", "attrs",
    "frozenlist", "multidict", "propcache", "yarl", "aiohappyeyeballs", "psutil",
}
# Python 3.12 on Linux x86_64: the markers the closure is evaluated with.
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "os_name": "posix"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> dict[str, str | None]:
    """{name: installed version or None} for ``roots`` and their runtime requirements."""
    found: dict[str, str | None] = {}
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = normalise(req.name)
        if name in found:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            found[name] = None
            continue
        found[name] = dist.version
        for line in dist.requires or []:
            sub = Requirement(line)
            extras = [""] + sorted(req.extras)
            if sub.marker is None or any(sub.marker.evaluate({**TARGET_ENV, "extra": e}) for e in extras):
                todo.append(sub)
    return found


def pins() -> tuple[list[str], list[str]]:
    """(name==version to carry, names left to the image)."""
    carry, left = [], []
    for name, ver in sorted(closure(ROOTS).items()):
        if TORCH_FAMILY.match(name) or name in IMAGE_BASE:
            left.append(name)
        elif ver is None:
            raise SystemExit(f"{name} is required but not installed here. HINT: pip install -e . first.")
        else:
            carry.append(f"{name}=={ver.split('+')[0]}")
    return carry, left


def lacking(folder: Path) -> list[Path]:
    """Wheels in ``folder`` whose distribution this Python does not have."""
    out = []
    for wheel in sorted(folder.glob("*.whl")):
        try:
            md.version(normalise(wheel.name.split("-")[0]))
        except md.PackageNotFoundError:
            out.append(wheel)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lacking", type=Path, default=None, help="print the wheels of FOLDER this Python lacks")
    args = p.parse_args(argv)
    if args.lacking is not None:
        print("\n".join(str(w) for w in lacking(args.lacking)))
        return 0
    carry, left = pins()
    print("\n".join(carry))
    print(f"left to the GPU machine's image: {', '.join(left)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
