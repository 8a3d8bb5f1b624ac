"""The packed wire layout (fedfsd.wire): one float32 array + a strict layout, both directions.

Each attack is built against the real packing code and sent through the aggregator's real
reply path (`judge_train_reply`) with an honest manifest, so only the layout checks can stop
it; the region side is driven through the real ClientApp.
"""

from __future__ import annotations

import io
import pickle
import re
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from fedfsd import wire
from fedfsd.aggregator.server_app import RoundOutcome, judge_train_reply
from fedfsd.aggregator.update_checks import Expectation
from fedfsd.errors import IntegrityError
from fedfsd.privacy.ledger import update_digest

GLOBAL = {
    "net.0.weight": np.zeros((4, 3), np.float32),
    "net.0.bias": np.zeros((4,), np.float32),
    "net.2.weight": np.zeros((2, 4), np.float32),
}
SHAPES = {k: v.shape for k, v in GLOBAL.items()}
EXP = Expectation.from_weights(GLOBAL, norm_bound=10.0, run_id="r", round_idx=2)
RAN: list[str] = []  # set if a hostile pickle ever runs


def _update() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {k: rng.uniform(-0.1, 0.1, v.shape).astype(np.float32) for k, v in GLOBAL.items()}


def _md() -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"m{time.monotonic_ns()}",
        src_node_id=7,
        dst_node_id=0,
        reply_to_message_id="x",
        group_id="2",
        created_at=time.time(),
        ttl=60,
        message_type="train",
    )


def _manifest(u: dict[str, np.ndarray], schema: int = wire.MANIFEST_SCHEMA) -> bytes:
    m = wire.UpdateManifest(
        schema=schema, region="eu", run_id="r", round=2, sha256=wire.array_digest(u)
    )
    return m.SerializeToString()


def _reply(arrays: ArrayRecord, layout: object, manifest: bytes) -> Message:
    entries: dict = {wire.MANIFEST_KEY: manifest}
    if layout is not None:
        entries[wire.LAYOUT_KEY] = layout
    content = RecordDict(
        {
            wire.ARRAYS: arrays,
            wire.MANIFEST: ConfigRecord(entries),
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 1}),
        }
    )
    return Message(metadata=_md(), content=content)


def _judge(reply: Message) -> RoundOutcome:
    out = RoundOutcome()
    judge_train_reply(reply, EXP, {}, out)
    return out


def _spec(layout: bytes) -> wire.PackedLayout:
    spec = wire.PackedLayout()
    spec.ParseFromString(layout)
    return spec


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


# ---- the honest path -----------------------------------------------------------------------------
def test_roundtrip_keeps_names_shapes_values_and_the_ledger_digest() -> None:
    u = _update()
    rec, layout = wire.pack_arrays(u)
    assert list(rec.keys()) == [wire.PACKED]
    assert rec[wire.PACKED].dtype == "float32" and rec[wire.PACKED].shape == (24,)
    spec = _spec(layout)
    assert [t.name for t in spec.tensors] == sorted(u)  # canonical: sorted, contiguous
    assert [t.offset for t in spec.tensors] == [0, 4, 16] and spec.total == 24
    back = wire.unpack_arrays(rec, layout, expected=SHAPES)
    assert list(back) == sorted(u)
    for k, v in u.items():
        assert back[k].dtype == np.float32 and back[k].flags.writeable
        np.testing.assert_array_equal(back[k], v)
    # the manifest digest of what arrived is the ledger's update_sha256 of what was released
    assert wire.array_digest(back) == update_digest(u)
    out = _judge(_reply(rec, layout, _manifest(u)))
    assert [r for r, _, _ in out.accepted] == ["eu"] and not out.rejected


def test_a_train_reply_is_seven_flower_objects_and_an_instruction_six() -> None:
    """Each Flower object is moved by its own Fleet API request: 17 before packing."""
    from fedfsd.aggregator.server_app import initial_weights
    from fedfsd.aggregator.settings import RunSettings
    from fedfsd.flower.message_objects import get_all_nested_objects

    w = initial_weights(RunSettings())  # the real MLP: 6 tensors
    reply = Message(
        metadata=_md(),
        content=RecordDict(
            {
                **wire.packed_records(w, wire.MANIFEST, {wire.MANIFEST_KEY: _manifest(w)}),
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 1}),
            }
        ),
    )
    ins = Message(metadata=_md(), content=RecordDict(wire.packed_records(w, wire.CONFIG, {})))
    per_tensor = Message(
        metadata=_md(),
        content=RecordDict(
            {
                wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in w.items()}),
                wire.MANIFEST: ConfigRecord({wire.MANIFEST_KEY: _manifest(w)}),
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 1}),
            }
        ),
    )
    assert len(w) == 6
    assert len(get_all_nested_objects(reply)) == 7
    assert len(get_all_nested_objects(ins)) == 6
    assert len(get_all_nested_objects(per_tensor)) == 17


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"w": np.zeros(3, np.float64)}, "not <f4"),
        ({"w": np.zeros(3, np.int32)}, "not <f4"),
        ({"w": np.zeros(3, ">f4")}, "not <f4"),
        ({"a|b": np.zeros(3, np.float32)}, "contains '|'"),
        ({"": np.zeros(3, np.float32)}, "empty"),
        ({}, "nothing to pack"),
    ],
    ids=["float64", "int32", "big-endian", "pipe", "empty-name", "no-arrays"],
)
def test_pack_refuses_what_the_wire_cannot_carry(arrays, needle) -> None:
    with pytest.raises(wire.LayoutError, match=needle):
        wire.pack_arrays(arrays)


# ---- layout lies ---------------------------------------------------------------------------------
def _lie(spec: wire.PackedLayout, how: str) -> None:
    t = {x.name: x for x in spec.tensors}
    if how == "transposed-shape":
        t["net.0.weight"].shape[:] = [3, 4]
    elif how == "longer-shape":
        t["net.0.bias"].shape[:] = [5]
    elif how == "negative-dim":
        t["net.0.bias"].shape[:] = [-4]
    elif how == "gap":
        t["net.0.weight"].offset += 1
    elif how == "overlap":
        t["net.0.weight"].offset -= 1
    elif how == "negative-offset":
        t["net.0.bias"].offset = -4
    elif how == "overflowing-offset":
        t["net.2.weight"].offset = (1 << 63) - 1
    elif how == "overflowing-dim":
        t["net.2.weight"].shape[:] = [1 << 62, 1 << 62]
    elif how == "duplicate-name":
        t["net.0.weight"].name = "net.0.bias"
    elif how == "unsorted":
        a, b = t["net.0.bias"], t["net.0.weight"]
        a.name, b.name = "net.0.weight", "net.0.bias"
    elif how == "dtype-float64":
        t["net.0.bias"].dtype = "<f8"
    elif how == "dtype-object":
        t["net.0.bias"].dtype = "|O"
    elif how == "total-short":
        spec.total -= 1
    elif how == "version":
        spec.version = wire.LAYOUT_VERSION + 1
    elif how == "missing-tensor":
        spec.tensors.pop()
    else:
        raise AssertionError(how)


LAYOUT_LIES = {
    "transposed-shape": "shape (3, 4) != (4, 3)",
    "longer-shape": "not contiguous",
    "negative-dim": "is not a shape",
    "gap": "not contiguous",
    "overlap": "not contiguous",
    "negative-offset": "offset -4",
    "overflowing-offset": "not contiguous",
    "overflowing-dim": "beyond the buffer",
    "duplicate-name": "twice",
    "unsorted": "sorted name order",
    "dtype-float64": "'<f8' is not '<f4'",
    "dtype-object": "'|O' is not '<f4'",
    "total-short": "beyond the buffer",
    "version": "layout version 2",
    "missing-tensor": "cover 16 elements, the buffer holds 24",
}


@pytest.mark.parametrize("how", sorted(LAYOUT_LIES))
def test_a_lying_layout_is_refused_not_aggregated(how: str) -> None:
    u = _update()
    rec, layout = wire.pack_arrays(u)
    spec = _spec(layout)
    _lie(spec, how)
    lie = spec.SerializeToString()
    with pytest.raises(wire.LayoutError, match=re.escape(LAYOUT_LIES[how])):
        wire.unpack_arrays(rec, lie, expected=SHAPES)
    out = _judge(_reply(rec, lie, _manifest(u)))
    assert not out.accepted
    assert out.rejected[0][1].startswith("packed arrays refused: "), out.rejected
    assert LAYOUT_LIES[how] in out.rejected[0][1]


def test_a_shape_lie_the_region_cannot_check_still_breaks_the_digest() -> None:
    """Without the model's shapes (the region's side), a transposed layout unpacks, but the
    digest covers every shape, so the update no longer matches its manifest."""
    u = _update()
    rec, layout = wire.pack_arrays(u)
    spec = _spec(layout)
    _lie(spec, "transposed-shape")
    back = wire.unpack_arrays(rec, spec.SerializeToString())
    assert back["net.0.weight"].shape == (3, 4)
    assert wire.array_digest(back) != wire.array_digest(u)


@pytest.mark.parametrize(
    "layout", [b"\xff\xff\xff", "a string", None, 42], ids=["garbage", "str", "missing", "int"]
)
def test_a_missing_or_undecodable_layout_is_refused(layout) -> None:
    u = _update()
    rec, _ = wire.pack_arrays(u)
    out = _judge(_reply(rec, layout, _manifest(u)))
    assert not out.accepted and out.rejected[0][1].startswith("packed arrays refused: ")


# ---- buffer lies ---------------------------------------------------------------------------------
def _ran(tag: str) -> None:
    RAN.append(tag)


class _Boom:
    """Unpickling it calls `_ran`: proof that the receiver unpickled hostile bytes."""

    def __reduce__(self):
        return (_ran, ("unpickled",))


def _buffer(how: str, flat: np.ndarray) -> Array:
    n = flat.size
    if how == "one-byte-short":
        return Array(dtype="float32", shape=(n,), stype="numpy.ndarray", data=_npy(flat)[:-1])
    if how == "one-byte-long":
        return Array(dtype="float32", shape=(n,), stype="numpy.ndarray", data=_npy(flat) + b"\0")
    if how == "one-element-short":  # Array and .npy header agree with each other, not the layout
        return Array(flat[:-1].copy())
    if how == "float64":
        return Array(flat.astype(np.float64))
    if how == "npy-float64-declared-float32":
        return Array(dtype="float32", shape=(n,), stype="numpy.ndarray",
                     data=_npy(flat.astype(np.float64)))  # fmt: skip
    if how in ("object-pickle", "fortran"):
        buf = io.BytesIO()
        descr = "|O" if how == "object-pickle" else "<f4"
        header = {"descr": descr, "fortran_order": how == "fortran", "shape": (n,)}
        np.lib.format.write_array_header_1_0(buf, header)
        buf.write(pickle.dumps([_Boom()] * n) if how == "object-pickle" else flat.tobytes())
        return Array(dtype="float32", shape=(n,), stype="numpy.ndarray", data=buf.getvalue())
    if how == "torch-stype":
        return Array(dtype="float32", shape=(n,), stype="torch.Tensor", data=_npy(flat))
    raise AssertionError(how)


BUFFER_LIES = {
    "one-byte-short": "holds 95 bytes, the layout needs 96",
    "one-byte-long": "holds 97 bytes, the layout needs 96",
    "one-element-short": "expected 'numpy.ndarray' 'float32' (24,)",
    "float64": "'float64'",
    "npy-float64-declared-float32": "dtype float64 is not <f4",
    "object-pickle": "dtype object is not <f4",
    "fortran": "fortran_order True",
    "torch-stype": "'torch.Tensor'",
}


@pytest.mark.parametrize("how", sorted(BUFFER_LIES))
def test_a_lying_buffer_is_refused_and_never_unpickled(how: str) -> None:
    u = _update()
    _, layout = wire.pack_arrays(u)
    flat = np.concatenate([u[k].ravel() for k in sorted(u)])
    rec = ArrayRecord({wire.PACKED: _buffer(how, flat)})
    with pytest.raises(wire.LayoutError):
        wire.unpack_arrays(rec, layout, expected=SHAPES)
    out = _judge(_reply(rec, layout, _manifest(u)))
    assert not out.accepted and BUFFER_LIES[how] in out.rejected[0][1], out.rejected
    assert RAN == []  # the hostile pickle never ran


def test_a_second_array_next_to_the_packed_one_is_refused() -> None:
    u = _update()
    rec, layout = wire.pack_arrays(u)
    rec["zz.extra"] = Array(np.zeros(1, np.float32))
    out = _judge(_reply(rec, layout, _manifest(u)))
    assert not out.accepted and "expected exactly one array 'packed'" in out.rejected[0][1]


# ---- the old per-tensor layout -------------------------------------------------------------------
def test_the_old_per_tensor_layout_is_refused_with_a_clear_reason() -> None:
    u = _update()
    old = ArrayRecord({k: Array(v) for k, v in sorted(u.items())})
    out = _judge(_reply(old, None, _manifest(u, schema=1)))
    assert not out.accepted
    reason = out.rejected[0][1]
    assert "old per-tensor wire layout (manifest schema 1)" in reason, reason
    with pytest.raises(wire.OldWireLayout) as e:
        wire.unpack_arrays(old, None)
    assert isinstance(e.value, IntegrityError) and isinstance(e.value, ValueError)


def test_a_region_refuses_an_instruction_in_the_old_layout(tmp_path) -> None:
    """Region side: the old downlink is refused before any training or spend, with a reason
    that says which side to upgrade, and nothing but the refusal leaves."""
    from flwr.app import Context

    from fedfsd.aggregator.server_app import initial_weights
    from fedfsd.aggregator.settings import RunSettings
    from fedfsd.region.client_app import make_client_app

    settings = RunSettings(**{"local-steps": 2, "vehicles-per-step": 4, "frames-per-vehicle": 4})
    w = initial_weights(settings)
    cfg = {**settings.train_request(), "run-id": "run-old", "round": 1}
    md = Metadata(
        run_id=1, message_id="old", src_node_id=0, dst_node_id=5, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=600, message_type="train",
    )  # fmt: skip
    old = RecordDict(
        {
            wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in w.items()}),
            wire.CONFIG: ConfigRecord(cfg),
        }
    )
    app = make_client_app({"sim-vehicles": 40, "sim-frames": 6, "sim-ledger-dir": str(tmp_path)})
    ctx = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 1, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )
    reply = app(Message(metadata=md, content=old), ctx)
    assert not reply.content.array_records
    raw = reply.content.config_records[wire.MANIFEST][wire.MANIFEST_KEY]
    assert wire.manifest_from_bytes(raw).refused_reason == wire.OldWireLayout.border_reason
    assert not list(tmp_path.rglob("*.jsonl"))  # no ledger line: nothing trained or spent
    # the same weights packed are served
    new = RecordDict(wire.packed_records(w, wire.CONFIG, cfg))
    md2 = Metadata(
        run_id=1, message_id="new", src_node_id=0, dst_node_id=5, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=600, message_type="train",
    )  # fmt: skip
    ok = app(Message(metadata=md2, content=new), ctx)
    man = wire.manifest_from_bytes(ok.content.config_records[wire.MANIFEST][wire.MANIFEST_KEY])
    assert not man.refused_reason and man.schema == wire.MANIFEST_SCHEMA
    assert man.sha256 == wire.array_digest(wire.arrays_from(ok.content, wire.MANIFEST))
