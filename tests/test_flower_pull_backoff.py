"""fedfsd.flower.pull_backoff: Flower's object pulls retry after 50 ms, not after 1 s and 2 s."""

from __future__ import annotations

import importlib
import time

import pytest

from fedfsd.flower.message_objects import ObjectUnavailableError
from fedfsd.flower.pull_backoff import (
    BACKOFF_CAP_S,
    CALL_SITES,
    INITIAL_BACKOFF_S,
    SERVERAPP_SITE,
    fast_object_pulls,
)


@pytest.fixture
def restore_sites():
    mods = {m: importlib.import_module(m) for m, _ in CALL_SITES}
    saved = {(m, a): getattr(mods[m], a) for m, a in CALL_SITES}
    yield mods
    for (m, a), fn in saved.items():
        setattr(mods[m], a, fn)


def test_every_call_site_is_found_and_patching_is_idempotent(restore_sites) -> None:
    assert fast_object_pulls() == []  # flwr 1.39 layout: nothing skipped
    first = {(m, a): getattr(restore_sites[m], a) for m, a in CALL_SITES}
    assert fast_object_pulls() == []
    for (m, a), fn in first.items():
        again = getattr(restore_sites[m], a)
        assert again.keywords == {
            "initial_backoff": INITIAL_BACKOFF_S,
            "backoff_cap": BACKOFF_CAP_S,
        }
        assert again.func is fn.func  # a second call re-wraps the original, not the wrapper


def test_an_object_that_arrives_late_is_pulled_soon_after(restore_sites) -> None:
    fast_object_pulls((SERVERAPP_SITE,))
    pull_objects = restore_sites[SERVERAPP_SITE].pull_objects
    tries = []

    def pull_object(object_id: str) -> bytes:
        tries.append(time.monotonic())
        if len(tries) < 3:  # the sender has not uploaded it yet
            raise ObjectUnavailableError(object_id)
        return b"content"

    t0 = time.monotonic()
    got = pull_objects(["obj"], pull_object_fn=pull_object)
    waited = time.monotonic() - t0
    assert got == {"obj": b"content"} and len(tries) == 3
    # Flower's own schedule waits 1 s then 2 s (±20%) before the third try: ≥ 2.4 s.
    assert waited < 1.0, waited
