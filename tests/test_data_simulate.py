"""The fast simulation loop gives byte-identical tracks to highway-env's stock Road and lanes.

FastRoad vectorises lane assignment, neighbour search and collision candidates, and straight
lanes project with Python floats; none of that may change a single logged value.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedfsd.data import simulate
from fedfsd.data.fleet import draw_drivers
from fedfsd.data.profiles import RegionProfile, load_region


def _stock(monkeypatch) -> None:
    from highway_env.road.lane import StraightLane
    from highway_env.road.road import Road

    monkeypatch.setattr(simulate, "_fast_road_class", lambda: Road)
    monkeypatch.setattr(simulate, "_fast_lane_class", lambda: StraightLane)


@pytest.mark.parametrize(("region", "episode"), [("cn", 1), ("jp", 1), ("public", 0)])
def test_fast_loop_matches_stock_highway_env(region: str, episode: int, monkeypatch) -> None:
    d = load_region(region).model_dump(mode="json")
    d["traffic"].update(vehicles_per_episode=24, fleet_share=1.0)
    d["episode"].update(duration_s=8.0, warmup_s=2.0)
    prof = RegionProfile.model_validate(d)
    drivers = draw_drivers(prof, 24, np.random.default_rng(7))
    ids = [f"v{i}" for i in range(24)]
    fast = simulate.simulate_episode(prof, episode, 3, ids, drivers).columns
    _stock(monkeypatch)
    stock = simulate.simulate_episode(prof, episode, 3, ids, drivers).columns
    assert fast.keys() == stock.keys()
    for k in fast:
        np.testing.assert_array_equal(fast[k], stock[k], err_msg=k)
    assert (fast["lane_change"] != 0).any()  # the episode exercises MOBIL lane changes
