"""What crosses the border between a region and the aggregator, defined once for both sides.

The region computes the digest of the update it releases and the aggregator recomputes it from
the arrays it received; both must hash the same bytes in the same order, so the rule lives here
and nowhere else. This module imports only numpy and the generated protobuf code, so the
aggregator can use it without touching the data or training code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from fedfsd.proto.fedfsd.v1.update_pb2 import UpdateManifest

# Record names inside a Flower RecordDict (docs/contracts.md, "Federation").
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
MANIFEST = "manifest"
MANIFEST_KEY = "manifest"  # key of the serialised UpdateManifest inside the ConfigRecord
REGION = "region"  # evaluate replies: ConfigRecord "region" with key "name"
NUM_EXAMPLES = "num-examples"
MANIFEST_SCHEMA = 1
# A refusal reason that starts with this refuses the whole run, not one round: the region's
# pre-flight found that the run's plan does not fit its remaining budget (fedfsd.region.preflight).
RUN_REFUSED_PREFIX = "run refused: "
# Run config key that tells regions how many rounds the run asks for (their pre-flight needs it).
ROUNDS_KEY = "num-server-rounds"

__all__ = [
    "ARRAYS",
    "CONFIG",
    "MANIFEST",
    "METRICS",
    "NUM_EXAMPLES",
    "UpdateManifest",
    "array_digest",
    "l2_norm",
    "manifest_from_bytes",
]


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


def arrays_to_record(arrays: Mapping[str, np.ndarray]):  # -> flwr.app.ArrayRecord
    """Named numpy arrays as a Flower ArrayRecord (keeps the names, sorted)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(arrays[k])) for k in sorted(arrays)})


def record_to_arrays(record) -> dict[str, np.ndarray]:  # record: flwr.app.ArrayRecord
    """A Flower ArrayRecord back into named numpy arrays (never unpickles)."""
    return {name: arr.numpy() for name, arr in record.items()}
