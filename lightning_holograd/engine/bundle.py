"""Bundles: tensors and primitives as bytes, without pickle (docs/PROTOCOL.md §6.5).

What a worker sends to its verifier is untrusted. ``pickle`` would let it run code on the
verifier, so the verification transport moves **bundles** instead: a JSON description of
the structure plus the raw bytes of its tensors, decoded by a reader that only ever
builds the few types below and checks every size against the bytes it was given.

A bundle holds, nested to any depth up to ``MAX_DEPTH``:

- ``None``, ``bool``, ``int``, ``float`` (exactly, non-finite values included), ``str``,
  ``bytes``;
- CPU tensors of the dtypes in ``DTYPES`` (any shape, contiguous copies);
- ``dict`` with ``None``/``bool``/``int``/``float``/``str`` keys (a dict subclass is sent
  as a ``dict``);
- ``list`` and ``tuple``, subclasses included: their type name travels, and the reader
  rebuilds a same-named ``list``/``tuple`` subclass (a namedtuple with its fields), so
  that the batch hash of docs/PROTOCOL.md §2.3, which covers type names, is unchanged.

Layout (every integer little-endian):

    body    = u32le(m) || structure (m bytes, UTF-8 JSON) || tensor bytes
    message = b"HGBNDL01" || u64le(n) || SHA256(body) || body (n bytes) || SHA256(body)

The digest is written twice: the copy at the end arrives last, so a receiver polling a
buffer knows the message is complete when both copies are there and agree
(``read_message``). The structure is a tree of JSON arrays, one per value:
``["N"]``, ``["b", bool]``, ``["i", int]``, ``["f", float.hex()]``, ``["s", str]``,
``["y", hex]``, ``["T", dtype, shape, offset, nbytes]``, ``["L", type name, items]`` (a list),
``["P", type name, fields or null, items]`` (a tuple; fields of a namedtuple) and
``["M", [[key, value], ...]]``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import struct
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["BundleError", "DTYPES", "MAX_DEPTH", "decode_bundle", "encode_bundle", "frame_message",
           "read_message", "HEADER_SIZE", "TRAILER_SIZE"]

MAGIC = b"HGBNDL01"
HEADER_SIZE = len(MAGIC) + 8 + 32  # magic, body length, digest
TRAILER_SIZE = 32
MAX_DEPTH = 32
MAX_NODES = 1_000_000
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)}
_KEY_TYPES = (type(None), bool, int, float, str)


class BundleError(ValueError):
    """Bytes that are not a valid bundle, or a value that cannot be put in one."""


# -- encoding --------------------------------------------------------------------------------
def encode_bundle(value: Any) -> bytes:
    """The body of a bundle holding ``value`` (tensors are copied to the CPU)."""
    chunks: list[bytes] = []
    offset = [0]

    def node(item: Any, depth: int) -> list[Any]:
        if depth > MAX_DEPTH:
            raise BundleError(f"value nested deeper than {MAX_DEPTH} levels.")
        if item is None:
            return ["N"]
        if isinstance(item, bool):
            return ["b", item]
        if isinstance(item, int):
            return ["i", int(item)]
        if isinstance(item, float):
            return ["f", float(item).hex()]
        if isinstance(item, str):
            return ["s", str(item)]
        if isinstance(item, (bytes, bytearray)):
            return ["y", bytes(item).hex()]
        if isinstance(item, torch.Tensor):
            return tensor_node(item)
        if isinstance(item, Mapping):
            pairs = []
            for key, sub in item.items():
                if not isinstance(key, _KEY_TYPES):
                    raise BundleError(f"dict key {key!r} of type {type(key).__name__} cannot be sent. HINT: use "
                                      "str, int, float, bool or None keys.")
                pairs.append([node(key, depth + 1), node(sub, depth + 1)])
            return ["M", pairs]
        if isinstance(item, list):
            return ["L", type(item).__name__, [node(sub, depth + 1) for sub in item]]
        if isinstance(item, tuple):
            fields = getattr(item, "_fields", None)
            fields = list(fields) if isinstance(fields, tuple) and all(isinstance(f, str) for f in fields) else None
            return ["P", type(item).__name__, fields, [node(sub, depth + 1) for sub in item]]
        raise BundleError(f"a {type(item).__name__} cannot be sent to a verifier. HINT: batches may hold tensors, "
                          "numbers, strings, bytes, None and dicts/lists/tuples of them.")

    def tensor_node(tensor: torch.Tensor) -> list[Any]:
        name = str(tensor.dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise BundleError(f"tensor dtype {tensor.dtype} cannot be sent. HINT: one of {sorted(DTYPES)}.")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        chunks.append(data)
        start, offset[0] = offset[0], offset[0] + len(data)
        return ["T", name, list(tensor.shape), start, len(data)]

    structure = json.dumps(node(value, 0), separators=(",", ":"), allow_nan=False).encode("utf-8")
    return struct.pack("<I", len(structure)) + structure + b"".join(chunks)


# -- decoding --------------------------------------------------------------------------------
def decode_bundle(body: bytes | memoryview) -> Any:
    """The value in a bundle body; raises ``BundleError`` for anything malformed."""
    body = memoryview(body)
    if len(body) < 4:
        raise BundleError("bundle shorter than its 4-byte structure length.")
    (length,) = struct.unpack_from("<I", body, 0)
    if length > len(body) - 4:
        raise BundleError(f"structure length {length} exceeds the {len(body) - 4} bytes that follow.")
    try:
        tree = json.loads(bytes(body[4 : 4 + length]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as error:
        raise BundleError(f"structure is not valid JSON ({type(error).__name__}).") from error
    return _Reader(body[4 + length :]).value(tree, 0)


class _Reader:
    """Rebuilds values from a structure tree, checking every field against ``data``."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.nodes = 0

    def value(self, node: Any, depth: int) -> Any:
        self.nodes += 1
        if depth > MAX_DEPTH or self.nodes > MAX_NODES:
            raise BundleError(f"structure deeper than {MAX_DEPTH} levels or larger than {MAX_NODES} values.")
        if not isinstance(node, list) or not node or not isinstance(node[0], str):
            raise BundleError(f"malformed node {str(node)[:80]!r}.")
        kind, args = node[0], node[1:]
        reader = _READERS.get(kind)
        if reader is None:
            raise BundleError(f"unknown node kind {kind!r}.")
        try:
            return reader(self, args, depth)
        except (TypeError, ValueError, OverflowError, RuntimeError) as error:
            if isinstance(error, BundleError):
                raise
            raise BundleError(f"malformed {kind!r} node ({error}).") from error

    def tensor(self, args: list[Any], depth: int) -> torch.Tensor:
        name, shape, start, size = args
        if name not in DTYPES or not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise BundleError(f"bad tensor header {args!r}.")
        dtype = DTYPES[name]
        numel = 1
        for extent in shape:
            numel *= extent
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not (_is_int(start) and _is_int(size)) or size != numel * itemsize or start < 0 \
                or start + size > len(self.data):
            raise BundleError(f"tensor of {numel} x {itemsize} bytes at {start} does not fit the {len(self.data)} "
                              "data bytes.")
        raw = torch.frombuffer(bytearray(self.data[start : start + size]), dtype=torch.uint8) if size \
            else torch.empty(0, dtype=torch.uint8)
        if dtype is torch.bool and bool((raw > 1).any()):
            raise BundleError("bool tensor holds bytes other than 0 and 1.")
        return raw.view(dtype).reshape(shape)

    def list_(self, args: list[Any], depth: int) -> list[Any]:
        name, items = args
        if not isinstance(name, str) or not isinstance(items, list):
            raise BundleError("bad list header.")
        return _subclass(name, list)([self.value(item, depth + 1) for item in items])

    def tuple_(self, args: list[Any], depth: int) -> tuple[Any, ...]:
        name, fields, items = args
        if not isinstance(name, str) or not isinstance(items, list):
            raise BundleError("bad tuple header.")
        values = [self.value(item, depth + 1) for item in items]
        if fields is not None:
            return _namedtuple(name, fields)(*values)
        return _subclass(name, tuple)(values)

    def mapping(self, args: list[Any], depth: int) -> dict[Any, Any]:
        (pairs,) = args
        out: dict[Any, Any] = {}
        for key_node, value_node in pairs:
            key = self.value(key_node, depth + 1)
            if not isinstance(key, _KEY_TYPES):
                raise BundleError(f"dict key of type {type(key).__name__} is not allowed.")
            out[key] = self.value(value_node, depth + 1)
        return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _scalar(expected: type) -> Any:
    def read(reader: _Reader, args: list[Any], depth: int) -> Any:
        (value,) = args
        if type(value) is not expected:
            raise BundleError(f"expected a {expected.__name__}, got {type(value).__name__}.")
        return value
    return read


def _none(reader: _Reader, args: list[Any], depth: int) -> None:
    if args:
        raise BundleError("bad None node.")


_READERS = {
    "N": _none,
    "b": _scalar(bool),
    "i": _scalar(int),
    "s": _scalar(str),
    "f": lambda reader, args, depth: float.fromhex(_scalar(str)(reader, args, depth)),
    "y": lambda reader, args, depth: bytes.fromhex(_scalar(str)(reader, args, depth)),
    "T": _Reader.tensor,
    "L": _Reader.list_,
    "P": _Reader.tuple_,
    "M": _Reader.mapping,
}
_TYPES: dict[tuple[str, Any], type] = {}  # rebuilt sequence types, reused (bounded: names come from peers)
_MAX_CACHED_TYPES = 1024


def _subclass(name: str, base: type) -> type:
    """A ``base`` subclass called ``name`` (the batch hash covers sequence type names)."""
    if name in ("list", "tuple"):
        return base
    if not name.isidentifier():
        raise BundleError(f"sequence type name {name!r} is not an identifier.")
    key = (name, base)
    made = _TYPES.get(key) or type(name, (base,), {"__module__": __name__})
    if len(_TYPES) < _MAX_CACHED_TYPES:
        _TYPES.setdefault(key, made)
    return made


def _namedtuple(name: str, fields: Any) -> type:
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise BundleError("namedtuple fields must be a list of strings.")
    key = (name, tuple(fields))
    made = _TYPES.get(key)
    if made is None:
        try:
            made = collections.namedtuple(name, fields)  # validates identifiers; runs no user code
        except ValueError as error:
            raise BundleError(f"bad namedtuple {name}{tuple(fields)}: {error}") from error
        if len(_TYPES) < _MAX_CACHED_TYPES:
            _TYPES[key] = made
    return made


# -- framing -----------------------------------------------------------------------------------
def frame_message(body: bytes) -> bytes:
    """``body`` framed for the transport: magic, length and digest before it, digest after it."""
    digest = hashlib.sha256(body).digest()
    return MAGIC + struct.pack("<Q", len(body)) + digest + body + digest


def read_message(buffer: torch.Tensor, max_body: int) -> bytes | None:
    """The body of a complete message at the start of ``buffer`` (uint8), or None while it is
    still arriving. Raises ``BundleError`` for a message that can never become valid."""
    head = bytes(buffer[:HEADER_SIZE].tolist())
    if head[: len(MAGIC)] != MAGIC:
        return None
    (length,) = struct.unpack_from("<Q", head, len(MAGIC))
    if length > max_body or HEADER_SIZE + length + TRAILER_SIZE > buffer.numel():
        raise BundleError(f"announced {length} bytes, more than the {max_body}-byte limit.")
    digest = head[len(MAGIC) + 8 :]
    end = HEADER_SIZE + length
    if bytes(buffer[end : end + TRAILER_SIZE].tolist()) != digest:
        return None
    body = buffer[HEADER_SIZE:end].numpy().tobytes()
    if hashlib.sha256(body).digest() != digest:
        raise BundleError("message digest does not match its body.")
    return body
