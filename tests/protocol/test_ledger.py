"""Hash-chained slashing ledger (docs/PROTOCOL.md §6)."""

from __future__ import annotations

import hashlib
import json

import pytest

from lightning_holograd.protocol import Ledger, LedgerRecord, LedgerTamperError
from lightning_holograd.protocol.ledger import GENESIS_HASH

EVENTS = [
    (3, 1, "verify", {"accepted": True, "max_abs_err": 0.0}),
    (3, 2, "verify", {"accepted": False, "max_abs_err": 12.5}),
    (3, 2, "slash", {"reason": "scalar mismatch", "directions": [0, 4]}),
    (7, -1, "bootstrap", {"verifiable": False}),
    (9, 3, "verify", {"accepted": True, "max_abs_err": 1e-7}),
]


def _filled(path=None) -> Ledger:
    ledger = Ledger(path)
    for step, rank, event, data in EVENTS:
        ledger.append(step, rank, event, **data)
    return ledger


def _lines(path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _write(path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _edit(path, index: int, **changes) -> None:
    """Rewrite record ``index`` of the file with some fields changed (still valid JSON)."""
    lines = _lines(path)
    record = json.loads(lines[index])
    record.update(changes)
    lines[index] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    _write(path, lines)


# -- chaining and round trips ----------------------------------------------------------


def test_records_are_hash_chained():
    ledger = _filled()
    assert len(ledger) == len(EVENTS)
    prev = GENESIS_HASH
    for seq, record in enumerate(ledger):
        assert record.seq == seq and record.prev == prev
        body = {k: v for k, v in json.loads(record.to_json()).items() if k != "hash"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        assert record.hash == hashlib.sha256(canonical).hexdigest()
        prev = record.hash
    assert ledger.head == prev
    assert Ledger().head == GENESIS_HASH


def test_append_and_load_round_trip(tmp_path):
    path = tmp_path / "ledger.jsonl"
    written = _filled(path)
    assert len(_lines(path)) == len(EVENTS)
    loaded = Ledger.load(path)
    assert loaded.records == written.records
    assert loaded.head == written.head
    assert [(r.step, r.rank, r.event, r.data) for r in loaded] == [tuple(e) for e in EVENTS]
    assert loaded.path is None  # read-only unless append=True


def test_load_with_append_continues_the_chain(tmp_path):
    path = tmp_path / "ledger.jsonl"
    _filled(path)
    reference = _filled()  # the same events, in memory only
    resumed = Ledger.load(path, append=True)
    record = resumed.append(11, 0, "slash", reason="late")
    assert record.seq == len(EVENTS) and record.prev == reference.head
    assert reference.append(11, 0, "slash", reason="late") == record
    assert Ledger.load(path).records == reference.records
    assert len(_lines(path)) == len(EVENTS) + 1


def test_ledger_without_path_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _filled()
    assert list(tmp_path.iterdir()) == []


def test_state_dict_round_trip():
    original = _filled()
    state = json.loads(json.dumps(original.state_dict()))
    restored = Ledger()
    restored.load_state_dict(state)
    assert restored.records == original.records
    assert restored.append(12, 1, "verify", accepted=True) == original.append(12, 1, "verify", accepted=True)


# -- tamper detection ------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [{"step": 4}, {"rank": 1}, {"event": "verify"}, {"data": {"reason": "scalar mismatch", "directions": [0]}}],
    ids=["step", "rank", "event", "data"],
)
def test_edited_field_is_detected_and_named(tmp_path, changes):
    path = tmp_path / "ledger.jsonl"
    _filled(path)
    Ledger.load(path)  # verifies before the edit
    _edit(path, 2, **changes)
    with pytest.raises(LedgerTamperError, match=r"record 2 \(step \d+\) was modified"):
        Ledger.load(path)


def test_raw_byte_edit_is_detected(tmp_path):
    path = tmp_path / "ledger.jsonl"
    _filled(path)
    lines = _lines(path)
    assert '"max_abs_err":12.5' in lines[1]
    lines[1] = lines[1].replace('"max_abs_err":12.5', '"max_abs_err":0.0')
    _write(path, lines)
    with pytest.raises(LedgerTamperError, match="record 1 .*was modified"):
        Ledger.load(path)


def test_rehashed_edit_breaks_the_next_link(tmp_path):
    """A forger who also recomputes the edited record's hash is caught by the next record."""
    path = tmp_path / "ledger.jsonl"
    _filled(path)
    forged = LedgerRecord.from_json(_lines(path)[1])
    forged = LedgerRecord(**{**json.loads(forged.to_json()), "data": {"accepted": True, "max_abs_err": 0.0}})
    forged = LedgerRecord(**{**json.loads(forged.to_json()), "hash": forged.compute_hash()})
    lines = _lines(path)
    lines[1] = forged.to_json()
    _write(path, lines)
    with pytest.raises(LedgerTamperError, match=r"record 2 \(step 3\) does not link"):
        Ledger.load(path)


def test_removed_record_is_detected(tmp_path):
    path = tmp_path / "ledger.jsonl"
    _filled(path)
    lines = _lines(path)
    del lines[2]
    _write(path, lines)
    with pytest.raises(LedgerTamperError, match="record 2 has seq=3; records were removed or reordered"):
        Ledger.load(path)


def test_reordered_records_are_detected(tmp_path):
    path = tmp_path / "ledger.jsonl"
    _filled(path)
    lines = _lines(path)
    lines[1], lines[3] = lines[3], lines[1]
    _write(path, lines)
    with pytest.raises(LedgerTamperError, match="record 1 has seq=3"):
        Ledger.load(path)


def test_renumbered_records_are_detected(tmp_path):
    """Removing a record and renumbering seq leaves a broken prev link."""
    path = tmp_path / "ledger.jsonl"
    _filled(path)
    lines = [json.loads(line) for line in _lines(path)]
    del lines[1]
    for seq, record in enumerate(lines):
        record["seq"] = seq
    _write(path, [json.dumps(record) for record in lines])
    with pytest.raises(LedgerTamperError, match="record 1 "):
        Ledger.load(path)


@pytest.mark.parametrize("garbage", ["{not json", '{"seq": 0}', "[1, 2]"])
def test_garbage_line_is_rejected(tmp_path, garbage):
    path = tmp_path / "ledger.jsonl"
    _filled(path)
    lines = _lines(path)
    lines.insert(2, garbage)
    _write(path, lines)
    with pytest.raises(LedgerTamperError, match="line 3 is not a ledger record"):
        Ledger.load(path)


def test_load_state_dict_of_tampered_records_raises():
    original = _filled()
    state = original.state_dict()
    tampered = json.loads(state["records"][3])
    tampered["rank"] = 0
    records = list(state["records"])
    records[3] = json.dumps(tampered)
    target = _filled()
    target.append(20, 0, "verify")
    before = list(target.records)
    with pytest.raises(LedgerTamperError, match="checkpoint ledger: record 3 .*was modified"):
        target.load_state_dict({"records": records})
    assert target.records == before  # unchanged on failure
    with pytest.raises(LedgerTamperError, match="record 0 has seq=1"):
        Ledger().load_state_dict({"records": state["records"][1:]})
