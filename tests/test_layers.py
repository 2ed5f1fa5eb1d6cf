"""The four layers import only downwards (README "Architecture").

protocol (pure torch) <- engine (torch.distributed) <- strategies (Lightning) <- callbacks.
Checked on the source, so imports inside functions count too; the protocol test in
tests/protocol/test_imports.py also imports it with Lightning blocked.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lightning_holograd

PACKAGE_DIR = Path(lightning_holograd.__file__).resolve().parent
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")
# layer -> (external modules it must not import, sibling layers it must not import)
RULES = {
    "protocol": (LIGHTNING + ("torch.distributed",), ("engine", "strategies", "callbacks", "demos")),
    "engine": (LIGHTNING, ("strategies", "callbacks", "demos")),
    "strategies": ((), ("callbacks", "demos")),
    "callbacks": (("torch.distributed",), ("strategies", "demos")),
}


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, level) of every import; level > 0 for relative imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def _layer_of(module: str, level: int, layer: str) -> str | None:
    """The package layer a relative import from ``layer`` reaches, if any."""
    if level == 2:  # from ..x import y
        return module.split(".")[0] or None
    if level == 0 and module.startswith("lightning_holograd."):
        return module.split(".")[1]
    return layer if level == 1 else None


@pytest.mark.parametrize("layer", list(RULES))
def test_layer_imports_only_downwards(layer):
    external, siblings = RULES[layer]
    files = sorted((PACKAGE_DIR / layer).glob("*.py"))
    assert files
    offenders = []
    for path in files:
        for module, level in _imports(path):
            if level == 0 and any(module == name or module.startswith(name + ".") for name in external):
                offenders.append(f"{path.name}: {module}")
            if _layer_of(module, level, layer) in siblings:
                offenders.append(f"{path.name}: {'.' * level}{module}")
    assert not offenders, offenders


def test_engine_imports_without_lightning():
    code = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys, types

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {LIGHTNING!r}:
                    raise ImportError(f"blocked import of {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        package = types.ModuleType("lightning_holograd")
        package.__path__ = [{str(PACKAGE_DIR)!r}]
        sys.modules["lightning_holograd"] = package
        engine = importlib.import_module("lightning_holograd.engine")
        assert not [m for m in sys.modules if m.split(".")[0] in {LIGHTNING!r}]
        print("engine imported without lightning:", len(engine.__all__), "names")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "engine imported without lightning" in result.stdout
