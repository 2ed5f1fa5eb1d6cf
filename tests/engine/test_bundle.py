"""Bundles (engine/bundle.py): what a claimant sends its verifier, decoded without pickle.

Round trips keep values, dtypes, shapes and the batch hash of docs/PROTOCOL.md §2.3
(which covers sequence type names). Malicious bytes raise ``BundleError`` and never build
anything but the documented types; nothing in this module can run a peer's code.
"""

from __future__ import annotations

import collections
import json
import pickle
import struct

import pytest
import torch

from lightning_holograd.engine.bundle import (
    DTYPES,
    HEADER_SIZE,
    MAX_DEPTH,
    BundleError,
    decode_bundle,
    encode_bundle,
    frame_message,
    read_message,
)
from lightning_holograd.protocol import hash_batch

Pair = collections.namedtuple("Pair", ["inputs", "target"])


class Tokens(list):
    """A list subclass: its name is part of the batch hash."""


def _sample() -> dict:
    return {
        "x": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "pair": Pair(torch.tensor([0.5, -1.0], dtype=torch.bfloat16), (torch.zeros(0), None)),
        "tokens": Tokens([torch.tensor([True, False]), 3, 2.5, float("inf"), float("nan"), "text", b"\x00\xff"]),
        7: torch.randn(2, 2, dtype=torch.float64)[:, 0],  # a non-contiguous view
        None: {"nested": [[[]]]},
    }


def _body(tree: list, data: bytes = b"") -> bytes:
    structure = json.dumps(tree).encode()
    return struct.pack("<I", len(structure)) + structure + data


def test_round_trip_keeps_values_types_and_the_batch_hash():
    value = _sample()
    decoded = decode_bundle(encode_bundle(value))
    assert hash_batch(decoded) == hash_batch(value)
    assert type(decoded["pair"]).__name__ == "Pair" and decoded["pair"]._fields == ("inputs", "target")
    assert type(decoded["tokens"]).__name__ == "Tokens" and isinstance(decoded["tokens"], list)
    assert torch.equal(decoded["x"], value["x"]) and decoded["pair"].inputs.dtype == torch.bfloat16
    assert decoded["tokens"][4] != decoded["tokens"][4]  # NaN survives (float.hex)
    assert decoded[None] == {"nested": [[[]]]}


@pytest.mark.parametrize("dtype", sorted(DTYPES.values(), key=str))
def test_every_listed_dtype_round_trips_bitwise(dtype):
    source = torch.arange(6).reshape(2, 3) % 2 if dtype is torch.bool else torch.arange(6).reshape(2, 3)
    tensor = source.to(dtype)
    decoded = decode_bundle(encode_bundle([tensor]))[0]
    assert decoded.dtype == dtype and decoded.shape == tensor.shape
    assert torch.equal(decoded.view(torch.uint8) if dtype is not torch.bool else decoded,
                       tensor.view(torch.uint8) if dtype is not torch.bool else tensor)


def test_a_pickle_is_not_a_bundle():
    """A pickle that would run code when unpickled is refused as malformed bytes."""
    payload = pickle.dumps(print)
    with pytest.raises(BundleError):
        decode_bundle(payload)


@pytest.mark.parametrize(("tree", "data", "pattern"), [
    (["T", "float32", [4], 0, 16], b"\x00" * 8, "does not fit"),         # tensor past the data
    (["T", "float32", [4], 0, 12], b"\x00" * 16, "does not fit"),        # size != numel x itemsize
    (["T", "float32", [-1], 0, 0], b"", "bad tensor header"),
    (["T", "object", [1], 0, 8], b"\x00" * 8, "bad tensor header"),       # dtype not allowed
    (["T", "bool", [1], 0, 1], b"\x07", "bool tensor"),
    (["X", 1], b"", "unknown node kind"),
    (["P", "os.system", None, []], b"", "not an identifier"),           # no dotted names, no imports
    (["P", "Pair", ["__class__"], [["N"]]], b"", "bad namedtuple"),
    (["M", [[["T", "uint8", [0], 0, 0], ["N"]]]], b"", "key of type Tensor"),
    (["i", "12"], b"", "expected a int"),
    ("not a node", b"", "malformed node"),
])
def test_malformed_bundles_are_refused(tree, data, pattern):
    with pytest.raises(BundleError, match=pattern):
        decode_bundle(_body(tree, data))


def test_depth_and_length_fields_are_bounded():
    deep: list = ["N"]
    for _ in range(MAX_DEPTH + 2):
        deep = ["L", "list", [deep]]
    with pytest.raises(BundleError, match="deeper"):
        decode_bundle(_body(deep))
    with pytest.raises(BundleError, match="exceeds"):
        decode_bundle(struct.pack("<I", 10_000) + b"{}")
    with pytest.raises(BundleError, match="cannot be sent"):
        encode_bundle({"f": lambda: None})


def test_framing_shows_completeness_and_enforces_the_limit():
    body = encode_bundle({"batches": [torch.arange(1000)]})
    message = frame_message(body)
    buffer = torch.zeros(len(message) + 64, dtype=torch.uint8)
    assert read_message(buffer, len(body)) is None  # nothing yet
    payload = torch.frombuffer(bytearray(message), dtype=torch.uint8)
    buffer[: len(message) - 1] = payload[:-1]
    assert read_message(buffer, len(body)) is None  # the trailing digest is not complete yet
    buffer[len(message) - 1] = payload[-1]
    assert read_message(buffer, len(body)) == body
    with pytest.raises(BundleError, match="limit"):
        read_message(buffer, len(body) - 1)
    buffer[HEADER_SIZE] ^= 1  # a flipped body byte: digests agree with each other, not with the body
    with pytest.raises(BundleError, match="digest"):
        read_message(buffer, len(body))
