"""docs/PROTOCOL.md: the package's references to it, its section numbers and its test vectors.

Code comments point at the repo's own spec as "docs/PROTOCOL.md §N". These tests keep
those pointers valid, keep the private design files out of the package, and recompute
the spec's test vectors (§2.8, §3.2, §3.3, §3.8, §6.11) with the package, so the text
cannot drift from what the code computes.
"""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

import torch

from lightning_holograd.protocol import (
    CommitmentChain,
    GaussianDirections,
    Ledger,
    RademacherDirections,
    SketchDirections,
    claim_digest,
    direction_seeds,
    draw_claims,
    genesis_commitment,
    hash_batch,
    scalars_digest,
)
from lightning_holograd.protocol.direction_hash import gaussian_table, hash_words
from lightning_holograd.protocol.directions_v1 import block_seed

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "lightning_holograd"
SPEC = REPO / "docs" / "PROTOCOL.md"

TOP_LEVEL_SECTIONS = {
    1: "The idea",
    2: "Commitment chain and seeds",
    3: "Direction families",
    4: "Aggregation",
    5: "Codebook (ADC)",
    6: "Verification and slashing",
    7: "Other modes",
    8: "Communication accounting",
    9: "Extensions",
    10: "Departures from the public HoloGrad code",
}

# "docs/PROTOCOL.md §5", "docs/PROTOCOL.md §§5 and 7", "docs/PROTOCOL.md §2.3, §6.4",
# "docs/PROTOCOL.md sections 1-4": the section list right after the file name.
_REFERENCE = re.compile(
    r"docs/PROTOCOL\.md[,:]?\s*\(?\s*((?:§+|sections?\b)\s*\d+(?:\.\d+)*"
    r"(?:\s*(?:,|and|or|to|-|–)\s*§*\s*\d+(?:\.\d+)*)*)"
)
_NUMBER = re.compile(r"\d+(?:\.\d+)*")
_HEADING = re.compile(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s+(.*)$", re.MULTILINE)


def _spec_text() -> str:
    return SPEC.read_text(encoding="utf-8")


def spec_sections(text: str) -> dict[str, str]:
    """Section number ("2", "2.3") -> heading title, from the markdown headings."""
    return {number: title.strip() for number, title in _HEADING.findall(text)}


def cited_sections(text: str) -> list[str]:
    """Every section number cited as "docs/PROTOCOL.md §N" (or "sections N-M") in ``text``."""
    cited = []
    for match in _REFERENCE.finditer(text):
        cited.extend(_NUMBER.findall(match.group(1)))
    return cited


def _package_text_files() -> list[Path]:
    """Every readable text file under lightning_holograd/ (compiled caches skipped)."""
    files = []
    for path in sorted(PACKAGE.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix in {".pyc", ".pyo", ".so"}:
            continue
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def forbidden_references(text: str) -> list[str]:
    """Mentions of the private design files: PROTOCOL.md without docs/, STYLE.md, LIGHTNING_NOTES.md."""
    def line(match: re.Match[str]) -> int:
        return text.count("\n", 0, match.start()) + 1

    found = [f"line {line(m)}: PROTOCOL.md without docs/" for m in re.finditer(r"(?<!docs/)\bPROTOCOL\.md", text)]
    found += [f"line {line(m)}: {name}" for name in ("STYLE.md", "LIGHTNING_NOTES.md")
              for m in re.finditer(re.escape(name), text)]
    return found


# -- the helpers themselves (so the checks below can fail) ----------------------------


def test_reference_parser_reads_every_citation_form():
    text = ("see docs/PROTOCOL.md §5 and docs/PROTOCOL.md §§2.3, 6.4 or docs/PROTOCOL.md sections 1-4; "
            "docs/PROTOCOL.md (§7 and §42). Plain docs/PROTOCOL.md cites nothing.")
    assert cited_sections(text) == ["5", "2.3", "6.4", "1", "4", "7", "42"]


def test_forbidden_reference_finder():
    assert forbidden_references("see docs/PROTOCOL.md §2") == []
    assert len(forbidden_references("see PROTOCOL.md section 2")) == 1
    assert len(forbidden_references("STYLE.md and LIGHTNING_NOTES.md")) == 2
    assert len(forbidden_references("/work/shared/PROTOCOL.md")) == 1


# -- the package's references -----------------------------------------------------------


def test_package_cites_only_docs_protocol():
    offenders = {}
    for path in _package_text_files():
        found = forbidden_references(path.read_text(encoding="utf-8"))
        if found:
            offenders[str(path.relative_to(REPO))] = found
    assert not offenders, (
        f"files under lightning_holograd/ cite files users never get: {offenders}. HINT: write "
        "'docs/PROTOCOL.md §N' for the spec; STYLE.md and LIGHTNING_NOTES.md are not shipped."
    )


def test_package_citations_name_existing_sections():
    sections = spec_sections(_spec_text())
    missing = {}
    for path in _package_text_files():
        bad = [n for n in cited_sections(path.read_text(encoding="utf-8")) if n not in sections]
        if bad:
            missing[str(path.relative_to(REPO))] = bad
    assert not missing, (
        f"docs/PROTOCOL.md has no such section: {missing}. HINT: sections are "
        f"{', '.join(sorted(sections, key=lambda n: [int(p) for p in n.split('.')]))}."
    )


def test_top_level_sections_keep_their_numbers():
    """Code comments cite these numbers: renumbering would silently break them."""
    sections = spec_sections(_spec_text())
    for number, title in TOP_LEVEL_SECTIONS.items():
        assert str(number) in sections, f"docs/PROTOCOL.md lost section {number} ({title})."
        assert sections[str(number)].startswith(title), (
            f"docs/PROTOCOL.md section {number} is titled {sections[str(number)]!r}, expected {title!r}...")


def test_extensions_are_marked_not_implemented():
    text = _spec_text()
    section9 = text[text.index("## 9."):text.index("## 10.")]
    assert "not yet implemented" in section9


# -- test vectors ---------------------------------------------------------------------------


def _assert_vector(label: str, value: object) -> None:
    text = _spec_text()
    line = f"`{label}` = `{value}`"
    assert line in text, f"docs/PROTOCOL.md should state {line} (the code computes it)."


def _example_batch() -> dict:
    return {"x": torch.tensor([[1, 2], [3, 4]], dtype=torch.int64),
            "y": [torch.tensor(0.5, dtype=torch.float32), None, 3, "a"]}


def _step_one(direction_version: int = 2) -> tuple[CommitmentChain, bytes, bytes, bytes]:
    h0 = hash_batch(torch.tensor([1.0, 2.0], dtype=torch.float32))
    h1 = hash_batch(torch.tensor([3.0, 4.0], dtype=torch.float32))
    chain = CommitmentChain("holograd", direction_version=direction_version)
    c1 = chain.advance([h0, h1])
    return chain, h0, h1, c1


def test_chain_vectors():
    _assert_vector('genesis("holograd")', genesis_commitment("holograd").hex())
    _assert_vector("batch_hash(example of 2.3)", hash_batch(_example_batch()).hex())
    chain, h0, h1, c1 = _step_one()
    _assert_vector("batch_hash(tensor([1.0, 2.0]))", h0.hex())
    _assert_vector("batch_hash(tensor([3.0, 4.0]))", h1.hex())
    _assert_vector("c_1", c1.hex())
    s10, s11 = chain.seeds(2)
    _assert_vector("s_{1,0}", s10)
    _assert_vector("s_{1,1}", s11)
    d1 = chain.record_scalars(torch.tensor([1.0, -2.0]))
    _assert_vector("d_1", d1.hex())
    _assert_vector("c_2", chain.advance([h1, h0]).hex())
    basis_seed = direction_seeds(genesis_commitment("holograd") + b"/basis", 1)[0]
    _assert_vector('basis_seed("holograd")', basis_seed)


def test_chain_vectors_follow_the_written_formulas():
    """The byte layouts of §2.1, §2.2 and §2.4, written out independently of the package."""
    chain, h0, h1, c1 = _step_one()
    c0 = hashlib.sha256(b"holograd/v2/dirs2" + b"holograd").digest()
    assert c1 == hashlib.sha256(c0 + struct.pack("<Q", 1) + h0 + h1 + bytes(32)).digest()
    assert genesis_commitment("holograd", 1) == hashlib.sha256(b"holograd/v1" + b"holograd").digest()
    assert chain.seeds(1)[0] == int.from_bytes(hashlib.sha256(c1 + struct.pack("<Q", 0)).digest()[:8], "little")
    assert h0 == hashlib.sha256(b"T|torch.float32|(2,)|" + struct.pack("<2f", 1.0, 2.0)).digest()


def test_version_1_vectors():
    """§3.8: the chain of §2.8 under the version-1 genesis tag, and version 1's block seed."""
    _assert_vector('genesis_v1("holograd")', genesis_commitment("holograd", 1).hex())
    chain, *_ = _step_one(direction_version=1)
    seed = chain.seeds(1)[0]
    _assert_vector("s_{1,0} (version 1)", seed)
    _assert_vector("block_seed(s_{1,0} (version 1), 0)", block_seed(seed, 0))


_WORD_ROW = re.compile(r"^\| `0x([0-9A-F]{16})` \| (\d+) \| `0x([0-9A-F]{8})` \|$", re.MULTILINE)


def test_hash_word_table():
    """Every row of §3.2's reference table is word(s, e) as the package computes it."""
    rows = _WORD_ROW.findall(_spec_text())
    assert len(rows) >= 9, "docs/PROTOCOL.md §3.2 lost its reference values of word(s, e)."
    for seed, index, word in rows:
        computed = int(hash_words([int(seed, 16)], int(index), int(index) + 1)[0, 0])
        assert computed == int(word, 16), f"word(0x{seed}, {index}) is 0x{computed:08X}, the spec says 0x{word}"


def _signs(values: list[float]) -> str:
    return ", ".join("+1" if v > 0 else "-1" for v in values)


def test_family_value_vectors():
    """§3.2's family values at d = 0..3 and §3.3's table T, recomputed with the families."""
    seed, table = 0x0123456789ABCDEF, gaussian_table("cpu")
    sketch = SketchDirections(4, 64)
    directions = torch.stack([sketch.direction([seed], k) for k in range(64)])  # (K, 4)
    assert torch.equal(directions.abs().sum(dim=0), torch.ones(4))  # one bucket per coordinate
    _assert_vector("sketch buckets(0..3)", ", ".join(str(int(k)) for k in directions.abs().argmax(dim=0)))
    _assert_vector("sketch signs(0..3)", _signs(directions.sum(dim=0).tolist()))
    rademacher = RademacherDirections(4, 64)
    _assert_vector("rademacher z_0(0..3)", _signs(rademacher.direction([seed, 0], 0).tolist()))
    _assert_vector("rademacher z_3(0..3)", _signs(rademacher.direction([seed, 0], 3).tolist()))
    gaussian = GaussianDirections(4, 1).direction([seed], 0)
    atoms = [int((table == value).nonzero()) for value in gaussian]  # the atoms are distinct
    _assert_vector("gaussian z_0(0..3)", ", ".join(f"T[{i}]" for i in atoms))
    _assert_vector("T[0]", repr(float(table[0])))
    _assert_vector("T[32768]", repr(float(table[32768])))
    _assert_vector("sha256(T)", hashlib.sha256(table.numpy().astype("<f4").tobytes()).hexdigest())


def test_draw_and_ledger_vectors():
    _, _, _, c1 = _step_one()
    matrix = torch.tensor([[1.0, 2.0], [1.0, 2.5], [0.5, 2.0], [1.0, 2.0]])
    root = hashlib.sha256(b"holograd/verify" + c1 + scalars_digest(matrix)).digest()
    for rank in range(4):
        u = int.from_bytes(hashlib.sha256(root + struct.pack("<Q", rank)).digest()[:8], "little") / 2.0**64
        _assert_vector(f"u_{rank}", repr(u))
        assert draw_claims(c1, matrix, u + 1e-12, [rank]) == [rank]  # the formula is the package's
        assert draw_claims(c1, matrix, u, [rank]) == []
    assert draw_claims(c1, matrix, 0.5, [1, 2, 3]) == [2, 3]
    assert "the draw picks ranks 2 and 3" in _spec_text()

    digest = claim_digest(matrix[2])
    ledger = Ledger()
    record = ledger.append(1, 2, "verify", verdict="accept", reason="ok", claim_digest=digest,
                           recomputed_digest=digest, max_abs_error=0.0, max_rel_error=0.0)
    _assert_vector("claim_digest(A[2])", digest)
    _assert_vector("record 0 hash", record.hash)
    assert record.to_json() in _spec_text()
