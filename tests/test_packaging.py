"""Installing and finding the package (issue 15, items 5-7).

- ``pytorch-lightning`` is an extra (``pl``): the package imports and registers its
  strategies without it; README says how each namespace is used.
- The README's CLI section leads with the class-path form, which works in a LightningCLI
  script that never imports the package.
- ``fit --help`` does not list a strategy's arguments (LightningCLI's behaviour); the
  README names the command that does, and that command lists them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
TIMEOUT_S = 120


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=REPO, env=env)


def readme_section(title: str) -> str:
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ )", README, re.MULTILINE | re.DOTALL)
    assert match, f"README has no section {title!r}"
    return match.group(1)


# -- 6. dependencies ---------------------------------------------------------------------------


def test_pytorch_lightning_is_an_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=\[ ]", dep)[0] for dep in project["dependencies"]]
    assert "pytorch-lightning" not in names and "lightning" in names
    assert any(dep.startswith("pytorch-lightning") for dep in project["optional-dependencies"]["pl"])
    assert 'pip install "lightning-holograd[pl]"' in README
    install = readme_section("Install")
    assert "lightning.pytorch" in install and "lightning.fabric" in install and "pytorch_lightning" in install


def test_the_package_works_without_pytorch_lightning():
    """pytorch_lightning blocked: import, registration and a Trainer/Fabric strategy by name still work."""
    result = run_python("""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "pytorch_lightning":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, Block())
        import lightning_holograd
        import lightning.pytorch as L
        from lightning.fabric import Fabric

        assert lightning_holograd.PLHoloGradStrategy is None
        assert type(L.Trainer(strategy="holograd", accelerator="cpu", devices=2).strategy).__name__ == "HoloGradStrategy"
        assert type(Fabric(strategy="holograd", accelerator="cpu", devices=2).strategy).__name__ == "HoloGradFabricStrategy"
        assert not [m for m in sys.modules if m.startswith("pytorch_lightning")]
        print("ok without pytorch_lightning")
        """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok without pytorch_lightning" in result.stdout


# -- 7. CLI: the class-path form, no import needed -------------------------------------------------


def test_readme_cli_section_leads_with_the_class_path():
    section = readme_section("LightningCLI")
    first_block = re.search(r"```\w*\n(.*?)```", section, re.DOTALL).group(1)
    assert "lightning_holograd.HoloGradStrategy" in first_block
    assert section.index("lightning_holograd.HoloGradStrategy") < section.index("import lightning_holograd")


@pytest.mark.timeout(TIMEOUT_S)
def test_class_path_works_in_a_cli_script_that_does_not_import_the_package():
    result = run_python("""
        import sys
        from lightning.pytorch.cli import LightningCLI
        from lightning.pytorch.demos.boring_classes import BoringModel

        assert "lightning_holograd" not in sys.modules
        LightningCLI(BoringModel, args=["fit", "--trainer.strategy", "lightning_holograd.HoloGradStrategy",
                                        "--trainer.strategy.num_directions", "8", "--print_config"])
        """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class_path: lightning_holograd.HoloGradStrategy" in result.stdout
    assert "num_directions: 8" in result.stdout
    assert "find_unused_parameters" not in result.stdout  # DDP-only arguments are not offered


# -- 5. where the strategy's arguments are listed ------------------------------------------------


@pytest.mark.timeout(TIMEOUT_S)
def test_the_command_readme_names_lists_the_strategy_arguments():
    command = "python examples/train_gpt2.py fit --trainer.strategy.help lightning_holograd.HoloGradStrategy"
    assert command in README
    result = subprocess.run([sys.executable, *command.split()[1:]], capture_output=True, text=True,
                            timeout=TIMEOUT_S, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    for argument in ("num_directions", "target_compression", "estimate_scale", "directions", "aggregation"):
        assert f"--trainer.strategy.{argument}" in result.stdout
