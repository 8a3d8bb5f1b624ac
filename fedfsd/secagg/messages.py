"""The byte format of every stage message: a versioned msgpack map.

Why msgpack: the masked vector and the ciphertexts are binary and large (the MLP's masked input
is 80k ring elements), so a binary format with native byte strings avoids base64's third; it
decodes untrusted input without code execution, and the bytes fit a Flower ConfigRecord value
unchanged. Every message names its kind, so a message replayed into another stage fails to decode.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack

from fedfsd.secagg.errors import SecAggRefused

VERSION = 1
KINDS = (
    "setup",  # aggregator -> every region: the round's parameters
    "advertise",  # region -> aggregator: signed per-round public keys
    "keys",  # aggregator -> every region: all advertisements
    "shares",  # region -> aggregator: encrypted Shamir shares, one per peer
    "routed",  # aggregator -> one region: the ciphertexts addressed to it
    "masked",  # region -> aggregator: the masked integer vector (+ its signed "manifest")
    "unmask-request",  # aggregator -> survivors: who survived, who dropped
    "unmask",  # survivor -> aggregator: the shares asked for, each signed by its dealer
)
MAX_MESSAGE = 1 << 30  # a masked MLP input is < 1 MiB; refuse absurd sizes before parsing


def encode(kind: str, body: Mapping[str, Any]) -> bytes:
    """`body` as a message of `kind` (keys "v" and "kind" are reserved)."""
    if kind not in KINDS:
        raise ValueError(f"unknown secagg message kind {kind!r}")
    return msgpack.packb({"v": VERSION, "kind": kind, **body}, use_bin_type=True)


def decode(data: bytes, kind: str) -> dict[str, Any]:
    """The body of a message that must be of `kind`; SecAggRefused for anything else."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) > MAX_MESSAGE:
        raise SecAggRefused(f"{kind}: not a secagg message")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise SecAggRefused(f"{kind}: undecodable message ({type(e).__name__})") from None
    if not isinstance(obj, dict) or obj.get("v") != VERSION:
        raise SecAggRefused(f"{kind}: not a version-{VERSION} secagg message")
    if obj.get("kind") != kind:
        raise SecAggRefused(f"expected a {kind!r} message, got {obj.get('kind')!r} (out of stage)")
    return obj


def field(body: Mapping[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    """`body[key]`, refused unless it has type `typ` (bool is not an int here)."""
    v = body.get(key)
    if isinstance(v, bool) and typ is not bool or not isinstance(v, typ):
        raise SecAggRefused(f"{body.get('kind')}: field {key!r} missing or of the wrong type")
    return v


def str_list(body: Mapping[str, Any], key: str) -> list[str]:
    """A list of distinct strings."""
    v = field(body, key, list)
    if not all(isinstance(x, str) for x in v) or len(set(v)) != len(v):
        raise SecAggRefused(f"{body.get('kind')}: field {key!r} must list distinct names")
    return list(v)


def bytes_map(body: Mapping[str, Any], key: str) -> dict[str, bytes]:
    """A map name -> bytes."""
    v = field(body, key, dict)
    if not all(isinstance(k, str) and isinstance(x, bytes) for k, x in v.items()):
        raise SecAggRefused(f"{body.get('kind')}: field {key!r} must map names to bytes")
    return dict(v)
