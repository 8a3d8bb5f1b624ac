"""One simulated episode on highway-env: IDM/MOBIL traffic, every vehicle logged at log_hz.

We never step through `env.step` (3–40 labels/s). Instead we build the road ourselves and call
`road.act()` then `road.step(dt)`: right after `act()` every IDM vehicle holds a consistent
(state, expert action) pair, so logging there labels the whole road at once.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import numpy as np

from fedfsd.data.fleet import draw_drivers
from fedfsd.data.profiles import RegionProfile
from fedfsd.data.schema import NO_MERGE, TRACK_COLUMNS

LANE_W = 4.0
ROAD_LEN = 4000.0
# merge layout (metres along x): ramp, converging S-curve, parallel merge lane, then highway.
PRE_MERGE, CONVERGE, PARALLEL = 200.0, 80.0, 110.0
MERGE_END = PRE_MERGE + CONVERGE + PARALLEL
NO_LIMIT = 100.0  # lanes get this "limit" so IDM never silently clips a driver's desired speed


@dataclass
class EpisodeResult:
    columns: dict[str, np.ndarray]
    fleet_vehicle_episodes: int
    crashed_fleet_vehicle_episodes: int


def _fleet_vehicle_class():
    from highway_env.vehicle.behavior import IDMVehicle

    class FleetVehicle(IDMVehicle):
        """IDM/MOBIL with a keep-side bias: MOBIL 1.12 is symmetric, real regions are not."""

        keep_bias = 0.0
        main_lanes = 1
        LANE_CHANGE_MIN_ACC_GAIN: float  # highway-env's class attribute (annotation only)

        def mobil(self, lane_index) -> bool:  # noqa: ANN001 - highway-env's own type
            gain = self.LANE_CHANGE_MIN_ACC_GAIN
            # Only between through lanes: leaving an entry lane is never made harder.
            if max(lane_index[2], self.lane_index[2]) < self.main_lanes:
                towards_slow = lane_index[2] > self.lane_index[2]  # highway-env: + = right
                self.LANE_CHANGE_MIN_ACC_GAIN = gain + (-1 if towards_slow else 1) * self.keep_bias
            try:
                return super().mobil(lane_index)
            finally:
                self.LANE_CHANGE_MIN_ACC_GAIN = gain

        def on_state_update(self) -> None:
            # FastRoad.step finds every vehicle's closest lane in one vectorised pass.
            if not getattr(self.road, "batch_lane_update", False):
                super().on_state_update()

    return FleetVehicle


@functools.cache
def _fast_lane_class():
    """StraightLane whose `local_coordinates` uses Python float arithmetic.

    Same values as the stock numpy version (a 2-element dot product is two products and one
    sum either way; no fused multiply-add), without numpy's per-call overhead: highway-env's
    driver models call it several times per vehicle and step.
    """
    from highway_env.road.lane import StraightLane

    class FastStraightLane(StraightLane):
        def local_coordinates(self, position: np.ndarray) -> tuple[float, float]:
            c = self.__dict__.get("_coef")
            if c is None:
                c = self._coef = (
                    *self.start.tolist(),
                    *self.direction.tolist(),
                    *self.direction_lateral.tolist(),
                )
            x, y = position.tolist()
            dx, dy = x - c[0], y - c[1]
            return dx * c[2] + dy * c[3], dx * c[4] + dy * c[5]

    return FastStraightLane


def _fast_road_class():
    """Road with vectorised neighbour search, lane assignment and a collision pre-filter.

    Same results as highway-env's Road (same tie-breaking) on straight lanes, several times
    faster: the stock versions call `lane.local_coordinates` / `_is_colliding` once per vehicle
    pair, and `get_closest_lane_index` once per vehicle and lane, in Python. Curved lanes fall
    back to the stock code. Positions only change in `step`, so per-step caches stay valid
    through `act`.
    """
    from highway_env.road.lane import StraightLane
    from highway_env.road.road import Road

    straight_types = (StraightLane, _fast_lane_class())

    class FastRoad(Road):
        _pos: np.ndarray | None = None
        _index: dict[int, int] | None = None
        _others: list | None = None
        _lanes: tuple | None = None
        batch_lane_update = False

        def _positions(self) -> np.ndarray:
            if self._pos is None:
                self._others = self.vehicles + self.objects
                self._pos = np.array([o.position for o in self._others], float)
                self._index = {id(o): i for i, o in enumerate(self._others)}
                self._proj: dict = {}
            return self._pos

        def _lane_order(self, lane_index, lane) -> tuple[list[float], list[int]]:  # noqa: ANN001
            """Objects on `lane` sorted by (longitudinal position, index): values and indices."""
            hit = self._proj.get(lane_index) if self._pos is not None else None
            if hit is None:
                delta = self._positions() - lane.start
                s_all = delta @ lane.direction
                lat_all = delta @ lane.direction_lateral
                on = (np.abs(lat_all) <= lane.width / 2 + 1) & (s_all >= -lane.VEHICLE_LENGTH)
                on &= s_all < lane.length + lane.VEHICLE_LENGTH
                idx = np.flatnonzero(on)
                order = idx[np.lexsort((idx, s_all[idx]))]
                hit = self._proj[lane_index] = (s_all[order].tolist(), order.tolist())
            return hit

        def neighbour_vehicles(self, vehicle, lane_index=None):  # noqa: ANN001, ANN201
            lane_index = lane_index or vehicle.lane_index
            if not lane_index:
                return None, None
            lane = self.network.get_lane(lane_index)
            if type(lane) not in straight_types or self.neighbour_vehicles_connected_lanes:
                return super().neighbour_vehicles(vehicle, lane_index)
            vals, idx = self._lane_order(lane_index, lane)
            me = self._index.get(id(vehicle), -1)
            s = float((vehicle.position - lane.start) @ lane.direction)
            p = bisect.bisect_left(vals, s)  # vals[p:] >= s > vals[:p]
            n = len(vals)
            front = rear = None
            # Front: the smallest value >= s; among equals the stock code keeps the LAST index.
            q = p
            while q < n and idx[q] == me:
                q += 1
            if q < n:
                last = q
                while last + 1 < n and vals[last + 1] == vals[q]:
                    last += 1
                if idx[last] == me:  # runs are sorted by index: step back over the vehicle
                    last -= 1
                front = idx[last]
            # Rear: the largest value < s; among equals the stock code keeps the FIRST index.
            q = p - 1
            while q >= 0 and idx[q] == me:
                q -= 1
            if q >= 0:
                first = q
                while first > 0 and vals[first - 1] == vals[q]:
                    first -= 1
                if idx[first] == me:
                    first += 1
                rear = idx[first]
            others = self._others
            return (
                others[front] if front is not None else None,
                others[rear] if rear is not None else None,
            )

        def _lane_table(self) -> tuple:
            """Every lane in the network's iteration order (the stock argmin's tie order)."""
            if self._lanes is None:
                idx, lanes = [], []
                for _from, to_dict in self.network.graph.items():
                    for _to, group in to_dict.items():
                        for _id, lane in enumerate(group):
                            idx.append((_from, _to, _id))
                            lanes.append(lane)
                straight = np.array([type(ln) in straight_types for ln in lanes])
                geo = np.array(
                    [
                        [*ln.start, *ln.direction, *ln.direction_lateral, ln.length, ln.heading]
                        if s
                        else [0.0] * 8
                        for ln, s in zip(lanes, straight, strict=True)
                    ],
                    float,
                )
                self._lanes = (idx, lanes, straight, geo)
            return self._lanes

        def _assign_lanes(self) -> None:
            """`get_closest_lane_index` for every vehicle at once, bit for bit.

            Written with the same float operations in the same order as highway-env's
            `StraightLane.distance_with_heading` (elementwise products, not a matrix product,
            whose fused multiply-adds would round differently).
            """
            idx, lanes, straight, geo = self._lane_table()
            vs = self.vehicles
            pos = np.array([v.position for v in vs], float)
            heading = np.array([v.heading for v in vs], float)
            dx = pos[:, 0:1] - geo[None, :, 0]
            dy = pos[:, 1:2] - geo[None, :, 1]
            lon = dx * geo[None, :, 2] + dy * geo[None, :, 3]
            lat = dx * geo[None, :, 4] + dy * geo[None, :, 5]
            angle = np.abs(((heading[:, None] - geo[None, :, 7] + np.pi) % (2 * np.pi)) - np.pi)
            dist = np.abs(lat) + np.maximum(lon - geo[None, :, 6], 0.0)
            dist = dist + np.maximum(0.0 - lon, 0.0) + 1.0 * angle
            for j in np.flatnonzero(~straight):
                dist[:, j] = [lanes[j].distance_with_heading(v.position, v.heading) for v in vs]
            best = np.argmin(dist, axis=1)
            get_lane = self.network.get_lane
            for v, b in zip(vs, best, strict=True):
                v.lane_index = idx[b]
                v.lane = get_lane(v.lane_index)

        def step(self, dt: float) -> None:
            if self.record_history:
                raise RuntimeError("FastRoad does not record vehicle history")
            self.batch_lane_update = True
            try:
                for v in self.vehicles:
                    v.step(dt)
            finally:
                self.batch_lane_update = False
            self._assign_lanes()
            self._pos = None
            pos = self._positions()[: len(self.vehicles)]
            diag = np.array([v.diagonal for v in self.vehicles])
            speed = np.array([abs(v.speed) for v in self.vehicles])
            dist = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
            reach = (diag[:, None] + diag[None, :]) / 2 + np.maximum.outer(speed, speed) * dt
            close = np.triu(dist <= reach, k=1)
            for i, j in zip(*np.nonzero(close), strict=True):
                self.vehicles[i].handle_collisions(self.vehicles[j], dt)
            for v in self.vehicles:
                for other in self.objects:
                    v.handle_collisions(other, dt)

    return FastRoad


def _make_road(scenario: str, lanes: int, seed: int):
    from highway_env.road.lane import LineType, SineLane, StraightLane
    from highway_env.road.road import RoadNetwork
    from highway_env.vehicle.objects import Obstacle

    net = RoadNetwork()
    if scenario == "highway":
        RoadNetwork.straight_road_network(
            lanes, length=ROAD_LEN, nodes_str=("a", "d"), speed_limit=NO_LIMIT, net=net
        )
        obstacles = []
    else:
        bounds = [
            (0.0, PRE_MERGE + CONVERGE),
            (PRE_MERGE + CONVERGE, PARALLEL),
            (MERGE_END, ROAD_LEN),
        ]
        for (start, length), nodes in zip(
            bounds, [("a", "b"), ("b", "c"), ("c", "d")], strict=True
        ):
            RoadNetwork.straight_road_network(
                lanes, start=start, length=length, nodes_str=nodes, speed_limit=NO_LIMIT, net=net
            )
        amp = 3.25
        y_par = lanes * StraightLane.DEFAULT_WIDTH
        c, s = LineType.CONTINUOUS_LINE, LineType.STRIPED
        ljk = StraightLane(
            [0, y_par + 2 * amp],
            [PRE_MERGE, y_par + 2 * amp],
            line_types=[c, c],
            forbidden=True,
            speed_limit=NO_LIMIT,
        )
        lkb = SineLane(
            [PRE_MERGE, y_par + amp],
            [PRE_MERGE + CONVERGE, y_par + amp],
            amp,
            2 * np.pi / (2 * CONVERGE),
            np.pi / 2,
            line_types=[c, c],
            forbidden=True,
            speed_limit=NO_LIMIT,
        )
        lbc = StraightLane(
            [PRE_MERGE + CONVERGE, y_par],
            [MERGE_END, y_par],
            line_types=[s, c],
            forbidden=True,
            speed_limit=NO_LIMIT,
        )
        net.add_lane("j", "k", ljk)
        net.add_lane("k", "b", lkb)
        net.add_lane("b", "c", lbc)
        obstacles = [lbc.position(PARALLEL, 0)]
    for to_dict in net.graph.values():
        for group in to_dict.values():
            for lane in group:
                if type(lane) is StraightLane:
                    lane.__class__ = _fast_lane_class()  # same state, faster local_coordinates
    road = _fast_road_class()(network=net, np_random=np.random.RandomState(seed % 2**32))
    for pos in obstacles:
        road.objects.append(Obstacle(road, pos))
    return road


def _spawn_positions(profile: RegionProfile, scenario: str, n: int, rng: np.random.Generator):
    """(lane_index, x) for n vehicles: ramp vehicles first on a merge road, then main lanes."""
    lanes = profile.road.lanes
    spacing = 1000.0 / profile.traffic.vehicles_per_km_per_lane
    out: list[tuple[tuple[str, str, int], float]] = []
    n_ramp = max(1, round(0.15 * n)) if scenario == "merge" else 0
    if n_ramp:
        xs = np.sort(rng.uniform(0, PRE_MERGE - 30, size=n_ramp))
        xs = np.maximum.accumulate(xs + np.arange(n_ramp) * 25.0)
        out += [(("j", "k", 0), float(x)) for x in xs if x < PRE_MERGE - 5]
    n_main = n - len(out)
    per_lane = [n_main // lanes + (1 if i < n_main % lanes else 0) for i in range(lanes)]
    for lane, count in enumerate(per_lane):
        gaps = spacing * rng.uniform(0.5, 1.5, size=count)
        xs = rng.uniform(0, spacing) + np.cumsum(np.maximum(gaps, 18.0)) - gaps[0]
        for x in xs:
            seg = (
                ("a", "d")
                if scenario == "highway"
                else (
                    ("a", "b")
                    if x < PRE_MERGE + CONVERGE
                    else ("b", "c")
                    if x < MERGE_END
                    else ("c", "d")
                )
            )
            out.append(((*seg, lane), float(x)))
    return out


def _episode_road(profile: RegionProfile, seed: int, episode: int) -> RegionProfile:
    """The profile with this episode's lane count and speed limit (profiles that vary them).

    Drawn from its own seeded stream, so profiles without variation simulate exactly as before.
    """
    road = profile.road
    if not road.lanes_mix and not road.speed_limits_kmh:
        return profile
    rng = np.random.default_rng([seed, 6, episode])
    lanes, limit = road.lanes, road.speed_limit_kmh
    if road.lanes_mix:
        mix = sorted(road.lanes_mix.items())
        lanes = int(mix[int(rng.choice(len(mix), p=[p for _, p in mix]))][0])
    if road.speed_limits_kmh:
        limit = float(road.speed_limits_kmh[int(rng.integers(len(road.speed_limits_kmh)))])
    fixed = road.model_copy(
        update={
            "lanes": lanes,
            "speed_limit_kmh": limit,
            "lanes_mix": {},
            "speed_limits_kmh": [],
        }
    )
    return profile.model_copy(update={"road": fixed})


def simulate_episode(
    profile: RegionProfile,
    episode: int,
    seed: int,
    fleet_ids: list[str],
    fleet_drivers: dict[str, np.ndarray],
) -> EpisodeResult:
    """Simulate one episode with the given fleet members (ids and driver params) in traffic.

    Deterministic for (profile, episode, seed, members). Returns the track columns of all vehicles
    from 1 s before the end of warm-up on (the warm-up transient is dropped).
    """
    FleetVehicle = _fleet_vehicle_class()
    rng = np.random.default_rng([seed, 2, episode])
    mix = sorted(profile.road.scenario_mix.items())
    scenario = mix[int(rng.choice(len(mix), p=[p for _, p in mix]))][0]
    rain = bool(rng.random() < profile.weather.rain_probability)
    profile = _episode_road(profile, seed, episode)
    n_fleet = len(fleet_ids)
    n_total = max(profile.traffic.vehicles_per_episode, n_fleet)
    road = _make_road(scenario, profile.road.lanes, int(rng.integers(2**31)))
    spawns = _spawn_positions(profile, scenario, n_total, rng)
    n_total = len(spawns)
    n_fleet = min(n_fleet, n_total)
    fleet_slots = rng.choice(n_total, size=n_fleet, replace=False)
    bg = draw_drivers(profile, n_total, rng)
    ids = [f"bg-{episode}-{i}" for i in range(n_total)]
    is_fleet = np.zeros(n_total, dtype=bool)
    drivers = {k: v.copy() for k, v in bg.items()}
    for j, slot in enumerate(fleet_slots):
        ids[slot] = fleet_ids[j]
        is_fleet[slot] = True
        for k in drivers:
            drivers[k][slot] = fleet_drivers[k][j]
    w = profile.weather
    limit = profile.speed_limit
    vehicles = []
    for i, (lane_index, x) in enumerate(spawns):
        lane = road.network.get_lane(lane_index)
        desired = limit * drivers["desired_speed_ratio"][i] * (w.rain_speed_factor if rain else 1)
        s_lane = x - float(lane.start[0])
        v = FleetVehicle(
            road,
            lane.position(s_lane, 0),
            heading=lane.heading_at(s_lane),
            speed=desired * rng.uniform(0.92, 1.0),
            target_speed=desired,
        )
        v.TIME_WANTED = drivers["time_headway_s"][i] * (w.rain_headway_factor if rain else 1)
        v.DISTANCE_WANTED = drivers["min_gap_m"][i] + v.LENGTH
        acc_f = w.rain_acc_factor if rain else 1.0
        v.COMFORT_ACC_MAX = drivers["comfort_acc"][i] * acc_f
        v.COMFORT_ACC_MIN = -drivers["comfort_brake"][i] * acc_f
        v.LANE_CHANGE_MAX_BRAKING_IMPOSED = drivers["comfort_brake"][i]
        v.POLITENESS = drivers["politeness"][i]
        v.LANE_CHANGE_MIN_ACC_GAIN = drivers["lane_change_gain"][i]
        v.keep_bias = drivers["keep_side_bias"][i]
        v.main_lanes = profile.road.lanes
        v.timer = rng.uniform(0, v.LANE_CHANGE_DELAY)
        vehicles.append(v)
    road.vehicles = vehicles
    return _run(profile, road, vehicles, ids, is_fleet, episode, scenario, rain)


def _cross_section(v, lanes: int, scenario: str) -> tuple[int, int]:
    """(index counted from the smallest highway-env y, lanes in the cross-section) at v."""
    li = v.lane_index
    if scenario == "highway":
        return int(li[2]), lanes
    x = float(v.position[0])
    ramp = li[0] in ("j", "k") or (li[0] == "b" and li[2] == lanes)
    n = lanes + 1 if x < MERGE_END else lanes
    return (lanes if ramp else int(li[2])), n


def _run(profile, road, vehicles, ids, is_fleet, episode, scenario, rain) -> EpisodeResult:
    ep = profile.episode
    dt = 1.0 / ep.sim_hz
    every = ep.sim_hz // ep.log_hz
    n_steps = int(round(ep.duration_s * ep.sim_hz))
    first_log = int(round((ep.warmup_s - 1.0) * ep.sim_hz))
    # highway-env y grows to the right of travel; the log frame's y grows to the left, so
    # right-hand traffic flips y (s = -1). Left-hand traffic is the exact mirror: s = +1.
    s = 1.0 if profile.left_hand_traffic else -1.0
    lanes = profile.road.lanes
    rows: dict[str, list] = {k: [] for k in TRACK_COLUMNS}
    crashed_ever = np.zeros(len(vehicles), dtype=bool)
    for step in range(n_steps + 1):
        road.act()
        if step >= first_log and step % every == 0:
            t = step * dt
            for i, v in enumerate(vehicles):
                v.clip_actions()
                c_hw, n_l = _cross_section(v, lanes, scenario)
                lane_obj = v.lane
                lon, lat = lane_obj.local_coordinates(v.position)
                tgt = v.target_lane_index
                change = 0
                if tgt != v.lane_index and tgt[:2] == v.lane_index[:2]:
                    change = int(-s * np.sign(tgt[2] - v.lane_index[2]))  # hw +y -> log -s*y
                x = float(v.position[0])
                rows["episode"].append(episode)
                rows["frame"].append(step // every)
                rows["t"].append(t)
                rows["vehicle_id"].append(ids[i])
                rows["is_fleet"].append(bool(is_fleet[i]))
                rows["x"].append(x)
                rows["y"].append(s * float(v.position[1]))
                vel = v.velocity
                rows["vx"].append(float(vel[0]))
                rows["vy"].append(s * float(vel[1]))
                rows["speed"].append(float(v.speed))
                rows["heading"].append(s * float(v.heading))
                rows["accel"].append(float(v.action["acceleration"]))
                rows["steering"].append(s * float(v.action["steering"]))
                rows["lane"].append(c_hw if s > 0 else n_l - 1 - c_hw)
                rows["n_lanes"].append(n_l)
                rows["lane_offset"].append(s * float(lat))
                rows["lane_change"].append(change)
                rows["speed_limit"].append(profile.speed_limit)
                rows["length"].append(float(v.LENGTH))
                rows["width"].append(float(v.WIDTH))
                rows["crashed"].append(bool(v.crashed))
                rows["scenario"].append(scenario)
                md = MERGE_END - x if scenario == "merge" and x < MERGE_END else NO_MERGE
                rows["merge_distance"].append(md)
                rows["rain"].append(rain)
        if step == n_steps:
            break
        road.step(dt)
        for i, v in enumerate(vehicles):
            crashed_ever[i] |= bool(v.crashed)
    import pyarrow as pa

    columns = {
        k: np.asarray(vals, dtype=object if t == pa.string() else t.to_pandas_dtype())
        for k, vals in rows.items()
        for t in [TRACK_COLUMNS[k][0]]
    }
    return EpisodeResult(
        columns=columns,
        fleet_vehicle_episodes=int(is_fleet.sum()),
        crashed_fleet_vehicle_episodes=int((crashed_ever & is_fleet).sum()),
    )
