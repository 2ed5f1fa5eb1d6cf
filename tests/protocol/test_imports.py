"""The protocol package is pure torch: it never imports Lightning (README "Architecture")."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning_holograd.protocol as protocol

PROTOCOL_DIR = Path(protocol.__file__).resolve().parent
PACKAGE_DIR = PROTOCOL_DIR.parent
FORBIDDEN = ("lightning", "pytorch_lightning", "lightning_fabric")

# Runs in a fresh interpreter. Any import of a Lightning package raises; the parent
# package is replaced by a bare module so lightning_holograd/__init__.py (which will
# register the strategy, and so import Lightning) is never executed.
_CHILD = textwrap.dedent(
    """
    import importlib, importlib.abc, sys, types

    FORBIDDEN = {forbidden!r}

    class BlockLightning(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN:
                raise ImportError(f"blocked import of {{name}}")
            return None

    sys.meta_path.insert(0, BlockLightning())
    try:
        import lightning  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the import blocker does not work")

    package = types.ModuleType("lightning_holograd")
    package.__path__ = [{package_dir!r}]
    sys.modules["lightning_holograd"] = package
    protocol = importlib.import_module("lightning_holograd.protocol")
    for name in protocol.__all__:
        getattr(protocol, name)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    assert not loaded, loaded
    print("protocol imported without lightning:", len(protocol.__all__), "names")
    """
)


def test_protocol_imports_without_lightning():
    code = _CHILD.format(forbidden=FORBIDDEN, package_dir=str(PACKAGE_DIR))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "protocol imported without lightning" in result.stdout


def test_no_lightning_import_statement_anywhere_in_protocol():
    """Also catches imports inside functions, which importing the package would not run."""
    offenders = []
    files = sorted(PROTOCOL_DIR.glob("*.py"))
    assert len(files) >= 7
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders
