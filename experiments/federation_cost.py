"""Federation cost: where the time of a round goes, and how many bytes cross per region.

    .venv/bin/python experiments/federation_cost.py --quick
    .venv/bin/python experiments/federation_cost.py                 # full size
    .venv/bin/python experiments/federation_cost.py --tiny          # smoke run (tests)

It starts the real deployment, `fedfsd.deploy.federation.LocalFederation` (SuperLink with TLS and
SuperNode authentication, one SuperNode + the region's own executor per region, all separate
processes on loopback), runs a few rounds of the packaged app, and measures:

- round wall time: the aggregator's own `rounds.jsonl` (`seconds`: train send-and-receive,
  verification, FedAvg and the evaluate round of that round);
- region task time: each region executor's `decisions.jsonl` (`seconds` from pulling the task to
  pushing the reply, split into `pull_s`, `app_s` (the ClientApp) and `push_s`), per message;
- local training: `train_seconds` of each release in the region's own privacy ledger (the wall
  time of the DP-SGD steps inside the executor, not accounting, not I/O); "not training" is
  everything else of the round wall: round wall − slowest region's DP-SGD time;
- serialisation: Flower 1.39 deflates a Message into inflatable objects; we time and size exactly
  that in this process; aggregation (`verify_update` per region + `FedAvgMomentum.step`) is
  timed in this process too;
- transport + waiting = round wall − slowest train task − slowest evaluate task − aggregation;
- bytes: every SuperNode dials the Fleet API through its own counting TCP relay, so the bytes
  are the TLS records each region really sent and received (TCP payload, no IP/TCP headers),
  including polls and heartbeats; compared with the raw update size (float32 params × 4).
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import typer
from common import (
    DATA_CACHE,
    bad_option,
    calibrate_sigma,
    console,
    default_delta,
    ensure_dataset,
    load_region,
    machine,
    make_policy,
    out_dir,
    policy_toml,
    rich_table,
    sized_preset,
    write_json,
)


# -- byte counting ---------------------------------------------------------------------------------
class CountingRelay:
    """A TCP relay in front of the Fleet API that counts the bytes of each direction.

    Why a relay and not socket statistics: connections may come and go during a run; the relay
    sees every byte of every connection of one region and nothing else.
    """

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.target = target
        self.sock = socket.create_server((host, 0))
        self.port = int(self.sock.getsockname()[1])
        self.up = 0  # region → aggregator
        self.down = 0  # aggregator → region
        self.connections = 0
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> CountingRelay:
        self._thread.start()
        return self

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._open += [client, upstream]
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, up), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
                with self._lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        with self._lock:
            for s in self._open:
                s.close()


class RelaySampler:
    """Samples every relay's counters (wall clock, every `every` s) while a run goes on.

    Why: bytes per round taken as run total / rounds also charge the rounds with the start of
    the ServerApp and the end of the run, when regions only poll; with samples, the bytes of
    the rounds' own time span can be read off (`bytes_between`).
    """

    def __init__(self, relays: dict[str, CountingRelay], every: float = 0.25) -> None:
        self.relays, self.every = relays, every
        self.samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _take(self) -> None:
        self.samples.append((time.time(), {r: x.snapshot() for r, x in self.relays.items()}))

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._take()

    def __enter__(self) -> RelaySampler:
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()


def bytes_between(samples: list, region: str, t0: float, t1: float) -> tuple[float, float]:
    """(up, down) bytes a region's relay counted between wall-clock times t0 and t1 (linear
    interpolation between samples; clamped to the sampled span)."""
    ts = np.array([t for t, _ in samples])
    up = np.array([float(s[region][0]) for _, s in samples])
    down = np.array([float(s[region][1]) for _, s in samples])
    return (
        float(np.interp(t1, ts, up) - np.interp(t0, ts, up)),
        float(np.interp(t1, ts, down) - np.interp(t0, ts, down)),
    )


def rounds_span(rounds: list[dict]) -> tuple[float, float]:
    """Wall-clock span of the rounds from rounds.jsonl (`time` is each round's end, truncated to
    the second; `seconds` its length): widened by that second, so never shorter than the truth."""
    from datetime import datetime

    ends = [datetime.fromisoformat(r["time"]).timestamp() for r in rounds]
    starts = [e - float(r["seconds"]) for e, r in zip(ends, rounds, strict=True)]
    return min(starts), max(ends) + 1.0


def metered_federation(run_dir: Path, regions: dict[str, Any]) -> Any:
    """A LocalFederation whose SuperNodes each dial the Fleet API through a CountingRelay."""
    from fedfsd.deploy.federation import LocalFederation

    class MeteredFederation(LocalFederation):
        def __init__(self) -> None:
            super().__init__(run_dir, regions, tls=True)
            self.relays = {
                n: CountingRelay((self.host, self.fleet_port)).start() for n in self.regions
            }

        def supernode_argv(self, name: str) -> list[str]:
            argv = super().supernode_argv(name)
            argv[argv.index("--superlink") + 1] = f"{self.host}:{self.relays[name].port}"
            return argv

        def stop(self) -> None:
            try:
                super().stop()
            finally:
                for r in self.relays.values():
                    r.stop()

    return MeteredFederation()


# -- in-process measurements -----------------------------------------------------------------------
def wire_size(message: Any) -> tuple[int, float]:
    """Bytes and seconds to deflate a Flower 1.39 Message into the objects it sends."""
    from fedfsd.flower.message_objects import deflated_size

    t = time.perf_counter()
    size = deflated_size(message)
    return size, time.perf_counter() - t


def object_count(message: Any) -> int:
    """Flower objects a Message deflates into: each one is moved by its own Fleet API request."""
    from fedfsd.flower.message_objects import get_all_nested_objects

    return len(get_all_nested_objects(message))


def _message(content: Any, kind: str, reply_to: str = "") -> Any:
    """A Message with explicit metadata (outside a Flower run there is no task identity)."""
    from flwr.app import Message, Metadata

    md = Metadata(
        run_id=1,
        message_id=f"m{time.monotonic_ns()}",
        src_node_id=0 if not reply_to else 5,
        dst_node_id=5 if not reply_to else 0,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=time.time(),
        ttl=600,
        message_type=kind,
    )
    return Message(metadata=md, content=content)


def train_messages(
    weights: dict[str, np.ndarray], update: dict[str, np.ndarray], cfg: dict, manifest: bytes
) -> tuple[Any, Any]:
    """The train instruction and reply, with the records the ServerApp and ClientApp put in."""
    from flwr.app import MessageType, MetricRecord, RecordDict

    from fedfsd import wire

    ins = _message(RecordDict(wire.packed_records(weights, wire.CONFIG, cfg)), MessageType.TRAIN)
    reply = _message(
        RecordDict(
            {
                **wire.packed_records(update, wire.MANIFEST, {wire.MANIFEST_KEY: manifest}),
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 1, "loss": 0.5}),
            }
        ),
        MessageType.TRAIN,
        reply_to=ins.metadata.message_id,
    )
    return ins, reply


def serialisation_cost(weights: dict[str, np.ndarray], cfg: dict, reps: int) -> dict[str, float]:
    """Sizes and median deflate times of one train instruction and one train reply."""
    from fedfsd.region.egress import guard_update, make_manifest

    rng = np.random.default_rng(0)
    new = {k: v + rng.normal(0, 1e-3, v.shape).astype(np.float32) for k, v in weights.items()}
    rel = guard_update(weights, new, 1e9)
    manifest = make_manifest(region="xx", run_id="r", round_idx=1, release=rel).SerializeToString()
    ins, reply = train_messages(weights, rel.arrays, cfg, manifest)
    ins_t, rep_t = [], []
    ins_b = rep_b = 0
    for _ in range(reps):
        ins_b, t = wire_size(ins)
        ins_t.append(t)
        rep_b, t = wire_size(reply)
        rep_t.append(t)
    return {
        "train_ins_bytes": ins_b,
        "train_reply_bytes": rep_b,
        "train_ins_objects": object_count(ins),
        "train_reply_objects": object_count(reply),
        "train_ins_deflate_s": statistics.median(ins_t),
        "train_reply_deflate_s": statistics.median(rep_t),
    }


def aggregation_cost(weights: dict[str, np.ndarray], n_regions: int, reps: int) -> float:
    """Median seconds of the aggregator's per-round work: verify each update, then FedAvg."""
    from fedfsd.aggregator.strategy import FedAvgMomentum
    from fedfsd.aggregator.update_checks import Expectation, verify_update
    from fedfsd.region.egress import guard_update, make_manifest

    rng = np.random.default_rng(1)
    exp = Expectation.from_weights(weights, norm_bound=1e9, run_id="r", round_idx=1)
    ups = []
    for i in range(n_regions):
        new = {k: v + rng.normal(0, 1e-3, v.shape).astype(np.float32) for k, v in weights.items()}
        rel = guard_update(weights, new, 1e9)
        ups.append(
            (rel.arrays, make_manifest(region=f"r{i}", run_id="r", round_idx=1, release=rel))
        )
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for u, m in ups:
            assert verify_update(u, m, exp) is None
        FedAvgMomentum().step(weights, [(u, 1.0) for u, _ in ups])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def seconds_per_step(cfg: Cfg, data: dict[str, Path], work: Path, steps: int = 20) -> float:
    """Warm wall seconds of one DP step (slowest region), to size `--train-seconds` rounds."""
    from fedfsd.config import load_policy
    from fedfsd.privacy.local_round import run_local_round

    probe = replace(cfg, local_steps=steps)
    worst = 0.0
    for r, path in data.items():
        frames = load_region(path, "train")
        policy = load_policy(work / "regions" / r / "policy.toml")
        policy = policy.model_copy(update={"epsilon_budget": 1e6, "max_local_steps": steps})
        ledger = work / "step-probe" / r / "ledger.jsonl"
        w = initial_weights(frames)
        for rnd in (1, 2):  # round 1 warms imports and caches, as in the long-lived executor
            res = run_local_round(frames, policy, ledger, w, probe.request(), "probe", rnd, "mlp")
            w = res.new_weights
        worst = max(worst, float(res.record["train_seconds"]) / steps)
    return worst


def initial_weights(frames: Any) -> dict[str, np.ndarray]:
    from fedfsd.models import build_model, get_weights

    return get_weights(build_model("mlp", frames.features.shape[1], frames.labels.shape[1]))


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class Cfg:
    """Sizes of one federation-cost run."""

    regions: list[str] = field(default_factory=lambda: ["cn", "eu", "us"])
    vehicles: int = 300
    episodes: int = 40
    data_seed: int = 11
    rounds: int = 4
    local_steps: int = 200
    vehicles_per_step: int = 16
    frames_per_vehicle: int = 8
    # σ of every region is calibrated (Opacus PRV) so the whole run spends this ε, as an
    # operator would: a long round at a fixed σ would otherwise spend ε in the hundreds, and
    # the accounting of such a history alone takes tens of seconds.
    target_epsilon: float = 8.0
    noise_multiplier: float = 0.0  # the aggregator asks for none: each region's policy sets σ
    round_timeout: float = 900.0
    idle_s: float = 10.0
    evaluate_every: int = 1
    lr: float = 0.1
    train_seconds: float | None = None  # size local steps so DP training takes about this long

    def request(self) -> Any:
        from fedfsd.config import TrainRequest

        return TrainRequest(
            local_steps=self.local_steps,
            lr=self.lr,
            noise_multiplier=self.noise_multiplier,
            clip_norm=1.0,
            vehicles_per_step=self.vehicles_per_step,
            frames_per_vehicle=self.frames_per_vehicle,
        )

    def run_config(self, run_dir: Path) -> dict[str, Any]:
        return {
            "num-server-rounds": self.rounds,
            "local-steps": self.local_steps,
            "lr": self.lr,
            "noise-multiplier": self.noise_multiplier,
            "clip-norm": 1.0,
            "vehicles-per-step": self.vehicles_per_step,
            "frames-per-vehicle": self.frames_per_vehicle,
            "model": "mlp",
            "min-regions": len(self.regions),
            "round-timeout": self.round_timeout,
            "update-norm-bound": 20.0,
            "run-dir": str(run_dir),
            "run-id": "cost",
            "plot-metric": "fde",
            "evaluate-every": self.evaluate_every,
        }


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_policies(cfg: Cfg, data: dict[str, Path], work: Path) -> dict[str, Path]:
    """Each region's policy.toml: σ calibrated so `rounds` rounds spend `target_epsilon`."""
    from fedfsd.privacy.dpsgd import sample_rate

    paths = {}
    for r in cfg.regions:
        rdir = work / "regions" / r
        rdir.mkdir(parents=True, exist_ok=True)
        n = load_region(data[r], "train").n_vehicles
        q = sample_rate(cfg.vehicles_per_step, n)
        sigma = calibrate_sigma(
            cfg.target_epsilon, default_delta(n), q, cfg.rounds * cfg.local_steps
        )
        pol = make_policy(
            r,
            n_vehicles=n,
            epsilon_budget=cfg.target_epsilon,
            noise_multiplier=sigma,
            clip_norm=1.0,
            update_norm_bound=20.0,
            local_steps=cfg.local_steps,
            vehicles_per_step=cfg.vehicles_per_step,
            frames_per_vehicle=cfg.frames_per_vehicle,
        )
        paths[r] = rdir / "policy.toml"
        paths[r].write_text(policy_toml(pol))
    return paths


def run(cfg: Cfg, folder: Path, data_cache: Path) -> tuple[Cfg, dict[str, Any]]:
    """Start the federation, run the rounds, then collect logs, ledgers and byte counters.

    Returns the settings that ran (local steps are sized here when `train_seconds` is set).
    """
    from fedfsd.deploy.federation import RegionSpec

    data = {
        r: ensure_dataset(data_cache, r, cfg.vehicles, cfg.episodes, cfg.data_seed)
        for r in cfg.regions
    }
    work = folder / "work"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    policies = write_policies(cfg, data, work)
    step_s = None
    if cfg.train_seconds:
        step_s = seconds_per_step(cfg, data, work)
        steps = max(1, round(cfg.train_seconds / step_s))
        console.print(
            f"one DP step ≈ {1e3 * step_s:.1f} ms (slowest region, alone) → {steps} local steps "
            f"for ≈ {cfg.train_seconds:g} s of training per round"
        )
        cfg = replace(cfg, local_steps=steps)
        policies = write_policies(cfg, data, work)
    specs = {r: RegionSpec(data[r], policies[r], policies[r].parent / "ledger.jsonl") for r in data}
    agg = work / "aggregator"
    agg.mkdir(parents=True)
    t0 = time.monotonic()
    with metered_federation(work / "deploy", specs) as fed:
        fed.wait_connected()
        startup = time.monotonic() - t0
        idle0 = {r: fed.relays[r].snapshot() for r in cfg.regions}
        time.sleep(cfg.idle_s)  # no run yet: only polls and heartbeats cross
        before = {r: fed.relays[r].snapshot() for r in cfg.regions}
        idle = {
            r: tuple((b - a) / cfg.idle_s for a, b in zip(idle0[r], before[r], strict=True))
            for r in cfg.regions
        }
        t1 = time.monotonic()
        with RelaySampler(fed.relays) as sampler:
            fed.run(cfg.run_config(agg), timeout=cfg.rounds * (cfg.round_timeout + 60))
        run_s = time.monotonic() - t1
        after = {r: fed.relays[r].snapshot() for r in cfg.regions}
        conns = {r: fed.relays[r].connections for r in cfg.regions}
        decisions = {r: _jsonl(fed.region_dir(r) / "decisions.jsonl") for r in cfg.regions}
    ledgers = {
        r: [x for x in _jsonl(Path(specs[r].ledger_path)) if x.get("kind") == "release"]
        for r in cfg.regions
    }
    return cfg, {
        "data": data,
        "work": work,
        "step_s_probe": step_s,
        "startup_s": startup,
        "run_s": run_s,
        "bytes": {
            r: {"up": after[r][0] - before[r][0], "down": after[r][1] - before[r][1]}
            for r in cfg.regions
        },
        "connections": conns,
        "idle_bytes_per_s": idle,
        "decisions": decisions,
        "ledgers": ledgers,
        "rounds": _jsonl(agg / "rounds.jsonl"),
        "samples": sampler.samples,
    }


def _per_round(recs: list[dict], kind: str) -> list[dict]:
    return [d for d in recs if d.get("message_type") == kind]


def analyse(cfg: Cfg, res: dict[str, Any], reps: int) -> dict[str, Any]:
    """Per-round breakdown and per-region bytes (see module doc for how each is obtained)."""
    frames = load_region(res["data"][cfg.regions[0]], "train")
    weights = initial_weights(frames)
    n_params = int(sum(v.size for v in weights.values()))
    raw = 4 * n_params
    ser = serialisation_cost(weights, cfg.run_config(Path("/x")), reps)
    agg_s = aggregation_cost(weights, len(cfg.regions), reps)
    ser_s = ser["train_ins_deflate_s"] + ser["train_reply_deflate_s"]
    trains = {r: _per_round(d, "train") for r, d in res["decisions"].items()}
    evals = {r: _per_round(d, "evaluate") for r, d in res["decisions"].items()}
    # The executor does not log an evaluate task's round, so the k-th evaluate task of a region
    # belongs to the k-th round that evaluated (the one whose summary has metrics).
    ev_rounds = [int(x["round"]) for x in res["rounds"] if x.get("metrics")]
    rows = []
    for rd in res["rounds"]:
        i = int(rd["round"]) - 1
        task = {r: float(v[i]["seconds"]) for r, v in trains.items() if len(v) > i}
        training = {
            r: float(led[i].get("train_seconds", "nan"))
            for r, led in res["ledgers"].items()
            if len(led) > i
        }
        k = ev_rounds.index(i + 1) if (i + 1) in ev_rounds else None
        ev = max(
            (float(v[k]["seconds"]) for v in evals.values() if k is not None and len(v) > k),
            default=0.0,
        )
        wall = float(rd["seconds"])
        slowest_task = max(task.values(), default=float("nan"))
        train_s = max(training.values(), default=float("nan"))
        region_other = max((task[r] - training.get(r, 0.0) for r in task), default=float("nan"))
        hops = max(
            (
                float(v[i].get("pull_s", 0)) + float(v[i].get("push_s", 0))
                for v in trains.values()
                if len(v) > i
            ),
            default=float("nan"),
        )
        rows.append(
            {
                "round": rd["round"],
                "status": rd["status"],
                "round_s": wall,
                "local_training_s": train_s,
                "train_task_s": slowest_task,
                "region_other_s": region_other,
                "runtime_api_hops_s": hops,
                "serialisation_s": ser_s,
                "evaluate_task_s": ev,
                "aggregation_s": agg_s,
                "transport_waiting_s": wall - slowest_task - ev - agg_s,
                "not_training_s": wall - train_s,
                "not_training_share": 1.0 - train_s / wall,
            }
        )
    later = rows[1:] or rows  # round 1 also loads each region's dataset into its executor
    per_region = {}
    span = rounds_span(res["rounds"]) if res["rounds"] else None
    for r, b in res["bytes"].items():
        up_round, down_round = b["up"] / cfg.rounds, b["down"] / cfg.rounds
        idle_up, idle_down = res["idle_bytes_per_s"][r]
        # Outside its tasks a SuperNode polls the Fleet API twice a second; how long it waits
        # there depends on the other regions and the load of the machine, not on the messages.
        idle_s = max(
            0.0, res["run_s"] - sum(float(d.get("seconds", 0.0)) for d in res["decisions"][r])
        )
        messages_up = (b["up"] - idle_up * idle_s) / cfg.rounds
        per_region[r] = {
            "idle_up_bytes_per_s": idle_up,
            "idle_down_bytes_per_s": idle_down,
            "up_bytes_total": b["up"],
            "down_bytes_total": b["down"],
            "up_bytes_per_round": up_round,
            "down_bytes_per_round": down_round,
            "up_vs_raw_update": up_round / raw,
            "down_vs_raw_model": down_round / raw,
            "tcp_connections": res["connections"][r],
            "tasks": len(res["decisions"][r]),
            "outside_tasks_s": idle_s,
            "up_without_idle_polls_per_round": messages_up,
            "up_without_idle_polls_vs_raw": messages_up / raw,
        }
        if span is not None and len(res.get("samples", [])) > 1:
            up_in, down_in = bytes_between(res["samples"], r, *span)
            per_region[r].update(
                {
                    "rounds_span_s": span[1] - span[0],
                    "up_in_rounds_per_round": up_in / len(res["rounds"]),
                    "up_in_rounds_vs_raw": up_in / len(res["rounds"]) / raw,
                    "down_in_rounds_vs_raw": down_in / len(res["rounds"]) / raw,
                }
            )
    privacy = {
        r: {
            "sigma": led[-1]["noise_multiplier"],
            "q": led[-1]["sample_rate"],
            "steps_per_round": led[-1]["steps"],
            "epsilon_spent": led[-1]["epsilon_prv"],
            "epsilon_budget": led[-1]["epsilon_budget"],
        }
        for r, led in res["ledgers"].items()
        if led
    }
    return {
        "n_params": n_params,
        "raw_update_bytes": raw,
        "privacy": privacy,
        "serialisation": ser,
        "aggregation_s": agg_s,
        "step_s_probe": res["step_s_probe"],
        "rounds": rows,
        "not_training_share_median": statistics.median(r["not_training_share"] for r in later),
        "not_training_s_median": statistics.median(r["not_training_s"] for r in later),
        "local_training_s_median": statistics.median(r["local_training_s"] for r in later),
        "bytes": per_region,
        "up_vs_raw_max": max(v["up_vs_raw_update"] for v in per_region.values()),
        "up_without_idle_polls_vs_raw_max": max(
            v["up_without_idle_polls_vs_raw"] for v in per_region.values()
        ),
        "up_in_rounds_vs_raw_max": max(
            (v["up_in_rounds_vs_raw"] for v in per_region.values() if "up_in_rounds_vs_raw" in v),
            default=float("nan"),
        ),
        "startup_s": res["startup_s"],
        "run_s": res["run_s"],
    }


def plot(doc: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rounds"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(rows))
    for r in rows:  # stack: training, rest of the train task, evaluate, aggregate, transport
        r["_task_rest"] = r["train_task_s"] - r["local_training_s"]
    parts = [
        ("local_training_s", "DP training (region ledgers)"),
        ("_task_rest", "rest of the train task (accounting, (de)serialise, runtime hops)"),
        ("evaluate_task_s", "evaluate task"),
        ("aggregation_s", "verify + FedAvg"),
        ("transport_waiting_s", "transport + waiting"),
    ]
    bottom = np.zeros(len(rows))
    for key, label in parts:
        vals = np.array([max(0.0, r[key]) for r in rows])
        ax1.bar(x, vals, bottom=bottom, label=label)
        bottom += vals
    ax1.set_xticks(x, [str(r["round"]) for r in rows])
    ax1.set_xlabel("round")
    ax1.set_ylabel("seconds")
    ax1.set_title("round wall time, broken down")
    ax1.legend(fontsize=8)
    regions = list(doc["bytes"])
    up = [doc["bytes"][r]["up_bytes_per_round"] / 1e3 for r in regions]
    down = [doc["bytes"][r]["down_bytes_per_round"] / 1e3 for r in regions]
    xr = np.arange(len(regions))
    ax2.bar(xr - 0.2, up, 0.4, label="region → aggregator (TLS)")
    ax2.bar(xr + 0.2, down, 0.4, label="aggregator → region (TLS)")
    ax2.axhline(doc["raw_update_bytes"] / 1e3, color="k", ls="--", label="raw update (float32)")
    ax2.axhline(1.1 * doc["raw_update_bytes"] / 1e3, color="k", ls=":", label="1.1 × raw")
    ax2.set_xticks(xr, regions)
    ax2.set_ylabel("kB per round")
    ax2.set_title("bytes per region per round")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_tables(doc: dict[str, Any]) -> None:
    cols = [
        "round",
        "wall s",
        "DP training s",
        "train task s",
        "runtime hops s",
        "evaluate s",
        "aggregate s",
        "transport+wait s",
        "not training s",
        "not training",
    ]
    rows = [
        [
            r["round"],
            r["round_s"],
            r["local_training_s"],
            r["train_task_s"],
            r["runtime_api_hops_s"],
            r["evaluate_task_s"],
            r["aggregation_s"],
            r["transport_waiting_s"],
            r["not_training_s"],
            f"{100 * r['not_training_share']:.1f}%",
        ]
        for r in doc["rounds"]
    ]
    console.print(rich_table("round time (TLS, loopback)", cols, rows))
    brow = [
        [
            r,
            v["up_bytes_per_round"],
            v["down_bytes_per_round"],
            doc["raw_update_bytes"],
            f"{v['up_vs_raw_update']:.3f}×",
            f"{v.get('up_in_rounds_vs_raw', float('nan')):.3f}×",
            f"{v['up_without_idle_polls_vs_raw']:.3f}×",
            f"{v['down_vs_raw_model']:.3f}×",
            v["idle_up_bytes_per_s"],
            v["outside_tasks_s"],
            v["tcp_connections"],
        ]
        for r, v in doc["bytes"].items()
    ]
    console.print(
        rich_table(
            "bytes per region per round (counted on a TCP relay; TLS records incl. polls)",
            [
                "region",
                "up B/round",
                "down B/round",
                "raw update B",
                "up/raw",
                "up/raw in rounds",
                "up/raw w/o idle polls",
                "down/raw",
                "idle up B/s",
                "s outside tasks",
                "TCP conns",
            ],
            brow,
        )
    )
    s = doc["serialisation"]
    console.print(
        f"serialised train instruction {s['train_ins_bytes']} B in {s['train_ins_objects']} "
        f"objects, reply {s['train_reply_bytes']} B in {s['train_reply_objects']} objects "
        f"(raw update {doc['raw_update_bytes']} B, {doc['n_params']} float32 params); "
        f"rounds after the first: median DP training {doc['local_training_s_median']:.1f} s, "
        f"not training {doc['not_training_s_median']:.2f} s = "
        f"{100 * doc['not_training_share_median']:.1f}% of the round (target ≤ 10%); "
        f"uplink ≤ {doc['up_vs_raw_max']:.3f}× the raw update per round of the whole run "
        f"(target ≤ 1.1×), ≤ {doc['up_in_rounds_vs_raw_max']:.3f}× within the rounds' own time, "
        f"{doc['up_without_idle_polls_vs_raw_max']:.3f}× without the idle polls between tasks"
    )


SIZES: dict[str, dict[str, Any]] = {
    # The setting: about a minute of DP training per round. Every 5th round (here only
    # the last) also runs the evaluate exchange, so the table shows rounds with and without it.
    # 1500 steps ≈ 60 s per region on the 2-core machine with 3 regions training at once
    # (alone, one step takes ~14 ms; concurrently ~40 ms). On other machines use
    # --train-seconds, which sizes steps from a probe of one region training alone.
    "full": {"rounds": 5, "vehicles_per_step": 64, "local_steps": 1500, "evaluate_every": 5},
    "quick": {
        "vehicles": 120,
        "episodes": 12,
        "rounds": 3,
        "vehicles_per_step": 32,
        "train_seconds": 15.0,
        "evaluate_every": 3,
    },
    "tiny": {
        "vehicles": 6,
        "episodes": 2,
        "rounds": 2,
        "local_steps": 2,
        "vehicles_per_step": 2,
        "regions": ["eu", "us"],
        "round_timeout": 120.0,
        "idle_s": 3.0,
    },
}


def main(
    quick: bool = typer.Option(False, help="a few minutes on 2 cores"),
    tiny: bool = typer.Option(False, help="tiny fleets and 2 steps: a smoke test only"),
    out: str = typer.Option(None, help="output folder (default experiments/out/federation_cost)"),
    data: str = typer.Option(str(DATA_CACHE), help="cache of generated fleet datasets"),
    rounds: int = typer.Option(None, help="rounds (overrides the size preset)"),
    local_steps: int = typer.Option(None, help="local DP steps per round (fixed; no sizing)"),
    train_seconds: float = typer.Option(
        None, help="size local steps so DP training takes about this long per round"
    ),
    vehicles_per_step: int = typer.Option(None, help="expected vehicles per DP step"),
    evaluate_every: int = typer.Option(None, help="aggregator evaluates after every k-th round"),
    reps: int = typer.Option(20, help="repetitions of the in-process timings"),
) -> None:
    """Run the federation, print the tables, write federation_cost.json and .png."""
    preset = sized_preset(
        SIZES,
        quick,
        tiny,
        rounds=rounds,
        local_steps=local_steps,
        train_seconds=train_seconds,
        vehicles_per_step=vehicles_per_step,
        evaluate_every=evaluate_every,
    )
    if reps < 1:
        bad_option("--reps must be ≥ 1")
    if local_steps is not None:
        preset["train_seconds"] = None  # explicit steps win over sizing by time
    cfg = Cfg(**preset)
    folder = out_dir("federation_cost", out)
    cfg, res = run(cfg, folder, Path(data))
    doc = {"config": asdict(cfg), "machine": machine(), **analyse(cfg, res, reps)}
    doc["notes"] = [
        "round wall: aggregator rounds.jsonl; task times: region executors' decisions.jsonl "
        "(pull_s / app_s / push_s); DP training: train_seconds of each region's ledger release",
        "not training = round wall − slowest region's DP training; the share is of the round wall",
        "serialisation (Flower inflatable-object deflate) and aggregation (verify_update + FedAvg) "
        "timed in this process with the same model and settings",
        "transport + waiting = round wall − slowest train task − slowest evaluate task − "
        "aggregation",
        "bytes: counting TCP relay per region in front of the Fleet API (TLS payload, polls and "
        "heartbeats included); per round = run total / rounds",
        "up in rounds: relay counters sampled every 0.25 s, bytes between the first round's "
        "start and the last round's end (rounds.jsonl, widened by its 1 s resolution) / rounds: "
        "leaves out the ServerApp's start and the run's end, when regions only poll",
        "up w/o idle polls (an estimate): run total − idle up rate × the run's seconds outside "
        "the region's tasks (run wall − Σ task seconds in decisions.jsonl), / rounds; the idle "
        "rate is measured before the run (polls + heartbeats), heartbeats during tasks stay in",
        f"{len(cfg.regions)} regions share this machine's {machine()['cpus_visible']} cores, so "
        "regions train concurrently and slow each other",
    ]
    write_json(folder / "federation_cost.json", doc)
    plot(doc, folder / "federation_cost.png")
    print_tables(doc)
    console.print(f"wrote {folder / 'federation_cost.json'} and {folder / 'federation_cost.png'}")


if __name__ == "__main__":
    typer.run(main)
