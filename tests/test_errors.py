"""One error type (issue 13, finding 2): border-safe reasons by class, one exit code per input."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from typer.testing import CliRunner

import fedfsd
from fedfsd import wire
from fedfsd.aggregator.server_app import initial_weights
from fedfsd.aggregator.settings import RunSettings
from fedfsd.cli import app as cli
from fedfsd.errors import ExitCode, FedfsdError, border_reason, exit_code
from fedfsd.region.client_app import default_deps, make_client_app

SETTINGS = RunSettings(**{"local-steps": 1, "vehicles-per-step": 4, "frames-per-vehicle": 4})
SIM = {"partition-id": 0, "num-partitions": 1}


def _train(w: dict[str, np.ndarray] | None, **cfg: object) -> Message:
    md = Metadata(
        run_id=1,
        message_id=f"m{time.monotonic_ns()}",
        src_node_id=0,
        dst_node_id=5,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600,
        message_type="train",
    )
    config = {**SETTINGS.train_request(), "run-id": "run-e", "round": 1, **cfg}
    if w is None:
        content = RecordDict({wire.CONFIG: ConfigRecord(config)})
    else:
        content = RecordDict(wire.packed_records(w, wire.CONFIG, config))
    return Message(metadata=md, content=content)


def _reason(reply: Message) -> str:
    raw = reply.content.config_records[wire.MANIFEST][wire.MANIFEST_KEY]
    return wire.manifest_from_bytes(raw).refused_reason


def _ctx() -> Context:
    return Context(run_id=1, node_id=5, node_config=SIM, state=RecordDict(), run_config={})


def test_a_bugs_key_error_is_an_internal_error_not_a_bad_request(tmp_path: Path) -> None:
    weights = initial_weights(SETTINGS)
    deps = default_deps()
    real_round = deps.local_round

    def buggy_round(*args: object, **kw: object) -> object:
        res = real_round(*args, **kw)
        res.new_weights["a-layer-the-model-does-not-have"]  # the bug: a wrong key
        return res

    deps.local_round = buggy_round
    sim = {"sim-vehicles": 20, "sim-frames": 4, "sim-ledger-dir": str(tmp_path)}
    app = make_client_app(sim, deps)
    reply = app(_train(weights), _ctx())
    assert not reply.content.array_records
    assert _reason(reply) == "internal error"
    # the sender's own mistakes are still named as such
    assert _reason(app(_train(None), _ctx())) == "bad train request"
    assert _reason(app(_train(weights, **{"local-steps": -1}), _ctx())) == "bad train request"
    assert border_reason(KeyError("x")) == "internal error" and exit_code(KeyError("x")) == 1


def _fedfsd_exceptions() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for mod in pkgutil.walk_packages(fedfsd.__path__, "fedfsd."):
        if ".proto" in mod.name:
            continue
        module = importlib.import_module(mod.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("fedfsd."):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return list(found.values())


def test_every_fedfsd_exception_derives_from_fedfsd_error() -> None:
    classes = _fedfsd_exceptions()
    names = {c.__name__ for c in classes}
    assert {"PolicyError", "BudgetExceeded", "LedgerError", "EgressRefused"} <= names
    stray = sorted(c.__name__ for c in classes if not issubclass(c, FedfsdError))
    assert stray == [], f"exceptions outside fedfsd.errors' hierarchy: {stray}"


BAD_POLICY = """
region = "eu"
epsilon_budget = 8.0
delta = -1
min_noise_multiplier = 0.8
max_clip_norm = 1.0
update_norm_bound = 5.0
"""


def test_the_same_bad_policy_exits_2_from_both_region_commands(tmp_path: Path) -> None:
    pol = tmp_path / "eu.toml"
    pol.write_text(BAD_POLICY)
    led = str(tmp_path / "eu.jsonl")
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    runner = CliRunner()
    local = runner.invoke(
        cli,
        ["region", "train-local", "--synthetic", "20", "--policy", str(pol), "--ledger", led,
         "--steps", "1"],
    )  # fmt: skip
    start = runner.invoke(
        cli,
        ["region", "start", "--superlink", "127.0.0.1:1", "--insecure", "--policy", str(pol),
         "--data", str(data), "--ledger", led],
    )  # fmt: skip
    for res in (local, start):
        assert res.exit_code == ExitCode.USAGE == 2, res.output
        assert "error:" in res.output and "delta" in res.output and "Traceback" not in res.output
    assert not Path(led).exists()


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["privacy", "ledger", "show", "{tmp}/missing.jsonl"], ExitCode.USAGE),
        ("privacy epsilon --noise-multiplier 1 --sample-rate 2 --steps 1 --delta 1e-5".split(),
         ExitCode.USAGE),
    ],
    ids=["missing-ledger", "bad-sample-rate"],
)  # fmt: skip
def test_bad_input_is_exit_2_everywhere(tmp_path: Path, argv: list[str], code: int) -> None:
    res = CliRunner().invoke(cli, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert res.exit_code == code, res.output
    assert res.output.count("error:") == 1
