"""Issue 20, item 5: the region bounds what it pulls for one message.

The executor's own pull (`pull_message_bounded`) runs against Flower 1.39's real in-memory
ObjectStore holding a real Message's deflated objects (what the SuperNode's Runtime API serves).
The oversized message is the attack of the issue in small: one chunk of zeros referenced many
times, so a few MB of unique objects inflate to much more.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedfsd import wire
from fedfsd.flower.message_objects import (
    InMemoryObjectStore,
    ObjectTree,
    get_all_nested_objects,
    get_object_tree,
)
from fedfsd.region.executor import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MessageRefused,
    max_message_bytes_from_policy,
    pull_message_bounded,
)

RUN = 7


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedfsd.flower.message_objects import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", RUN)  # what Flower sets on the sending side
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _stored(records: dict, layout: bytes = b"") -> tuple[InMemoryObjectStore, Message, dict]:
    """A real Message deflated into Flower's real ObjectStore, as the SuperNode holds it."""
    msg = Message(
        RecordDict({**records, "config": ConfigRecord({"round": 1, wire.LAYOUT_KEY: layout})}),
        dst_node_id=3,
        message_type=MessageType.TRAIN,
    )
    store = InMemoryObjectStore()
    tree = get_object_tree(msg)
    store.preregister(RUN, tree)
    objects = get_all_nested_objects(msg)
    for oid, obj in objects.items():
        store.put(oid, obj.deflate())
    return store, msg, {"tree": tree, "objects": objects}


class _Pulls:
    """Counts what the executor pulled from the store, and confirms."""

    def __init__(self, store: InMemoryObjectStore) -> None:
        self.store, self.ids, self.bytes, self.confirmed = store, [], 0, []

    def pull(self, oid: str) -> bytes:
        content = self.store.get(oid)
        assert content is not None
        self.ids.append(oid)
        self.bytes += len(content)
        return content

    def confirm(self, oid: str) -> None:
        self.confirmed.append(oid)


def test_a_model_sized_message_is_pulled_and_inflated_intact() -> None:
    w = {
        "fc.weight": np.arange(6000, dtype=np.float32).reshape(60, 100),
        "b": np.ones(3, np.float32),
    }
    packed, layout = wire.pack_arrays(w)
    store, msg, parts = _stored({"arrays": packed}, layout)
    p = _Pulls(store)
    got, nbytes = pull_message_bounded(parts["tree"], p.pull, p.confirm, 1 << 20)
    back = wire.arrays_from(got.content, wire.CONFIG)
    np.testing.assert_array_equal(back["fc.weight"], w["fc.weight"])
    assert got.content["config"]["round"] == 1 and p.confirmed == [parts["tree"].object_id]
    assert 24_000 < nbytes < 1 << 20


def test_an_oversized_message_is_refused_before_its_chunks_are_pulled() -> None:
    big = np.zeros((6, 1 << 20), np.float32)  # 24 MiB of zeros: 5 MiB chunks, 2 unique
    store, msg, parts = _stored({"arrays": wire.pack_arrays({"w": big})[0]})
    chunks = {oid for oid, o in parts["objects"].items() if type(o).__name__ == "ArrayChunk"}
    assert chunks and len(store) >= 5
    p = _Pulls(store)
    with pytest.raises(MessageRefused, match="before pulling them"):
        pull_message_bounded(parts["tree"], p.pull, p.confirm, 2 << 20)
    assert not chunks & set(p.ids)  # not one chunk pulled
    assert p.bytes < 64 << 10 and p.confirmed == []


def test_repeated_chunks_are_counted_by_reference_not_by_unique_bytes() -> None:
    # The array's header lies (says 1 float); its data is 16 MiB of zeros in 5 MiB chunks, of
    # which one 5 MiB chunk and one 1 MiB chunk are unique: 6 MiB pulled would inflate to 16.
    data = bytes(16 << 20)
    liar = Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=data)
    store, _, parts = _stored({"arrays": ArrayRecord({"w": liar})})
    p = _Pulls(store)
    with pytest.raises(MessageRefused, match="inflates to"):
        pull_message_bounded(parts["tree"], p.pull, p.confirm, 12 << 20)
    assert p.bytes < 7 << 20 and p.confirmed == []


def test_an_object_that_does_not_match_its_id_is_refused() -> None:
    store, _, parts = _stored({"arrays": wire.pack_arrays({"w": np.ones(10, np.float32)})[0]})
    p = _Pulls(store)
    leaf = next(iter(parts["objects"]))

    def tampered(oid: str) -> bytes:
        content = p.pull(oid)
        return content[:-1] + bytes([content[-1] ^ 1]) if oid == leaf else content

    with pytest.raises(MessageRefused, match="sha256"):
        pull_message_bounded(parts["tree"], tampered, p.confirm, 1 << 20)


def test_the_bound_comes_from_the_region_policy(tmp_path: Path) -> None:
    pol = tmp_path / "p.toml"
    base = (
        'region = "eu"\nepsilon_budget = 8.0\ndelta = 1e-6\nmin_noise_multiplier = 0.8\n'
        "max_clip_norm = 1.0\nupdate_norm_bound = 5.0\n"
    )
    pol.write_text(base)
    assert max_message_bytes_from_policy(str(pol)) == DEFAULT_MAX_MESSAGE_BYTES
    pol.write_text(base + "max_message_bytes = 1000000\n")
    assert max_message_bytes_from_policy(str(pol)) == 1_000_000
    assert max_message_bytes_from_policy(None) == DEFAULT_MAX_MESSAGE_BYTES


def test_a_malformed_object_is_refused_not_raised() -> None:
    import hashlib

    junk = b"not an inflatable object"
    oid = hashlib.sha256(junk).hexdigest()
    with pytest.raises(MessageRefused, match="malformed"):
        pull_message_bounded(ObjectTree(object_id=oid), {oid: junk}.__getitem__, print, 1 << 20)


def test_an_object_that_vanished_with_its_superlink_fails_the_pull_soon() -> None:
    """A message delivered before its SuperLink was killed: its objects never come back. The
    pull gives up after `object_wait` seconds instead of Flower's 500 tries (≈ 4 minutes at our
    backoff), so the executor is free when the resumed run asks (test_e2e_deploy's resume)."""
    import time

    from fedfsd.flower.message_objects import ObjectPullError, ObjectUnavailableError

    _, _, parts = _stored({"arrays": wire.pack_arrays({"w": np.ones(10, np.float32)})[0]})
    tries: list[str] = []

    def gone(oid: str) -> bytes:
        tries.append(oid)
        raise ObjectUnavailableError(oid)

    t0 = time.monotonic()
    with pytest.raises(ObjectPullError):
        pull_message_bounded(parts["tree"], gone, print, 1 << 20, object_wait=1.0)
    took = time.monotonic() - t0
    assert 1.0 <= took < 5.0 and len(tries) >= 2  # retried for object_wait, then stopped
