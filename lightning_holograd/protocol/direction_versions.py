"""Which direction definitions this release builds, and how each is named (docs/PROTOCOL.md §3.8).

- Version 2 (``DIRECTION_VERSION``, every new run): counter-based hash, ``direction_hash``.
- Version 1 (lightning-holograd 0.1.x): a ``torch.Generator`` reseeded per coordinate
  block, ``directions_v1``. Built only to resume a 0.1.x checkpoint, and only for the
  families listed in ``VERSION_1_FAMILIES``: the codebook and momentum families have been
  rewritten since, so their 0.1.x state cannot be continued.

A version is recorded in a family's state (``direction_version``; absent means 1) and in
the commitment chain's genesis tag, so a run never mixes two definitions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .direction_hash import DIRECTION_VERSION

__all__ = [
    "GENESIS_TAGS",
    "VERSION_1_FAMILIES",
    "check_resumable",
    "genesis_tag",
    "resume_hint",
    "stored_direction_version",
    "version_mismatch",
]

VERSION_1_FAMILIES = ("gaussian", "rademacher", "sketch", "identity")
# c_0 = SHA256(tag || S_0): the tag names the direction version (docs/PROTOCOL.md §2.1).
GENESIS_TAGS = {1: b"holograd/v1", DIRECTION_VERSION: f"holograd/v2/dirs{DIRECTION_VERSION}".encode()}


def stored_direction_version(state: Mapping[str, Any]) -> int:
    """The direction version a checkpointed family state was written with; a state without
    ``direction_version`` was written by lightning-holograd 0.1.x, i.e. version 1."""
    return int(state.get("direction_version", 1))


def resume_hint(name: str, version: int) -> str:
    """What to do with a checkpointed family ``name`` of direction version ``version``."""
    if version == DIRECTION_VERSION or (version == 1 and name in VERSION_1_FAMILIES):
        return (f"HINT: build the family with make_family(..., direction_version={version}); "
                "HoloGradStrategy does so when it resumes.")
    if version == 1:
        return "HINT: start a new run or finish it with lightning-holograd 0.1.x."
    return "HINT: resume with the lightning-holograd release that wrote the checkpoint, or upgrade."


def _unknown(version: Any) -> ValueError:
    return ValueError(
        f"direction_version={version!r} is unknown to this release (it generates version {DIRECTION_VERSION} "
        f"and resumes version 1 for {', '.join(VERSION_1_FAMILIES)}). {resume_hint('', version)}"
    )


def genesis_tag(version: int) -> bytes:
    """The genesis tag of direction version ``version``."""
    if version not in GENESIS_TAGS:
        raise _unknown(version)
    return GENESIS_TAGS[version]


def check_resumable(name: str, version: int) -> None:
    """Refuse, with what to do, a family ``name`` of direction version ``version`` that this
    release cannot build."""
    if version == DIRECTION_VERSION or (version == 1 and name in VERSION_1_FAMILIES):
        return
    if version == 1:
        raise ValueError(
            f"directions={name!r} with direction_version=1 (a lightning-holograd 0.1.x checkpoint) cannot "
            f"be resumed: the codebook and momentum families have been rewritten since 0.1.x, so a 0.1.x "
            f"{name} state cannot be continued. {resume_hint(name, version)}"
        )
    raise _unknown(version)


def version_mismatch(state: Mapping[str, Any], expected: int) -> str:
    """Why a family of direction version ``expected`` refuses the checkpointed ``state``."""
    stored, version = state.get("direction_version"), stored_direction_version(state)
    written = "lightning-holograd 0.1.x" if stored is None else f"direction version {version}"
    return (f"checkpoint direction family has direction_version={stored!r} (written by {written}); this family "
            f"generates direction_version={expected}, so it cannot continue or verify the checkpoint's steps. "
            f"{resume_hint(state['name'], version)}")
