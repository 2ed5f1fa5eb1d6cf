"""Overrides are marked ``@override`` and exist on the class they override.

Lightning calls hooks by name: a hook renamed upstream would silently stop being called.
Every method of the package marked ``@override`` must exist further up its class's MRO
(for the strategies, callbacks and launchers: on the Lightning base class), and every
method of a Lightning subclass that shadows a Lightning method must be marked.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from typing import Any

import pytest

import lightning_holograd

PACKAGE = lightning_holograd.__name__


def _package_classes() -> list[type]:
    classes: dict[str, type] = {}
    for info in pkgutil.walk_packages(lightning_holograd.__path__, prefix=f"{PACKAGE}."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__:
                classes[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return list(classes.values())


def _ours(cls: type) -> bool:
    return cls.__module__.split(".")[0] == PACKAGE


def _function(attr: Any) -> Any:
    """The function behind a class attribute (classmethod, staticmethod, property)."""
    if isinstance(attr, (classmethod, staticmethod)):
        return attr.__func__
    if isinstance(attr, property):
        return attr.fget
    return attr


def _methods(cls: type) -> Iterator[tuple[type, str, bool]]:
    """(defining class, name, marked) for every function defined in the package's classes of cls's MRO."""
    for klass in cls.__mro__:
        if _ours(klass):
            for name, attr in vars(klass).items():
                func = _function(attr)
                if callable(func):
                    yield klass, name, bool(getattr(func, "__override__", False))


CLASSES = _package_classes()
LIGHTNING_SUBCLASSES = [cls for cls in CLASSES
                        if any(base.__module__.split(".")[0] in ("lightning", "pytorch_lightning") for base in cls.__mro__)]


def test_the_walk_finds_the_lightning_classes():
    names = {cls.__qualname__ for cls in LIGHTNING_SUBCLASSES}
    assert {"HoloGradStrategy", "PLHoloGradStrategy", "HoloGradLauncher", "PLHoloGradLauncher", "HoloGradMetrics",
            "ProofVerifier", "ADCBootstrap", "ByzantineSimulator", "ToyModule"} <= names


def _is_mixin(cls: type) -> bool:
    """A class with no base but object outside its own mixins: checked through the classes using it."""
    return cls.__qualname__.endswith("Mixin") and all(_ours(base) or base is object for base in cls.__mro__)


@pytest.mark.parametrize("cls", [cls for cls in CLASSES if not _is_mixin(cls)],
                         ids=lambda cls: f"{cls.__module__}.{cls.__qualname__}")
def test_every_marked_override_exists_further_up_the_mro(cls):
    for klass, name, marked in _methods(cls):
        if marked:
            later = cls.__mro__[cls.__mro__.index(klass) + 1:]
            assert any(name in vars(base) for base in later), (
                f"{klass.__qualname__}.{name} is marked @override but no base of {cls.__qualname__} defines it")


@pytest.mark.parametrize("cls", LIGHTNING_SUBCLASSES, ids=lambda cls: cls.__qualname__)
def test_every_override_of_lightning_is_marked(cls):
    lightning_bases = [base for base in cls.__mro__ if not _ours(base) and base is not object]
    unmarked = [f"{klass.__qualname__}.{name}" for klass, name, marked in _methods(cls)
                if not marked and not name.startswith("__") and any(name in vars(b) for b in lightning_bases)]
    assert not unmarked, f"overrides of Lightning methods without @override: {unmarked}"
