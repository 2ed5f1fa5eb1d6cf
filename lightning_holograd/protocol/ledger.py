"""Append-only, hash-chained ledger of verification and slashing events (docs/PROTOCOL.md §6.9).

Each record is one JSON object per line (JSONL). ``prev`` is the SHA-256 (hex) of the
previous record's canonical form (64 zeros for the first), and ``hash`` the SHA-256 of
this record's canonical form without ``hash``: sorted keys, no whitespace. Editing,
removing or reordering any record breaks the chain, and loading fails naming it.

What a chain cannot show by itself: that records were cut off *at the end* (a shorter
file is a valid chain), or that the whole file was rewritten with fresh hashes. Both are
caught only against an anchor kept elsewhere: the record count and head hash stored in
checkpoints and logged every step (``Ledger.load(path, anchor=...)``).

Durability: a record is one ``write`` followed by ``fsync``. A crash during an append
leaves a torn last line; ``load`` reports it (``torn_tail``) and keeps the chain before
it. ``open_file`` never overwrites an earlier file: contents that the resumed run does
not continue are kept as ``<path>.previous.<n>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["GENESIS_HASH", "LedgerRecord", "Ledger", "LedgerTamperError"]

GENESIS_HASH = "0" * 64
log = logging.getLogger(__name__)


class LedgerTamperError(ValueError):
    """A ledger's hash chain does not verify."""


def _canonical(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class LedgerRecord:
    seq: int  # 0-based position in the ledger
    step: int  # optimizer step the event belongs to
    rank: int  # rank the event is about (-1 for run-wide events)
    event: str  # e.g. "verify", "slash", "bootstrap"
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
        self.torn_tail: str | None = None  # a partial last line found by ``load`` (a crash mid-append)

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
    def load(cls, path: str | os.PathLike[str], append: bool = False,
             anchor: tuple[int, str] | None = None) -> "Ledger":
        """Read and verify a JSONL ledger; with ``append=True`` new records go to the same file.

        A last line without its newline that is not a valid record is a torn append: it is
        reported (a warning, and ``torn_tail``), and the records before it load. Any other bad
        line raises ``LedgerTamperError``. ``anchor=(records, head)`` (from a checkpoint or
        the logged metrics) also rejects a file cut short or rewritten: it must hold at
        least that many records, the anchored one ending in that head.
        """
        source = os.fspath(path)
        with open(path, "rb") as handle:
            lines = handle.read().decode("utf-8", errors="replace").split("\n")
        records, torn = [], None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(LedgerRecord.from_json(line))
            except (json.JSONDecodeError, TypeError) as error:
                if number == len(lines):  # no newline after it: the write was cut short
                    torn = line
                    log.warning("%s: the last line (%d bytes) is a torn append, left out; the %d records before it "
                                "verify.", source, len(line.encode()), len(records))
                    break
                raise LedgerTamperError(f"{source}: line {number} is not a ledger record ({error}).") from error
        cls.verify_records(records, source)
        if anchor is not None:
            check_anchor(records, anchor, source)
        ledger = cls(path if append else None)
        ledger.records = records
        ledger.torn_tail = torn
        return ledger

    @classmethod
    def open_file(cls, path: str | os.PathLike[str], records: list[LedgerRecord]) -> "Ledger":
        """A ledger holding ``records`` (a checkpoint's) that appends to ``path``.

        An existing file that holds exactly ``records`` is continued. Any other file (longer:
        records of steps redone after a crash; shorter, empty, torn, or another chain) is
        kept as ``<path>.previous.<n>`` with the first free n, and a new file is written.
        """
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            if _holds_exactly(path, records):
                ledger = cls(path)
                ledger.records = list(records)
                return ledger
            kept = keep_previous(path)
            log.warning("%s does not end at the resumed checkpoint's ledger head (%d records); kept it as %s and "
                        "started the file again from the checkpoint.", path, len(records), kept)
        temporary = f"{path}.tmp-{os.getpid()}"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.writelines(record.to_json() + "\n" for record in records)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        ledger = cls(path)
        ledger.records = list(records)
        return ledger

    def state_dict(self) -> dict[str, Any]:
        return {"records": [record.to_json() for record in self.records]}

    @property
    def anchor(self) -> tuple[int, str]:
        """(number of records, head hash): what a file must still show later."""
        return len(self.records), self.head

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        records = [LedgerRecord.from_json(line) for line in state["records"]]
        self.verify_records(records, "checkpoint ledger")
        self.records = records


def check_anchor(records: list[LedgerRecord], anchor: tuple[int, str], source: str = "ledger") -> None:
    """Raise ``LedgerTamperError`` unless ``records`` reach the anchor (count, head)."""
    count, head = int(anchor[0]), str(anchor[1])
    if len(records) < count:
        raise LedgerTamperError(f"{source}: holds {len(records)} records, but its anchor says {count}: records were "
                                "removed from the end (or the file was emptied).")
    if count and records[count - 1].hash != head:
        raise LedgerTamperError(f"{source}: record {count - 1} does not end at the anchored head {head[:16]}...: the "
                                "file was rewritten.")
    if not count and head != GENESIS_HASH:
        raise LedgerTamperError(f"{source}: the anchor of 0 records must have the genesis head.")


def keep_previous(path: str) -> str:
    """Move ``path`` to the first free ``<path>.previous.<n>`` (never overwriting one); return it."""
    n = 1
    while True:
        target = f"{path}.previous.{n}"
        try:
            os.link(path, target)  # fails if target exists: no race can overwrite evidence
        except FileExistsError:
            n += 1
            continue
        os.unlink(path)
        return target


def _holds_exactly(path: str, records: list[LedgerRecord]) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError):
        return False
    return text == "".join(record.to_json() + "\n" for record in records)
