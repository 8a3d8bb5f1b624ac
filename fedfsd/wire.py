"""What crosses the border between a region and the aggregator, defined once for both sides.

The region computes the digest of the update it releases and the aggregator recomputes it from
the arrays it received; both must hash the same bytes in the same order, so the rule lives here
and nowhere else. This module imports only numpy, the generated protobuf code and the error
bases, so the aggregator can use it without touching the data or training code.

Weights (downlink) and updates (uplink) travel packed: ONE Flower Array holding a flat
little-endian float32 buffer, plus a `PackedLayout` (names, dtypes, shapes, offsets) in a
ConfigRecord entry. Flower 1.39 stores a message as a tree of objects and moves each with its
own request; one Array per tensor made a reply 17 objects, packed it is 7. Only the canonical
layout is accepted (names sorted and unique, offsets contiguous from 0, float32 only), so the
update digest, which hashes every name, dtype and shape and then every byte in that order, is a
hash of the layout and the packed buffer: re-laid-out, truncated or padded buffers are refused
on unpacking, and a layout that lies about shapes changes the digest.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedfsd.errors import IntegrityError
from fedfsd.proto.fedfsd.v1.layout_pb2 import PackedLayout
from fedfsd.proto.fedfsd.v1.update_pb2 import UpdateManifest

# Record names inside a Flower RecordDict (docs/contracts.md, "Federation").
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
MANIFEST = "manifest"
MANIFEST_KEY = "manifest"  # key of the serialised UpdateManifest inside the ConfigRecord
REGION = "region"  # evaluate replies: ConfigRecord "region" with key "name"
NUM_EXAMPLES = "num-examples"
# 2: the update travels as one packed array + layout (1 was one Flower Array per tensor).
MANIFEST_SCHEMA = 2
# The packed wire layout: the single Array's key in ArrayRecord "arrays", and the key of the
# serialised PackedLayout in the ConfigRecord next to it ("config" downlink, "manifest" uplink).
PACKED = "packed"
LAYOUT_KEY = "layout"
LAYOUT_VERSION = 1
WIRE_DTYPE = np.dtype("<f4")  # the only dtype that crosses the border
MAX_TENSORS = 4096  # far above any model here; bounds the work a hostile layout can cause
MAX_NDIM = 16
# A refusal reason that starts with this refuses the whole run, not one round: the region's
# pre-flight found that the run's plan does not fit its remaining budget (fedfsd.region.preflight).
RUN_REFUSED_PREFIX = "run refused: "
# Run config key that tells regions how many rounds the run asks for (their pre-flight needs it).
ROUNDS_KEY = "num-server-rounds"

__all__ = [
    "ARRAYS",
    "CONFIG",
    "LAYOUT_KEY",
    "MANIFEST",
    "METRICS",
    "NUM_EXAMPLES",
    "PACKED",
    "LayoutError",
    "OldWireLayout",
    "PackedLayout",
    "UpdateManifest",
    "array_digest",
    "arrays_from",
    "l2_norm",
    "manifest_from_bytes",
    "pack_arrays",
    "packed_records",
    "unpack_arrays",
]


class LayoutError(IntegrityError, ValueError):
    """Packed arrays that do not match their layout (or a layout that is not the canonical one).

    Raised on receipt, never crashes the receiver: the aggregator rejects the update with
    `str(err)`, a region refuses the round with the border-safe category below.
    """

    border_reason = "weights do not match their packed layout"


class OldWireLayout(LayoutError):
    """The sender still uses the old layout: one Flower Array per tensor and no layout entry."""

    border_reason = "old wire layout (one array per tensor): both sides need packed layout 1"


def array_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 hex over the arrays in sorted name order: name, dtype, shape and C-order bytes.

    Byte-for-byte the same stream as the ledger's `update_sha256`
    (`fedfsd.privacy.ledger.update_digest`), so a manifest can be matched to its ledger line.
    Unambiguous for names without "|" (the model's names): dtype and shape fix each byte count.
    """
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm over all arrays (float64 accumulation)."""
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # huge or NaN input gives inf/NaN
        for a in arrays.values():
            a64 = np.asarray(a, dtype=np.float64).ravel()
            total += float(np.dot(a64, a64))
    return float(np.sqrt(total))


def manifest_from_bytes(data: bytes) -> UpdateManifest:
    """Parse a serialised manifest; raises ValueError on garbage."""
    m = UpdateManifest()
    try:
        m.ParseFromString(bytes(data))
    except Exception as e:  # protobuf raises DecodeError (a Message error subclass)
        raise ValueError(f"manifest is not a valid UpdateManifest: {e}") from None
    return m


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[Any, bytes]:
    """Named float32 arrays as (ArrayRecord {PACKED: flat float32 Array}, serialised layout).

    Tensors are concatenated in sorted name order, so `array_digest(arrays)` is the digest of
    the layout and the packed buffer. Refuses anything but float32 (no silent cast: a cast would
    change what the digest covers) and names the digest cannot separate ("|", empty).
    """
    from flwr.app import Array, ArrayRecord

    layout = PackedLayout(version=LAYOUT_VERSION)
    parts: list[np.ndarray] = []
    offset = 0
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        if a.dtype != WIRE_DTYPE:
            raise LayoutError(f"{name}: dtype {a.dtype.str} is not {WIRE_DTYPE.str} (float32)")
        _check_name(name)
        layout.tensors.add(name=name, dtype=WIRE_DTYPE.str, shape=list(a.shape), offset=offset)
        parts.append(np.ascontiguousarray(a).ravel())
        offset += int(a.size)
    if not parts:
        raise LayoutError("nothing to pack: no arrays")
    layout.total = offset
    flat = np.concatenate(parts)
    return ArrayRecord({PACKED: Array(flat)}), layout.SerializeToString()


def packed_records(
    arrays: Mapping[str, np.ndarray], config: str, values: Mapping[str, Any]
) -> dict[str, Any]:
    """{ARRAYS: packed ArrayRecord, config: ConfigRecord(values + the layout)} for a RecordDict.

    `config` is CONFIG for server -> region messages and MANIFEST for train replies, the record
    `arrays_from` reads the layout back from.
    """
    from flwr.app import ConfigRecord

    packed, layout = pack_arrays(arrays)
    return {ARRAYS: packed, config: ConfigRecord({**values, LAYOUT_KEY: layout})}


def unpack_arrays(
    record: Any, layout: object, expected: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
    """The named arrays of a packed ArrayRecord, checked strictly against its layout.

    `record` is a Flower ArrayRecord, `layout` the serialised PackedLayout that came with it,
    `expected` (optional) the names and shapes the receiver's model has. Raises `LayoutError`
    (`OldWireLayout` for the per-tensor layout) on anything but the canonical layout of exactly
    the buffer received; never unpickles. Returns writable float32 copies.
    """
    keys = list(record.keys())
    if keys != [PACKED]:
        if layout is None and keys and PACKED not in keys:
            raise OldWireLayout(
                f"{len(keys)} arrays and no layout: the sender uses the old per-tensor wire "
                f"layout (manifest schema 1); expected one array {PACKED!r} + layout "
                f"version {LAYOUT_VERSION}"
            )
        raise LayoutError(f"expected exactly one array {PACKED!r}, got {keys[:5]}")
    if not isinstance(layout, bytes):
        raise LayoutError(f"layout missing or not bytes ({type(layout).__name__})")
    spec = _parse_layout(layout)
    flat = _flat_buffer(record[PACKED], spec.total)
    out: dict[str, np.ndarray] = {}
    for t in spec.tensors:
        size = _size(t.shape)
        out[t.name] = flat[t.offset : t.offset + size].reshape(tuple(t.shape)).copy()
    if expected is not None:
        _check_expected(out, expected)
    return out


def arrays_from(
    content: Any, config: str, expected: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
    """Unpack a RecordDict's ArrayRecord "arrays" with the layout in ConfigRecord `config`.

    `config` is CONFIG for server -> region messages and MANIFEST for train replies.
    """
    if ARRAYS not in content.array_records:
        raise LayoutError(f"no {ARRAYS!r} array record")
    cfg = content.config_records.get(config)
    layout = cfg.get(LAYOUT_KEY) if cfg is not None else None
    return unpack_arrays(content.array_records[ARRAYS], layout, expected)


# -- strict layout checks ------------------------------------------------------------------------
def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name or "|" in name or not name.isprintable():
        raise LayoutError(f"tensor name {name!r} is empty, not printable or contains '|'")


def _size(shape: Any) -> int:
    size = 1
    for d in shape:
        size *= int(d)
    return size


def _parse_layout(data: bytes) -> PackedLayout:
    """A PackedLayout that is exactly the canonical one for its tensors, or LayoutError."""
    spec = PackedLayout()
    try:
        spec.ParseFromString(data)
    except Exception as e:  # protobuf DecodeError
        raise LayoutError(f"layout is not a valid PackedLayout: {e}") from None
    if spec.version != LAYOUT_VERSION:
        raise LayoutError(f"layout version {spec.version} != {LAYOUT_VERSION}")
    if not 0 < len(spec.tensors) <= MAX_TENSORS:
        raise LayoutError(f"layout lists {len(spec.tensors)} tensors (1..{MAX_TENSORS})")
    names = [t.name for t in spec.tensors]
    if len(set(names)) != len(names):
        raise LayoutError("layout lists a tensor name twice")
    if names != sorted(names):
        raise LayoutError("layout tensors are not in sorted name order")
    offset = 0
    for t in spec.tensors:
        _check_name(t.name)
        if t.dtype != WIRE_DTYPE.str:
            raise LayoutError(f"{t.name}: dtype {t.dtype!r} is not {WIRE_DTYPE.str!r} (float32)")
        if len(t.shape) > MAX_NDIM or any(d < 0 for d in t.shape):
            raise LayoutError(f"{t.name}: shape {list(t.shape)} is not a shape")
        if t.offset != offset:
            raise LayoutError(
                f"{t.name}: offset {t.offset} != {offset} (layout not contiguous from 0)"
            )
        offset += _size(t.shape)
        if offset > spec.total:
            raise LayoutError(f"{t.name}: ends at {offset}, beyond the buffer's {spec.total}")
    if offset != spec.total:
        raise LayoutError(f"tensors cover {offset} elements, the buffer holds {spec.total}")
    return spec


def _flat_buffer(arr: Any, total: int) -> np.ndarray:
    """The packed Array as a 1-d float32 view, exactly `total` elements, parsed by hand."""
    from numpy.lib import format as npy

    if (arr.stype, arr.dtype, tuple(arr.shape)) != ("numpy.ndarray", "float32", (total,)):
        raise LayoutError(
            f"packed array is {arr.stype!r} {arr.dtype!r} {tuple(arr.shape)}, "
            f"expected 'numpy.ndarray' 'float32' ({total},)"
        )
    data = arr.data
    if not isinstance(data, bytes):
        raise LayoutError("packed array data is not bytes")
    buf = io.BytesIO(data)
    try:
        version = npy.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(buf)
        else:
            raise ValueError(f"npy version {version}")
    except Exception as e:  # bad magic, bad header, object dtype descr ...
        raise LayoutError(f"packed array is not a plain .npy buffer: {e}") from None
    if np.dtype(dtype) != WIRE_DTYPE or np.dtype(dtype).str != WIRE_DTYPE.str:
        raise LayoutError(f"packed buffer dtype {dtype} is not {WIRE_DTYPE.str}")
    if fortran or tuple(shape) != (total,):
        raise LayoutError(
            f"packed buffer header (shape {shape}, fortran_order {fortran}) is not ({total},) "
            "in C order"
        )
    start = buf.tell()
    if len(data) - start != total * WIRE_DTYPE.itemsize:
        raise LayoutError(
            f"packed buffer holds {len(data) - start} bytes, the layout needs "
            f"{total * WIRE_DTYPE.itemsize}"
        )
    return np.frombuffer(data, dtype=WIRE_DTYPE, count=total, offset=start)


def _check_expected(out: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> None:
    if set(out) != set(expected):
        missing = sorted(set(expected) - set(out))[:5]
        extra = sorted(set(out) - set(expected))[:5]
        raise LayoutError(f"names differ from the model: missing={missing} extra={extra}")
    for name, a in out.items():
        if tuple(a.shape) != tuple(expected[name]):
            raise LayoutError(f"{name}: shape {tuple(a.shape)} != {tuple(expected[name])}")
