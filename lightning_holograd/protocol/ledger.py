"""Append-only, hash-chained ledger of verification and slashing events (docs/PROTOCOL.md §6).

Each record is one JSON object per line (JSONL). ``prev`` is the SHA-256 (hex) of the
previous record's canonical form (64 zeros for the first), and ``hash`` the SHA-256 of
this record's canonical form without ``hash``: sorted keys, no whitespace. Editing,
removing or reordering any record breaks the chain, and loading fails naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["GENESIS_HASH", "LedgerRecord", "Ledger", "LedgerTamperError"]

GENESIS_HASH = "0" * 64


class LedgerTamperError(ValueError):
    """A ledger's hash chain does not verify."""


def _canonical(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class LedgerRecord:
    seq: int  # 0-based position in the ledger
    step: int  # optimizer step the event belongs to
    rank: int  # rank the event is about (-1 for run-wide events)
    event: str  # "verify", "slash" or "true_gradient"
    data: dict[str, Any] = field(default_factory=dict)
    prev: str = GENESIS_HASH
    hash: str = ""

    def body(self) -> dict[str, Any]:
        payload = asdict(self)
        payload.pop("hash")
        return payload

    def compute_hash(self) -> str:
        return hashlib.sha256(_canonical(self.body())).hexdigest()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> "LedgerRecord":
        return cls(**json.loads(line))


class Ledger:
    """Hash-chained records, kept in memory and optionally appended to a JSONL file.

    Only one process should write a given file (the strategy's rank 0). Each record is
    flushed as it is appended, so a crash loses at most the record being written.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.records: list[LedgerRecord] = []

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[LedgerRecord]:
        return iter(self.records)

    @property
    def head(self) -> str:
        """Hash of the last record (GENESIS_HASH when empty)."""
        return self.records[-1].hash if self.records else GENESIS_HASH

    def append(self, step: int, rank: int, event: str, **data: Any) -> LedgerRecord:
        record = LedgerRecord(seq=len(self.records), step=int(step), rank=int(rank), event=event,
                              data=dict(data), prev=self.head)
        record = LedgerRecord(**{**asdict(record), "hash": record.compute_hash()})
        # Round-trip through JSON so the in-memory record equals what a reader would load.
        record = LedgerRecord.from_json(record.to_json())
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(record.to_json() + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        return record

    @staticmethod
    def verify_records(records: list[LedgerRecord], source: str = "ledger") -> None:
        """Raise LedgerTamperError naming the first record whose chain link fails."""
        prev = GENESIS_HASH
        for position, record in enumerate(records):
            if record.seq != position:
                raise LedgerTamperError(f"{source}: record {position} has seq={record.seq}; records were removed or reordered.")
            if record.prev != prev:
                raise LedgerTamperError(f"{source}: record {position} (step {record.step}) does not link to the record before it.")
            if record.compute_hash() != record.hash:
                raise LedgerTamperError(f"{source}: record {position} (step {record.step}) was modified: its hash does not match its content.")
            prev = record.hash

    @classmethod
    def load(cls, path: str | os.PathLike[str], append: bool = False) -> "Ledger":
        """Read and verify a JSONL ledger; with ``append=True`` new records go to the same file."""
        records = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(LedgerRecord.from_json(line))
                except (json.JSONDecodeError, TypeError) as error:
                    raise LedgerTamperError(f"{os.fspath(path)}: line {number} is not a ledger record ({error}).") from error
        cls.verify_records(records, os.fspath(path))
        ledger = cls(path if append else None)
        ledger.records = records
        return ledger

    def state_dict(self) -> dict[str, Any]:
        return {"records": [record.to_json() for record in self.records]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        records = [LedgerRecord.from_json(line) for line in state["records"]]
        self.verify_records(records, "checkpoint ledger")
        self.records = records
