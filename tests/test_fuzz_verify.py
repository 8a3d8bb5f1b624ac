"""Fuzz pass over the aggregator's handling of a train reply (hypothesis).

Unlike tests/test_verify.py, which checks each rule on hand-made updates, this drives the whole
reply path a hostile region reaches: a Flower `Message` whose records, packed array bytes, packed
layout (names, dtypes, shapes, offsets), metrics and manifest bytes are generated, through
`judge_train_reply` (unpack, weight, verify). Properties: it never raises, every reply lands in
exactly one bucket, anything it accepts independently satisfies every rule, and a reply whose
layout or packed buffer was tampered with is never accepted. Each test prints how many cases it
tried.
"""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedfsd import wire
from fedfsd.aggregator.server_app import RoundOutcome, judge_train_reply
from fedfsd.aggregator.update_checks import NORM_ATOL, NORM_RTOL, Expectation, verify_update

GLOBAL = {
    "net.0.weight": np.zeros((4, 3), np.float32),
    "net.0.bias": np.zeros((4,), np.float32),
    "net.2.weight": np.zeros((2, 4), np.float32),
}
BOUND = 1.0
RUN, ROUND = "run-fuzz", 4
EXP = Expectation.from_weights(GLOBAL, norm_bound=BOUND, run_id=RUN, round_idx=ROUND)
FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def report(capsys, name: str, n: int, extra: str = "") -> None:
    """Write the number of cases to the terminal (not swallowed by capture)."""
    with capsys.disabled():
        print(f"\n[fuzz] {name}: {n} cases tried {extra}")


# ---- strategies ----------------------------------------------------------------------------
def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


NAMES = st.sampled_from([*GLOBAL, wire.PACKED, "extra", "net.0.weight ", "", "x" * 300])
DTYPES = st.sampled_from(
    ["float32", "<f4", ">f4", "float64", "float16", "int32", "uint8", "bool", "complex64",
     "O", "|S4", "garbage", ""]
)  # fmt: skip


@st.composite
def honest_update(draw) -> dict[str, np.ndarray]:
    """A well-formed update with norm at most the bound."""
    u = {
        k: draw(arrays(np.float32, v.shape, elements=st.floats(-1, 1, width=32)))
        for k, v in GLOBAL.items()
    }
    n = wire.l2_norm(u)
    scale = draw(st.floats(0.0, 1.0))
    if n > 0:  # in float64: with a tiny (subnormal) norm, BOUND / n overflows float32 to inf
        u = {
            k: (v.astype(np.float64) * (scale * BOUND / n)).astype(np.float32) for k, v in u.items()
        }
    return u


@st.composite
def hostile_array(draw) -> Array:
    """An Array whose dtype string, shape and bytes may disagree or be garbage."""
    kind = draw(st.sampled_from(["real", "raw", "mismatch"]))
    if kind == "real":
        dt = draw(st.sampled_from([np.float32, np.float64, np.float16, np.int32, np.bool_]))
        shape = draw(st.sampled_from([v.shape for v in GLOBAL.values()] + [(), (0,), (5, 5)]))
        a = draw(arrays(dt, shape))
        return Array(a)
    shape = tuple(draw(st.lists(st.integers(-2, 6), max_size=3)))
    if kind == "raw":
        data = draw(st.binary(max_size=256))
    else:  # a valid .npy of one shape/dtype declared as another
        data = _npy(draw(arrays(np.float32, draw(st.sampled_from([(4, 3), (3,), (2, 4)])))))
    stype = draw(st.sampled_from(["numpy.ndarray", "torch.Tensor", ""]))
    return Array(dtype=draw(DTYPES), shape=shape, stype=stype, data=data)


def _manifest_bytes(update: dict[str, np.ndarray], **kw) -> bytes:
    fields = {"region": "eu", "run_id": RUN, "round": ROUND, "sha256": wire.array_digest(update)}
    fields.update(kw)
    return wire.UpdateManifest(schema=wire.MANIFEST_SCHEMA, **fields).SerializeToString()


def _layout(data: bytes) -> wire.PackedLayout:
    spec = wire.PackedLayout()
    spec.ParseFromString(data)
    return spec


@st.composite
def lying_layout(draw, layout: bytes) -> object:
    """The honest layout with one lie: shapes, offsets, names, dtypes, counts, version, bytes."""
    spec = _layout(layout)
    i = draw(st.integers(0, len(spec.tensors) - 1))
    t = spec.tensors[i]
    how = draw(
        st.sampled_from(
            ["transpose", "grow", "shrink", "negative-dim", "offset", "negative-offset",
             "huge-offset", "huge-dim", "duplicate", "unsorted", "dtype", "total", "version",
             "drop", "extra", "pipe-name", "garbage", "missing", "not-bytes"]
        )
    )  # fmt: skip
    if how == "transpose" and len(t.shape) == 2:
        t.shape[:] = [t.shape[1], t.shape[0]]
    elif how in ("grow", "transpose"):
        t.shape[0] += 1
    elif how == "shrink":
        t.shape[0] -= 1
    elif how == "negative-dim":
        t.shape[0] = -t.shape[0]
    elif how == "offset":
        t.offset += draw(st.sampled_from([-1, 1, 2]))
    elif how == "negative-offset":
        t.offset = -draw(st.integers(1, 1 << 62))
    elif how == "huge-offset":
        t.offset = draw(st.integers(1 << 40, (1 << 63) - 1))
    elif how == "huge-dim":
        t.shape[0] = draw(st.integers(1 << 40, (1 << 63) - 1))
    elif how == "duplicate":
        t.name = spec.tensors[i - 1 if i else 1].name
    elif how == "unsorted":
        names = [x.name for x in spec.tensors]
        for x, n in zip(spec.tensors, reversed(names), strict=True):
            x.name = n
    elif how == "dtype":
        t.dtype = draw(st.sampled_from(["<f8", "|O", ">f4", "float32", "<f2", "<i4", ""]))
    elif how == "total":
        spec.total += draw(st.sampled_from([-1, 1, 1 << 40]))
    elif how == "version":
        spec.version = draw(st.sampled_from([0, 2, 7]))
    elif how == "drop":
        del spec.tensors[i]
    elif how == "extra":
        spec.tensors.add(name="zz.extra", dtype="<f4", shape=[1], offset=spec.total)
        spec.total += 1
    elif how == "pipe-name":
        t.name = t.name + "|"
    elif how == "garbage":
        return draw(st.binary(min_size=1, max_size=64))
    elif how == "missing":
        return None
    else:
        return "not bytes"
    return spec.SerializeToString()


@st.composite
def lying_buffer(draw, update: dict[str, np.ndarray]) -> Array:
    """The packed Array with one lie: bytes short or long, dtype, shape, header, stype."""
    flat = np.concatenate([update[k].ravel() for k in sorted(update)]).astype(np.float32)
    n = flat.size
    how = draw(
        st.sampled_from(
            ["short-byte", "long-byte", "short-element", "float64", "big-endian", "fortran",
             "object", "header-shape", "array-shape", "stype", "garbage"]
        )
    )  # fmt: skip
    if how in ("short-byte", "long-byte"):
        data = _npy(flat)
        data = data[:-1] if how == "short-byte" else data + b"\0"
        return Array(dtype="float32", shape=(n,), stype="numpy.ndarray", data=data)
    if how == "short-element":
        return Array(dtype="float32", shape=(n,), stype="numpy.ndarray", data=_npy(flat[:-1]))
    if how == "float64":
        return Array(flat.astype(np.float64))
    if how == "big-endian":
        return Array(dtype="float32", shape=(n,), stype="numpy.ndarray",
                     data=_npy(flat.astype(">f4")))  # fmt: skip
    if how in ("fortran", "object"):
        buf = io.BytesIO()
        descr = "|O" if how == "object" else "<f4"
        header = {"descr": descr, "fortran_order": how == "fortran", "shape": (n,)}
        np.lib.format.write_array_header_1_0(buf, header)
        buf.write(pickle.dumps(list(flat)) if how == "object" else flat.tobytes())
        return Array(dtype="float32", shape=(n,), stype="numpy.ndarray", data=buf.getvalue())
    if how == "header-shape":  # the .npy header says 2-d, the Array says 1-d
        return Array(dtype="float32", shape=(n,), stype="numpy.ndarray",
                     data=_npy(flat.reshape(1, n)))  # fmt: skip
    if how == "array-shape":
        return Array(dtype="float32", shape=(n + 1,), stype="numpy.ndarray", data=_npy(flat))
    if how == "stype":
        return Array(dtype="float32", shape=(n,), stype="torch.Tensor", data=_npy(flat))
    return Array(dtype="float32", shape=(n,), stype="numpy.ndarray",
                 data=draw(st.binary(max_size=256)))  # fmt: skip


@st.composite
def manifest_field(draw, update: dict[str, np.ndarray] | None):
    """Serialised manifest: honest, mutated in one field, random bytes, or not bytes at all."""
    kind = draw(st.sampled_from(["honest", "mutated", "random", "str", "missing"]))
    base = update if update is not None else GLOBAL
    if kind == "honest":
        return _manifest_bytes(base)
    if kind == "mutated":
        field, value = draw(
            st.sampled_from(
                [("round", ROUND - 1), ("round", ROUND + 1), ("run_id", "other"), ("region", ""),
                 ("sha256", "0" * 64), ("refused_reason", "budget")]
            )
        )  # fmt: skip
        return _manifest_bytes(base, **{field: value})
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "str":
        return "not bytes"
    return None


@st.composite
def hostile_reply(draw) -> Message:
    """A train reply a misbehaving region could send, and how it was made (`mode`)."""
    content = RecordDict()
    # honest thrice: an accepted reply also needs an honest manifest and a valid weight
    modes = ["honest"] * 3 + ["corrupt", "layout", "buffer", "old", "random"]
    mode = draw(st.sampled_from(modes))
    update = draw(honest_update()) if mode != "random" else None
    layout: object = None
    if mode == "corrupt":  # one targeted corruption of the values, packed honestly
        update = _corrupt(draw, update, packable=True)
    if update is not None and mode != "old":
        packed, layout = wire.pack_arrays(update)
        if mode == "layout":
            layout = draw(lying_layout(layout))
        elif mode == "buffer":
            packed = ArrayRecord({wire.PACKED: draw(lying_buffer(update))})
        content.array_records[wire.ARRAYS] = packed
    elif mode == "old":  # the per-tensor layout of manifest schema 1, with no layout entry
        content.array_records[wire.ARRAYS] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in update.items()}
        )
    else:
        for rec_name in draw(st.lists(st.sampled_from([wire.ARRAYS, "other"]), max_size=2)):
            recs = {n: draw(hostile_array()) for n in draw(st.lists(NAMES, max_size=4))}
            content.array_records[rec_name] = ArrayRecord(recs)
        if draw(st.booleans()):
            layout = draw(st.one_of(st.binary(max_size=64), st.just(_PACKED_GLOBAL[1])))
    n_ex = draw(
        st.one_of(
            st.sampled_from([1, 2, 64, 1024]),
            st.integers(-5, 1 << 31),
            st.floats(allow_nan=True, allow_infinity=True),
            st.lists(st.integers(0, 4), max_size=2),
            st.none(),
        )
    )
    if n_ex is not None:
        content.metric_records[wire.METRICS] = MetricRecord({wire.NUM_EXAMPLES: n_ex})
    man = draw(manifest_field(update))
    if man is not None:
        entries = {wire.MANIFEST_KEY: man}
        if layout is not None:
            entries[wire.LAYOUT_KEY] = layout
        content.config_records[wire.MANIFEST] = ConfigRecord(entries)
    meta = Metadata(
        run_id=1, message_id="", src_node_id=draw(st.integers(1, 5)), dst_node_id=0,
        reply_to_message_id="", group_id=str(ROUND), created_at=0.0, ttl=60.0,
        message_type="train",
    )  # fmt: skip
    reply = Message(content=content, metadata=meta)
    return reply, mode


_PACKED_GLOBAL = wire.pack_arrays(GLOBAL)


def _corrupt(draw, update: dict[str, np.ndarray], packable: bool = False) -> dict[str, np.ndarray]:
    """One corruption of an honest update; `packable`: only those float32 can carry."""
    u = dict(update)
    name = draw(st.sampled_from(sorted(u)))
    hows = ["nan", "inf", "scale", "shape", "drop", "extra"] + ([] if packable else ["dtype"])
    how = draw(st.sampled_from(hows))
    if how in ("nan", "inf"):
        a = u[name].copy()
        a.flat[draw(st.integers(0, a.size - 1))] = np.nan if how == "nan" else -np.inf
        u[name] = a
    elif how == "scale":
        u = {k: (v * np.float32(draw(st.floats(1.01, 1e30))) + 1).astype(np.float32)
             for k, v in u.items()}  # fmt: skip
    elif how == "shape":
        u[name] = np.zeros(u[name].size + 1, np.float32)
    elif how == "dtype":
        u[name] = u[name].astype(draw(st.sampled_from([np.float64, np.float16, np.int32])))
    elif how == "drop":
        del u[name]
    else:
        u["extra.weight"] = np.zeros(3, np.float32)
    return u


# ---- properties ----------------------------------------------------------------------------
def _independently_acceptable(update: dict[str, np.ndarray]) -> bool:
    if set(update) != set(GLOBAL):
        return False
    for k, v in update.items():
        if v.dtype != np.float32 or v.shape != GLOBAL[k].shape or not np.isfinite(v).all():
            return False
    n = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.values()))
    return n <= BOUND * (1 + NORM_RTOL) + NORM_ATOL


def _parsed_manifest(reply: Message) -> wire.UpdateManifest | None:
    rec = reply.content.config_records.get(wire.MANIFEST)
    raw = rec.get(wire.MANIFEST_KEY) if rec is not None else None
    try:
        return wire.manifest_from_bytes(raw) if isinstance(raw, bytes) else None
    except ValueError:
        return None


def test_fuzz_judge_train_reply(capsys) -> None:
    """Hostile replies never crash the aggregator and are never accepted unless sound."""
    seen = {"cases": 0, "accepted": 0, "rejected": 0, "refused": 0}

    @FUZZ
    @given(hostile_reply())
    def run(case: tuple[Message, str]) -> None:
        reply, mode = case
        seen["cases"] += 1
        out = RoundOutcome()
        judge_train_reply(reply, EXP, {}, out)
        buckets = [len(out.accepted), len(out.rejected), len(out.refused), len(out.errors)]
        assert sum(buckets) == 1, buckets
        if mode in ("layout", "buffer", "old"):  # a packing lie or the old layout: never counts
            assert not out.accepted, mode
            seen[mode] = seen.get(mode, 0) + 1
            man = _parsed_manifest(reply)
            if man is not None and not man.refused_reason:  # unpacking itself must refuse it
                assert out.rejected[0][1].startswith("packed arrays refused: "), out.rejected
                seen["unpack-refused"] = seen.get("unpack-refused", 0) + 1
        if out.accepted:
            seen["accepted"] += 1
            _, update, weight = out.accepted[0]
            assert _independently_acceptable(update)
            assert weight >= 1 and int(weight) & (int(weight) - 1) == 0
            man = wire.manifest_from_bytes(
                reply.content.config_records[wire.MANIFEST][wire.MANIFEST_KEY]
            )
            assert man.sha256 == wire.array_digest(update)
            assert (man.run_id, man.round) == (RUN, ROUND) and man.region
        elif out.rejected:
            seen["rejected"] += 1
            assert isinstance(out.rejected[0][1], str) and out.rejected[0][1]
        else:
            seen["refused"] += 1

    run()
    assert seen["cases"] >= 100
    assert seen["rejected"] > seen["accepted"] > 0  # the generator reaches both outcomes
    assert min(seen.get(m, 0) for m in ("layout", "buffer", "old", "unpack-refused")) > 0
    report(capsys, "judge_train_reply", seen["cases"], str(seen))


def test_fuzz_verify_update_mutations(capsys) -> None:
    """Every single targeted corruption of an honest update is rejected with a reason, and the
    honest update itself is accepted."""
    seen = {"cases": 0}

    @FUZZ
    @given(honest_update(), st.data())
    def run(update: dict[str, np.ndarray], data) -> None:
        seen["cases"] += 1
        man = wire.manifest_from_bytes(_manifest_bytes(update))
        assert verify_update(update, man, EXP) is None
        bad = _corrupt(data.draw, update)
        reason = verify_update(bad, wire.manifest_from_bytes(_manifest_bytes(bad)), EXP)
        if _independently_acceptable(bad):  # e.g. "scale" of an all-zero update stays small
            return
        assert isinstance(reason, str) and reason

    run()
    report(capsys, "verify_update mutations", seen["cases"])


def test_fuzz_manifest_bytes(capsys) -> None:
    """Arbitrary bytes parse into a manifest or raise ValueError, nothing else."""
    seen = {"cases": 0, "parsed": 0}

    @FUZZ
    @given(st.binary(max_size=512))
    def run(data: bytes) -> None:
        seen["cases"] += 1
        try:
            m = wire.manifest_from_bytes(data)
        except ValueError:
            return
        seen["parsed"] += 1
        assert isinstance(m, wire.UpdateManifest)

    run()
    report(capsys, "manifest_from_bytes", seen["cases"], str(seen))
